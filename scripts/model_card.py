"""Print the model-card table: held-out quality of one or more checkpoints, side by side.

    python scripts/model_card.py model/weights/default runs/seed-recipe/checkpoint

For each checkpoint: how it was trained (from its config.json) and, on the held-out photos, MSE,
PSNR, perplexity and codes used, on the full images (padded to a multiple of the downsample factor)
and on the fixed set of 512 held-out 64x64 crops.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqtok.model.checkpoint import load_checkpoint
from vqtok.model.evaluate import evaluate_spec


def describe(path: str) -> dict[str, object]:
    checkpoint = load_checkpoint(path, "cpu")
    provenance = checkpoint.record.provenance
    training = provenance.training or {}
    network, codebook = checkpoint.network, checkpoint.codebook_training
    full, _ = evaluate_spec(checkpoint.model, "photos", "heldout")
    crops, _ = evaluate_spec(checkpoint.model, "photos", "heldout", crop=64)
    restarts = f"restarts every {codebook.dead_code_window} steps" if codebook.dead_code_window else "no restarts"
    return {
        "checkpoint": path,
        "recipe": f"{network.quantizer} quantizer, {restarts}" + (", k-means init" if codebook.kmeans_init else ""),
        "model": f"f={network.downsample}, K={network.num_embeddings}, D={network.embedding_dim}",
        "training": f"{provenance.steps} steps x batch {training.get('batch_size')} of "
                    f"{training.get('image_size')}px crops, lr {training.get('lr')} {training.get('lr_schedule')}",
        "wall time": f"{(provenance.wall_time_s or 0.0) / 60:.1f} min on "
                     f"{(provenance.hardware or {}).get('device')}",
        "full MSE": f"{full['mse']:.5f}",
        "full PSNR (dB)": f"{full['psnr']:.2f}",
        "full codes used": f"{full['codes_used']} / {full['num_embeddings']}",
        "full perplexity": f"{full['perplexity']:.1f}",
        "crops MSE": f"{crops['mse']:.5f}",
        "crops PSNR (dB)": f"{crops['psnr']:.2f}",
        "crops codes used": f"{crops['codes_used']} / {crops['num_embeddings']}",
        "crops perplexity": f"{crops['perplexity']:.1f}",
    }


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    torch.set_grad_enabled(False)
    columns = [describe(path) for path in paths]
    print("| | " + " | ".join(str(c["checkpoint"]) for c in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for key in columns[0]:
        if key == "checkpoint":
            continue
        print(f"| {key} | " + " | ".join(str(c[key]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
