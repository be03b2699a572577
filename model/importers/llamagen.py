"""LlamaGen's VQ tokenizers (``tokenizer/tokenizer_image/vq_model.py``: VQ-8 and VQ-16), also used by Janus and
Janus-Pro for image generation. Published as ``vq_ds16_c2i.pt`` / ``vq_ds8_c2i.pt`` (class-to-image),
``vq_ds16_t2i.pt`` (text-to-image): a ``torch.save`` dict whose ``model`` entry is the state dict (the training
files also hold ``optimizer``, ``discriminator`` and an ``argparse.Namespace``, read as inert stubs). Janus ships the
same network inside its own weights under ``gen_vision_model.`` (``--prefix gen_vision_model.``).

LlamaGen has no config file: the architecture is read from the shapes. Its network is taming's under other names,
renamed here to taming's (then to ``VQVAE``'s by ``common.to_vqvae_keys``):

- ``encoder.conv_blocks.{i}.res.{j}`` -> ``encoder.down.{i}.block.{j}`` (``attn`` and ``downsample`` keep their names);
- ``decoder.conv_blocks.{j}`` -> ``decoder.up.{L-1-j}`` (LlamaGen's decoder lists its levels lowest resolution
  first; ``res`` -> ``block``);
- ``{encoder,decoder}.mid.{0,1,2}`` -> ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``;
- ``quantize.codebook_used`` (a training usage counter) is left out.

The codebook is l2-normalised (``codebook_l2_norm=True`` in every published model): the nearest code is the one
of highest cosine similarity, and the decoder receives the unit-norm code, as ``VectorQuantizer(l2_normalize=True)``
does. Serving defaults: 256 x 256 (``--size 384`` for the 384-px models), short side resized and centre-cropped,
the ``flat`` layout (LlamaGen and Janus add their own offset to raw codes).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vqtok.model.importers.common import (
    CheckpointImportError,
    ImportResult,
    build_model,
    infer_vqgan_network,
    to_vqvae_keys,
)
from vqtok.model.importers.safe_load import state_dict_from
from vqtok.model.importers.taming import select_keys

__all__ = ["DEFAULT_FIT", "DEFAULT_LAYOUT", "DEFAULT_SIZE", "import_weights", "to_taming_keys"]

DEFAULT_SIZE = 256
DEFAULT_FIT = "crop"
DEFAULT_LAYOUT = "flat"
IGNORED_KEYS = ("quantize.codebook_used",)
_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}


def to_taming_keys(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """LlamaGen key names -> taming's (see the module docstring); keys outside the network are kept as they are
    (the strict check then names them)."""
    decoder_levels = {int(m.group(1)) for key in state if (m := re.match(r"^decoder\.conv_blocks\.(\d+)\.", key))}
    if decoder_levels and decoder_levels != set(range(len(decoder_levels))):
        raise CheckpointImportError(f"{where}: decoder levels {sorted(decoder_levels)} are not 0..n-1")
    last = len(decoder_levels) - 1
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if m := re.match(r"^(encoder|decoder)\.mid\.(\d+)\.(.*)$", key):
            if m.group(2) not in _MID:
                raise CheckpointImportError(f"{where}: unexpected middle block {key!r}")
            new = f"{m.group(1)}.mid.{_MID[m.group(2)]}.{m.group(3)}"
        elif m := re.match(r"^encoder\.conv_blocks\.(\d+)\.(res|attn|downsample)(\..*)$", key):
            part = "block" if m.group(2) == "res" else m.group(2)
            new = f"encoder.down.{m.group(1)}.{part}{m.group(3)}"
        elif m := re.match(r"^decoder\.conv_blocks\.(\d+)\.(res|attn|upsample)(\..*)$", key):
            part = "block" if m.group(2) == "res" else m.group(2)
            new = f"decoder.up.{last - int(m.group(1))}.{part}{m.group(3)}"
        if new in renamed:
            raise CheckpointImportError(f"{where}: two keys map to {new!r}")
        renamed[new] = value
    return renamed


def import_weights(obj: Any, where: str, config: dict[str, Any] | None = None, prefix: str = "",
                   l2_normalize: bool = True) -> ImportResult:
    """A LlamaGen (or Janus, with ``prefix``) VQ checkpoint -> ``ImportResult``. ``config`` must be None."""
    if config is not None:
        raise CheckpointImportError(f"{where}: LlamaGen publishes no config file; the architecture is read from the "
                                    "weights (leave out --config)")
    state, key = state_dict_from(obj, where, keys=("model", "state_dict"))
    state = select_keys(state, prefix, where)
    ignored = tuple(sorted(k for k in state if k in IGNORED_KEYS))
    taming = to_taming_keys({k: v for k, v in state.items() if k not in IGNORED_KEYS}, where)
    network = infer_vqgan_network(taming, where, l2_normalize=l2_normalize)
    model = build_model(network, to_vqvae_keys(taming), where)
    return ImportResult(model=model, native_size=DEFAULT_SIZE, fit=DEFAULT_FIT, layout=DEFAULT_LAYOUT,
                        state_dict_key=(f"{key}/{prefix}" if key else prefix) if prefix else key, ignored=ignored)
