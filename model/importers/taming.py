"""taming-transformers VQGANs (``taming.models.vqgan.VQModel``), and latent-diffusion's VQ first stages built
from the same modules: Lightning ``.ckpt`` files whose ``state_dict`` uses taming's key names.

Published examples: the ImageNet f=16 VQGANs with 1,024 and 16,384 codes (``last.ckpt`` + ``model.yaml``), and
latent-diffusion's ``vq-f4`` / ``vq-f8`` / ``vq-f16`` first stages (``model.ckpt`` + ``config.yaml``). The
architecture comes from the YAML config when given (checked against the weights' shapes) or from the shapes.

Left out on purpose: ``loss.*`` (the training losses: discriminator and LPIPS), ``model_ema.*`` (latent-diffusion's
EMA copy) and the EMA quantizer's ``cluster_size`` / ``embed_avg`` statistics. Refused: Gumbel quantization
(taming's f=8 model with 8,192 codes: its encoder picks codes with a learned projection plus Gumbel noise, not by
nearest-code search) and remapped indices (``quantize.used``).
"""

from __future__ import annotations

from typing import Any

import torch

from vqtok.model.importers.common import (
    CheckpointImportError,
    ImportResult,
    build_model,
    compare_networks,
    infer_vqgan_network,
    network_from_taming_config,
    to_vqvae_keys,
)
from vqtok.model.importers.safe_load import state_dict_from

__all__ = ["DEFAULT_FIT", "DEFAULT_LAYOUT", "DEFAULT_SIZE", "import_taming_format", "import_weights"]

DEFAULT_SIZE = 256  # the published ImageNet models were trained on 256 x 256 crops
DEFAULT_FIT = "crop"  # taming's ImageNet data: resize the short side, centre-crop (validation)
DEFAULT_LAYOUT = "flat"  # taming's transformers read the raw code indices
IGNORED_PREFIXES = ("loss.", "model_ema.")
IGNORED_KEYS = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg")


def select_keys(state: dict[str, torch.Tensor], prefix: str, where: str) -> dict[str, torch.Tensor]:
    """The keys under ``prefix`` (stripped); all keys when ``prefix`` is empty. Refuses an empty selection."""
    if not prefix:
        return state
    chosen = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not chosen:
        sample = ", ".join(sorted(state)[:5])
        raise CheckpointImportError(f"{where}: no key starts with the prefix {prefix!r} (keys begin: {sample})")
    return chosen


def import_taming_format(obj: Any, where: str, *, config: dict[str, Any] | None, prefix: str,
                         default_size: int, default_fit: str, default_layout: str) -> ImportResult:
    """A loaded taming-format checkpoint object (+ its config) -> ``ImportResult`` (see the module docstring)."""
    state, key = state_dict_from(obj, where)
    state = select_keys(state, prefix, where)
    if "quantize.proj.weight" in state or "quantize.embed.weight" in state:
        raise CheckpointImportError(
            f"{where}: Gumbel quantization (quantize.proj / quantize.embed; taming's f=8 model with 8,192 codes) is "
            "not supported: its encoder picks codes with a learned projection plus Gumbel noise, not by nearest-code "
            "search"
        )
    if "quantize.used" in state:
        raise CheckpointImportError(f"{where}: quantize.used: remapped code indices are not supported")
    ignored = tuple(sorted(k for k in state if k.startswith(IGNORED_PREFIXES) or k in IGNORED_KEYS))
    kept = {k: v for k, v in state.items() if k not in set(ignored)}
    from_weights = infer_vqgan_network(kept, where, l2_normalize=False)
    size: int | None = None
    if config is not None:
        network, size = network_from_taming_config(config, where)
        compare_networks(network, from_weights, where)
    else:
        network = from_weights
    model = build_model(network, to_vqvae_keys(kept), where)
    return ImportResult(model=model, native_size=size or default_size, fit=default_fit, layout=default_layout,
                        state_dict_key=(f"{key}/{prefix}" if key else prefix) if prefix else key, ignored=ignored)


def import_weights(obj: Any, where: str, config: dict[str, Any] | None = None, prefix: str = "") -> ImportResult:
    """A taming-transformers / latent-diffusion VQGAN checkpoint -> ``ImportResult``."""
    return import_taming_format(obj, where, config=config, prefix=prefix, default_size=DEFAULT_SIZE,
                                default_fit=DEFAULT_FIT, default_layout=DEFAULT_LAYOUT)
