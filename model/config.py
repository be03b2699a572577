"""Model configuration in two parts, both saved inside every checkpoint.

- ``NetworkConfig``: what defines the network, so what serving needs: the architecture, the codebook
  size and dimension, the quantizer kind, the downsampling factor and the pixel normalisation. Every
  field can change a token or a decoded pixel, so the checkpoint's ``model_id`` hashes all of them
  (plus the weights).
- ``CodebookTrainingConfig``: what only training reads: the commitment loss weight, the EMA decay and
  smoothing, dead-code restarts and k-means initialisation. The inference path (``VQVAE.encode`` /
  ``decode``: nearest-code search and lookup) never reads them, so they cannot change a token or a
  pixel and stay out of ``model_id``; a served model may leave them at their defaults.

The defaults are the seed's table (zalandoresearch/pytorch-vq-vae, after Sonnet's ``vqvae.py``),
plus the downsampling factor, the pixel normalisation and the codebook-health features. Both parts
take values as JSON gives them and refuse, naming the field, a value of the wrong type (``TypeError``)
or out of range (``ValueError``), before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import torch

QuantizerKind = Literal["ema", "plain"]

# Upper bounds, checked before any tensor is allocated, so a mistyped or hostile config.json is a clear
# error instead of an out-of-memory crash. Per field: far above any VQ-VAE tokenizer (the bundled one has
# 128 hidden channels, K=512, D=64); in total: at most MAX_PARAMETERS numbers in the model's tensors
# (parameters and buffers; 8 GB of float32), see ``NetworkConfig.parameter_count``.
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


class _StrictFields:
    """Shared by both configs: strict JSON types, list -> tuple and int -> float coercion, the per-field
    maxima, finiteness, ``to_dict`` / ``from_dict``. Subclasses (frozen dataclasses) add ``validate``."""

    def __post_init__(self) -> None:
        kinds = _field_kinds(type(self))
        for name, kind in kinds.items():
            _check_type(name, kind, getattr(self, name))
        # JSON has no tuples: accept lists and store tuples so configs compare equal after a round trip;
        # floats given as integers (JSON ``1``) are stored as floats.
        for name, kind in kinds.items():
            value = getattr(self, name)
            if kind == "floats":
                object.__setattr__(self, name, tuple(float(v) for v in value))
            elif kind == "float":
                object.__setattr__(self, name, float(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of range; nothing is allocated."""
        raise NotImplementedError

    def _check_common(self) -> None:
        """The per-field maxima (``FIELD_MAXIMA``) and finiteness (JSON has NaN and Infinity; no field takes them)."""
        kinds = _field_kinds(type(self))
        for name in kinds:
            if name in FIELD_MAXIMA and getattr(self, name) > FIELD_MAXIMA[name]:
                raise ValueError(f"{name} must be <= {FIELD_MAXIMA[name]}, got {getattr(self, name)}")
        for name, kind in kinds.items():
            value = getattr(self, name)
            values = value if kind == "floats" else (value,) if kind == "float" else ()
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-friendly (tuples as lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build a config from ``to_dict`` output; an unknown key is a ``ValueError`` naming it.

        A value of the wrong type is a ``TypeError`` and one out of range (``FIELD_MAXIMA``,
        ``MAX_PARAMETERS`` included) a ``ValueError``, both naming the field, raised before any
        tensor is allocated. Absent keys take their defaults (older checkpoints lack newer fields).
        """
        unknown = sorted(set(data) - set(_field_kinds(cls)))
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class NetworkConfig(_StrictFields):
    """What defines one VQ-VAE network: everything ``encode`` and ``decode`` compute with.

    Attributes:
      in_channels: image channels (3, RGB).
      num_hiddens: channels of the encoder/decoder trunk.
      num_residual_hiddens: channels inside each residual block.
      num_residual_layers: residual blocks in each residual stack.
      embedding_dim: D, the size of one codebook vector (channels after the 1x1 pre-VQ conv).
      num_embeddings: K, the number of codebook vectors (the token vocabulary).
      quantizer: "ema" (codebook learned by exponential moving averages) or "plain" (codebook learned
        by gradient through the codebook loss). It picks the module that runs the search (and its
        buffers), even though both kinds search the same way today, so it belongs to the network.
      downsample: f, the ratio image side / token-grid side: 4, 8 or 16.
      pixel_mean, pixel_std: per-channel normalisation applied to images in [0, 1]:
        ``x = (pixels - mean) / std``. The seed's (0.5, 1.0) maps pixels to [-0.5, 0.5].
    """

    in_channels: int = 3
    num_hiddens: int = 128
    num_residual_hiddens: int = 32
    num_residual_layers: int = 2
    embedding_dim: int = 64
    num_embeddings: int = 512
    quantizer: QuantizerKind = "ema"
    downsample: int = 4
    pixel_mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    pixel_std: tuple[float, ...] = field(default=(1.0, 1.0, 1.0))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range (see ``FIELD_MAXIMA``).

        Every bound is checked arithmetically, before a model is built: nothing is allocated.
        """
        for name in ("in_channels", "num_hiddens", "num_residual_hiddens", "embedding_dim", "num_embeddings"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_common()
        if self.num_residual_layers < 0:
            raise ValueError(f"num_residual_layers must be >= 0, got {self.num_residual_layers}")
        if self.downsample not in (4, 8, 16):
            raise ValueError(f"downsample must be 4, 8 or 16, got {self.downsample}")
        if self.quantizer not in ("ema", "plain"):
            raise ValueError(f"quantizer must be 'ema' or 'plain', got {self.quantizer!r}")
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
        ``VQVAE(network).state_dict()``), so the size is known before anything is allocated. Only the
        network decides it: no training-only field adds or resizes a tensor.
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

    @property
    def num_downsamples(self) -> int:
        """Stride-2 stages in the encoder (and transposed ones in the decoder): log2(downsample)."""
        return int(math.log2(self.downsample))

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


@dataclass(frozen=True)
class CodebookTrainingConfig(_StrictFields):
    """How the codebook learns: read by the losses, the EMA update and codebook health, never by inference.

    Attributes:
      commitment_cost: beta, weight of the encoder's commitment loss.
      decay: EMA decay of the cluster sizes and sums ("ema" quantizer only).
      epsilon: Laplace smoothing of the EMA cluster sizes ("ema" only).
      dead_code_window: a code unused for this many training steps is re-seeded from the current
        batch's encoder outputs; 0 disables restarts.
      dead_code_threshold: "ema" only: a code whose EMA cluster size (vectors per step) falls below
        this is re-seeded too, so rarely used codes move to where the data is (0 disables).
      kmeans_init: initialise the codebook by k-means on the first training batch.
      kmeans_iters: Lloyd iterations of that k-means.
    """

    commitment_cost: float = 0.25
    decay: float = 0.99
    epsilon: float = 1e-5
    dead_code_window: int = 100
    dead_code_threshold: float = 0.0
    kmeans_init: bool = False
    kmeans_iters: int = 10

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        self._check_common()
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
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")

    def check_network(self, network: NetworkConfig) -> None:
        """Raise ``ValueError`` if a setting needs a quantizer kind ``network`` does not have."""
        if self.dead_code_threshold > 0 and network.quantizer != "ema":
            raise ValueError("dead_code_threshold needs the 'ema' quantizer (it reads the EMA cluster sizes)")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(name: str, kind: str, value: object) -> None:
    """Raise ``TypeError`` naming the field if ``value`` has the wrong type.

    Strict, as JSON gives it: ``True`` is not an integer and ``"128"`` is not a number.
    """
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


@functools.cache
def _field_kinds(cls: type) -> dict[str, str]:
    """Field name -> "int", "float", "bool", "str" (a Literal) or "floats" (a tuple of floats), in field order."""
    kinds: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if typing.get_origin(annotation) is Literal:
            kinds[f.name] = "str"
        elif typing.get_origin(annotation) is tuple:
            kinds[f.name] = "floats"
        else:
            kinds[f.name] = {int: "int", float: "float", bool: "bool", str: "str"}[annotation]
    return kinds
