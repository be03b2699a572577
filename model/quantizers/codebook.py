"""Codebook quantizers: map latents to the nearest of K learned code vectors.

Two learning rules, as in Sonnet's ``vqvae.py``:

- ``VectorQuantizer``: the codebook is a parameter learned by gradient through the codebook loss
  ``||sg[z] - e||^2``; the encoder gets the commitment loss ``beta * ||z - sg[e]||^2``.
- ``VectorQuantizerEMA``: the codebook is the exponential moving average of the encoder outputs
  assigned to each code (cluster sums / Laplace-smoothed cluster sizes); only the commitment loss
  reaches the encoder.

Both take two options from ViT-VQGAN (Yu et al. 2022) and LlamaGen:

- ``code_dim`` > 0: factorised codes. A learned linear map ``project_in`` (D -> code_dim) runs before the
  search and ``project_out`` (code_dim -> D) after the lookup; the codebook is (K, code_dim).
- ``l2_normalize``: the (projected) latents and the codes are unit vectors, so the nearest code is the one
  of highest cosine similarity; the losses compare the normalised vectors.

With both off the quantizer is the seed's: same math, same state-dict keys.

Both can add a codebook-usage (entropy) regulariser to their loss in training (``entropy_weight`` > 0; see
``quantizers.entropy``): confident soft assignments of each latent, spread over the whole codebook in the batch.

Both search in float32 (chunked, never an N x K one-hot matrix), look vectors up by index, pass gradients
straight through, report perplexity and codes used, and keep the codebook healthy: a code unused for
``dead_code_window`` training steps is re-seeded from the current batch's (projected) latents, and the
codebook can start from k-means (``initialise_codebook``, on many batches gathered by the trainer, or on the
first training batch as a fallback). Every statistic that changes the codebook goes through the quantizer's
``reducer`` (all-reduced, or broadcast from rank 0), so that every DDP rank holds the same codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.model.quantizers.base import Quantizer, QuantizerOutput
from vqtok.model.quantizers.entropy import entropy_terms, nearest_sq_distance_mean
from vqtok.model.quantizers.search import kmeans, nearest_code


class CodebookQuantizer(Quantizer):
    """Shared search, projections, lookup, statistics and codebook health. Subclasses own the codebook storage.

    Args:
      num_embeddings: K, the number of codes.
      embedding_dim: D, the channels received and returned.
      commitment_cost: beta, weight of ``||z - sg[e]||^2``.
      code_dim: 0 searches in D; > 0 searches (K, code_dim) codes between ``project_in`` / ``project_out``.
      l2_normalize: unit-norm latents and codes (cosine-similarity search).
      dead_code_window: re-seed a code unused for this many training steps (0: never).
      kmeans_init: start the codebook from k-means (``initialise_codebook``, or the first training batch).
      kmeans_iters: Lloyd iterations of that k-means.
      entropy_weight: weight of the entropy regulariser added to the loss in training (0: off, not computed).
      entropy_temperature: T of its soft assignments, relative to the batch's quantisation error.
      entropy_batch_weight: weight of its batch term relative to the per-sample term.
      entropy_sample: compute it on a random subset of at most this many latent vectors per step (0: all).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float,
        code_dim: int = 0,
        l2_normalize: bool = False,
        dead_code_window: int = 0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.1,
        entropy_batch_weight: float = 4.0,
        entropy_sample: int = 0,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.commitment_cost = commitment_cost
        self.code_dim = code_dim
        self.l2_normalize = l2_normalize
        self.search_dim = code_dim or embedding_dim  # C: the size of one code
        self.dead_code_window = dead_code_window
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.entropy_batch_weight = entropy_batch_weight
        self.entropy_sample = entropy_sample
        # Factorised codes: per-position linear maps (a 1x1 conv) around the search; absent (no state-dict keys)
        # when code_dim is 0, so the seed's checkpoints load unchanged.
        self.project_in: nn.Linear | None = nn.Linear(embedding_dim, code_dim) if code_dim else None
        self.project_out: nn.Linear | None = nn.Linear(code_dim, embedding_dim) if code_dim else None
        # Training steps since each code was last chosen (by any rank).
        self.register_buffer("steps_since_used", torch.zeros(num_embeddings, dtype=torch.long))
        # Whether the codebook has been initialised from data (k-means); True when kmeans_init is off.
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    # --- codebook storage, provided by subclasses -------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """(K, C) float32 code vectors the search compares against (unit rows with ``l2_normalize``)."""
        raise NotImplementedError

    def _set_codes(self, code_ids: torch.Tensor, vectors: torch.Tensor) -> None:
        """Overwrite codes ``code_ids`` (M,) with ``vectors`` (M, C) from the search space."""
        raise NotImplementedError

    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """Learning rule applied after the search in training mode (EMA only)."""

    def _losses(self, latents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _rarely_used(self) -> torch.Tensor | None:
        """(K,) bool: codes used too rarely to keep, besides the unused ones (EMA only)."""
        return None

    # --- the search space ----------------------------------------------------------------------------
    def _to_search_space(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) latents -> (B, C, H, W): ``project_in``, then l2-normalised over C when asked.

        The identity (the same tensor) with both options off.
        """
        latents = inputs
        if self.project_in is not None:
            # The Linear acts on the channel axis: channels last, project, channels first again.
            latents = self.project_in(latents.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.l2_normalize:
            latents = F.normalize(latents, dim=1)
        return latents

    def _from_search_space(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., C) code vectors -> (..., D): ``project_out`` when present."""
        return codes if self.project_out is None else self.project_out(codes)

    def _flat_search_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Raw (N, D) latents -> (N, C) search-space vectors (projected, normalised), float32, no grad."""
        with torch.no_grad():
            flat = vectors.float()
            if self.project_in is not None:
                flat = self.project_in(flat)
            return F.normalize(flat, dim=1) if self.l2_normalize else flat

    # --- public API --------------------------------------------------------------------------------
    @property
    def needs_initialisation(self) -> bool:
        """k-means initialisation is on and has not run yet (a loaded checkpoint has run it)."""
        return self.kmeans_init and not bool(self.initialized)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``indices`` as the decoder receives them: (...) long -> (..., D) float32."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self._from_search_space(F.embedding(indices, self.codebook))

    def quantize_indices(self, inputs: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices only: (B, D, H, W) -> (B, H, W) long. Never changes the codebook."""
        self._check_channels(inputs)
        b, _, h, w = inputs.shape
        with torch.no_grad(), torch.autocast(device_type=inputs.device.type, enabled=False):
            latents = self._to_search_space(inputs.float())  # (B, C, H, W)
            flat = latents.permute(0, 2, 3, 1).reshape(-1, self.search_dim)  # (N, C)
            return nearest_code(flat, self.codebook, cosine=self.l2_normalize).view(b, h, w)

    def initialise_codebook(self, vectors: torch.Tensor) -> None:
        """Set every code to k-means centres of ``vectors`` and mark the codebook initialised.

        Args:
          vectors: (N, D) raw latents (what ``forward`` receives, channels last), ideally N >= 10 K gathered
            over many batches. They are projected (``code_dim``) and normalised (``l2_normalize``) as the
            search sees them; k-means (k-means++ seeds, then Lloyd; spherical with ``l2_normalize``) runs in
            float32, and rank 0's centres are broadcast so that every rank holds the same codebook.
        """
        if vectors.dim() != 2 or vectors.shape[1] != self.embedding_dim:
            raise ValueError(
                f"initialise_codebook expects (N, {self.embedding_dim}) vectors, got {tuple(vectors.shape)}"
            )
        device = self.steps_since_used.device
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            flat = self._flat_search_vectors(vectors.to(device))  # (N, C)
            centres = kmeans(flat, self.num_embeddings, self.kmeans_iters, spherical=self.l2_normalize)
            self.reducer.broadcast_from_rank0(centres)
            self._set_codes(torch.arange(self.num_embeddings, device=device), centres)
            self.steps_since_used.zero_()
            self.initialized.fill_(True)

    def forward(self, inputs: torch.Tensor) -> QuantizerOutput:
        """Quantize (B, D, H, W) latents; see ``QuantizerOutput``. In float32 even under autocast."""
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            return self._forward_fp32(inputs.float())

    def _forward_fp32(self, inputs: torch.Tensor) -> QuantizerOutput:
        self._check_channels(inputs)
        b, d, h, w = inputs.shape
        if self.training and not bool(self.initialized):
            # Standalone fallback: the trainer calls initialise_codebook on many batches before step 1.
            self.initialise_codebook(inputs.detach().permute(0, 2, 3, 1).reshape(-1, d))
        latents = self._to_search_space(inputs)  # (B, C, H, W); `inputs` itself in the seed configuration
        c = latents.shape[1]
        flat = latents.permute(0, 2, 3, 1).reshape(-1, c)  # (N, C), N = B*H*W
        detached = flat.detach()

        with torch.no_grad():
            indices = nearest_code(detached, self.codebook, cosine=self.l2_normalize)  # (N,)
            counts = self._statistics(indices)
        # Vectors are looked up before this step's codebook update, as in Sonnet.
        nearest = F.embedding(indices, self.codebook)  # (N, C)
        codes = nearest.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        loss = self._losses(latents, codes)
        entropy_loss = self._entropy_loss(flat, nearest) if self.training and self.entropy_weight > 0 else None
        if entropy_loss is not None:
            loss = loss + entropy_loss
        if self.training:
            with torch.no_grad():
                self._update_codebook(detached, indices, counts)
                self._restart_dead_codes(detached, counts)
        if latents.requires_grad:
            # Straight-through estimator: forward the code vectors, backward the identity to the encoder.
            codes = latents + (codes - latents).detach()
        if self.project_out is not None:
            codes = self._from_search_space(codes.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, D, H, W)
        return self._output(codes, loss, indices.view(b, h, w), counts, entropy_loss)

    def _entropy_loss(self, flat: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """The weighted entropy regulariser of (N, C) search-space latents whose nearest codes are ``nearest``
        (N, C); a scalar with gradients to the latents (and to a gradient-trained codebook). With
        ``entropy_sample`` < N, over that many rows drawn at random (the global generator, so seeded runs
        repeat)."""
        if 0 < self.entropy_sample < flat.shape[0]:
            rows = torch.randperm(flat.shape[0], device=flat.device)[: self.entropy_sample]
            flat, nearest = flat[rows], nearest[rows]
        scale = nearest_sq_distance_mean(flat, nearest)  # the batch's quantisation error: the temperature's unit
        # A copy of the codes: this step's EMA update and restarts overwrite the codebook in place before the
        # backward pass, which needs the values the forward pass used (the copy keeps the plain codebook's graph).
        terms = entropy_terms(flat, self.codebook.clone(), self.entropy_temperature, scale)
        return self.entropy_weight * terms.loss(self.num_embeddings, self.entropy_batch_weight)

    # --- codebook health ---------------------------------------------------------------------------
    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        """Re-seed codes unused for ``dead_code_window`` steps (or too rarely used, see ``_rarely_used``)
        from random rows of ``flat`` (N, C), the search-space vectors of this batch."""
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


class VectorQuantizer(CodebookQuantizer):
    """Codebook learned by gradient (van den Oord et al. 2017).

    Args:
      num_embeddings: K, the number of codes.
      embedding_dim: D, the channels received and returned.
      commitment_cost: beta, weight of ``||z - sg[e]||^2``.
      code_dim, l2_normalize, dead_code_window, kmeans_init, kmeans_iters: see ``CodebookQuantizer``.

    The codebook ``embedding`` (K, C) starts uniform in [-1/K, 1/K]. Loss:
    ``||sg[z] - e||^2 + beta ||z - sg[e]||^2``, with z and e normalised under ``l2_normalize`` (the gradient
    then reaches the raw parameter through the normalisation).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float, **options: object) -> None:
        super().__init__(num_embeddings, embedding_dim, commitment_cost, **options)  # type: ignore[arg-type]
        self.embedding = nn.Parameter(
            torch.empty(num_embeddings, self.search_dim).uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)
        )

    @property
    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding, dim=1) if self.l2_normalize else self.embedding

    def _set_codes(self, code_ids: torch.Tensor, vectors: torch.Tensor) -> None:
        self.embedding.data[code_ids] = vectors.to(self.embedding.dtype)

    def _losses(self, latents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        codebook_loss = F.mse_loss(codes, latents.detach())  # moves codes towards encoder outputs
        commitment_loss = F.mse_loss(latents, codes.detach())  # keeps the encoder near its codes
        return codebook_loss + self.commitment_cost * commitment_loss


class VectorQuantizerEMA(CodebookQuantizer):
    """Codebook learned by exponential moving averages (van den Oord et al. 2017, appendix A.1).

    Args:
      num_embeddings: K, the number of codes.
      embedding_dim: D, the channels received and returned.
      commitment_cost: beta, weight of ``||z - sg[e]||^2`` (the only loss term).
      decay: gamma, EMA decay of the cluster sizes and sums.
      epsilon: Laplace smoothing of the cluster sizes, so no code divides by zero.
      dead_code_threshold: a code whose EMA cluster size falls below this (vectors per step) is
        re-seeded like a dead one; a re-seeded code gets ``dead_code_window`` steps of grace.
      code_dim, l2_normalize, dead_code_window, kmeans_init, kmeans_iters: see ``CodebookQuantizer``.

    Per training step, after the nearest-code search, with n_i codes chosen and s_i their sum:
      N_i <- gamma N_i + (1 - gamma) n_i;  m_i <- gamma m_i + (1 - gamma) s_i
      e_i  = m_i / N~_i,  N~_i = (N_i + eps) / (sum_j N_j + K eps) * sum_j N_j.
    With ``l2_normalize`` the s_i are sums of unit (projected) latents and the stored code is the unit
    vector e_i / ||e_i|| (the mean direction of its cluster). Nothing changes in eval mode.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        dead_code_threshold: float = 0.0,
        **options: object,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, commitment_cost, **options)  # type: ignore[arg-type]
        self.decay = decay
        self.epsilon = epsilon
        self.dead_code_threshold = dead_code_threshold
        # Cluster size a re-seeded code starts from: one vector, or enough that, unused, it decays to the
        # threshold only after dead_code_window steps (c * decay^window = threshold).
        self.reseed_cluster_size = max(1.0, dead_code_threshold / decay ** max(self.dead_code_window, 1))
        initial = torch.randn(num_embeddings, self.search_dim)  # the seed's normal init
        if self.l2_normalize:
            initial = F.normalize(initial, dim=1)  # random directions
        self.register_buffer("embedding", initial.clone())
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_embedding_sum", initial.clone())

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding  # kept unit-norm by _set_codes and _update_codebook under l2_normalize

    def _set_codes(self, code_ids: torch.Tensor, vectors: torch.Tensor) -> None:
        if self.l2_normalize:
            vectors = F.normalize(vectors, dim=1)
        # A re-seeded code counts as c vectors at `vectors`: e = m / N stays `vectors` until it is used.
        self.embedding[code_ids] = vectors
        self.ema_embedding_sum[code_ids] = vectors * self.reseed_cluster_size
        self.ema_cluster_size[code_ids] = self.reseed_cluster_size

    def _rarely_used(self) -> torch.Tensor | None:
        if self.dead_code_threshold <= 0:
            return None
        return self.ema_cluster_size < self.dead_code_threshold

    def _losses(self, latents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.commitment_cost * F.mse_loss(latents, codes.detach())

    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_embedding_sum).index_add_(0, indices, flat.float())  # (K, C)
        self.reducer.all_reduce_sum(sums)  # counts arrive already summed over ranks
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_embedding_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.ema_cluster_size.sum()
        # Laplace smoothing: every cluster size > 0, and the sizes still sum to `total`.
        smoothed = (self.ema_cluster_size + self.epsilon) / (total + self.num_embeddings * self.epsilon) * total
        means = self.ema_embedding_sum / smoothed.unsqueeze(1)  # (K, C) cluster means
        # Under l2_normalize the code is the mean's direction (the search compares unit vectors).
        self.embedding.copy_(F.normalize(means, dim=1) if self.l2_normalize else means)
