"""Model configuration: every hyperparameter of the VQ-VAE, saved inside every checkpoint.

The defaults are the seed's table (zalandoresearch/pytorch-vq-vae, after Sonnet's ``vqvae.py``),
plus the downsampling factor, the pixel normalisation and the codebook-health features.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

QuantizerKind = Literal["ema", "plain"]

# Fields that decide what ``encode`` and ``decode`` compute: the architecture, the codebook size and
# the pixel normalisation. The checkpoint's ``model_id`` hashes exactly these (plus the weights).
TOKEN_FIELDS: tuple[str, ...] = (
    "in_channels", "num_hiddens", "num_residual_hiddens", "num_residual_layers", "embedding_dim",
    "num_embeddings", "quantizer", "downsample", "pixel_mean", "pixel_std",
)
# Fields read only by training (losses, EMA updates, dead-code restarts, k-means init): the inference
# path (``VQVAE.encode`` / ``decode``: nearest-code search and lookup) never reads them, so they cannot
# change a token or a pixel and stay out of ``model_id``. ``quantizer`` stays in TOKEN_FIELDS: it picks
# the module that runs the search, even though both kinds search the same way today.
TRAINING_ONLY_FIELDS: tuple[str, ...] = (
    "commitment_cost", "decay", "epsilon", "dead_code_window", "dead_code_threshold", "kmeans_init", "kmeans_iters",
)

# Upper bounds, checked before any tensor is allocated, so a mistyped or hostile config.json is a clear
# error instead of an out-of-memory crash. Per field: far above any VQ-VAE tokenizer (the bundled one has
# 128 hidden channels, K=512, D=64); in total: at most MAX_PARAMETERS numbers in the model's tensors
# (parameters and buffers; 8 GB of float32), see ``VQVAEConfig.parameter_count``.
FIELD_MAXIMA: dict[str, int] = {
    "in_channels": 16,
    "num_hiddens": 4096,
    "num_residual_hiddens": 4096,
    "num_residual_layers": 64,
    "embedding_dim": 4096,
    "num_embeddings": 1 << 20,
    "dead_code_window": 1_000_000_000,
    "kmeans_iters": 1000,
}
MAX_PARAMETERS = 2_000_000_000


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
        self._check_types()
        # JSON has no tuples: accept lists and store tuples so configs compare equal after a round trip;
        # floats given as integers (JSON ``1``) are stored as floats.
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _field_kinds()[f.name]
            if kind == "floats":
                object.__setattr__(self, f.name, tuple(float(v) for v in value))
            elif kind == "float":
                object.__setattr__(self, f.name, float(value))
        self.validate()

    def _check_types(self) -> None:
        """Raise ``TypeError`` naming the first field whose value has the wrong type.

        Strict, as JSON gives it: ``True`` is not an integer and ``"128"`` is not a number.
        """
        for name, kind in _field_kinds().items():
            value = getattr(self, name)
            if kind == "int" and not _is_int(value):
                raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
            if kind == "float" and not _is_number(value):
                raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
            if kind == "bool" and not isinstance(value, bool):
                raise TypeError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
            if kind == "str" and not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
            if kind == "floats" and not (isinstance(value, list | tuple) and all(_is_number(v) for v in value)):
                raise TypeError(f"{name} must be a list of numbers, got {value!r}")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range (see ``FIELD_MAXIMA``).

        Every bound is checked arithmetically, before a model is built: nothing is allocated.
        """
        positive = ("in_channels", "num_hiddens", "num_residual_hiddens", "embedding_dim", "num_embeddings")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, maximum in FIELD_MAXIMA.items():
            if getattr(self, name) > maximum:
                raise ValueError(f"{name} must be <= {maximum}, got {getattr(self, name)}")
        for name, kind in _field_kinds().items():  # JSON has NaN and Infinity; no field takes them
            value = getattr(self, name)
            values = value if kind == "floats" else (value,) if kind == "float" else ()
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite, got {value}")
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
        if (count := self.parameter_count()) > MAX_PARAMETERS:
            raise ValueError(
                f"the model would hold {count:,} numbers (parameters and buffers), more than the limit of "
                f"{MAX_PARAMETERS:,}; lower num_hiddens, num_residual_hiddens, embedding_dim or num_embeddings"
            )

    def parameter_count(self) -> int:
        """Numbers in the model's tensors (parameters and buffers), computed from the config alone.

        Mirrors ``model.blocks`` and ``model.quantizer`` exactly (a test checks it against
        ``VQVAE(config).state_dict()``), so the size is known before anything is allocated.
        """
        c, h, r = self.in_channels, self.num_hiddens, self.num_residual_hiddens
        d, k = self.embedding_dim, self.num_embeddings
        half, extra_stages = h // 2, self.num_downsamples - 2
        residual_stack = self.num_residual_layers * (h * r * 9 + r * h)  # 3x3 and 1x1 convs, no bias
        # weights + biases of: the two first 4x4 stride-2 convs, the further ones, the 3x3 conv, the residual stack
        encoder = ((c * half * 16 + half) + (half * h * 16 + h) + extra_stages * (h * h * 16 + h)
                   + (h * h * 9 + h) + residual_stack)
        pre_vq = h * d + d
        quantizer = k * d + k + 1  # codebook, steps_since_used, initialized
        if self.quantizer == "ema":
            quantizer += k + k * d  # ema_cluster_size, ema_embedding_sum
        # the 3x3 conv in, the residual stack, the 4x4 stride-2 transposed convs back to the image
        decoder = ((d * h * 9 + h) + residual_stack + extra_stages * (h * h * 16 + h)
                   + (h * half * 16 + half) + (half * c * 16 + c))
        return encoder + pre_vq + quantizer + decoder

    def token_fields(self) -> dict[str, Any]:
        """The fields that change tokens or decoded pixels (``TOKEN_FIELDS``), JSON-friendly."""
        everything = self.to_dict()
        return {name: everything[name] for name in TOKEN_FIELDS}

    @property
    def num_downsamples(self) -> int:
        """Stride-2 stages in the encoder (and transposed ones in the decoder): log2(downsample)."""
        return int(math.log2(self.downsample))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQVAEConfig:
        """Build a config from ``to_dict`` output; an unknown key is a ``ValueError`` naming it.

        A value of the wrong type is a ``TypeError`` and one out of range (``FIELD_MAXIMA``,
        ``MAX_PARAMETERS`` included) a ``ValueError``, both naming the field, raised before any
        tensor is allocated. Absent keys take their defaults (older checkpoints lack newer fields).
        """
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@functools.cache
def _field_kinds() -> dict[str, str]:
    """Field name -> "int", "float", "bool", "str" (a Literal) or "floats" (a tuple of floats)."""
    kinds: dict[str, str] = {}
    for name, annotation in typing.get_type_hints(VQVAEConfig).items():
        if typing.get_origin(annotation) is Literal:
            kinds[name] = "str"
        elif typing.get_origin(annotation) is tuple:
            kinds[name] = "floats"
        else:
            kinds[name] = {int: "int", float: "float", bool: "bool", str: "str"}[annotation]
    return kinds
