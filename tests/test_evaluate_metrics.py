"""The quality measures of `vqtok evaluate` beyond PSNR: SSIM and the grid-artifact measure, on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqtok.model.data import load_photo
from vqtok.model.evaluate import MetricAccumulator, grid_measure, phase_gradients, ssim_of


def _photo(name: str = "astronaut", side: int = 256) -> torch.Tensor:
    """(1, 3, side, side) in [0, 1]: the top-left corner of a bundled photo."""
    array = np.asarray(load_photo(name))[:side, :side]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255.0


def _grid(images: torch.Tensor, period: int) -> float:
    return grid_measure(*phase_gradients(images, period))


def test_a_natural_photo_scores_about_one_and_a_patchwise_reconstruction_shows_its_lattice() -> None:
    photo = _photo()
    assert 1.0 <= _grid(photo, 4) < 1.08
    # each 4x4 patch painted flat (its mean): the lattice a patch-by-patch decoder leaves
    patches = F.interpolate(F.avg_pool2d(photo, 4), scale_factor=4, mode="nearest")
    assert _grid(patches, 4) == float("inf")  # no gradient at all inside the patches
    # a milder version: the photo plus a faint step at every patch border
    border = torch.zeros(1, 1, 256, 256)
    border[..., ::4, :] = border[..., :, ::4] = 0.02
    assert _grid((photo + border).clamp(0, 1), 4) > _grid(photo, 4) + 0.1


def test_phase_gradients_counts_every_pixel_with_neighbours_once() -> None:
    images = torch.rand(2, 3, 13, 10)
    sums, counts = phase_gradients(images, 4)
    assert counts.sum() == 2 * 12 * 9 and sums.shape == (4, 4)
    gradient = ((images[..., :-1, 1:] - images[..., :-1, :-1]).abs()
                + (images[..., 1:, :-1] - images[..., :-1, :-1]).abs()).mean(dim=1)
    assert float(sums.sum()) == pytest.approx(float(gradient.double().sum()))


def test_ssim_is_one_for_identical_images_and_falls_with_noise() -> None:
    photo = _photo()[0]
    assert ssim_of(photo, photo) == pytest.approx(1.0)
    noisy = (photo + 0.1 * torch.randn_like(photo, generator=None)).clamp(0, 1)
    assert 0 < ssim_of(photo, noisy) < 0.9
    assert ssim_of(photo[:, :5, :5], photo[:, :5, :5]) is None  # smaller than SSIM's window


def test_the_accumulator_reports_ssim_and_both_grid_measures() -> None:
    photo = _photo()
    # patches whose inside keeps half the photo's detail: a lattice at the borders, finite
    patches = F.interpolate(F.avg_pool2d(photo, 4), scale_factor=4, mode="nearest")
    reconstruction = 0.5 * (photo + patches)
    accumulator = MetricAccumulator(num_embeddings=8, period=4)
    accumulator.add(photo, reconstruction, torch.zeros(1, 64, 64, dtype=torch.long))
    result = accumulator.result()
    assert 1.3 < result["grid"] < float("inf") and result["grid_original"] < 1.08
    assert torch.allclose(torch.tensor(grid_measure(torch.zeros(4, 4), torch.ones(4, 4))), torch.tensor(1.0))
    assert 0 < result["ssim"] < 1
