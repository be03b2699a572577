"""Datasets for training and evaluating the VQ-VAE.

Three sources, one convention. Every image tensor this module yields is ``float32`` in ``[0, 1]``
with shape ``(3, H, W)``; the model applies its own normalisation later.

* :class:`ImageFolder` - every image Pillow can open under a folder (recursively), random crops or
  resizes, and a train / held-out split that is a hash of each file's relative path.
* :class:`Cifar10` - the python-pickle CIFAR-10 batches from a local directory (never downloaded).
* :class:`PhotoCrops` - random crops of the natural photos that ship inside scikit-image,
  scikit-learn and matplotlib, with a FIXED split by image (:data:`PHOTO_HELDOUT`).

:func:`build_dataset` turns a spec string (``"photos"``, ``"cifar10:DIR"``, ``"folder:DIR"`` or a
folder path) into one of them; :func:`iter_full_images` walks whole images for evaluation;
:func:`data_variance` gives the variance that turns an MSE into the seed's NMSE; :func:`describe`
gives the JSON-able record a checkpoint stores.

Randomness: every random item draws from its own ``numpy.random.Generator`` seeded from
``(seed, epoch, index)``, so an item is the same whatever the number of DataLoader workers or
ranks. Call ``set_epoch(epoch)`` before each epoch (as with ``DistributedSampler``) for new crops;
with ``persistent_workers=True`` the workers keep the epoch they were started with.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

__all__ = [
    "CIFAR_HELDOUT_BATCHES",
    "CIFAR_TRAIN_BATCHES",
    "DEFAULT_HELDOUT_FRACTION",
    "DEFAULT_PHOTO_LENGTH",
    "HELDOUT_SEED",
    "PHOTO_HELDOUT",
    "SPLITS",
    "Cifar10",
    "CropInfo",
    "FolderScan",
    "ImageFolder",
    "PhotoCrops",
    "build_dataset",
    "data_variance",
    "describe",
    "iter_full_images",
    "load_image",
    "load_photos",
    "parse_spec",
    "photo_sources",
    "scan_folder",
    "to_rgb_array",
    "to_tensor",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "heldout", "all")
#: Default expected fraction of a folder's files in the held-out split.
DEFAULT_HELDOUT_FRACTION = 0.05
MODES: tuple[str, ...] = ("crop", "resize")

#: Seed of every held-out crop set: the evaluation set never depends on the training seed.
HELDOUT_SEED = 20_240_601
#: Default number of crops per epoch of :class:`PhotoCrops`, by split.
DEFAULT_PHOTO_LENGTH: dict[str, int] = {"train": 10_000, "heldout": 512, "all": 10_000}

CIFAR_TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_HELDOUT_BATCHES: tuple[str, ...] = ("test_batch",)
CIFAR_SUBDIR = "cifar-10-batches-py"

#: The bundled photos that are never trained on: a cat (fur, close-up), a still life (smooth
#: shading, specular highlights) and a portrait (a face, fabric, a flag), each from a different
#: package. No crop of these images is ever produced by the ``"train"`` split.
PHOTO_HELDOUT: tuple[str, ...] = ("chelsea", "coffee", "grace_hopper")


# --------------------------------------------------------------------------- pixels


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a Pillow image of any mode to an RGB array.

    Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index, ...) is composited on white;
    16/32-bit integer and float greyscale (``I;16``, ``I``, ``F``) are rescaled to 8 bits rather
    than clipped; ``CMYK``, ``YCbCr``, ``1``, ``L`` and palettes go through Pillow's conversion.

    Returns:
        ``(H, W, 3)`` ``uint8`` array (C-contiguous, a copy owned by the caller).
    """
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        return _grey_to_rgb(_high_depth_to_uint8(img))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = (img.convert("LA") if mode == "La" else img).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """``I;16*`` / ``I`` / ``F`` greyscale → ``(H, W)`` uint8, rescaling instead of clipping."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and values.max(initial=0.0) > 255.0):
        values = values / 257.0  # 16-bit range 0..65535 → 0..255
    elif img.mode == "F" and values.max(initial=0.0) <= 1.0:
        values = values * 255.0  # float image in [0, 1]
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 → ``(H, W, 3)`` uint8."""
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """A ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 array → ``(H, W, 3)`` uint8 via :func:`to_rgb_array`."""
    return to_rgb_array(Image.fromarray(np.ascontiguousarray(array)))


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file (first frame, EXIF orientation applied).

    Returns:
        ``(H, W, 3)`` uint8.

    Raises:
        OSError / ValueError / Image.DecompressionBombError: when the file cannot be decoded.
    """
    with Image.open(path) as img:
        img.load()
        return to_rgb_array(ImageOps.exif_transpose(img))


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, H, W)`` float32 in ``[0, 1]``."""
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    return torch.from_numpy(chw).to(torch.float32).div_(255.0)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item: a pure function of ``(seed, epoch, index)``."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def ensure_min_side(array: np.ndarray, size: int) -> np.ndarray:
    """Upscale (bicubic, aspect kept) so that both sides are at least ``size``.

    Args:
        array: ``(H, W, 3)`` uint8.

    Returns:
        ``(H', W', 3)`` uint8 with ``min(H', W') >= size``; ``array`` itself when already large enough.
    """
    h, w = array.shape[:2]
    if min(h, w) >= size:
        return array
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    return np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.Resampling.BICUBIC))


def resize_square(array: np.ndarray, size: int) -> np.ndarray:
    """Resize (bicubic, antialiased when shrinking) to ``(size, size, 3)`` uint8, ignoring aspect."""
    if array.shape[:2] == (size, size):
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BICUBIC))


def random_crop_origin(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Uniform ``(top, left)`` of a ``size`` x ``size`` window inside ``height`` x ``width``."""
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return top, left


def random_crop(array: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(H, W, 3)`` → ``(size, size, 3)``: upscale if a side is short, then a uniform random crop."""
    array = ensure_min_side(array, size)
    top, left = random_crop_origin(array.shape[0], array.shape[1], size, rng)
    return array[top : top + size, left : left + size]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


# --------------------------------------------------------------------------- image folder


def is_heldout_path(relative_path: str, heldout_fraction: float) -> bool:
    """Whether a file belongs to the held-out split.

    A pure function of the POSIX relative path (SHA-256, first 8 bytes as a fraction of 2**64), so
    a file keeps its split when other files are added, removed or the training seed changes.
    """
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < heldout_fraction


def _verify_image(path: Path) -> bool:
    """Cheap scan-time check: Pillow identifies the file and ``verify()`` passes."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception:  # any decoder error means "not a usable image"
        return False
    return True


class FolderScan(NamedTuple):
    """What :func:`scan_folder` found: readable files of the split and every skipped file."""

    root: Path
    files: list[Path]
    skipped: list[Path]
    readable: int  # readable images in all splits


def _walk_files(root: Path) -> Iterator[Path]:
    """Every non-hidden file under ``root``, in a sorted (deterministic) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def scan_folder(
    root: str | os.PathLike[str], split: str = "all", heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> FolderScan:
    """Recursively list the readable images of one split of a folder.

    Files are not filtered by extension: every non-hidden file is tried with Pillow, and the ones
    it cannot identify or verify are returned in ``skipped`` (whatever their split).

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    _check_split(split)
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    files: list[Path] = []
    skipped: list[Path] = []
    readable = 0
    for path in _walk_files(root):
        if not _verify_image(path):
            skipped.append(path)
            continue
        readable += 1
        heldout = is_heldout_path(path.relative_to(root).as_posix(), heldout_fraction)
        if split == "all" or heldout == (split == "heldout"):
            files.append(path)
    if skipped:
        log.warning("image folder %s: skipped %d unreadable file(s), e.g. %s", root, len(skipped), skipped[0])
    return FolderScan(root, files, skipped, readable)


class ImageFolder(Dataset[torch.Tensor]):
    """Every image under a folder, as ``(3, S, S)`` float32 tensors in ``[0, 1]``.

    Args:
        root: folder scanned recursively (hidden files and folders are ignored).
        image_size: side ``S`` of the square items.
        mode: ``"crop"`` - a random ``S`` x ``S`` crop (the image is first upscaled, aspect kept, when
            a side is shorter than ``S``); ``"resize"`` - the whole image resized to ``S`` x ``S``.
        split: ``"train"``, ``"heldout"`` or ``"all"``; see :func:`is_heldout_path`.
        heldout_fraction: expected fraction of files in the held-out split.
        seed: seed of the crops; item ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``.

    Attributes:
        files: the readable images of the split, sorted by path.
        skipped_paths: files that Pillow could not open or verify (all splits).
        skipped: ``len(skipped_paths)``.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: the folder holds no readable image, or the requested split is empty.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int,
        mode: str = "crop",
        split: str = "train",
        heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
        seed: int = 0,
    ) -> None:
        _check_size(image_size)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        scan = scan_folder(root, split, heldout_fraction)
        self.root = scan.root
        self.files = scan.files
        self.skipped_paths = scan.skipped
        self.image_size = image_size
        self.mode = mode
        self.split = split
        self.heldout_fraction = heldout_fraction
        self.seed = seed
        self.epoch = 0
        if not self.files:
            raise ValueError(self._empty_message(scan))

    def _empty_message(self, scan: FolderScan) -> str:
        if scan.readable == 0:
            return (
                f"image folder {str(self.root)!r} holds no readable image "
                f"({len(scan.skipped)} file(s) skipped as unreadable)"
            )
        return (
            f"image folder {str(self.root)!r} has no image in the {self.split!r} split "
            f"({scan.readable} readable in all, heldout_fraction={self.heldout_fraction}); "
            "add images or change heldout_fraction"
        )

    @property
    def skipped(self) -> int:
        """Number of unreadable files found at scan time."""
        return len(self.skipped_paths)

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch`` (call before iterating, like ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def relative_name(self, index: int) -> str:
        """POSIX path of item ``index`` relative to the root."""
        return self.files[index].relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> torch.Tensor:
        """Item ``index`` as ``(3, S, S)`` float32 in ``[0, 1]``.

        If the file has become unreadable since the scan, the next readable file (index + 1, + 2,
        ... modulo the length) is used instead, so the result stays deterministic.
        """
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        rng = item_rng(self.seed, self.epoch, index)
        for offset in range(n):
            path = self.files[(index + offset) % n]
            try:
                array = load_image(path)
            except Exception as exc:  # the file went bad after the scan
                log.warning("image folder: cannot read %s (%s); using the next image", path, exc)
                continue
            return to_tensor(self._transform(array, rng))
        raise RuntimeError(f"image folder {str(self.root)!r}: no image of the split is readable any more")

    def _transform(self, array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``(H, W, 3)`` → ``(S, S, 3)`` uint8 by ``self.mode``."""
        if self.mode == "resize":
            return resize_square(array, self.image_size)
        return random_crop(array, self.image_size, rng)


# --------------------------------------------------------------------------- CIFAR-10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds NumPy arrays: a batch file cannot run arbitrary code."""

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.numeric", "_frombuffer"),  # protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # bytes written with pickle protocol <= 2 by Python 3
            ("copy_reg", "_reconstructor"),
            ("copyreg", "_reconstructor"),
            ("__builtin__", "object"),
            ("builtins", "object"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which is not allowed")


def resolve_cifar_dir(root: str | os.PathLike[str]) -> Path:
    """``root`` itself, or ``root/cifar-10-batches-py`` when that exists."""
    root = Path(root)
    nested = root / CIFAR_SUBDIR
    return nested if nested.is_dir() else root


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-pickle batch → images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64."""
    with open(path, "rb") as f:
        batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ValueError(f"CIFAR-10 batch {path} is not a dict with a b'data' entry")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"CIFAR-10 batch {path}: data has shape {data.shape}, expected (N, 3072)")
    labels = np.asarray(batch.get(b"labels", [-1] * len(data)), dtype=np.int64)
    return data.reshape(-1, 3, 32, 32), labels


class Cifar10(Dataset[torch.Tensor]):
    """CIFAR-10 from the python-pickle batches on disk; items ``(3, 32, 32)`` float32 in ``[0, 1]``.

    ``split="train"`` reads ``data_batch_1`` ... ``data_batch_5``, ``"heldout"`` reads
    ``test_batch`` and ``"all"`` both. ``root`` is the batch directory or a parent holding
    ``cifar-10-batches-py``. Nothing is ever downloaded. Labels are kept in ``labels`` ``(N,)``.

    Raises:
        FileNotFoundError: a batch file is missing (the message names it).
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "train") -> None:
        _check_split(split)
        self.root = resolve_cifar_dir(root)
        self.split = split
        names = {
            "train": CIFAR_TRAIN_BATCHES,
            "heldout": CIFAR_HELDOUT_BATCHES,
            "all": CIFAR_TRAIN_BATCHES + CIFAR_HELDOUT_BATCHES,
        }[split]
        images, labels = [], []
        for name in names:
            path = self.root / name
            if not path.is_file():
                raise FileNotFoundError(
                    f"CIFAR-10 batch file {str(path)!r} not found; expected the python version "
                    f"(cifar-10-python.tar.gz extracted) in {str(self.root)!r}. vqtok never downloads data."
                )
            batch_images, batch_labels = read_cifar_batch(path)
            images.append(batch_images)
            labels.append(batch_labels)
        self.images = torch.from_numpy(np.concatenate(images))  # (N, 3, 32, 32) uint8
        self.labels = torch.from_numpy(np.concatenate(labels))  # (N,) int64

    def set_epoch(self, epoch: int) -> None:
        """No-op (no random transform), for a uniform training loop."""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        """``(3, 32, 32)`` float32 in ``[0, 1]``."""
        return self.images[index].to(torch.float32).div_(255.0)


# --------------------------------------------------------------------------- bundled photos


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
    _check_split(split)
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
    _check_split(split)
    return list(_load_photos_cached(split))


class CropInfo(NamedTuple):
    """Where item ``i`` of :class:`PhotoCrops` comes from (in the possibly upscaled image)."""

    name: str
    top: int
    left: int
    flipped: bool


class PhotoCrops(Dataset[torch.Tensor]):
    """``length`` random ``(3, S, S)`` crops of the bundled photos of one split.

    Item ``i`` of epoch ``e`` picks a photo uniformly (every photo equally often, so one large
    photo with a wide black border cannot dominate training), then a uniform crop position, then
    (train split only) a horizontal flip with probability 1/2, all from a generator seeded with
    ``(seed, e, i)``. Photos with a side shorter than ``S`` are upscaled once (aspect kept).
    Only images of ``split`` are ever used: see :data:`PHOTO_HELDOUT`.
    """

    def __init__(self, split: str, image_size: int, length: int, seed: int = 0) -> None:
        _check_split(split)
        _check_size(image_size)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length!r}")
        self.split = split
        self.image_size = image_size
        self.length = int(length)
        self.seed = seed
        self.epoch = 0
        self.flip = split == "train"
        photos = load_photos(split)
        self.names = [name for name, _ in photos]
        self.arrays = [ensure_min_side(array, image_size) for _, array in photos]
        self.probs = np.full(len(self.arrays), 1.0 / len(self.arrays))

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch`` (call before iterating, like ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def crop_info(self, index: int) -> CropInfo:
        """The photo, crop origin and flip of item ``index`` in the current epoch."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} crops")
        rng = item_rng(self.seed, self.epoch, index)
        k = int(rng.choice(len(self.arrays), p=self.probs))
        h, w = self.arrays[k].shape[:2]
        top, left = random_crop_origin(h, w, self.image_size, rng)
        flipped = bool(self.flip and rng.random() < 0.5)
        return CropInfo(self.names[k], top, left, flipped)

    def __getitem__(self, index: int) -> torch.Tensor:
        """``(3, S, S)`` float32 in ``[0, 1]``."""
        info = self.crop_info(index)
        size = self.image_size
        array = self.arrays[self.names.index(info.name)]
        crop = array[info.top : info.top + size, info.left : info.left + size]
        if info.flipped:
            crop = crop[:, ::-1]
        return to_tensor(crop)


# --------------------------------------------------------------------------- specs


class _Limited(Dataset[torch.Tensor]):
    """``length`` evenly spaced items of a dataset (deterministic); forwards ``set_epoch``."""

    def __init__(self, dataset: Dataset[torch.Tensor], length: int) -> None:
        self.dataset = dataset
        n = len(dataset)
        self.indices = np.linspace(0, n - 1, num=min(length, n)).round().astype(np.int64).tolist()

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[self.indices[index]]


_SPEC_HELP = "expected 'photos', 'cifar10:DIR', 'folder:DIR' or the path of an image folder"


def parse_spec(spec: str) -> tuple[str, str]:
    """``spec`` → ``(kind, source)`` with kind ``"photos"``, ``"cifar10"`` or ``"folder"``.

    Raises:
        ValueError: empty spec, unknown ``kind:`` prefix, or a missing directory.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError(f"empty dataset spec; {_SPEC_HELP}")
    if spec == "photos":
        return "photos", ""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("cifar10", "folder"):
        kind, source = prefix, rest
    elif sep and prefix.isidentifier() and len(prefix) > 1 and not Path(spec).exists():
        raise ValueError(f"unknown dataset kind {prefix!r} in spec {spec!r}; {_SPEC_HELP}")
    else:
        kind, source = "folder", spec
    if not source:
        raise ValueError(f"dataset spec {spec!r} names no directory; {_SPEC_HELP}")
    if not Path(source).is_dir():
        what = "CIFAR-10 directory" if kind == "cifar10" else "image folder"
        raise ValueError(f"dataset spec {spec!r}: {what} {source!r} does not exist (or is not a directory)")
    return kind, source


def build_dataset(
    spec: str,
    image_size: int,
    split: str,
    seed: int = 0,
    length: int | None = None,
    mode: str = "crop",
) -> Dataset[torch.Tensor]:
    """The dataset a spec names; items ``(3, S, S)`` float32 in ``[0, 1]`` (``S = 32`` for CIFAR-10).

    Args:
        spec: ``"photos"``, ``"cifar10:DIR"``, ``"folder:DIR"`` or a folder path.
        image_size: side ``S`` of the items; must be 32 for CIFAR-10.
        split: ``"train"``, ``"heldout"`` or ``"all"``.
        seed: seed of the random crops. Held-out crops always use :data:`HELDOUT_SEED` instead,
            so the evaluation set does not depend on the training seed.
        length: photos - crops per epoch (default :data:`DEFAULT_PHOTO_LENGTH`); folder / CIFAR-10 -
            optional cap (evenly spaced items).
        mode: folder only, ``"crop"`` or ``"resize"`` (see :class:`ImageFolder`).

    Raises:
        ValueError: bad spec, missing directory, empty split, or a wrong size for CIFAR-10.
    """
    _check_split(split)
    _check_size(image_size)
    kind, source = parse_spec(spec)
    crop_seed = HELDOUT_SEED if split == "heldout" else seed
    dataset: Dataset[torch.Tensor]
    if kind == "photos":
        n = DEFAULT_PHOTO_LENGTH[split] if length is None else length
        return PhotoCrops(split, image_size, n, seed=crop_seed)
    if kind == "cifar10":
        if image_size != 32:
            raise ValueError(f"CIFAR-10 images are 32x32; image_size must be 32, got {image_size}")
        dataset = Cifar10(source, split)
    else:
        dataset = ImageFolder(source, image_size, mode=mode, split=split, seed=crop_seed)
    return dataset if length is None else _Limited(dataset, length)


def iter_full_images(spec: str, split: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole images of a split (not crops): ``(name, (3, H, W) float32 in [0, 1])``.

    photos - each bundled photo of the split (name as in :func:`photo_sources`); folder - each
    readable file of the split (name = relative path; files that fail to decode are skipped);
    cifar10 - each 32x32 image (name ``"<split>/<index>"``).
    """
    _check_split(split)
    kind, source = parse_spec(spec)
    if kind == "photos":
        for name, array in load_photos(split):
            yield name, to_tensor(array)
    elif kind == "cifar10":
        dataset = Cifar10(source, split)
        for i in range(len(dataset)):
            yield f"{split}/{i}", dataset[i]
    else:
        scan = scan_folder(source, split)
        for path in scan.files:
            try:
                array = load_image(path)
            except Exception as exc:
                log.warning("image folder: cannot read %s (%s); skipped", path, exc)
                continue
            yield path.relative_to(scan.root).as_posix(), to_tensor(array)


def data_variance(dataset: Dataset[Any], max_items: int = 2048) -> float:
    """Variance of all pixel values (``[0, 1]`` units) over up to ``max_items`` evenly spaced items.

    The denominator of NMSE = MSE / variance, as in the seed. Items may be tensors or tuples
    whose first element is the image tensor. Computed in float64 with running sums (no stacking).
    """
    n = len(dataset)
    if n == 0 or max_items < 1:
        raise ValueError("data_variance needs a non-empty dataset and max_items >= 1")
    indices = np.linspace(0, n - 1, num=min(n, max_items)).round().astype(np.int64)
    count, total, total_sq = 0, 0.0, 0.0
    for i in np.unique(indices).tolist():
        item = dataset[i]
        image = item[0] if isinstance(item, tuple | list) else item
        values = torch.as_tensor(image).to(torch.float64)
        count += values.numel()
        total += float(values.sum())
        total_sq += float(values.square().sum())
    mean = total / count
    return max(total_sq / count - mean * mean, 0.0)


def describe(spec: str, split: str) -> dict[str, Any]:
    """A small JSON-able record of a dataset (stored in checkpoints by training).

    Keys: ``kind``, ``source``, ``split``, ``num_images``; photos add ``heldout`` (the held-out
    names) and ``images`` (name → ``[H, W]``); folders add ``skipped`` and the split rule.
    """
    _check_split(split)
    kind, source = parse_spec(spec)
    record: dict[str, Any] = {"kind": kind, "split": split}
    if kind == "photos":
        photos = load_photos(split)
        record["source"] = "bundled photos (scikit-image, scikit-learn, matplotlib)"
        record["num_images"] = len(photos)
        record["heldout"] = list(PHOTO_HELDOUT)
        record["images"] = {name: [int(a.shape[0]), int(a.shape[1])] for name, a in photos}
    elif kind == "cifar10":
        dataset = Cifar10(source, split)
        record["source"] = str(dataset.root.resolve())
        record["num_images"] = len(dataset)
    else:
        scan = scan_folder(source, split)
        record["source"] = str(scan.root.resolve())
        record["num_images"] = len(scan.files)
        record["skipped"] = len(scan.skipped)
        record["heldout_fraction"] = DEFAULT_HELDOUT_FRACTION
        record["split_rule"] = "sha256(relative path)[:8] / 2**64 < heldout_fraction"
    return record
