"""Model configuration in two parts, both saved inside every checkpoint.

- ``NetworkConfig``: what defines the network, so what serving needs: the architecture, the codebook
  size and dimension, the quantizer kind, the downsampling factor and the pixel normalisation. Every
  field can change a token or a decoded pixel, so the checkpoint's ``model_id`` hashes all of them
  (plus the weights).
- ``CodebookTrainingConfig``: what only training reads: the commitment loss weight, the EMA decay and
  smoothing, dead-code restarts, k-means initialisation and the codebook-usage (entropy) regulariser.
  The inference path (``VQVAE.encode`` / ``decode``: nearest-code search and lookup) never reads them,
  so they cannot change a token or a pixel and stay out of ``model_id``; a served model may leave them
  at their defaults.

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

QuantizerKind = Literal["ema", "plain", "fsq"]
ArchitectureKind = Literal["seed", "vqgan"]
UpsampleKind = Literal["transposed", "resize", "bilinear"]

#: The published channel multipliers of the VQGAN family per downsampling factor (taming-transformers and
#: latent-diffusion's VQ first stages, LlamaGen's VQ-8 / VQ-16): one level per entry, f = 2 ** (levels - 1).
PUBLISHED_CHANNEL_MULTIPLIERS: dict[int, tuple[int, ...]] = {4: (1, 2, 4), 8: (1, 2, 2, 4), 16: (1, 1, 2, 2, 4)}

#: NetworkConfig fields added after the first checkpoint format. ``model_id`` leaves such a field out while it
#: holds its default (an absent key loads as the default, so nothing is ambiguous): the ids of every
#: checkpoint written before the field existed stay what they were.
FIELDS_HASHED_ONLY_WHEN_SET: tuple[str, ...] = (
    "arch", "channel_multipliers", "num_res_blocks", "attention_levels", "mid_attention", "z_channels",
    "norm_groups", "code_dim", "l2_normalize", "fsq_levels", "upsample",
)

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
    "num_res_blocks": 64,
    "z_channels": 4096,
    "norm_groups": 4096,
    "code_dim": 4096,
}
MAX_LEVELS = 8  # VQGAN levels: f = 2 ** (levels - 1) is at most 16, so 5 are needed; 8 bounds a typo
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
            elif kind == "ints":
                object.__setattr__(self, name, tuple(value))
            elif kind == "float":
                object.__setattr__(self, name, float(value))
        self.resolve()
        self.validate()

    def resolve(self) -> None:
        """Fill fields whose default depends on other fields (before ``validate``); none by default."""

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
      arch: the encoder/decoder family. "seed": the seed's VQ-VAE (strided 4x4 convs, ReLU residual
        stacks, transposed-conv upsampling; van den Oord et al. 2017). "vqgan": the VQGAN family
        (taming-transformers, LlamaGen, Chameleon): GroupNorm/SiLU residual blocks, channel multipliers per
        level, optional self-attention, nearest-neighbour upsampling followed by a convolution.
      in_channels: image channels (3, RGB).
      num_hiddens: seed: channels of the encoder/decoder trunk. vqgan: the base channels of level 0 (the
        published 128), multiplied per level by ``channel_multipliers``.
      num_residual_hiddens: seed only: channels inside each residual block.
      num_residual_layers: seed only: residual blocks in each residual stack.
      upsample: seed only: how the decoder doubles the resolution at each stage. "transposed" (the seed's):
        4x4 stride-2 transposed convolutions: each of the 2x2 output phases sums its own taps of the kernel,
        so they print a checkerboard at the stage periods unless training balances the taps. "resize":
        nearest-neighbour doubling followed by a 3x3 convolution (Odena et al. 2016, "Deconvolution and
        checkerboard artifacts"; what the VQGAN family always does): every output pixel sees the same taps,
        but a doubled pixel pair has no step inside it and the whole step between pairs.
        "bilinear": bilinear doubling followed by a 3x3 convolution: between and within the doubled pairs
        alike, a locally linear input gives the same step.
      embedding_dim: D, the channels the quantizer receives and returns (after the 1x1 projection from
        the encoder; LlamaGen's VQ models use 8, taming's 256).
      num_embeddings: K, the number of codes (the token vocabulary). With "fsq" it must equal the product
        of ``fsq_levels``.
      quantizer: "ema" (codebook learned by exponential moving averages), "plain" (codebook learned by
        gradient through the codebook loss) or "fsq" (finite scalar quantization: no learned codebook,
        each channel rounded to a few levels; Mentzer et al. 2023). It picks the module that holds the
        codes (and its buffers), so it belongs to the network.
      code_dim: "ema" / "plain": 0 searches the codes in D itself; > 0 searches low-dimensional codes
        (ViT-VQGAN's factorised codes): a learned projection D -> code_dim before the search and
        code_dim -> D after the lookup, so the codebook is (K, code_dim).
      l2_normalize: "ema" / "plain": l2-normalise the (projected) latents and the codes, so the nearest
        code is the one of highest cosine similarity (ViT-VQGAN, LlamaGen); keeps big codebooks in use.
      fsq_levels: "fsq" only: levels per channel, e.g. (8, 5, 5, 5) for K = 1,000 or (8, 8, 8, 5, 5, 5)
        for K = 64,000 (the paper's recommendations); the quantizer projects D -> len(levels) and back.
      channel_multipliers: vqgan only: channels of level i = ``num_hiddens * channel_multipliers[i]``;
        f = 2 ** (levels - 1). Empty means the published multipliers for ``downsample``: (1, 2, 4) for f=4,
        (1, 2, 2, 4) for f=8, (1, 1, 2, 2, 4) for f=16.
      num_res_blocks: vqgan only: residual blocks per encoder level (the decoder has one more per level),
        published 2.
      attention_levels: vqgan only: levels (0 = full resolution) whose blocks are followed by
        self-attention. The published models put it at the lowest resolution (taming's
        ``attn_resolutions=[16]`` at 256 px is level 4 of 5); empty means none (cheapest on CPU).
      mid_attention: vqgan only: self-attention in the middle block between the two residual blocks
        (published: on).
      z_channels: vqgan only: channels at the encoder output and decoder input, around the 1x1 projections
        to and from D (published 256).
      norm_groups: vqgan only: GroupNorm groups (published 32); every level's channels must divide by it.
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
    arch: ArchitectureKind = "seed"
    channel_multipliers: tuple[int, ...] = ()
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()
    mid_attention: bool = True
    z_channels: int = 256
    norm_groups: int = 32
    code_dim: int = 0
    l2_normalize: bool = False
    fsq_levels: tuple[int, ...] = ()
    upsample: UpsampleKind = "transposed"

    def resolve(self) -> None:
        """vqgan with no ``channel_multipliers``: the published ones for ``downsample``."""
        if self.arch == "vqgan" and not self.channel_multipliers and self.downsample in PUBLISHED_CHANNEL_MULTIPLIERS:
            object.__setattr__(self, "channel_multipliers", PUBLISHED_CHANNEL_MULTIPLIERS[self.downsample])

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range (see ``FIELD_MAXIMA``).

        Every bound is checked arithmetically, before a model is built: nothing is allocated.
        """
        for name in ("in_channels", "num_hiddens", "num_residual_hiddens", "embedding_dim", "num_embeddings",
                     "z_channels", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_common()
        for name in ("num_residual_layers", "num_res_blocks", "code_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.downsample not in (4, 8, 16):
            raise ValueError(f"downsample must be 4, 8 or 16, got {self.downsample}")
        if self.arch not in ("seed", "vqgan"):
            raise ValueError(f"arch must be 'seed' or 'vqgan', got {self.arch!r}")
        if self.quantizer not in ("ema", "plain", "fsq"):
            raise ValueError(f"quantizer must be 'ema', 'plain' or 'fsq', got {self.quantizer!r}")
        if self.upsample not in ("transposed", "resize", "bilinear"):
            raise ValueError(f"upsample must be 'transposed', 'resize' or 'bilinear', got {self.upsample!r}")
        for name in ("pixel_mean", "pixel_std"):
            if len(getattr(self, name)) != self.in_channels:
                raise ValueError(f"{name} needs {self.in_channels} values, got {len(getattr(self, name))}")
        if any(s <= 0 for s in self.pixel_std):
            raise ValueError(f"pixel_std must be > 0, got {self.pixel_std}")
        self._validate_arch()
        self._validate_quantizer()
        if (count := self.parameter_count()) > MAX_PARAMETERS:
            raise ValueError(
                f"the model would hold {count:,} numbers (parameters and buffers), more than the limit of "
                f"{MAX_PARAMETERS:,}; lower num_hiddens, num_residual_hiddens, embedding_dim or num_embeddings"
            )

    def _validate_arch(self) -> None:
        if self.arch == "seed":
            for name in ("channel_multipliers", "attention_levels"):
                if getattr(self, name):
                    raise ValueError(f"{name} is a vqgan setting; arch 'seed' takes none (got {getattr(self, name)})")
            return
        multipliers = self.channel_multipliers
        if not 1 <= len(multipliers) <= MAX_LEVELS:
            raise ValueError(f"channel_multipliers needs 1 to {MAX_LEVELS} levels, got {len(multipliers)}")
        if 2 ** (len(multipliers) - 1) != self.downsample:
            raise ValueError(
                f"channel_multipliers {multipliers} has {len(multipliers)} levels, which downsample by "
                f"{2 ** (len(multipliers) - 1)}, but downsample is {self.downsample} "
                f"(f = 2 ** (levels - 1); the published ones for f={self.downsample}: "
                f"{PUBLISHED_CHANNEL_MULTIPLIERS[self.downsample]})"
            )
        if any(not 1 <= m <= 64 for m in multipliers):
            raise ValueError(f"channel_multipliers must be in [1, 64], got {multipliers}")
        if any(not 0 <= level < len(multipliers) for level in self.attention_levels):
            raise ValueError(f"attention_levels must be in [0, {len(multipliers) - 1}], got {self.attention_levels}")
        for channels in (self.num_hiddens, *(self.num_hiddens * m for m in multipliers)):
            if channels % self.norm_groups:
                raise ValueError(
                    f"every level's channels must divide by norm_groups {self.norm_groups}: num_hiddens "
                    f"{self.num_hiddens} x channel_multipliers {multipliers} gives {channels}"
                )
        if self.num_hiddens * max(multipliers) > FIELD_MAXIMA["num_hiddens"]:
            raise ValueError(
                f"num_hiddens x the largest channel multiplier must be <= {FIELD_MAXIMA['num_hiddens']}, got "
                f"{self.num_hiddens * max(multipliers)}"
            )

    def _validate_quantizer(self) -> None:
        if self.quantizer != "fsq":
            if self.fsq_levels:
                raise ValueError(f"fsq_levels is an 'fsq' setting; quantizer {self.quantizer!r} takes none")
            return
        if self.code_dim or self.l2_normalize:
            raise ValueError("code_dim and l2_normalize are codebook settings; the 'fsq' quantizer takes neither")
        if not 1 <= len(self.fsq_levels) <= 16 or any(not 2 <= level <= 256 for level in self.fsq_levels):
            raise ValueError(f"fsq_levels needs 1 to 16 levels, each in [2, 256], got {self.fsq_levels}")
        if math.prod(self.fsq_levels) != self.num_embeddings:
            raise ValueError(
                f"num_embeddings must be the product of fsq_levels {self.fsq_levels} "
                f"({math.prod(self.fsq_levels)}), got {self.num_embeddings}"
            )

    def identity_dict(self) -> dict[str, Any]:
        """What ``model_id`` hashes: every field, except the later ones (``FIELDS_HASHED_ONLY_WHEN_SET``)
        while they hold their defaults, so ids of checkpoints written before those fields existed hold."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {name: value for name, value in self.to_dict().items()
                if name not in FIELDS_HASHED_ONLY_WHEN_SET or getattr(self, name) != defaults[name]}

    def parameter_count(self) -> int:
        """Numbers in the model's tensors (parameters and buffers), computed from the config alone.

        The network is built on PyTorch's ``meta`` device, where tensors have shapes and no storage:
        nothing is allocated, and the count is exactly ``VQVAE(network).state_dict()``'s (a test checks it).
        Only the network decides it: no training-only field adds or resizes a tensor.
        """
        from vqtok.model.vqvae import VQVAE  # the network modules import this module

        with torch.device("meta"):
            model = VQVAE(self)
        return sum(tensor.numel() for tensor in model.state_dict().values())

    @property
    def code_vector_dim(self) -> int:
        """Width of the vectors ``codebook`` holds (what the search compares): ``len(fsq_levels)`` for FSQ,
        ``code_dim`` for factorised codes, else D."""
        if self.quantizer == "fsq":
            return len(self.fsq_levels)
        return self.code_dim or self.embedding_dim

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
      kmeans_init: initialise the codebook by k-means on encoder outputs before the first step.
      kmeans_iters: Lloyd iterations of that k-means.
      kmeans_vectors_per_code: the trainer gathers encoder outputs from as many batches as it takes to
        have this many vectors per code (10 x K: 81,920 vectors for K = 8,192) before running k-means;
        one batch is far too few for a big codebook.
      entropy_weight: "ema" / "plain": weight of the codebook-usage (entropy) regulariser added to the training
        loss, after MAGVIT-2's: soft assignments p_i = softmax(-||z_i - e_k||^2 / (T s)) of every latent over
        the K codes; loss = weight x (mean_i H(p_i) + entropy_batch_weight x (log K - H(mean_i p_i))):
        confident assignments, spread over the whole codebook. 0 (default) turns it off: nothing is computed.
        Its gradient on the latents is large next to the reconstruction's (about 10,000x per unit weight with
        T = 0.1 and batch weight 4 on a trained f=8 model), so useful weights are small: 1e-4 there.
      entropy_temperature: T, in units of s, the batch's mean squared distance to the nearest code (so it
        means the same at any latent scale or code dimension): a code farther than the nearest by s in squared
        distance gets exp(-1/T) times its probability. 0.1: about two codes per latent on a trained model.
      entropy_batch_weight: weight of the batch-entropy term relative to the per-sample one. MAGVIT-2 uses 1
        (with a fixed codebook); with learned codebooks the per-sample term then pins latents to the codes they
        already use and can lower use, so the default is 4.
      entropy_sample: compute the entropy regulariser on a random subset of at most this many of the batch's
        latent vectors, drawn anew each step (0, the default: all of them). Its cost grows with N x K (on one
        CPU thread, 2,048 vectors x 8,192 codes made a step about 3 times slower); 512 computes a quarter of
        it. The batch term then sees fewer vectors: it still pushes them apart, over fewer codes per step.
    """

    commitment_cost: float = 0.25
    decay: float = 0.99
    epsilon: float = 1e-5
    dead_code_window: int = 100
    dead_code_threshold: float = 0.0
    kmeans_init: bool = False
    kmeans_iters: int = 10
    kmeans_vectors_per_code: int = 10
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.1
    entropy_batch_weight: float = 4.0
    entropy_sample: int = 0

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
        if not 1 <= self.kmeans_vectors_per_code <= 1000:
            raise ValueError(f"kmeans_vectors_per_code must be in [1, 1000], got {self.kmeans_vectors_per_code}")
        for name in ("entropy_weight", "entropy_batch_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.entropy_temperature <= 0:
            raise ValueError(f"entropy_temperature must be > 0, got {self.entropy_temperature}")
        if self.entropy_sample < 0:
            raise ValueError(f"entropy_sample must be >= 0 (0: every vector), got {self.entropy_sample}")

    def check_network(self, network: NetworkConfig) -> None:
        """Raise ``ValueError`` if a setting needs a quantizer kind ``network`` does not have."""
        if self.dead_code_threshold > 0 and network.quantizer != "ema":
            raise ValueError("dead_code_threshold needs the 'ema' quantizer (it reads the EMA cluster sizes)")
        if self.kmeans_init and network.quantizer == "fsq":
            raise ValueError("kmeans_init needs a codebook; the 'fsq' quantizer has none (its codes are fixed)")
        if self.entropy_weight > 0 and network.quantizer == "fsq":
            raise ValueError(
                "entropy_weight needs a learned codebook ('ema' or 'plain'); the 'fsq' quantizer has none: its "
                "fixed grid of codes is used without an auxiliary loss (Mentzer et al. 2023), so set entropy_weight 0"
            )


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
    if kind == "ints" and not (isinstance(value, list | tuple) and all(_is_int(v) for v in value)):
        raise TypeError(f"{name} must be a list of integers, got {value!r}")


@functools.cache
def _field_kinds(cls: type) -> dict[str, str]:
    """Field name -> "int", "float", "bool", "str" (a Literal), "floats" or "ints" (tuples), in field order."""
    kinds: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if typing.get_origin(annotation) is Literal:
            kinds[f.name] = "str"
        elif typing.get_origin(annotation) is tuple:
            kinds[f.name] = "ints" if typing.get_args(annotation)[0] is int else "floats"
        else:
            kinds[f.name] = {int: "int", float: "float", bool: "bool", str: "str"}[annotation]
    return kinds
