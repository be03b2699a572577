"""Vector quantizers: map continuous latents to the nearest of K codebook vectors.

Two codebook learning rules, as in Sonnet's ``vqvae.py``:

- ``VectorQuantizer``: the codebook is a parameter learned by gradient through the codebook loss
  ``||sg[z] - e||^2``; the encoder gets the commitment loss ``beta * ||z - sg[e]||^2``.
- ``VectorQuantizerEMA``: the codebook is the exponential moving average of the encoder outputs
  assigned to each code (cluster sums / Laplace-smoothed cluster sizes); only the commitment loss
  reaches the encoder.

Both search the nearest code in float32 by ``argmin ||z||^2 + ||e||^2 - 2 z.e`` (chunked, never an
N x K one-hot matrix), look vectors up by index, pass gradients straight through, report perplexity
and codes used, and keep the codebook healthy: a code unused for ``dead_code_window`` training
steps is re-seeded from the current batch's encoder outputs, and the codebook can start from
k-means on the first batch. Every statistic that changes the codebook goes through the quantizer's
``reducer`` (all-reduced, or broadcast from rank 0): under DDP the trainer injects one backed by
``torch.distributed``, so that every rank holds the same codebook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Rows of the (rows x K) distance matrix computed at once: bounds the search's extra memory
# to about _DISTANCE_CHUNK_ELEMENTS floats whatever N is.
_DISTANCE_CHUNK_ELEMENTS = 1 << 24


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    Attributes:
      quantized: (B, D, H, W) nearest codebook vectors; gradients pass straight through to the input.
      loss: scalar, the quantizer's loss term (codebook + commitment, or commitment alone for EMA).
      perplexity: scalar, exp(entropy) of the code distribution in the batch: K when all codes are
        used equally, 1 when one code takes everything.
      codes_used: scalar long, the number of distinct codes in the batch.
      indices: (B, H, W) long, the code index of every latent position.
      counts: (K,) float, how many latents chose each code (summed over ranks under DDP).
    """

    quantized: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    codes_used: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class Reducer:
    """How a quantizer combines its statistics across processes (injected, as vector-quantize-pytorch's
    ``all_reduce_fn``): single-process code and tests never touch distributed state.

    Attributes:
      all_reduce_sum: sums a tensor over ranks in place and returns it.
      broadcast_from_rank0: overwrites a tensor with rank 0's copy in place and returns it.
    """

    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _unchanged
    broadcast_from_rank0: Callable[[torch.Tensor], torch.Tensor] = _unchanged


SINGLE_PROCESS = Reducer()  # one process: nothing to combine


def nearest_code(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook vector for every row.

    Args:
      flat: (N, D) vectors, any float dtype (computed in float32).
      codebook: (K, D) codebook.

    Returns:
      (N,) long indices in [0, K).
    """
    # Callers may be under autocast (bf16 encoders): the distances must not be, or near-ties flip.
    with torch.autocast(device_type=flat.device.type, enabled=False):
        return _nearest_code_fp32(flat, codebook)


def _nearest_code_fp32(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    flat = flat.float()
    codebook = codebook.float()
    # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e; ||z||^2 is the same for every code of a row,
    # so it cannot change the argmin and is left out.
    codebook_sq = codebook.pow(2).sum(dim=1)  # (K,)
    rows_per_chunk = max(1, _DISTANCE_CHUNK_ELEMENTS // codebook.shape[0])
    indices = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], rows_per_chunk):
        chunk = flat[start : start + rows_per_chunk]
        # addmm: codebook_sq (broadcast over rows) - 2 * chunk @ codebook^T, in one kernel.
        distances = torch.addmm(codebook_sq, chunk, codebook.t(), beta=1.0, alpha=-2.0)
        indices[start : start + chunk.shape[0]] = distances.argmin(dim=1)
    return indices


def perplexity_of(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the distribution ``counts / counts.sum()``; (K,) -> scalar."""
    probs = counts / counts.sum().clamp_min(1.0)
    # 0 * log 0 is taken as 0: xlogy does exactly that.
    return torch.exp(-torch.special.xlogy(probs, probs).sum())


def kmeans_plus_plus(flat: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """k-means++ seeding: (N, D) -> (num_clusters, D) rows, each drawn with probability ~ its squared
    distance to the nearest centre chosen so far (spreads the centres over the data)."""
    n = flat.shape[0]
    chosen = [int(torch.randint(0, n, (1,), device=flat.device))]
    nearest_sq = (flat - flat[chosen[0]]).pow(2).sum(dim=1)  # (N,) squared distance to the closest centre
    for _ in range(num_clusters - 1):
        total = nearest_sq.sum()
        if float(total) <= 0:  # fewer distinct rows than clusters: repeat rows
            pick = int(torch.randint(0, n, (1,), device=flat.device))
        else:
            pick = int(torch.multinomial(nearest_sq / total, 1))
        chosen.append(pick)
        nearest_sq = torch.minimum(nearest_sq, (flat - flat[pick]).pow(2).sum(dim=1))
    return flat[torch.tensor(chosen, device=flat.device)].clone()


def kmeans(flat: torch.Tensor, num_clusters: int, iters: int) -> torch.Tensor:
    """Lloyd's k-means from k-means++ seeds. (N, D) float32 -> (num_clusters, D) centres.

    An empty cluster keeps its previous centre.
    """
    centres = kmeans_plus_plus(flat, num_clusters)
    for _ in range(iters):
        assign = nearest_code(flat, centres)
        counts = torch.bincount(assign, minlength=num_clusters).float()
        sums = torch.zeros_like(centres).index_add_(0, assign, flat)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


class _QuantizerBase(nn.Module):
    """Shared search, lookup, statistics and codebook health. Subclasses own the codebook storage."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float,
        dead_code_window: int = 0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.dead_code_window = dead_code_window
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        # Training steps since each code was last chosen (by any rank).
        self.register_buffer("steps_since_used", torch.zeros(num_embeddings, dtype=torch.long))
        # Whether the codebook has been initialised from data (k-means); True when kmeans_init is off.
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.restarts_total = 0  # codes re-seeded so far in this process (for logging)
        self.reducer = SINGLE_PROCESS  # the trainer injects a torch.distributed one under DDP

    # --- codebook storage, provided by subclasses -------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) codebook vectors."""
        raise NotImplementedError

    def _set_codes(self, code_ids: torch.Tensor, vectors: torch.Tensor) -> None:
        """Overwrite codes ``code_ids`` (M,) with ``vectors`` (M, D)."""
        raise NotImplementedError

    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """Learning rule applied after the search in training mode (EMA only)."""

    def _losses(self, inputs: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _rarely_used(self) -> torch.Tensor | None:
        """(K,) bool: codes used too rarely to keep, besides the unused ones (EMA only)."""
        return None

    # --- public API --------------------------------------------------------------------------------
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of ``indices``: (...) long -> (..., D) float32."""
        return F.embedding(indices, self.codebook)

    def quantize_indices(self, inputs: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices only: (B, D, H, W) -> (B, H, W) long. Never changes the codebook."""
        b, d, h, w = inputs.shape
        flat = inputs.permute(0, 2, 3, 1).reshape(-1, d)
        return nearest_code(flat, self.codebook).view(b, h, w)

    def forward(self, inputs: torch.Tensor) -> QuantizerOutput:
        """Quantize (B, D, H, W) latents; see ``QuantizerOutput``. In float32 even under autocast."""
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            return self._forward_fp32(inputs.float())

    def _forward_fp32(self, inputs: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = inputs.shape
        if d != self.embedding_dim:
            raise ValueError(f"quantizer expects {self.embedding_dim} channels, got {d}")
        flat = inputs.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D), N = B*H*W
        detached = flat.detach()
        if self.training and not bool(self.initialized):
            self._kmeans_initialise(detached)

        with torch.no_grad():
            indices = nearest_code(detached, self.codebook)  # (N,)
            counts = torch.bincount(indices, minlength=self.num_embeddings).float()
            if self.training:
                self.reducer.all_reduce_sum(counts)  # the codebook statistics are global under DDP
        # Vectors are looked up before this step's codebook update, as in Sonnet.
        quantized = self.lookup(indices).view(b, h, w, d).permute(0, 3, 1, 2)
        loss = self._losses(inputs, quantized)
        if self.training:
            with torch.no_grad():
                self._update_codebook(detached, indices, counts)
                self._restart_dead_codes(detached, counts)
        if inputs.requires_grad:
            # Straight-through estimator: forward the code vectors, backward the identity to the encoder.
            quantized = inputs + (quantized - inputs).detach()
        return QuantizerOutput(
            quantized=quantized.contiguous(),
            loss=loss,
            perplexity=perplexity_of(counts),
            codes_used=(counts > 0).sum(),
            indices=indices.view(b, h, w),
            counts=counts,
        )

    # --- codebook health ---------------------------------------------------------------------------
    def _kmeans_initialise(self, flat: torch.Tensor) -> None:
        """Set the codebook to k-means centres of rank 0's first batch (broadcast to every rank)."""
        with torch.no_grad():
            centres = kmeans(flat.float(), self.num_embeddings, self.kmeans_iters)
            self.reducer.broadcast_from_rank0(centres)
            self._set_codes(torch.arange(self.num_embeddings, device=flat.device), centres)
            self.initialized.fill_(True)

    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        """Re-seed codes unused for ``dead_code_window`` steps (or too rarely used, see ``_rarely_used``)
        from random rows of ``flat`` (N, D)."""
        used = counts > 0
        self.steps_since_used.add_(1).masked_fill_(used, 0)
        if self.dead_code_window <= 0:
            return
        dead_mask = self.steps_since_used >= self.dead_code_window
        rare = self._rarely_used()
        if rare is not None:
            dead_mask |= rare
        dead = dead_mask.nonzero().squeeze(1)
        if dead.numel() == 0:  # counts and EMA statistics are global, so every rank agrees on this
            return
        # Fresh vectors for the dead codes: random encoder outputs of this batch, chosen on rank 0.
        picks = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        vectors = self.reducer.broadcast_from_rank0(flat[picks].float().contiguous())
        self._set_codes(dead, vectors)
        self.steps_since_used[dead] = 0
        self.restarts_total += int(dead.numel())


class VectorQuantizer(_QuantizerBase):
    """Codebook learned by gradient (van den Oord et al. 2017).

    Args:
      num_embeddings: K, the number of codes.
      embedding_dim: D, the size of one code.
      commitment_cost: beta, weight of ``||z - sg[e]||^2``.
      dead_code_window, kmeans_init, kmeans_iters: codebook health, see ``_QuantizerBase``.

    The codebook starts uniform in [-1/K, 1/K]. Loss: ``||sg[z] - e||^2 + beta ||z - sg[e]||^2``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float, **health: object) -> None:
        super().__init__(num_embeddings, embedding_dim, commitment_cost, **health)  # type: ignore[arg-type]
        self.embedding = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim).uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)
        )

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding

    def _set_codes(self, code_ids: torch.Tensor, vectors: torch.Tensor) -> None:
        self.embedding.data[code_ids] = vectors.to(self.embedding.dtype)

    def _losses(self, inputs: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        codebook_loss = F.mse_loss(quantized, inputs.detach())  # moves codes towards encoder outputs
        commitment_loss = F.mse_loss(inputs, quantized.detach())  # keeps the encoder near its codes
        return codebook_loss + self.commitment_cost * commitment_loss


class VectorQuantizerEMA(_QuantizerBase):
    """Codebook learned by exponential moving averages (van den Oord et al. 2017, appendix A.1).

    Args:
      num_embeddings: K, the number of codes.
      embedding_dim: D, the size of one code.
      commitment_cost: beta, weight of ``||z - sg[e]||^2`` (the only loss term).
      decay: gamma, EMA decay of the cluster sizes and sums.
      epsilon: Laplace smoothing of the cluster sizes, so no code divides by zero.
      dead_code_threshold: a code whose EMA cluster size falls below this (vectors per step) is
        re-seeded like a dead one; a re-seeded code gets ``dead_code_window`` steps of grace.
      dead_code_window, kmeans_init, kmeans_iters: codebook health, see ``_QuantizerBase``.

    Per training step, after the nearest-code search, with n_i codes chosen and s_i their sum:
      N_i <- gamma N_i + (1 - gamma) n_i;  m_i <- gamma m_i + (1 - gamma) s_i
      e_i  = m_i / N~_i,  N~_i = (N_i + eps) / (sum_j N_j + K eps) * sum_j N_j.
    Nothing changes in eval mode.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        dead_code_threshold: float = 0.0,
        **health: object,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, commitment_cost, **health)  # type: ignore[arg-type]
        self.decay = decay
        self.epsilon = epsilon
        self.dead_code_threshold = dead_code_threshold
        # Cluster size a re-seeded code starts from: one vector, or enough that, unused, it decays to the
        # threshold only after dead_code_window steps (c * decay^window = threshold).
        self.reseed_cluster_size = max(1.0, dead_code_threshold / decay ** max(self.dead_code_window, 1))
        initial = torch.randn(num_embeddings, embedding_dim)  # the seed's normal init
        self.register_buffer("embedding", initial.clone())
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_embedding_sum", initial.clone())

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding

    def _set_codes(self, code_ids: torch.Tensor, vectors: torch.Tensor) -> None:
        # A re-seeded code counts as c vectors at `vectors`: e = m / N stays `vectors` until it is used.
        self.embedding[code_ids] = vectors
        self.ema_embedding_sum[code_ids] = vectors * self.reseed_cluster_size
        self.ema_cluster_size[code_ids] = self.reseed_cluster_size

    def _rarely_used(self) -> torch.Tensor | None:
        if self.dead_code_threshold <= 0:
            return None
        return self.ema_cluster_size < self.dead_code_threshold

    def _losses(self, inputs: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return self.commitment_cost * F.mse_loss(inputs, quantized.detach())

    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_embedding_sum).index_add_(0, indices, flat.float())  # (K, D)
        self.reducer.all_reduce_sum(sums)  # counts arrive already summed over ranks
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_embedding_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.ema_cluster_size.sum()
        # Laplace smoothing: every cluster size > 0, and the sizes still sum to `total`.
        smoothed = (self.ema_cluster_size + self.epsilon) / (total + self.num_embeddings * self.epsilon) * total
        self.embedding.copy_(self.ema_embedding_sum / smoothed.unsqueeze(1))
