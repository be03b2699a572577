"""The bundled photos as a source: natural photos that ship inside scikit-image, scikit-learn and matplotlib.

No network: every file ships inside its package's wheel. The split is FIXED and by whole image:
``"heldout"`` is exactly :data:`PHOTO_HELDOUT`, ``"train"`` every other photo, so no crop of a held-out
image is ever trained on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Self

import numpy as np

from vqtok.model.data.pixels import array_to_rgb, load_image
from vqtok.model.data.source import BaseSource, SourceItem, check_split

__all__ = [
    "PHOTO_HELDOUT",
    "PhotoSource",
    "load_photo",
    "load_photos",
    "photo_names",
    "photo_sources",
]

#: The bundled photos that are never trained on: a cat (fur, close-up), a still life (smooth
#: shading, specular highlights) and a portrait (a face, fabric, a flag), each from a different
#: package. No crop of these images is ever produced by the ``"train"`` split.
PHOTO_HELDOUT: tuple[str, ...] = ("chelsea", "coffee", "grace_hopper")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: left view

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook

        return load_image(cbook.get_sample_data(filename, asfileobj=False))

    return load


def photo_sources() -> dict[str, Callable[[], np.ndarray]]:
    """Name → loader of each natural photo bundled in an installed package (no network).

    The list is fixed (it does not depend on what is installed), so the split never shifts; a
    loader raises ``ImportError`` when its package (the ``vqtok[train]`` extra) is missing.
    Every file ships inside the package wheel: none goes through ``pooch``. ``skimage.data.cat`` is
    left out because it is the same picture as ``chelsea``.
    """
    sources: dict[str, Callable[[], np.ndarray]] = {
        name: _skimage(name)
        for name in (
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "stereo_motorcycle",
            "hubble_deep_field",
            "retina",
            "immunohistochemistry",
            "camera",
        )
    }
    sources["china"] = _sklearn("china.jpg")
    sources["flower"] = _sklearn("flower.jpg")
    sources["grace_hopper"] = _matplotlib("grace_hopper.jpg")
    return sources


def photo_names(split: str) -> list[str]:
    """Names of the bundled photos in ``split``, in :func:`photo_sources` order."""
    check_split(split)
    names = list(photo_sources())
    if split == "all":
        return names
    return [n for n in names if (n in PHOTO_HELDOUT) == (split == "heldout")]


@functools.lru_cache(maxsize=32)
def load_photo(name: str) -> np.ndarray:
    """One bundled photo, ``(H, W, 3)`` uint8, read-only and cached."""
    sources = photo_sources()
    if name not in sources:
        raise ValueError(f"unknown bundled photo {name!r}; known: {sorted(sources)}")
    try:
        raw = sources[name]()
    except ImportError as exc:
        raise ImportError(f"bundled photo {name!r} needs {exc.name}: pip install 'vqtok[train]'") from exc
    array = array_to_rgb(np.asarray(raw, dtype=np.uint8))
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=32)
def _load_photos_cached(split: str) -> tuple[tuple[str, np.ndarray], ...]:
    return tuple((name, load_photo(name)) for name in photo_names(split))


def load_photos(split: str) -> list[tuple[str, np.ndarray]]:
    """The bundled photos of a split: ``[(name, (H, W, 3) uint8), ...]``.

    The split is by whole image: ``"heldout"`` is exactly :data:`PHOTO_HELDOUT`, ``"train"`` is
    every other photo, so no crop of a held-out image is ever trained on. Arrays are cached and
    read-only (copy before editing).
    """
    check_split(split)
    return list(_load_photos_cached(split))


class PhotoSource(BaseSource):
    """The bundled photos of one split; items ``(name, (H, W, 3) uint8 read-only, {})``.

    The spec is the bare word ``"photos"``. Photos are loaded on first use (and cached process-wide).
    """

    kind = "photos"
    takes_argument = False

    def __init__(self, split: str = "all") -> None:
        super().__init__(split)
        self.names = photo_names(split)

    @classmethod
    def check_argument(cls, spec: str, argument: str) -> None:
        if argument or spec != cls.kind:
            raise ValueError(f"dataset spec {spec!r}: the bundled photos take no argument; write 'photos'")

    @classmethod
    def from_spec(cls, argument: str, split: str) -> Self:
        return cls(split)

    @property
    def name(self) -> str:
        return self.kind

    def with_split(self, split: str) -> Self:
        return type(self)(split)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> SourceItem:
        name = self.names[self.check_index(index)]
        return SourceItem(name, load_photo(name))

    def _describe(self) -> dict[str, Any]:
        photos = load_photos(self.split)
        return {
            "source": "bundled photos (scikit-image, scikit-learn, matplotlib)",
            "num_images": len(photos),
            "heldout": list(PHOTO_HELDOUT),
            "images": {name: [int(a.shape[0]), int(a.shape[1])] for name, a in photos},
        }
