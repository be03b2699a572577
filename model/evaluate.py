"""Reconstruction quality and codebook usage of a checkpoint over a dataset.

Metrics, all in [0, 1] pixel space after the model's de-normalisation (what a user sees):
  mse        mean squared error per pixel value
  nmse       mse / variance of the evaluated pixels (the seed's normalised reconstruction error)
  psnr       10 log10(1 / mse), in dB
  perplexity exp(entropy) of the code distribution over every token of the data
  codes_used distinct codes chosen at least once (out of ``tokens`` tokens: at least 5 x K are needed to
             see whether K codes are used)
  ssim       structural similarity (scikit-image, Gaussian 11x11 window as Wang et al. 2004), mean over images
  grid, grid_original
             the grid-artifact measure of the reconstructions and of the originals: the mean gradient
             magnitude (|dx| + |dy|) of the pixels at each position (i mod f, j mod f) inside the f x f token
             patches, largest over smallest of the f^2 means. Natural photos score about 1.02 (JPEG's 8x8
             blocks raise it); a decoder that paints each token's patch on its own leaves a lattice at the
             patch period that PSNR does not reveal, and scores higher. Compare ``grid`` with ``grid_original``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vqtok.model.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, load_checkpoint, pick_device
from vqtok.model.options import add_config_arguments, config_from_args
from vqtok.model.quantizers import perplexity_of
from vqtok.model.vqvae import VQVAE


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Edge-replicate padding on the bottom and right: (B, C, H, W) -> (B, C, H', W'), H', W' multiples."""
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")


@torch.inference_mode()
def reconstruct(model: VQVAE, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [0, 1] (B, C, H, W), any H, W -> (reconstructed pixels (B, C, H, W), indices (B, h, w)).

    The images are padded to a multiple of the downsample factor and the reconstruction is
    cropped back, so every size works.
    """
    height, width = pixels.shape[-2:]
    padded = pad_to_multiple(pixels, model.network.downsample)
    indices = model.encode(model.network.normalize(padded))
    decoded = model.network.denormalize(model.decode(indices).float())
    return decoded[..., :height, :width], indices


def phase_gradients(images: torch.Tensor, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient magnitude summed by pixel phase: where each pixel sits inside its f x f token patch.

    Args:
      images: (B, C, H, W) in [0, 1].
      period: f, the downsampling factor.

    Returns:
      (sums, counts), each (period, period) float64: over every pixel (i, j) with a right and a lower neighbour,
      ``|x[i, j + 1] - x[i, j]| + |x[i + 1, j] - x[i, j]|`` (mean over channels) summed into cell
      ``(i % period, j % period)``, and how many pixels each cell holds.
    """
    images = images.double()
    gradient = ((images[..., :-1, 1:] - images[..., :-1, :-1]).abs()
                + (images[..., 1:, :-1] - images[..., :-1, :-1]).abs()).mean(dim=1)  # (B, H-1, W-1)
    sums = torch.zeros(period, period, dtype=torch.float64)
    counts = torch.zeros(period, period, dtype=torch.float64)
    for row in range(period):
        for column in range(period):
            cell = gradient[:, row::period, column::period]
            sums[row, column] = cell.sum().cpu()
            counts[row, column] = cell.numel()
    return sums, counts


def grid_measure(sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Largest over smallest mean gradient across the f x f pixel phases (``phase_gradients``)."""
    means = sums / counts.clamp_min(1.0)  # (period, period)
    if float(means.max()) == 0.0:
        return 1.0  # a flat image: no lattice
    return float(means.max() / means.min()) if float(means.min()) > 0 else float("inf")  # flat patches


def ssim_of(original: torch.Tensor, reconstruction: torch.Tensor) -> float | None:
    """SSIM of one (C, H, W) image pair in [0, 1] (scikit-image's, Gaussian weights as Wang et al. 2004);
    None when scikit-image (the ``vqtok[train]`` extra) is missing or the image is under 7 pixels a side."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return None
    if min(original.shape[-2:]) < 7:
        return None
    return float(structural_similarity(
        original.permute(1, 2, 0).double().cpu().numpy(), reconstruction.permute(1, 2, 0).double().cpu().numpy(),
        data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    ))


@dataclass
class MetricAccumulator:
    """Running sums for ``mse``, ``nmse``, ``psnr``, ``perplexity``, ``codes_used``, ``ssim`` and the grid
    measures (``period``: the downsampling factor they are measured at; 0 leaves them out)."""

    num_embeddings: int
    period: int = 0
    squared_error: float = 0.0
    values: int = 0
    pixel_sum: float = 0.0
    pixel_sq_sum: float = 0.0
    images: int = 0
    ssim_sum: float = 0.0
    ssim_images: int = 0
    counts: torch.Tensor = field(init=False)
    grid_sums: torch.Tensor = field(init=False)
    grid_sums_original: torch.Tensor = field(init=False)
    grid_counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_embeddings, dtype=torch.float64)
        self.grid_sums = torch.zeros(max(self.period, 1), max(self.period, 1), dtype=torch.float64)
        self.grid_sums_original = torch.zeros_like(self.grid_sums)
        self.grid_counts = torch.zeros_like(self.grid_sums)

    def add(self, original: torch.Tensor, reconstruction: torch.Tensor, indices: torch.Tensor) -> None:
        """Add a batch: originals and reconstructions (B, C, H, W) in [0, 1], indices (B, h, w)."""
        original = original.double()
        self.squared_error += float((reconstruction.double() - original).pow(2).sum())
        self.values += original.numel()
        self.pixel_sum += float(original.sum())
        self.pixel_sq_sum += float(original.pow(2).sum())
        self.images += original.shape[0]
        self.counts += torch.bincount(indices.flatten().cpu(), minlength=self.num_embeddings).double()
        if self.period:
            sums, counts = phase_gradients(reconstruction, self.period)
            self.grid_sums += sums
            self.grid_sums_original += phase_gradients(original, self.period)[0]
            self.grid_counts += counts
        for one_original, one_reconstruction in zip(original, reconstruction, strict=True):
            ssim = ssim_of(one_original, one_reconstruction)
            if ssim is not None:
                self.ssim_sum += ssim
                self.ssim_images += 1

    def result(self) -> dict[str, float | int]:
        if self.values == 0:
            raise ValueError("no images were evaluated")
        mse = self.squared_error / self.values
        mean = self.pixel_sum / self.values
        variance = self.pixel_sq_sum / self.values - mean * mean  # E[x^2] - E[x]^2
        return {
            "mse": mse,
            "nmse": mse / variance if variance > 0 else float("nan"),
            "psnr": 10.0 * math.log10(1.0 / mse) if mse > 0 else float("inf"),  # peak value 1.0
            "perplexity": float(perplexity_of(self.counts)),
            "codes_used": int((self.counts > 0).sum()),
            "tokens": int(self.counts.sum()),
            "num_embeddings": self.num_embeddings,
            "images": self.images,
            "data_variance": variance,
            "ssim": self.ssim_sum / self.ssim_images if self.ssim_images else None,
            **({"grid": grid_measure(self.grid_sums, self.grid_counts),
                "grid_original": grid_measure(self.grid_sums_original, self.grid_counts)} if self.period else {}),
        }


def evaluate_images(model: VQVAE, images: Iterable[torch.Tensor], batch_size: int = 16) -> MetricAccumulator:
    """Metrics over ``images`` ((C, H, W) in [0, 1]); equal shapes are batched together.

    Returns the filled accumulator: ``.result()`` is the metrics dict, ``.counts`` the per-code usage (K,),
    ``.grid_sums`` / ``.grid_sums_original`` / ``.grid_counts`` the per-phase gradient sums (f, f).
    """
    accumulator = MetricAccumulator(model.network.num_embeddings, period=model.network.downsample)
    for batch in _batches_of_equal_shape(images, batch_size):
        batch = batch.to(model.device)
        reconstruction, indices = reconstruct(model, batch)
        accumulator.add(batch, reconstruction, indices)
    return accumulator


def _batches_of_equal_shape(images: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Group consecutive same-shaped (C, H, W) images into (B, C, H, W) batches of at most ``batch_size``."""
    pending: list[torch.Tensor] = []
    for image in images:
        if pending and (image.shape != pending[0].shape or len(pending) == batch_size):
            yield torch.stack(pending)
            pending = []
        pending.append(image)
    if pending:
        yield torch.stack(pending)


def evaluate_spec(model: VQVAE, data: Any, split: str = "heldout", crop: int | None = None,
                  batch_size: int = 16, seed: int = 0) -> tuple[dict, MetricAccumulator]:
    """Metrics of ``model`` on a data spec or an opened source (see ``model.data.build_dataset``): full
    images or crops. Returns (metrics dict naming the data, split and crop; the accumulator behind it)."""
    from vqtok.model import data as datasets  # deferred: the photo sources import scikit-image lazily

    if crop is None:
        images: Iterable[torch.Tensor] = (image for _, image in datasets.iter_full_images(data, split))
    else:
        dataset = datasets.build_dataset(data, crop, split, seed=seed)
        images = (dataset[i] for i in range(len(dataset)))
    accumulator = evaluate_images(model, images, batch_size)
    metrics = accumulator.result()
    metrics.update({"data": data if isinstance(data, str) else data.name, "split": split, "crop": crop})
    return metrics, accumulator


def default_split(checkpoint: Checkpoint, data: str) -> tuple[Any, str, str]:
    """(the source to evaluate, its split, why) when ``--split`` is left to ``auto``.

    A folder the checkpoint was trained on: its held-out split under the run's own ``--heldout`` rule
    (the images it never saw). Any other folder: every image (none was trained on). The photos and
    CIFAR-10: their fixed held-out split.
    """
    from vqtok.model import data as datasets  # deferred: the photo sources import scikit-image lazily

    source = datasets.open_source(data)
    if not isinstance(source, datasets.FolderSource):
        return source, "heldout", "the fixed held-out split"
    provenance = checkpoint.record.provenance
    trained_on = provenance.data if provenance is not None and isinstance(provenance.data, dict) else {}
    if trained_on.get("kind") == "folder" and trained_on.get("source") == str(source.root.resolve()):
        rule = (provenance.training or {}).get("heldout") if provenance is not None else None
        if rule is None:  # a run from before --heldout: its recorded fraction
            rule = str(trained_on.get("heldout_fraction", datasets.DEFAULT_HELDOUT_FRACTION))
        return source.with_heldout(rule), "heldout", f"held-out split of the training folder (--heldout {rule})"
    return source, "all", "every image: the checkpoint was not trained on this folder"


@dataclass(frozen=True)
class EvaluateConfig:
    """What ``vqtok evaluate`` measures, and how (each field is a flag and a ``VQTOK_EVALUATE_*`` variable).

    Attributes:
      checkpoint: checkpoint directory.
      data: 'photos', 'cifar10:DIR' or an image folder.
      split: auto: a folder the checkpoint trained on -> its held-out images; another folder -> all of them;
        photos and cifar10 -> their held-out split.
      crop: evaluate on random N x N crops instead of full (padded) images.
      batch_size: images per forward pass.
      device: auto, cpu or cuda.
      json: print one JSON object.
    """

    checkpoint: str = str(DEFAULT_CHECKPOINT)
    data: str = "photos"
    split: Literal["auto", "train", "heldout", "all"] = "auto"
    crop: int | None = None
    batch_size: int = 16
    device: str = "auto"
    json: bool = False


EVALUATE_ENV_PREFIX = "VQTOK_EVALUATE_"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqtok evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, EvaluateConfig, EVALUATE_ENV_PREFIX, title="evaluation (env VQTOK_EVALUATE_*)")
    return parser


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(EvaluateConfig, build_parser().parse_args(argv))
    try:
        device = pick_device(config.device)
        checkpoint = load_checkpoint(config.checkpoint, device)
        data, split, why = config.data, config.split, "as asked"
        if split == "auto":
            data, split, why = default_split(checkpoint, config.data)
        metrics, _ = evaluate_spec(checkpoint.model, data, split, config.crop, config.batch_size)
        metrics.update({"data": config.data, "split_reason": why})
    except (ValueError, FileNotFoundError) as exc:
        print(f"vqtok evaluate: {exc}", file=sys.stderr)
        return 2
    metrics["checkpoint"] = str(checkpoint.path)
    metrics["model_id"] = checkpoint.model_id
    if config.json:
        print(json.dumps(metrics))
    else:
        print(f"checkpoint  {checkpoint.path}  ({checkpoint.name}, model_id {checkpoint.model_id[:12]})")
        print(f"data        {config.data} [{metrics['split']}: {why}]  {metrics['images']} images"
              + (f", {config.crop}x{config.crop} crops" if config.crop else ", full size"))
        print(f"MSE         {metrics['mse']:.6f}   NMSE {metrics['nmse']:.4f}   PSNR {metrics['psnr']:.2f} dB")
        print(f"perplexity  {metrics['perplexity']:.1f}   codes used {metrics['codes_used']}"
              f" / {metrics['num_embeddings']}")
        ssim = "n/a (pip install 'vqtok[train]')" if metrics["ssim"] is None else f"{metrics['ssim']:.4f}"
        print(f"SSIM        {ssim}   grid {metrics['grid']:.3f} (originals {metrics['grid_original']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
