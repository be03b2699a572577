"""What every importer shares: the VQGAN-family architecture read from a state dict's shapes or a taming-style
config, the strict state-dict check, and the ``ImportResult`` an importer hands to the command.

Every source is converted to taming-transformers' key names first (``encoder.down.{i}.block.{j}.conv1``,
``quant_conv``, ``quantize.embedding.weight``, ...), which ``model.networks.vqgan`` uses too; then
:func:`to_vqvae_keys` renames the three that differ in ``VQVAE`` (``quant_conv`` -> ``pre_vq_conv``,
``post_quant_conv`` -> ``post_vq_conv``, ``quantize.embedding.weight`` -> ``quantizer.embedding``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

import torch

from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
from vqtok.model.vqvae import VQVAE

__all__ = [
    "CONVERSION_VERSION",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "CheckpointImportError",
    "ImportResult",
    "build_model",
    "compare_networks",
    "infer_vqgan_network",
    "network_from_taming_config",
    "to_vqvae_keys",
]

#: Bumped whenever a conversion changes what it writes for the same input file.
CONVERSION_VERSION = 1
#: taming, LlamaGen and Chameleon all take images in [-1, 1]: (pixels - 0.5) / 0.5.
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
#: GroupNorm groups: hard-coded to 32 by all three projects (not visible in the shapes).
NORM_GROUPS = 32
#: Our quantizer's own buffers, which no published checkpoint has: taken from a fresh model.
OWN_BUFFERS = ("quantizer.steps_since_used", "quantizer.initialized")
_MAX_LISTED = 12


class CheckpointImportError(ValueError):
    """A published checkpoint that cannot be imported; the message names the file and the keys or fields."""


@dataclass(frozen=True)
class ImportResult:
    """An importer's output: the model (weights loaded, strict), and what the record should say about it.

    Attributes:
      model: the converted ``VQVAE`` (float32, eval mode).
      native_size: the side the source model was trained at (None when unknown).
      fit: how the source fits images to that size ("crop": resize the short side, centre-crop).
      layout: the default token layout preset for the source's LLM family.
      state_dict_key: where the state dict sat in the file ("state_dict", "model", a prefix, or None).
      ignored: the source keys left out on purpose (training losses, usage counters), for the report.
    """

    model: VQVAE
    native_size: int | None
    fit: str
    layout: str
    state_dict_key: str | None
    ignored: tuple[str, ...] = ()


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _tensor(state: dict[str, torch.Tensor], key: str, where: str, dims: int | None = None) -> torch.Tensor:
    if key not in state:
        raise CheckpointImportError(f"{where}: the state dict has no {key!r}; is it a VQGAN-family checkpoint of "
                                    "this source? (pass --from with the right source, or --prefix)")
    tensor = state[key]
    if dims is not None and tensor.dim() != dims:
        raise CheckpointImportError(f"{where}: {key!r} has shape {tuple(tensor.shape)}, expected {dims} dimensions")
    return tensor


def _indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """The distinct integers ``{i}`` of the keys matching ``pattern`` (a regex with one group), sorted."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state if (m := regex.match(key))})


def infer_vqgan_network(state: dict[str, torch.Tensor], where: str, *, l2_normalize: bool) -> NetworkConfig:
    """The ``NetworkConfig`` of a VQGAN-family state dict in taming's key names, from its shapes alone.

    Reads: base channels and image channels (``encoder.conv_in``), the levels and each level's width
    (``encoder.down.{i}.block.0.conv1``), residual blocks per level, attention levels (``down.{i}.attn``),
    middle attention (``mid.attn_1``), ``z_channels`` (``quant_conv`` input), D (``quant_conv`` output),
    K (``quantize.embedding.weight``). The GroupNorm groups (32) and l2 normalisation are not in the shapes.
    """
    conv_in = _tensor(state, "encoder.conv_in.weight", where, 4)
    channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = _indices(state, r"^encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointImportError(f"{where}: encoder levels {levels} are not 0..n-1")
    multipliers = []
    for level in levels:
        width = int(_tensor(state, f"encoder.down.{level}.block.0.conv1.weight", where, 4).shape[0])
        if width % channels:
            raise CheckpointImportError(f"{where}: level {level} has {width} channels, not a multiple of the base "
                                        f"{channels}")
        multipliers.append(width // channels)
    num_res_blocks = len(_indices(state, r"^encoder\.down\.0\.block\.(\d+)\."))
    attention = tuple(level for level in levels if f"encoder.down.{level}.attn.0.q.weight" in state)
    quant_conv = _tensor(state, "quant_conv.weight", where, 4)
    z_channels, embedding_dim = int(quant_conv.shape[1]), int(quant_conv.shape[0])
    encoder_out = int(_tensor(state, "encoder.conv_out.weight", where, 4).shape[0])
    if encoder_out == 2 * z_channels:
        raise CheckpointImportError(f"{where}: the encoder outputs 2 x z_channels ({encoder_out}): a KL "
                                    "autoencoder (double_z), not a VQ model")
    codebook = _tensor(state, "quantize.embedding.weight", where, 2)
    if int(codebook.shape[1]) != embedding_dim:
        raise CheckpointImportError(f"{where}: the codebook is {tuple(codebook.shape)} but quant_conv outputs "
                                    f"{embedding_dim} channels")
    downsample = 2 ** (len(levels) - 1)
    try:
        return NetworkConfig(
            arch="vqgan", in_channels=in_channels, num_hiddens=channels, channel_multipliers=tuple(multipliers),
            num_res_blocks=num_res_blocks, attention_levels=attention,
            mid_attention="encoder.mid.attn_1.q.weight" in state, z_channels=z_channels, norm_groups=NORM_GROUPS,
            embedding_dim=embedding_dim, num_embeddings=int(codebook.shape[0]), quantizer="plain",
            l2_normalize=l2_normalize, downsample=downsample, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointImportError(f"{where}: the weights describe a network vqtok cannot build: {exc}") from None


def _taming_params(config: dict[str, Any], where: str) -> dict[str, Any]:
    """``model.params`` of a taming / latent-diffusion / Chameleon config (or the params given directly)."""
    params: Any = config
    if isinstance(params.get("model"), dict):
        params = params["model"]
    if isinstance(params.get("params"), dict):
        params = params["params"]
    if not isinstance(params.get("ddconfig"), dict):
        raise CheckpointImportError(f"{where}: no model.params.ddconfig section (a taming-style VQGAN config)")
    return params


def network_from_taming_config(config: dict[str, Any], where: str, *, l2_normalize: bool = False
                               ) -> tuple[NetworkConfig, int | None]:
    """(``NetworkConfig``, training resolution) from a taming-style config (``model.params.ddconfig`` etc.).

    Refused, naming the setting: Gumbel or EMA quantizer targets, index remapping (``remap``), ``double_z``,
    a timestep embedding, conv shortcuts, linear attention, ``tanh_out``, and ``out_ch`` differing from
    ``in_channels``.
    """
    params = _taming_params(config, where)
    target = str((config.get("model") or {}).get("target", "")) if isinstance(config.get("model"), dict) else ""
    if "Gumbel" in target:
        raise CheckpointImportError(
            f"{where}: {target}: Gumbel quantization (taming's f8 model with 8,192 codes) is not supported: its "
            "encoder picks codes by a learned projection plus Gumbel noise, not by nearest-code search"
        )
    if params.get("remap"):
        raise CheckpointImportError(f"{where}: remap {params['remap']!r}: remapped code indices are not supported")
    dd = params["ddconfig"]
    refusals = {
        "double_z": bool(dd.get("double_z", True)) and "n_embed" in params,
        "use_timestep": bool(dd.get("use_timestep", False)),
        "use_linear_attn": bool(dd.get("use_linear_attn", False)) or dd.get("attn_type", "vanilla") == "linear",
        "tanh_out": bool(dd.get("tanh_out", False)),
        "give_pre_end": bool(dd.get("give_pre_end", False)),
        "resamp_with_conv false": not dd.get("resamp_with_conv", True),
    }
    bad = [name for name, refused in refusals.items() if refused]
    if bad:
        raise CheckpointImportError(f"{where}: ddconfig sets {', '.join(bad)}, which vqtok's VQGAN network does "
                                    "not have")
    try:
        in_channels, out_channels = int(dd["in_channels"]), int(dd.get("out_ch", dd["in_channels"]))
        channels, multipliers = int(dd["ch"]), tuple(int(m) for m in dd["ch_mult"])
        resolution = int(dd["resolution"]) if dd.get("resolution") is not None else None
        attn_resolutions = {int(r) for r in (dd.get("attn_resolutions") or [])}
        num_res_blocks, z_channels = int(dd["num_res_blocks"]), int(dd["z_channels"])
        n_embed, embed_dim = int(params["n_embed"]), int(params["embed_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointImportError(f"{where}: missing or malformed config field: {exc}") from None
    if in_channels != out_channels:
        raise CheckpointImportError(f"{where}: in_channels {in_channels} != out_ch {out_channels}")
    no_attention = dd.get("attn_type", "vanilla") == "none"
    attention: tuple[int, ...] = ()
    if attn_resolutions and not no_attention:
        if resolution is None:
            raise CheckpointImportError(f"{where}: attn_resolutions needs the ddconfig's resolution")
        attention = tuple(i for i in range(len(multipliers)) if resolution // 2 ** i in attn_resolutions)
    try:
        network = NetworkConfig(
            arch="vqgan", in_channels=in_channels, num_hiddens=channels, channel_multipliers=multipliers,
            num_res_blocks=num_res_blocks, attention_levels=attention, mid_attention=not no_attention,
            z_channels=z_channels, norm_groups=NORM_GROUPS, embedding_dim=embed_dim, num_embeddings=n_embed,
            quantizer="plain", l2_normalize=l2_normalize, downsample=2 ** (len(multipliers) - 1),
            pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointImportError(f"{where}: the config describes a network vqtok cannot build: {exc}") from None
    return network, resolution


def compare_networks(from_config: NetworkConfig, from_weights: NetworkConfig, where: str) -> None:
    """``CheckpointImportError`` naming every field where the config and the weights' shapes disagree."""
    differ = [f"{f.name}: config {getattr(from_config, f.name)!r}, weights {getattr(from_weights, f.name)!r}"
              for f in fields(NetworkConfig) if getattr(from_config, f.name) != getattr(from_weights, f.name)]
    if differ:
        raise CheckpointImportError(f"{where}: the config and the weights disagree: {'; '.join(differ)}")


def to_vqvae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """taming key names -> ``VQVAE``'s (``quant_conv`` -> ``pre_vq_conv``, ``post_quant_conv`` -> ``post_vq_conv``,
    ``quantize.embedding.weight`` -> ``quantizer.embedding``); every other key unchanged."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("quant_conv."):
            key = "pre_vq_conv." + key[len("quant_conv."):]
        elif key.startswith("post_quant_conv."):
            key = "post_vq_conv." + key[len("post_quant_conv."):]
        elif key == "quantize.embedding.weight":
            key = "quantizer.embedding"
        renamed[key] = value
    return renamed


def build_model(network: NetworkConfig, state: dict[str, torch.Tensor], where: str) -> VQVAE:
    """A ``VQVAE(network)`` holding exactly ``state`` (VQVAE key names), in float32, eval mode.

    Every key of the network must be in ``state`` with its shape, and nothing else may be: otherwise a
    ``CheckpointImportError`` lists the missing, unexpected and mis-shaped keys. Nothing is partially loaded.
    """
    training = CodebookTrainingConfig(dead_code_window=0)  # a fine-tune leaves the published codebook alone
    model = VQVAE(network, training)
    expected = model.state_dict()
    given = {**state, **{key: expected[key] for key in OWN_BUFFERS if key in expected}}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(f"{key} {tuple(given[key].shape)} (expected {tuple(expected[key].shape)})"
                       for key in set(expected) & set(given) if given[key].shape != expected[key].shape)
    if missing or unexpected or misshaped:
        parts = [f"{label} ({len(keys)}): {_listed(keys)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if keys]
        raise CheckpointImportError(f"{where}: the state dict does not match the network: {'; '.join(parts)}")
    nonfinite = sorted(k for k, v in given.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if nonfinite:
        raise CheckpointImportError(f"{where}: NaN or Inf in {_listed(nonfinite)}")
    converted = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in given.items()}
    model.load_state_dict(converted, strict=True)
    return model.eval()
