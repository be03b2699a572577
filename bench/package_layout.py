"""The installed ``vqtok`` package's layout, built from a source tree without pip: for bench scripts that serve a
commit other than the installed one (``service_ab.py``) or run from a checkout never installed (``gpu_figures.py``).

``pyproject.toml`` maps the same three places (``package-dir``): ``src/vqtok``'s files are the package's top,
``model/`` is ``vqtok.model`` and ``service/`` is ``vqtok.service``. This module imports nothing of vqtok.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def assemble_vqtok(source: Path, package: Path, place: Callable[[Path, Path], object]) -> Path:
    """Lay ``source`` (a tree holding ``src/vqtok``, ``model`` and ``service``) out as the importable folder
    ``package`` (named ``vqtok``), each part put there by ``place(part, destination)`` (a move or a symlink);
    returns ``package``."""
    package.mkdir()
    for item in (source / "src" / "vqtok").iterdir():
        place(item, package / item.name)
    place(source / "model", package / "model")
    place(source / "service", package / "service")
    return package
