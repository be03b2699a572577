"""The loaded model and its two batch operations, run on the one inference thread.

``Engine`` owns the checkpoint, the device and the precision policy: ``torch.inference_mode`` and
channels_last always (on the CPU too: 1.1-1.65x faster for both bundled models with the same tokens,
``bench/model_paths.py``); on CUDA bf16 autocast for the convolutions while the nearest-code search
runs in float32 (on the CPU bf16 changes 2-3% of the tokens, so it stays float32). It does no HTTP
and no batching.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vqtok.model.checkpoint import Checkpoint, load_checkpoint, pick_device
from vqtok.service.schemas import ModelIdentity

logger = logging.getLogger("vqtok.service.engine")


class Engine:
    """A checkpoint on a device, with batch encode/decode in the service's precision policy."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.model = checkpoint.model
        self.config = checkpoint.network  # what serving needs; the codebook-training config is not read here
        self.autocast_dtype: torch.dtype | None = torch.bfloat16 if device.type == "cuda" else None
        self.model.to(memory_format=torch.channels_last)
        # The identity is fixed for the engine's life: built once, not per request (model_id is a hash).
        self._identity = ModelIdentity(
            name=checkpoint.name,
            weights_sha256=checkpoint.weights_sha256,
            model_id=checkpoint.model_id,
            num_embeddings=self.config.num_embeddings,
            embedding_dim=self.config.embedding_dim,
            downsample=self.config.downsample,
        )
        self.identity_headers: dict[str, str] = {
            "x-vqtok-model": self._identity.name, "x-vqtok-weights-sha256": self._identity.weights_sha256,
            "x-vqtok-model-id": self._identity.model_id,
        }

    @classmethod
    def load(cls, path: Path, device_choice: str) -> Engine:
        device = pick_device(device_choice)
        checkpoint = load_checkpoint(path, device)
        logger.info("loaded checkpoint %s (model_id %s) on %s", checkpoint.name, checkpoint.model_id[:12], device)
        return cls(checkpoint, device)

    @property
    def dtype(self) -> str:
        return str(self.autocast_dtype or torch.float32).removeprefix("torch.")

    def identity(self) -> ModelIdentity:
        """The model's identity for answers (a copy: callers may not change the engine's)."""
        return self._identity.model_copy()

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                yield

    @torch.inference_mode()
    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB on the CPU -> (B, H/f, W/f) int64 indices on the CPU."""
        x = pixels.to(self.device, non_blocking=True).float().div_(255.0)
        x = self.config.normalize(x)
        x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            indices = self.model.encode(x)  # convolutions in bf16 on CUDA; the code search stays float32
        return indices.cpu()

    @torch.inference_mode()
    def decode_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 indices in [0, K) on the CPU -> (B, h*f, w*f, 3) uint8 RGB on the CPU."""
        grids = indices.to(self.device, non_blocking=True)
        with self._autocast():
            x = self.model.decode(grids)  # (B, 3, H, W)
        pixels = self.config.denormalize(x.float()).mul_(255.0).round_().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous().cpu()

    def warm_up(self, batch_size: int, side: int) -> None:
        """One encode and one decode at ``batch_size`` x ``side`` x ``side``, so the first request is not slow."""
        f = self.config.downsample
        side = max(f, side // f * f)
        pixels = torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8)
        indices = self.encode_batch(pixels)
        self.decode_batch(indices)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def codebook_usage(self) -> tuple[list[int] | None, float | None, int | None]:
        """(usage counts, perplexity, codes used) recorded in the checkpoint, each None if absent.

        All three describe one distribution, the codes the trainer's final held-out evaluation chose.
        With usage counts (``record.codebook_usage``; K of them, checked on load), perplexity and codes
        used come from the counts (exp(entropy) of ``counts / sum``, and the non-zero ones). Without
        counts, they are the figures the record's usage section holds, else those of the held-out
        evaluation itself (``record.metrics.heldout_crops``: ``perplexity``, ``codes_used``).
        """
        record = self.checkpoint.record
        usage = record.codebook_usage
        if usage is not None and usage.counts is not None:
            return list(usage.counts), usage.perplexity, usage.codes_used
        perplexity = usage.perplexity if usage is not None else None
        codes_used = usage.codes_used if usage is not None else None
        if perplexity is None:
            perplexity = record.metrics.heldout_perplexity
        if codes_used is None:
            codes_used = record.metrics.heldout_codes_used
        return None, perplexity, codes_used

    def codebook_vectors(self) -> torch.Tensor:
        """(K, D) float32 codebook on the CPU."""
        with torch.inference_mode():
            return self.model.codebook.detach().float().cpu().clone()

    def checkpoint_info(self) -> dict[str, Any]:
        """The checkpoint folder's name (never an absolute path: /info must not map the server's
        filesystem) and the record's sections, JSON-friendly: ``format``, ``format_version`` (the
        layout the file was read from), ``codebook_training``, ``provenance`` and ``metrics``. The
        identity (``model_id``, the weights) is in /info's ``model``, the network config in its
        ``config``, and the bulky usage counts at /codebook."""
        record = self.checkpoint.record
        info = record.to_json()
        for key in ("network", "codebook_usage", "weights_sha256", "weights_file", "model_id"):
            del info[key]
        return {"path": self.checkpoint.path.name, **info, "format_version": record.format_version}
