"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the ``len(levels)`` channels is squashed into a bounded range and rounded to one of ``L_i``
integer levels; the code is the vector of rounded values scaled to [-1, 1], and the implicit codebook is
the grid of all ``prod(levels)`` such vectors. There is no codebook to learn, so none to collapse: no loss,
no restarts, no k-means.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vqtok.model.quantizers.base import Quantizer, QuantizerOutput

# Widens the tanh range a little so that the outermost levels are reached by finite inputs.
_BOUND_EPS = 1e-3


class FiniteScalarQuantizer(Quantizer):
    """FSQ: (B, D, H, W) latents -> per-channel rounding to ``levels`` -> indices in [0, prod(levels)).

    Args:
      levels: L_i, the number of levels of each code channel (each >= 2), e.g. (8, 5, 5, 5) for K = 1,000.
      embedding_dim: D, the channels received and returned. When D != len(levels), a learned linear map
        ``project_in`` (D -> len(levels)) runs before the rounding and ``project_out`` (len(levels) -> D)
        after it.

    Per channel with L levels: ``half = (L - 1) (1 + eps) / 2``, ``offset = 0.5`` for even L (0 for odd),
    ``shift = atanh(offset / half)``; ``bounded = half tanh(z + shift) - offset`` lies in
    (-L/2 - small, L/2 - 1 + small) for even L and (-(L-1)/2 - small, (L-1)/2 + small) for odd L, so
    rounding yields exactly L integers ``-(L // 2) ... L - 1 - L // 2`` (0 at z = 0). The code is that integer
    over ``L // 2`` (in [-1, 1]); rounding passes gradients straight through. The index is the mixed-radix
    number of the level indices ``integer + L // 2`` with basis ``(1, L_0, L_0 L_1, ...)``.
    """

    def __init__(self, levels: tuple[int, ...], embedding_dim: int) -> None:
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"fsq levels must be one or more integers >= 2, got {levels}")
        super().__init__(math.prod(levels), embedding_dim)
        self.levels = tuple(int(level) for level in levels)
        self.search_dim = len(self.levels)  # C: channels of one code
        project = embedding_dim != self.search_dim
        self.project_in: nn.Linear | None = nn.Linear(embedding_dim, self.search_dim) if project else None
        self.project_out: nn.Linear | None = nn.Linear(self.search_dim, embedding_dim) if project else None
        half_width = [level // 2 for level in self.levels]  # integer offset from a level index to its value
        half = [(level - 1) * (1.0 + _BOUND_EPS) / 2.0 for level in self.levels]  # tanh amplitude
        offset = [0.5 if level % 2 == 0 else 0.0 for level in self.levels]  # even L: levels sit at half-integers
        basis = [math.prod(self.levels[:i]) for i in range(len(self.levels))]  # mixed-radix place values
        # Derived constants, not state: non-persistent (no checkpoint keys), but they follow .to(device).
        self.register_buffer("_levels", torch.tensor(self.levels, dtype=torch.long), persistent=False)
        self.register_buffer("_half_width", torch.tensor(half_width, dtype=torch.long), persistent=False)
        self.register_buffer("_half", torch.tensor(half), persistent=False)
        self.register_buffer("_offset", torch.tensor(offset), persistent=False)
        # shift = atanh(offset / half): tanh(0 + shift) * half - offset = 0, so z = 0 maps to the level 0.
        self.register_buffer("_shift", torch.atanh(torch.tensor(offset) / torch.tensor(half)), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)

    # --- the scalar quantization ----------------------------------------------------------------------
    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C) values whose rounding takes exactly L_i integer values per channel."""
        return torch.tanh(z + self._shift) * self._half - self._offset

    def _round_codes(self, z: torch.Tensor) -> torch.Tensor:
        """(..., C) search-space latents -> (..., C) codes in [-1, 1], straight-through rounding."""
        bounded = self.bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()  # round forward, identity backward
        return rounded / self._half_width  # integers -> [-1, 1]

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., C) codes on the grid -> (...) long indices."""
        level_index = torch.round(codes * self._half_width).long() + self._half_width  # (..., C) in [0, L_i)
        return (level_index * self._basis).sum(dim=-1)  # mixed-radix number

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) long indices -> (..., C) float32 codes in [-1, 1] (inverse of ``codes_to_indices``)."""
        level_index = (indices.long().unsqueeze(-1) // self._basis) % self._levels  # (..., C) mixed-radix digits
        return (level_index - self._half_width).float() / self._half_width

    # --- the quantizer interface -------------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """(K, C) float32: the implicit grid, row i being the code of index i."""
        return self.indices_to_codes(torch.arange(self.num_embeddings, device=self._basis.device))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) long -> (..., D) float32: codes, through ``project_out`` when D != C."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            codes = self.indices_to_codes(indices)
            return codes if self.project_out is None else self.project_out(codes)

    def _search_space(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W, C) channels-last latents, projected when D != C."""
        latents = inputs.permute(0, 2, 3, 1)
        return latents if self.project_in is None else self.project_in(latents)

    def quantize_indices(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W) long. Never changes any state."""
        self._check_channels(inputs)
        with torch.no_grad(), torch.autocast(device_type=inputs.device.type, enabled=False):
            return self.codes_to_indices(self._round_codes(self._search_space(inputs.float())))

    def forward(self, inputs: torch.Tensor) -> QuantizerOutput:
        """Quantize (B, D, H, W) latents; loss is a zero scalar. In float32 even under autocast."""
        self._check_channels(inputs)
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            codes = self._round_codes(self._search_space(inputs.float()))  # (B, H, W, C)
            with torch.no_grad():
                indices = self.codes_to_indices(codes)  # (B, H, W)
                counts = self._statistics(indices.reshape(-1))
            quantized = codes if self.project_out is None else self.project_out(codes)  # (B, H, W, D)
            loss = inputs.new_zeros(())
            return self._output(quantized.permute(0, 3, 1, 2), loss, indices, counts)
