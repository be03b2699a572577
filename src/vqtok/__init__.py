"""vqtok: a VQ-VAE image tokenizer for language models (library, CLI and HTTP service).

The public API: ``vqtok.Tokenizer`` (images <-> token grids in this process) and ``vqtok.Client``
(the same over HTTP, against ``vqtok serve``). The package is light to import: both load on first
use, so ``import vqtok`` pulls in neither torch nor the web stack, and ``Client`` never needs torch.

- ``vqtok.model``: the networks, quantizers, checkpoints, training and evaluation (no HTTP).
- ``vqtok.service``: the FastAPI service, its micro-batcher, and the HTTP client.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("vqtok")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+source"

if TYPE_CHECKING:
    from vqtok.service.client import VQTokClient as Client
    from vqtok.tokenizer import Tokenizer

# public name -> (module, attribute), imported on first access
_LAZY: dict[str, tuple[str, str]] = {
    "Client": ("vqtok.service.client", "VQTokClient"),
    "Tokenizer": ("vqtok.tokenizer", "Tokenizer"),
}

__all__ = ["Client", "Tokenizer", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attribute)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'vqtok' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
