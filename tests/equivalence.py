"""What vqtok promises about equal results, as assertions every test uses (README: "Reproducibility").

- Identical input and options at the same batch composition give identical output (bit for bit).
- Across batch compositions (a request alone vs. batched with others), the CPU and GPU libraries may
  pick different kernels per batch size, so float results differ in the last bits:
  decoded images agree within ``IMAGE_TOLERANCE`` grey levels, and token grids agree on at least
  ``TOKEN_AGREEMENT`` of positions, differing only where two codes are (near-)equally close to the
  latent, i.e. their squared distances differ by at most ``NEAR_TIE`` relative to the larger one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_TOLERANCE = 1  # grey levels (uint8)
TOKEN_AGREEMENT = 0.999  # fraction of grid positions
NEAR_TIE = 1e-3  # relative gap between the two codes' squared distances


def _pixels(image: bytes | np.ndarray) -> np.ndarray:
    """Encoded image bytes or an array -> int16 array (so differences do not wrap)."""
    if isinstance(image, bytes | bytearray):
        image = np.asarray(Image.open(io.BytesIO(image)))
    return np.asarray(image).astype(np.int16)


def assert_images_close(a: bytes | np.ndarray, b: bytes | np.ndarray, tolerance: int = IMAGE_TOLERANCE) -> None:
    """Same shape, every value within ``tolerance`` grey levels."""
    pa, pb = _pixels(a), _pixels(b)
    assert pa.shape == pb.shape, (pa.shape, pb.shape)
    worst = int(np.abs(pa - pb).max()) if pa.size else 0
    assert worst <= tolerance, f"images differ by {worst} grey levels (allowed {tolerance})"


def assert_tokens_agree(
    a: Sequence[object] | np.ndarray,
    b: Sequence[object] | np.ndarray,
    latents: torch.Tensor | None = None,
    codebook: torch.Tensor | None = None,
) -> None:
    """Token grids ``a`` and ``b`` (any nesting, same shape) agree under the batch-composition rule.

    With ``latents`` (..., D), one vector per position in the same order, and the (K, D) ``codebook``,
    every disagreement must also be a near-tie between the two codes.
    """
    ta, tb = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    assert ta.shape == tb.shape, (ta.shape, tb.shape)
    differ = (ta != tb).reshape(-1)
    agreement = 1.0 - differ.mean() if differ.size else 1.0
    assert agreement >= TOKEN_AGREEMENT, f"tokens agree on {agreement:.4%} of positions (need {TOKEN_AGREEMENT:.1%})"
    if latents is None or codebook is None or not differ.any():
        return
    vectors = latents.reshape(-1, latents.shape[-1]).double()[torch.from_numpy(differ)]  # (n, D)
    codes = codebook.double()
    first = codes[torch.from_numpy(ta.reshape(-1)[differ])]  # (n, D)
    second = codes[torch.from_numpy(tb.reshape(-1)[differ])]
    d_first = (vectors - first).pow(2).sum(-1)  # squared distance to each side's code
    d_second = (vectors - second).pow(2).sum(-1)
    gap = (d_first - d_second).abs() / torch.maximum(d_first, d_second).clamp_min(1e-12)
    assert bool((gap <= NEAR_TIE).all()), f"tokens differ where codes are not near-ties (relative gaps {gap.tolist()})"
