"""Print the model-card table: held-out quality of checkpoints side by side, and draw a zoomed crop.

    python scripts/model_card.py default runs/vqgan-f8/checkpoint runs/seed-f8/checkpoint --data data/photos-v1 \\
        --zoom docs/model-card-zoom.png

For each checkpoint (a directory or a bundled name), on the held-out images of ``--data`` at full size
(padded to a multiple of the downsampling factor): tokens per 256x256 image, bits per token, PSNR, SSIM,
the grid-artifact measure (reconstructions, originals), codes used over every held-out token, perplexity,
parameters, and how it was trained (steps, batch, crop size, wall time and hardware from its record).
``--zoom`` writes a figure: the same 64x64 region of a held-out photo, 4x enlarged (nearest neighbour),
as the original and as each checkpoint's reconstruction, where grid texture and banding are visible.
``--phases`` prints, per checkpoint, where its grid measure comes from: the mean gradient at each of the
f x f pixel phases (reconstructions, then originals), the same folded to the 2 x 2 phases of one decoder
stage (a pattern at the stages' 2-px period: checkerboard from the upsampling), and the f x f spread left
once that 2-px pattern is divided out (what each code's own patch adds).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vqtok.model import data as datasets
from vqtok.model.checkpoint import Checkpoint, load_checkpoint
from vqtok.model.evaluate import MetricAccumulator, evaluate_spec, reconstruct
from vqtok.model.weights import resolve_checkpoint


def describe(checkpoint: Checkpoint, data: str) -> tuple[dict[str, str], MetricAccumulator]:
    """One column of the table, and the held-out measurements behind it (for ``phase_report``)."""
    network, provenance = checkpoint.network, checkpoint.record.provenance
    training = (provenance.training if provenance else None) or {}
    metrics, accumulator = evaluate_spec(checkpoint.model, data, "heldout")
    side = 256 // network.downsample
    quantizer = network.quantizer + (", l2" if network.l2_normalize else "") + (
        f", code_dim {network.code_dim}" if network.code_dim else "")
    hardware = (provenance.hardware or {}).get("device", "?") if provenance else "?"
    wall = (provenance.wall_time_s or 0.0) / 60 if provenance else 0.0
    return {
        "architecture": f"{network.arch}, f={network.downsample}",
        "codes (K x code dim)": f"{network.num_embeddings:,} x {network.code_vector_dim} ({quantizer})",
        "tokens per 256x256 image": f"{side * side:,}",
        "bits per token": f"{math.log2(network.num_embeddings):.1f}",
        "PSNR (dB)": f"{metrics['psnr']:.2f}",
        "SSIM": f"{metrics['ssim']:.3f}" if metrics["ssim"] is not None else "n/a",
        "grid (originals)": f"{metrics['grid']:.3f} ({metrics['grid_original']:.3f})",
        "codes used": f"{metrics['codes_used']:,} / {network.num_embeddings:,} "
                      f"({100 * metrics['codes_used'] / network.num_embeddings:.1f}%)",
        "held-out tokens": f"{int(metrics['tokens']):,}",
        "perplexity": f"{metrics['perplexity']:.0f}",
        "parameters": f"{sum(p.numel() for p in checkpoint.model.parameters()) / 1e6:.2f}M",
        "training": f"{provenance.steps if provenance else '?'} steps x {training.get('batch_size', '?')} crops of "
                    f"{training.get('image_size', '?')}px",
        "training time": f"{wall:.0f} min on {hardware}",
    }, accumulator


def phase_spread(means: torch.Tensor) -> dict[str, float]:
    """Max over min of per-phase mean gradients (f, f), f even: over all f x f phases (the grid measure),
    over the 2 x 2 phases of one decoder stage (``means`` averaged by phase mod 2), and over the f x f
    phases once that 2-px pattern is divided out."""
    period = means.shape[0]
    folded = means.reshape(period // 2, 2, period // 2, 2).mean(dim=(0, 2))  # (2, 2): phase mod 2
    residual = means / folded.repeat(period // 2, period // 2)  # (f, f) with the 2-px pattern divided out
    return {name: float(values.max() / values.min())
            for name, values in (("all", means), ("stage", folded), ("code", residual))}


def phase_report(accumulator: MetricAccumulator) -> str:
    """The grid measure of one evaluation taken apart by pixel phase (see the module docstring), as text."""
    period = accumulator.period
    lines = []
    for name, sums in (("reconstructions", accumulator.grid_sums), ("originals", accumulator.grid_sums_original)):
        means = sums / accumulator.grid_counts  # (f, f): mean gradient per phase
        spread = phase_spread(means)
        lines.append(f"{name}: mean gradient x 1000 per phase (row = y mod {period}, column = x mod {period})")
        lines += ["  " + " ".join(f"{1000 * float(v):6.2f}" for v in row) for row in means]
        lines.append(f"  max/min: all {period}x{period} phases {spread['all']:.3f}, 2x2 stage phases "
                     f"{spread['stage']:.3f}, {period}x{period} without the 2-px pattern {spread['code']:.3f}")
    return "\n".join(lines)


def zoom_figure(checkpoints: list[tuple[str, Checkpoint]], data: str, out: Path, image_index: int = 0,
                region: tuple[int, int, int] = (200, 300, 64), scale: int = 4) -> None:
    """The same square region of held-out image ``image_index``, enlarged, original first."""
    key, image = list(datasets.iter_full_images(data, "heldout"))[image_index]
    top, left, size = region
    panels = [("original", image)]
    for name, checkpoint in checkpoints:
        reconstruction, _ = reconstruct(checkpoint.model, image[None])
        panels.append((name, reconstruction[0]))
    label, gap = 16, 6
    width = len(panels) * (size * scale + gap)
    canvas = Image.new("RGB", (width, size * scale + label), "white")
    for i, (name, pixels) in enumerate(panels):
        crop = pixels[:, top : top + size, left : left + size].permute(1, 2, 0).numpy()
        tile = Image.fromarray((crop * 255 + 0.5).clip(0, 255).astype(np.uint8))
        tile = tile.resize((size * scale, size * scale), Image.Resampling.NEAREST)
        canvas.paste(tile, (i * (size * scale + gap), label))
        ImageDraw.Draw(canvas).text((i * (size * scale + gap) + 2, 2), name, fill="black")
    canvas.save(out)
    print(f"wrote {out} ({key}, {size}x{size} at ({top}, {left}), x{scale})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories or bundled names")
    parser.add_argument("--data", default="data/photos-v1", help="data spec whose held-out images are measured")
    parser.add_argument("--zoom", type=Path, help="write the zoomed-crop figure here")
    parser.add_argument("--phases", action="store_true", help="print where each grid measure comes from")
    args = parser.parse_args(argv)
    with torch.no_grad():  # a context, not set_grad_enabled(False): callers in the same process keep autograd
        loaded = [(spec, load_checkpoint(resolve_checkpoint(spec), "cpu")) for spec in args.checkpoints]
        described = [describe(checkpoint, args.data) for _, checkpoint in loaded]
        columns = [column for column, _ in described]
        print("| | " + " | ".join(f"`{spec}`" for spec, _ in loaded) + " |")
        print("| --- |" + " --- |" * len(columns))
        for key in columns[0]:
            print(f"| {key} | " + " | ".join(column[key] for column in columns) + " |")
        if args.phases:
            for (spec, _), (_, accumulator) in zip(loaded, described, strict=True):
                print(f"\n`{spec}`\n" + phase_report(accumulator))
        if args.zoom:
            zoom_figure(loaded, args.data, args.zoom)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
