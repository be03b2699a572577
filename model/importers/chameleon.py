"""Chameleon's image tokenizer (also used by Anole and Lumina-mGPT): a taming VQGAN, published as
``tokenizer/vqgan.ckpt`` (a Lightning checkpoint) with ``tokenizer/vqgan.yaml`` in Meta's Chameleon release.

The format is taming's (``chameleon/inference/vqgan.py`` is taming's ``VQModel`` with minimal dependencies), so
the conversion is :mod:`vqtok.model.importers.taming`'s; what differs is the serving defaults: 512 x 512 images
(the config's ``resolution``), resized on the short side and centre-cropped (``ImageTokenizer._vqgan_input_from``),
f = 16 -> a 32 x 32 grid of 8,192 codes, laid out as Chameleon's LLM reads them (``chameleon-like``).
"""

from __future__ import annotations

from typing import Any

from vqtok.model.importers.common import ImportResult
from vqtok.model.importers.taming import import_taming_format

__all__ = ["DEFAULT_FIT", "DEFAULT_LAYOUT", "DEFAULT_SIZE", "import_weights"]

DEFAULT_SIZE = 512
DEFAULT_FIT = "crop"
DEFAULT_LAYOUT = "chameleon-like"


def import_weights(obj: Any, where: str, config: dict[str, Any] | None = None, prefix: str = "") -> ImportResult:
    """Chameleon's ``vqgan.ckpt`` (+ ``vqgan.yaml``) -> ``ImportResult``."""
    return import_taming_format(obj, where, config=config, prefix=prefix, default_size=DEFAULT_SIZE,
                                default_fit=DEFAULT_FIT, default_layout=DEFAULT_LAYOUT)
