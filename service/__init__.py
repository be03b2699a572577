"""The vqtok HTTP service: images to token grids and back (see ``vqtok.service.app.create_app``)."""

from __future__ import annotations

from vqtok import __version__

__all__ = ["__version__"]
