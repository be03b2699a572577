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
import itertools
import json
import math
import os
import pickle
import platform
import sys
import time
from collections import deque
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
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from vqtok.model import data as datasets
from vqtok.model.checkpoint import (
    CodebookUsage,
    Metrics,
    Provenance,
    load_checkpoint,
    pick_device,
    read_checkpoint_record,
    save_checkpoint,
)
from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
from vqtok.model.evaluate import evaluate_images, reconstruct
from vqtok.model.losses import gradient_loss
from vqtok.model.options import add_dataclass_arguments, dataclass_from_args
from vqtok.model.quantizers import Reducer
from vqtok.model.vqvae import VQVAE


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's own hyperparameters live in ``NetworkConfig`` and ``CodebookTrainingConfig``).

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
      log_every: steps between metrics.jsonl lines (0: every 1% of the run, so curves have 100 points).
      eval_every: steps between held-out evaluations (0: only at the end).
      checkpoint_every: steps between checkpoints (0: only at the end).
      num_workers: DataLoader worker processes.
      heldout: an image folder's held-out split: a fraction ("0.05", "5%") or a count of images ("3"); with
        two images or more each split keeps one. The photos and CIFAR-10 have fixed splits.
      heldout_crops: held-out crops evaluated during training.
      name: the model's name, recorded in the checkpoint.
      crops_per_image: folder data: random crops of each training image per epoch (a folder of a few
        dozen photos gives a few dozen crops per epoch otherwise, fewer than one batch).
      augment: folder data: random scale (a window of up to twice the crop side, resized) and left-right
        flips of the training crops; held-out crops are never augmented.
      recon_loss: "mse" (the seed's: it is what PSNR measures) or "l1" (less blurry on edges, as the VQGAN
        family's pixel term, at a small cost in PSNR). No perceptual or adversarial term: both need
        pretrained networks we cannot ship.
      gradient_loss_weight: weight of a gradient-matching term added to the reconstruction loss: the L1
        distance between the horizontal and vertical pixel differences of the reconstruction and of the
        target (``model.losses.gradient_loss``), against the lattice a decoder can leave at the token period.
        0 (default) turns it off: nothing is computed.
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
    log_every: int = 0
    eval_every: int = 1000
    checkpoint_every: int = 1000
    num_workers: int = 0
    heldout: str = "5%"
    heldout_crops: int = 256
    name: str = "vqtok"
    crops_per_image: int = 1
    augment: bool = False
    recon_loss: Literal["mse", "l1"] = "mse"
    gradient_loss_weight: float = 0.0

    def validate(self, network: NetworkConfig) -> None:
        if self.log_every < 0:
            raise ValueError(f"--log-every must be >= 0 (0: every 1% of the run), got {self.log_every}")
        for name in ("steps", "batch_size", "heldout_crops", "crops_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        datasets.parse_heldout(self.heldout)  # a ValueError naming --heldout
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.gradient_loss_weight < math.inf:
            raise ValueError(f"--gradient-loss-weight must be >= 0 and finite, got {self.gradient_loss_weight}")
        if self.image_size % network.downsample:
            raise ValueError(
                f"--image-size {self.image_size} must be a multiple of --downsample {network.downsample}"
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


def distributed_reducer() -> Reducer:
    """The quantizer's reducer under torchrun: statistics summed over ranks, restarts from rank 0."""
    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tensor, src=0)
        return tensor

    return Reducer(all_reduce_sum, broadcast_from_rank0)


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


def epoch_order(dataset: Dataset, seed: int, epoch: int, place: Distributed) -> list[int]:
    """This rank's item order for ``epoch``: a permutation fixed by (seed, epoch), disjoint across ranks."""
    if place.enabled:
        sampler = DistributedSampler(dataset, place.world_size, place.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(len(dataset), generator=generator).tolist()


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


def save_trainer_state(path: Path, state: dict[str, Any]) -> None:
    """``Trainer.trainer_state()`` for --resume; written to a temp file and renamed (atomic).

    Only tensors and plain Python values (dicts, lists, tuples, numbers, strings, None), so
    ``load_trainer_state`` reads it with ``torch.load(weights_only=True)``, which runs no pickled code.
    The RNG states are uint8 tensors; the data pipeline needs none (every item draws from its own
    generator seeded by seed, epoch and index, see ``model.data``).
    """
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


#: ``codes_used_window`` counts the distinct codes of the last batches holding this many tokens per code (5 x K):
#: one batch has far fewer tokens than a big codebook has codes, so per-batch counts cannot show its use.
USAGE_WINDOW_TOKENS_PER_CODE = 5
USAGE_WINDOW_MAX_STEPS = 1000

FIGURE_MAX_SIDE = 768  # held-out images larger than this are shown (and measured) scaled down to it


def save_reconstructions(path: Path, shown: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """reconstructions.png: each held-out image at its own size, original left, reconstruction right,
    under a label with its name, size and PSNR. ``shown``: (name, original, reconstruction), each
    (3, H, W) in [0, 1]."""
    from PIL import ImageDraw

    label_height, gap = 18, 8
    rows = []
    for name, original, reconstruction in shown:
        mse = float((reconstruction.double() - original.double()).pow(2).mean())
        psnr = 10.0 * math.log10(1.0 / mse) if mse > 0 else float("inf")  # peak value 1.0
        pair = torch.cat([original, torch.ones(3, original.shape[1], gap), reconstruction], dim=2)
        pixels = (pair.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        row = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + label_height), "white")
        row.paste(Image.fromarray(pixels), (0, label_height))
        height, width = original.shape[1:]
        ImageDraw.Draw(row).text((2, 3), f"{name}  {width}x{height}  original | reconstruction  PSNR {psnr:.2f} dB",
                                 fill="black")
        rows.append(row)
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height + gap for r in rows)), "white")
    top = 0
    for row in rows:
        canvas.paste(row, (0, top))
        top += row.height + gap
    canvas.save(path)


def write_reconstructions(model: VQVAE, source: Any, path: Path, count: int = 4) -> None:
    """reconstructions.png of up to ``count`` whole held-out images of a data spec or source."""
    model.eval()
    shown = []
    for name, image in itertools.islice(datasets.iter_full_images(source, "heldout"), count):
        original = _figure_size(image).to(model.device)
        reconstruction, _ = reconstruct(model, original[None])
        shown.append((name, original.cpu(), reconstruction[0].cpu()))
    if shown:
        save_reconstructions(path, shown)


def _figure_size(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) scaled down (antialiased) so its longer side is at most ``FIGURE_MAX_SIDE``."""
    height, width = image.shape[1:]
    scale = FIGURE_MAX_SIDE / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def save_training_plot(path: Path, history: list[dict[str, Any]]) -> None:
    """training.png: reconstruction loss, codebook use, held-out PSNR and learning rate against step.

    ``history`` holds metrics.jsonl's records: training records (``recon_mse``, ...) and held-out ones
    (``{"step", "heldout": {...}}``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "recon_mse" in h]
    heldout = [h for h in history if "heldout" in h]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    steps = [h["step"] for h in train]
    axes[0].plot(steps, [h["recon_mse"] for h in train], marker=".", markersize=3)
    axes[0].set(title="reconstruction MSE (normalised pixels)", yscale="log")
    axes[1].plot(steps, [h["perplexity"] for h in train], marker=".", markersize=3, label="perplexity")
    axes[1].plot(steps, [h["codes_used"] for h in train], marker=".", markersize=3, label="codes used")
    axes[1].set(title="codebook use per batch")
    axes[1].legend()
    axes[2].plot([h["step"] for h in heldout], [h["heldout"]["psnr"] for h in heldout], marker="o")
    axes[2].set(title="held-out PSNR (dB)")
    axes[3].plot(steps, [h["lr"] for h in train], marker=".", markersize=3)
    axes[3].set(title="learning rate")
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_heldout(model: VQVAE, heldout: Dataset, batch_size: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Held-out crop metrics (see ``model.evaluate``) with the model in eval mode."""
    was_training = model.training
    model.eval()
    accumulator = evaluate_images(model, (heldout[i] for i in range(len(heldout))), batch_size)
    model.train(was_training)
    return accumulator.result(), accumulator.counts


class Trainer:
    """One training run: it owns the model, the optimiser and its schedule, the data order, the metrics
    and the saving, and can stop after any checkpoint and resume to the same weights.

    Resume is exact: the trainer state holds the optimiser and scheduler, the step, the position in
    the data (epoch and batches consumed in it) and every RNG state, restored after seeding. A run
    killed after a checkpoint and resumed with the same command ends with the weights of the
    uninterrupted run (bit-identical on the CPU in one process).
    """

    def __init__(self, config: TrainConfig, network: NetworkConfig,
                 codebook_training: CodebookTrainingConfig | None = None) -> None:
        codebook_training = codebook_training or CodebookTrainingConfig()
        config.validate(network)
        codebook_training.check_network(network)
        self.config = config
        self.place, self.device = setup_distributed(config.device)
        self.out = Path(config.out)
        self.checkpoint_dir, self.state_path = self.out / "checkpoint", self.out / "trainer_state.pt"
        torch.manual_seed(config.seed)  # same initial weights on every rank
        if config.resume:  # the checkpoint's configs are the run's configs: check the schedule against them
            loaded = load_checkpoint(self.checkpoint_dir, self.device)
            network, codebook_training = loaded.network, loaded.codebook_training
            config.validate(network)
            self.model = loaded.model.train()
        else:
            self.model = VQVAE(network, codebook_training).to(self.device)
        self.network, self.codebook_training = network, codebook_training
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(config, step))
        self.step, self.epoch, self.batches_into_epoch = 0, 0, 0
        self.start_step = 0
        self.previous_wall_time = 0.0  # training time of the runs this one resumes
        # The training stream of random numbers (codebook restarts, k-means init): its own per rank.
        torch.manual_seed(config.seed + 1 + self.place.rank)
        if config.resume:
            self._restore(load_trainer_state(self.state_path))
        self.model.train()
        self.trainable: torch.nn.Module = self.model
        if self.place.enabled:
            self.model.quantizer.reducer = distributed_reducer()
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.trainable = DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)

        # The data spec is parsed once; both splits share its scan, and it is described once per run.
        source = datasets.open_source(config.data)
        if isinstance(source, datasets.FolderSource):
            source = source.with_heldout(config.heldout)
        self.source = source
        self.train_set = datasets.build_dataset(source, config.image_size, "train", seed=config.seed,
                                                crops_per_image=config.crops_per_image, augment=config.augment,
                                                cache_decoded=True)
        per_epoch, per_step = len(self.train_set), config.batch_size * self.place.world_size
        if per_epoch < per_step:  # every epoch would end before its first (full) batch: no step would ever run
            raise ValueError(
                f"--data {config.data}: one epoch is {per_epoch} training crops, fewer than one step's "
                f"{per_step} (--batch-size {config.batch_size} x {self.place.world_size} process(es)); "
                f"pass --crops-per-image {math.ceil(per_step * config.crops_per_image / per_epoch)} or more"
            )
        self.heldout_set = datasets.build_dataset(source, config.image_size, "heldout", seed=config.seed,
                                                  length=config.heldout_crops)
        self.data_description = datasets.describe(source, "train")
        data_variance = datasets.data_variance(self.train_set)
        # Reconstruction MSE is in normalised units; NMSE divides by the data variance in those units.
        self.normalised_variance = data_variance / (sum(network.pixel_std) / len(network.pixel_std)) ** 2
        self.autocast = self.device.type == "cuda"  # bf16 convolutions on GPU; the quantizer stays float32
        self.log_every = config.log_every or max(1, config.steps // 100)
        tokens_per_step = config.batch_size * self.place.world_size * (config.image_size // network.downsample) ** 2
        window_steps = math.ceil(USAGE_WINDOW_TOKENS_PER_CODE * network.num_embeddings / tokens_per_step)
        self.usage_window: deque[torch.Tensor] = deque(maxlen=min(USAGE_WINDOW_MAX_STEPS, window_steps))
        self.history: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    # --- state -------------------------------------------------------------------------------------
    def _restore(self, state: dict[str, Any]) -> None:
        """Optimiser, schedule, position and RNG states of a saved run (after seeding, so they win)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = self.start_step = int(state["step"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # an older trainer state: rebuild the schedule at the step (it is a function of the step)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: lr_factor(self.config, step), last_epoch=self.step - 1
            )
        self.epoch = int(state["epoch"])
        self.previous_wall_time = float(state.get("wall_time_s", 0.0))
        self.batches_into_epoch = int(state.get("batches_into_epoch", 0))
        if "batches_into_epoch" not in state:  # older trainer states resumed at the next epoch
            self.epoch += 1
        torch.set_rng_state(state["torch_rng"])
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)

    def trainer_state(self) -> dict[str, Any]:
        """Tensors and plain values only (``load_trainer_state`` reads them with ``weights_only=True``)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batches_into_epoch": self.batches_into_epoch,
            "wall_time_s": self.previous_wall_time + time.perf_counter() - self.started,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None,
        }

    # --- data --------------------------------------------------------------------------------------
    def batches(self) -> Iterator[torch.Tensor]:
        """Endless (B, C, S, S) batches from the current position; new crops and order every epoch.

        The loader gets a generator of its own, so the data pipeline never draws from the training
        stream of random numbers (which a resumed run restores exactly).
        """
        config = self.config
        while True:
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(self.epoch)
            order = epoch_order(self.train_set, config.seed, self.epoch, self.place)
            order = order[self.batches_into_epoch * config.batch_size:]
            loader = DataLoader(self.train_set, batch_size=config.batch_size, sampler=order, drop_last=True,
                                num_workers=config.num_workers, generator=torch.Generator().manual_seed(self.epoch))
            for batch in loader:
                self.batches_into_epoch += 1
                yield batch
            self.epoch, self.batches_into_epoch = self.epoch + 1, 0

    # --- the loop ----------------------------------------------------------------------------------
    def train_step(self, batch: torch.Tensor) -> dict[str, Any]:
        """One optimiser step on a (B, C, S, S) batch in [0, 1]; the step's figures."""
        x = self.network.normalize(batch.to(self.device, non_blocking=True))
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            output = self.trainable(x)
        reconstruction = output.reconstruction.float()
        recon_mse = F.mse_loss(reconstruction, x)
        recon_loss = recon_mse if self.config.recon_loss == "mse" else F.l1_loss(reconstruction, x)
        figures: dict[str, Any] = {"recon_mse": recon_mse, "output": output}
        if self.config.gradient_loss_weight > 0:  # off by default: not computed, the loss is unchanged
            figures["gradient_loss"] = self.config.gradient_loss_weight * gradient_loss(reconstruction, x)
            recon_loss = recon_loss + figures["gradient_loss"]
        loss = recon_loss + output.vq_loss  # reconstruction + codebook/commitment (+ entropy) terms
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.usage_window.append(output.counts.detach())  # (K,) this step's code counts (global under DDP)
        return figures

    def run(self) -> dict[str, Any]:
        """Train to ``config.steps``; returns the final held-out metrics (on rank 0; {} elsewhere)."""
        config, place = self.config, self.place
        if place.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.history = self._metrics_so_far()
        metrics_file = open(self.out / "metrics.jsonl", "a", encoding="utf-8") if place.is_main else None  # noqa: SIM115
        progress = tqdm(total=config.steps, initial=self.step, disable=not place.is_main, dynamic_ncols=True,
                        file=sys.stderr, mininterval=2.0)
        window_start, window_images = time.perf_counter(), 0
        batches = self.batches()
        if getattr(self.model.quantizer, "needs_initialisation", False):
            self._initialise_codebook()
        try:
            while self.step < config.steps:
                figures = self.train_step(next(batches))
                window_images += config.batch_size * place.world_size
                progress.update(1)
                step = self.step
                if step % self.log_every == 0 or step == config.steps:
                    record = self._record(figures, window_images / max(time.perf_counter() - window_start, 1e-9))
                    window_start, window_images = time.perf_counter(), 0
                    self.history.append(record)
                    progress.set_postfix(nmse=f"{record['nmse']:.4f}", ppl=f"{record['perplexity']:.0f}",
                                         codes=record["codes_used"], img_s=f"{record['images_per_s']:.0f}")
                    if metrics_file:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                if place.is_main and config.eval_every and step % config.eval_every == 0 and step != config.steps:
                    heldout, _ = evaluate_heldout(self.model, self.heldout_set, config.batch_size)
                    self.history.append({"step": step, "heldout": heldout})
                    if metrics_file:
                        metrics_file.write(json.dumps({"step": step, "heldout": heldout}) + "\n")
                        metrics_file.flush()
                    progress.write(f"step {step}: held-out PSNR {heldout['psnr']:.2f} dB, "
                                   f"codes used {heldout['codes_used']}")
                checkpoint_due = config.checkpoint_every and step % config.checkpoint_every == 0
                if checkpoint_due and step != config.steps and place.is_main:
                    self.save({}, None)
        finally:
            progress.close()
            if metrics_file:
                metrics_file.close()
        return self._finish()

    def _initialise_codebook(self) -> None:
        """k-means initialisation from ``kmeans_vectors_per_code`` x K encoder outputs, gathered over as many
        batches as that takes (one batch is far too few for K = 8,192), before the first step.

        The batches come from a loader of their own over the first epoch's crops, so the training stream
        (its order, position and random numbers) is the same as without initialisation.
        """
        wanted = self.codebook_training.kmeans_vectors_per_code * self.network.num_embeddings
        loader = DataLoader(self.train_set, batch_size=self.config.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.config.seed + 7919 * (1 + self.place.rank)))
        gathered, count = [], 0
        self.model.eval()
        with torch.no_grad():
            while count < wanted:
                for batch in loader:
                    x = self.network.normalize(batch.to(self.device))
                    latents = self.model.latents(x).float()  # (B, D, h, w)
                    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (B*h*w, D)
                    gathered.append(flat)
                    count += flat.shape[0]
                    if count >= wanted:
                        break
        vectors = torch.cat(gathered)[:wanted]
        if self.place.is_main:
            print(f"k-means initialisation of {self.network.num_embeddings} codes from {vectors.shape[0]:,} "
                  "encoder outputs", file=sys.stderr, flush=True)
        self.model.quantizer.initialise_codebook(vectors)
        self.model.train()

    def _record(self, figures: dict[str, Any], images_per_s: float) -> dict[str, Any]:
        recon_mse, output = figures["recon_mse"].item(), figures["output"]
        record = {
            "step": self.step,
            "recon_mse": recon_mse,
            "nmse": recon_mse / self.normalised_variance,
            "vq_loss": output.vq_loss.item(),
            "perplexity": float(output.perplexity),
            "codes_used": int(output.codes_used),
            # distinct codes over the last steps' tokens (up to 5 x K of them): the codebook in use
            "codes_used_window": int((torch.stack(list(self.usage_window)).sum(dim=0) > 0).sum()),
            "window_tokens": int(sum(float(counts.sum()) for counts in self.usage_window)),
            "restarts": self.model.quantizer.restarts_total,
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": images_per_s,
        }
        return record | self._optional_terms(figures)

    @staticmethod
    def _optional_terms(figures: dict[str, Any]) -> dict[str, float]:
        """The weighted optional loss terms of a step, those that are on: ``entropy_loss`` (part of ``vq_loss``)
        and ``gradient_loss`` (part of the reconstruction loss)."""
        terms = {"entropy_loss": figures["output"].entropy_loss, "gradient_loss": figures.get("gradient_loss")}
        return {name: value.item() for name, value in terms.items() if value is not None}

    def _metrics_so_far(self) -> list[dict[str, Any]]:
        """metrics.jsonl up to the resumed step (lines a killed run wrote after its last checkpoint go)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.start_step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        return [json.loads(line) for line in kept]

    def _finish(self) -> dict[str, Any]:
        codebook_spread = codebook_divergence(self.model, self.place)
        final: dict[str, Any] = {}
        if self.place.is_main:
            final, counts = evaluate_heldout(self.model, self.heldout_set, self.config.batch_size)
            self.history.append({"step": self.step, "heldout": dict(final)})
            final["ddp_codebook_max_abs_diff"] = codebook_spread
            model_id = self.save(final, counts)
            self._write_figures()
            print(json.dumps({"heldout": final, "out": str(self.out), "model_id": model_id}))
        if self.place.enabled:
            dist.barrier()
            dist.destroy_process_group()
        return final

    # --- outputs -----------------------------------------------------------------------------------
    def save(self, heldout_metrics: dict[str, Any], counts: torch.Tensor | None) -> str:
        """Write the checkpoint (with its record of how it was made) and the trainer state; its model_id."""
        model, config = self.model, self.config
        threads = torch.get_num_threads()
        device_name = (torch.cuda.get_device_name() if model.device.type == "cuda" else
                       f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' * (threads != 1)})")
        provenance = Provenance(
            name=config.name,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            steps=self.step,
            wall_time_s=round(self.previous_wall_time + time.perf_counter() - self.started, 1),
            resumed_from_step=self.start_step or None,
            training=dataclasses.asdict(config),
            data=self.data_description,
            hardware={"device": device_name, "processes": self.place.world_size, "torch": torch.__version__},
        )
        save_checkpoint(
            self.checkpoint_dir, model, provenance,
            Metrics(heldout_crops=heldout_metrics or None),
            CodebookUsage.from_counts(counts.long().tolist()) if counts is not None else None,
        )
        save_trainer_state(self.state_path, self.trainer_state())
        return str(read_checkpoint_record(self.checkpoint_dir).model_id)

    def _write_figures(self) -> None:
        write_reconstructions(self.model, self.source, self.out / "reconstructions.png")
        if self.history:
            save_training_plot(self.out / "training.png", self.history)


def train(config: TrainConfig, network: NetworkConfig,
          codebook_training: CodebookTrainingConfig | None = None) -> dict[str, Any]:
    """Run training; returns the final held-out metrics (on rank 0; {} elsewhere)."""
    return Trainer(config, network, codebook_training).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqtok train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_arguments(parser, TrainConfig, "VQTOK_TRAIN_", title="training (env VQTOK_TRAIN_*)")
    # Both model parts share the VQTOK_MODEL_ prefix (the flags predate the split; no field name repeats).
    add_dataclass_arguments(parser, NetworkConfig, "VQTOK_MODEL_", skip=("in_channels",),
                            title="model: network (env VQTOK_MODEL_*)")
    add_dataclass_arguments(parser, CodebookTrainingConfig, "VQTOK_MODEL_",
                            title="model: codebook training (env VQTOK_MODEL_*)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        network = dataclass_from_args(NetworkConfig, args)
        codebook_training = dataclass_from_args(CodebookTrainingConfig, args)
        config = dataclass_from_args(TrainConfig, args)
        final = train(config, network, codebook_training)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vqtok train: {exc}", file=sys.stderr)
        return 2
    return 0 if not final or math.isfinite(final.get("mse", 0.0)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
