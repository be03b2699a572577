"""The vqtok HTTP service: images to token grids and back (see ``service.app.create_app``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vqtok")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
