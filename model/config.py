"""Model configuration: every hyperparameter of the VQ-VAE, saved inside every checkpoint.

The defaults are the seed's table (zalandoresearch/pytorch-vq-vae, after Sonnet's ``vqvae.py``),
plus the downsampling factor, the pixel normalisation and the codebook-health features.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

QuantizerKind = Literal["ema", "plain"]


@dataclass(frozen=True)
class VQVAEConfig:
    """Hyperparameters of one VQ-VAE.

    Attributes:
      in_channels: image channels (3, RGB).
      num_hiddens: channels of the encoder/decoder trunk.
      num_residual_hiddens: channels inside each residual block.
      num_residual_layers: residual blocks in each residual stack.
      embedding_dim: D, the size of one codebook vector (channels after the 1x1 pre-VQ conv).
      num_embeddings: K, the number of codebook vectors (the token vocabulary).
      commitment_cost: beta, weight of the encoder's commitment loss.
      quantizer: "ema" (codebook learned by exponential moving averages) or "plain"
        (codebook learned by gradient through the codebook loss).
      decay: EMA decay of the cluster sizes and sums ("ema" only).
      epsilon: Laplace smoothing of the EMA cluster sizes ("ema" only).
      downsample: f, the ratio image side / token-grid side: 4, 8 or 16.
      dead_code_window: a code unused for this many training steps is re-seeded from the current
        batch's encoder outputs; 0 disables restarts.
      dead_code_threshold: "ema" only: a code whose EMA cluster size (vectors per step) falls below
        this is re-seeded too, so rarely used codes move to where the data is (0 disables).
      kmeans_init: initialise the codebook by k-means on the first training batch.
      kmeans_iters: Lloyd iterations of that k-means.
      pixel_mean, pixel_std: per-channel normalisation applied to images in [0, 1]:
        ``x = (pixels - mean) / std``. The seed's (0.5, 1.0) maps pixels to [-0.5, 0.5].
    """

    in_channels: int = 3
    num_hiddens: int = 128
    num_residual_hiddens: int = 32
    num_residual_layers: int = 2
    embedding_dim: int = 64
    num_embeddings: int = 512
    commitment_cost: float = 0.25
    quantizer: QuantizerKind = "ema"
    decay: float = 0.99
    epsilon: float = 1e-5
    downsample: int = 4
    dead_code_window: int = 100
    dead_code_threshold: float = 0.0
    kmeans_init: bool = False
    kmeans_iters: int = 10
    pixel_mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    pixel_std: tuple[float, ...] = field(default=(1.0, 1.0, 1.0))

    def __post_init__(self) -> None:
        # JSON has no tuples: accept lists and store tuples so configs compare equal after a round trip.
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        positive = ("in_channels", "num_hiddens", "num_residual_hiddens", "embedding_dim", "num_embeddings")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_residual_layers < 0:
            raise ValueError(f"num_residual_layers must be >= 0, got {self.num_residual_layers}")
        if self.downsample not in (4, 8, 16):
            raise ValueError(f"downsample must be 4, 8 or 16, got {self.downsample}")
        if self.quantizer not in ("ema", "plain"):
            raise ValueError(f"quantizer must be 'ema' or 'plain', got {self.quantizer!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.commitment_cost < 0:
            raise ValueError(f"commitment_cost must be >= 0, got {self.commitment_cost}")
        if self.dead_code_window < 0:
            raise ValueError(f"dead_code_window must be >= 0, got {self.dead_code_window}")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}")
        if self.dead_code_threshold > 0 and self.quantizer != "ema":
            raise ValueError("dead_code_threshold needs the 'ema' quantizer (it reads the EMA cluster sizes)")
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        for name in ("pixel_mean", "pixel_std"):
            if len(getattr(self, name)) != self.in_channels:
                raise ValueError(f"{name} needs {self.in_channels} values, got {len(getattr(self, name))}")
        if any(s <= 0 for s in self.pixel_std):
            raise ValueError(f"pixel_std must be > 0, got {self.pixel_std}")

    @property
    def num_downsamples(self) -> int:
        """Stride-2 stages in the encoder (and transposed ones in the decoder): log2(downsample)."""
        return int(math.log2(self.downsample))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQVAEConfig:
        """Build a config from ``to_dict`` output; an unknown key is a ``ValueError`` naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**data)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, C, H, W) -> model inputs ``(pixels - mean) / std``, same shape."""
        mean = torch.tensor(self.pixel_mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.pixel_std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs (B, C, H, W) -> images in [0, 1] (clamped), same shape."""
        mean = torch.tensor(self.pixel_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.pixel_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)
