"""Codebook-usage (entropy) regulariser for the codebook quantizers, in the style of MAGVIT-2's entropy loss.

Every latent vector z_i gets a soft assignment over the K codes, ``p_i = softmax(-d_i / (T s))``, from its
squared distances ``d_ik = ||z_i - e_k||^2``. The regulariser is

    per_sample + batch_weight * (log K - batch),  per_sample = mean_i H(p_i),  batch = H(mean_i p_i)

Minimising ``per_sample`` makes each assignment confident (the latent sits near one code, not between many);
maximising ``batch`` spreads the batch over the whole codebook. ``log K`` is the largest ``batch`` can be, so
both parts are >= 0 and 0 is the ideal (the constant changes no gradient).

Scale: ``s`` is the batch's mean squared distance to the nearest code (the quantisation error, detached), so
the temperature T is relative to it and means the same whatever the latents' magnitude and dimension: a code
whose squared distance exceeds the nearest one's by ``s`` gets ``exp(-1 / T)`` times its probability.

Gradients flow to the latents (through ``code_dim`` projections and l2-normalisation) and to the codes when they
are parameters ("plain"); the EMA codebook learns by its averages only. They scale as 1 / (T s), so they grow as
the codebook fits the latents: the regulariser's weight is small next to the reconstruction loss's (see
``CodebookTrainingConfig.entropy_weight``). Under DDP each process regularises its own batch's assignments.

Memory: the (N, K) soft assignments are computed in blocks of rows of at most ``_ENTROPY_CHUNK_ELEMENTS``
entries; with more than one block, each block is recomputed in the backward pass (activation checkpointing)
rather than kept, so the memory stays bounded whatever N and K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vqtok.model.quantizers.search import _rows_per_chunk

# Entries of one (rows x K) block of soft assignments: K = 8,192 codes, 2,048 vectors (a batch of 32 crops of
# 64 px at f = 8) is one block; the backward pass of a block holds a few such arrays (about 64 MiB each).
_ENTROPY_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class EntropyTerms:
    """The two entropies of a batch's soft assignments, in nats, both differentiable scalars.

    Attributes:
      per_sample: mean over the vectors of H(p_i), in [0, log K].
      batch: H(mean_i p_i), the entropy of the batch's mean assignment, in [0, log K].
    """

    per_sample: torch.Tensor
    batch: torch.Tensor

    def loss(self, num_codes: int, batch_weight: float) -> torch.Tensor:
        """``per_sample + batch_weight * (log K - batch)``: >= 0, 0 for confident assignments over every code."""
        return self.per_sample + batch_weight * (math.log(num_codes) - self.batch)


def nearest_sq_distance_mean(flat: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each row to its nearest code, detached: (N, C), (N, C) -> scalar.

    ``nearest`` holds the code each row was assigned (the search's choice), so this is the quantisation error.
    """
    return (flat.detach() - nearest.detach()).pow(2).sum(dim=1).mean()


def _block_sums(flat: torch.Tensor, codebook: torch.Tensor, inverse_scale: torch.Tensor) -> torch.Tensor:
    """Sum of the rows' entropies and of their soft assignments for one block of rows.

    Args:
      flat: (n, C) float32 latents (differentiable).
      codebook: (K, C) float32 codes (differentiable for gradient-trained codebooks).
      inverse_scale: scalar, 1 / (T s).

    Returns:
      (K + 1,): entries 0..K-1 are sum_i p_ik, entry K is sum_i H(p_i). One tensor, so that activation
      checkpointing recomputes the block once for both.
    """
    # -||z - e||^2 = -||z||^2 + 2 z.e - ||e||^2; -||z||^2 is the same for every code of a row and softmax is
    # shift-invariant per row, so the logits leave it out: one matrix product, no cancellation.
    logits = torch.addmm(-codebook.pow(2).sum(dim=1), flat, codebook.t(), alpha=2.0) * inverse_scale  # (n, K)
    log_p = F.log_softmax(logits, dim=1)  # stable for any spread of distances
    p = log_p.exp()
    entropy = -(p * log_p).sum()  # sum_i H(p_i); p = 0 gives 0 * finite = 0
    return torch.cat([p.sum(dim=0), entropy.unsqueeze(0)])


def entropy_terms(flat: torch.Tensor, codebook: torch.Tensor, temperature: float, distance_scale: torch.Tensor,
                  chunk_elements: int = _ENTROPY_CHUNK_ELEMENTS) -> EntropyTerms:
    """Per-sample and batch entropies of the soft assignments of ``flat`` over ``codebook``, in float32.

    Args:
      flat: (N, C) latents in the search space; gradients flow to them.
      codebook: (K, C) codes; gradients flow to them when they require it (the EMA codebook does not).
      temperature: T > 0, relative to ``distance_scale``.
      distance_scale: scalar s > 0 (detached), e.g. ``nearest_sq_distance_mean``: distances are divided by T s.
      chunk_elements: at most this many (row, code) entries per block.

    Returns:
      ``EntropyTerms``; see the module docstring.
    """
    flat, codebook = flat.float(), codebook.float()
    n, k = flat.shape[0], codebook.shape[0]
    # 1 / (T s): a floor on s keeps latents that sit exactly on their codes finite (the softmax is then one-hot).
    inverse_scale = 1.0 / (temperature * distance_scale.detach().float().clamp_min(1e-12))
    rows = _rows_per_chunk(k, chunk_elements)
    if rows >= n:  # one block: nothing to save by recomputing it
        sums = _block_sums(flat, codebook, inverse_scale)
    else:
        # Each block is recomputed in the backward pass instead of keeping its (rows, K) arrays.
        sums = torch.stack([checkpoint(_block_sums, flat[start : start + rows], codebook, inverse_scale,
                                       use_reentrant=False, preserve_rng_state=False)
                            for start in range(0, n, rows)]).sum(dim=0)
    mean_p = sums[:k] / n  # (K,) the batch's mean soft assignment
    # xlogy would give an infinite gradient where a mean probability underflows to 0; the floor keeps it finite.
    batch = -(mean_p * mean_p.clamp_min(1e-30).log()).sum()
    return EntropyTerms(per_sample=sums[k] / n, batch=batch)
