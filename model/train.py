"""Offline training of a VQ-VAE tokenizer: ``vqtok train`` / ``python -m vqtok.model.train``.

Single process, or ``torchrun --nproc_per_node N -m vqtok.model.train ...`` for DDP (nccl on GPUs, gloo
on CPU). The quantizer synchronises its own statistics across ranks, so every rank ends with the
same codebook. Output directory:

  checkpoint/          the model (model.safetensors + config.json), written atomically
  trainer_state.pt     optimizer, step and RNG state, for --resume
  metrics.jsonl        one JSON line per logged step (and per held-out evaluation)
  training.png         loss, perplexity and codes used over steps
  reconstructions.png  held-out originals (top row) above their reconstructions (bottom row)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm import tqdm

from vqtok.model import data as datasets
from vqtok.model.checkpoint import load_checkpoint, pick_device, read_checkpoint_record, save_checkpoint
from vqtok.model.config import VQVAEConfig
from vqtok.model.evaluate import evaluate_images, reconstruct
from vqtok.model.options import add_dataclass_arguments, dataclass_from_args
from vqtok.model.vqvae import VQVAE


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's own hyperparameters live in ``VQVAEConfig``).

    Attributes:
      data: 'photos', 'cifar10:DIR' or an image folder (see ``model.data.build_dataset``).
      steps: optimizer steps.
      batch_size: images per step per process.
      lr: Adam learning rate (the seed's 1e-3).
      lr_schedule: "constant" (the seed) or "cosine" decay to 0 after a linear warm-up.
      warmup_steps: linear warm-up steps of the cosine schedule.
      image_size: side of the square training crops; a multiple of the downsample factor.
      seed: seeds the model initialisation, the crops and the codebook restarts.
      device: auto, cpu or cuda.
      out: output directory.
      resume: continue from ``out``'s checkpoint and trainer state.
      log_every: steps between metrics.jsonl lines.
      eval_every: steps between held-out evaluations (0: only at the end).
      checkpoint_every: steps between checkpoints (0: only at the end).
      num_workers: DataLoader worker processes.
      heldout_crops: held-out crops evaluated during training.
      name: the model's name, recorded in the checkpoint.
    """

    data: str = "photos"
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 200
    image_size: int = 32
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: str = "runs/vqvae"
    resume: bool = False
    log_every: int = 50
    eval_every: int = 1000
    checkpoint_every: int = 1000
    num_workers: int = 0
    heldout_crops: int = 256
    name: str = "vqtok"

    def validate(self, model_config: VQVAEConfig) -> None:
        for name in ("steps", "batch_size", "log_every", "heldout_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.image_size % model_config.downsample:
            raise ValueError(
                f"--image-size {self.image_size} must be a multiple of --downsample {model_config.downsample}"
            )


@dataclass
class Distributed:
    """This process's place in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_request: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job when ``WORLD_SIZE`` > 1 (nccl on CUDA, gloo on CPU); pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_request)
    if world_size == 1:
        return Distributed(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank), device


def infinite_batches(dataset: Dataset, batch_size: int, seed: int, place: Distributed,
                     num_workers: int, start_epoch: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless (epoch, batch (B, C, S, S)) pairs; new crops and order every epoch, disjoint across ranks."""
    epoch = start_epoch
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if place.enabled:
            sampler: Any = DistributedSampler(dataset, place.world_size, place.rank, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=num_workers, persistent_workers=False)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if config.lr_schedule == "constant":
        return 1.0
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine from 1 down to 0


def codebook_divergence(model: VQVAE, place: Distributed) -> float:
    """Largest absolute difference between any rank's codebook and rank 0's (0.0 in one process)."""
    if not place.enabled:
        return 0.0
    codebook = model.codebook.detach().float().contiguous()
    gathered = [torch.empty_like(codebook) for _ in range(place.world_size)]
    dist.all_gather(gathered, codebook)
    return max(float((other - gathered[0]).abs().max()) for other in gathered)


def save_trainer_state(path: Path, optimizer: torch.optim.Optimizer, step: int, epoch: int) -> None:
    """Optimizer, step and RNG states for --resume; written to a temp file and renamed (atomic).

    Only tensors and plain Python values (dicts, lists, tuples, numbers, strings, None), so
    ``load_trainer_state`` reads it with ``torch.load(weights_only=True)``, which runs no pickled code.
    The RNG states are uint8 tensors; the data pipeline needs none (every item draws from its own
    generator seeded by seed, epoch and index, see ``model.data``).
    """
    state = {
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "epoch": int(epoch),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Read ``save_trainer_state``'s file with ``weights_only=True`` onto the CPU; ``ValueError`` naming the file.

    The optimizer state moves to the parameters' device in ``Optimizer.load_state_dict``; the RNG
    states must stay on the CPU for ``torch.set_rng_state``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (--resume needs the trainer state of an earlier run in --out)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: unreadable trainer state ({exc})") from exc
    if not isinstance(state, dict) or not {"optimizer", "step", "epoch", "torch_rng"} <= set(state):
        raise ValueError(f"{path}: not a vqtok trainer state (expected optimizer, step, epoch and torch_rng)")
    return state


def save_reconstructions(path: Path, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
    """A PNG grid: originals (B, 3, H, W) in the top row, reconstructions below, pixels in [0, 1]."""
    def row(images: torch.Tensor) -> np.ndarray:
        padded = F.pad(images, (1, 1, 1, 1), value=1.0)  # white 1-pixel border around each tile
        return padded.permute(2, 0, 3, 1).reshape(padded.shape[2], -1, 3).cpu().numpy()

    grid = np.concatenate([row(originals), row(reconstructions)], axis=0)
    Image.fromarray((grid * 255.0 + 0.5).clip(0, 255).astype(np.uint8)).save(path)


def save_training_plot(path: Path, history: list[dict[str, Any]]) -> None:
    """training.png: reconstruction loss, perplexity and codes used against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("recon_mse", "reconstruction MSE (normalised pixels)", True),
              ("perplexity", "codebook perplexity", False),
              ("codes_used", "codes used per batch", False))
    for axis, (key, title, log_scale) in zip(axes, panels, strict=True):
        axis.plot(steps, [h[key] for h in history])
        axis.set_title(title)
        axis.set_xlabel("step")
        if log_scale:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_heldout(model: VQVAE, heldout: Dataset, batch_size: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Held-out crop metrics (see ``model.evaluate``) with the model in eval mode."""
    was_training = model.training
    model.eval()
    metrics, counts = evaluate_images(model, (heldout[i] for i in range(len(heldout))), batch_size)
    model.train(was_training)
    return metrics, counts


def train(config: TrainConfig, model_config: VQVAEConfig) -> dict[str, Any]:
    """Run training; returns the final held-out metrics (on rank 0; {} elsewhere)."""
    config.validate(model_config)
    place, device = setup_distributed(config.device)
    out = Path(config.out)
    checkpoint_dir, state_path = out / "checkpoint", out / "trainer_state.pt"
    torch.manual_seed(config.seed)  # same initial weights on every rank

    start_step, start_epoch = 0, 0
    if config.resume:
        loaded = load_checkpoint(checkpoint_dir, device)
        model = loaded.model
        model_config = loaded.config
    else:
        model = VQVAE(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.resume:
        state = load_trainer_state(state_path)
        optimizer.load_state_dict(state["optimizer"])
        start_step, start_epoch = int(state["step"]), int(state["epoch"]) + 1
        torch.set_rng_state(state["torch_rng"])
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step),
                                                  last_epoch=start_step - 1 if start_step else -1)
    model.train()
    # Each rank gets its own crops; the quantizer keeps the codebook identical across ranks itself.
    torch.manual_seed(config.seed + 1 + place.rank)
    trainable: torch.nn.Module = model
    if place.enabled:
        trainable = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    train_set = datasets.build_dataset(config.data, config.image_size, "train", seed=config.seed)
    heldout_set = datasets.build_dataset(config.data, config.image_size, "heldout", seed=config.seed,
                                         length=config.heldout_crops)
    data_variance = datasets.data_variance(train_set)
    # Reconstruction MSE is in normalised units; NMSE divides by the data variance in those units.
    normalised_variance = data_variance / (sum(model_config.pixel_std) / len(model_config.pixel_std)) ** 2
    batches = infinite_batches(train_set, config.batch_size, config.seed, place, config.num_workers, start_epoch)
    autocast = device.type == "cuda"  # bf16 convolutions on GPU; the quantizer stays float32 inside

    if place.is_main:
        out.mkdir(parents=True, exist_ok=True)
    metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8") if place.is_main else None  # noqa: SIM115
    history: list[dict[str, Any]] = []
    progress = tqdm(total=config.steps, initial=start_step, disable=not place.is_main, dynamic_ncols=True,
                    file=sys.stderr, mininterval=2.0)
    started = time.perf_counter()
    window_start, window_images = time.perf_counter(), 0
    epoch = start_epoch
    try:
        for step in range(start_step + 1, config.steps + 1):
            epoch, batch = next(batches)
            pixels = batch.to(device, non_blocking=True)
            x = model_config.normalize(pixels)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                output = trainable(x)
            recon_mse = F.mse_loss(output.reconstruction.float(), x)
            loss = recon_mse + output.vq_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            window_images += pixels.shape[0] * place.world_size
            progress.update(1)

            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "recon_mse": recon_mse.item(),
                    "nmse": recon_mse.item() / normalised_variance,
                    "vq_loss": output.vq_loss.item(),
                    "perplexity": float(output.perplexity),
                    "codes_used": int(output.codes_used),
                    "restarts": model.quantizer.restarts_total,
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": window_images / max(elapsed, 1e-9),
                }
                window_start, window_images = time.perf_counter(), 0
                history.append(record)
                progress.set_postfix(nmse=f"{record['nmse']:.4f}", ppl=f"{record['perplexity']:.0f}",
                                     codes=record["codes_used"], img_s=f"{record['images_per_s']:.0f}")
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
            if place.is_main and config.eval_every and step % config.eval_every == 0 and step != config.steps:
                heldout_metrics, _ = evaluate_heldout(model, heldout_set, config.batch_size)
                if metrics_file:
                    metrics_file.write(json.dumps({"step": step, "heldout": heldout_metrics}) + "\n")
                progress.write(f"step {step}: held-out PSNR {heldout_metrics['psnr']:.2f} dB, "
                               f"codes used {heldout_metrics['codes_used']}")
            if (config.checkpoint_every and step % config.checkpoint_every == 0 and step != config.steps
                    and place.is_main):
                _save(model, optimizer, config, model_config, checkpoint_dir, state_path, step, epoch,
                      started, {}, None, place, start_step)
    finally:
        progress.close()
        if metrics_file:
            metrics_file.close()

    codebook_spread = codebook_divergence(model, place)
    final: dict[str, Any] = {}
    if place.is_main:
        final, counts = evaluate_heldout(model, heldout_set, config.batch_size)
        final["ddp_codebook_max_abs_diff"] = codebook_spread
        model_id = _save(model, optimizer, config, model_config, checkpoint_dir, state_path, config.steps, epoch,
                         started, final, counts, place, start_step)
        _write_figures(out, model, heldout_set, history)
        print(json.dumps({"heldout": final, "out": str(out), "model_id": model_id}))
    if place.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return final


def _save(model: VQVAE, optimizer: torch.optim.Optimizer, config: TrainConfig, model_config: VQVAEConfig,
          checkpoint_dir: Path, state_path: Path, step: int, epoch: int, started: float,
          heldout_metrics: dict[str, Any], counts: torch.Tensor | None, place: Distributed, start_step: int) -> str:
    """Write the checkpoint (with its record of how it was made) and the trainer state; returns its model_id."""
    device_name = (torch.cuda.get_device_name() if model.device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    metadata = {
        "name": config.name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "steps": step,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "resumed_from_step": start_step or None,
        "training": dataclasses.asdict(config),
        "data": datasets.describe(config.data, "train"),
        "hardware": {"device": device_name, "processes": place.world_size, "torch": torch.__version__},
        "metrics": {"heldout_crops": heldout_metrics} if heldout_metrics else {},
        "codebook_usage": counts.long().tolist() if counts is not None else None,
    }
    save_checkpoint(checkpoint_dir, model, metadata)
    save_trainer_state(state_path, optimizer, step, epoch)
    return str(read_checkpoint_record(checkpoint_dir)["model_id"])


def _write_figures(out: Path, model: VQVAE, heldout: Dataset, history: list[dict[str, Any]]) -> None:
    count = min(8, len(heldout))
    originals = torch.stack([heldout[i] for i in range(count)]).to(model.device)
    model.eval()
    reconstructions, _ = reconstruct(model, originals)
    save_reconstructions(out / "reconstructions.png", originals, reconstructions)
    if history:
        save_training_plot(out / "training.png", history)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqtok train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_arguments(parser, TrainConfig, "VQTOK_TRAIN_", title="training (env VQTOK_TRAIN_*)")
    add_dataclass_arguments(parser, VQVAEConfig, "VQTOK_MODEL_", skip=("in_channels",),
                            title="model (env VQTOK_MODEL_*)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model_config = dataclass_from_args(VQVAEConfig, args)
        config = dataclass_from_args(TrainConfig, args)
        final = train(config, model_config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vqtok train: {exc}", file=sys.stderr)
        return 2
    return 0 if not final or math.isfinite(final.get("mse", 0.0)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
