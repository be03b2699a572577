"""Torch datasets for training and evaluating the VQ-VAE, built on the sources.

Every image tensor this module yields is ``float32`` in ``[0, 1]`` with shape ``(3, H, W)``; the model
applies its own normalisation later.

* :class:`SourceCrops` - random ``S`` x ``S`` crops (or resizes) of the items of any source;
  :class:`ImageFolder` is it over a :class:`~vqtok.model.data.folder.FolderSource`.
* :class:`Cifar10` - the 32x32 CIFAR-10 images as they are.
* :class:`PhotoCrops` - random crops of the bundled photos, every photo equally often.

:func:`build_dataset` turns a spec (or a source) into the training set of its kind - the one dispatch
on source classes, :func:`training_set`; :func:`iter_full_images` walks whole images for evaluation;
:func:`data_variance` gives the variance that turns an MSE into the seed's NMSE.

Randomness: every random item draws from its own ``numpy.random.Generator`` seeded from
``(seed, epoch, index)``, so an item is the same whatever the number of DataLoader workers or
ranks. Call ``set_epoch(epoch)`` before each epoch (as with ``DistributedSampler``) for new crops;
with ``persistent_workers=True`` the workers keep the epoch they were started with.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vqtok.model.data.cifar import Cifar10Source
from vqtok.model.data.folder import DEFAULT_HELDOUT_FRACTION, FolderSource
from vqtok.model.data.photos import PhotoSource, load_photos
from vqtok.model.data.pixels import UnreadableImage, ensure_min_side, resize_square, to_pixels
from vqtok.model.data.source import BaseSource, DataSpec, Source, check_split, open_source

__all__ = [
    "DEFAULT_PHOTO_LENGTH",
    "HELDOUT_SEED",
    "MODES",
    "Cifar10",
    "CropInfo",
    "ImageFolder",
    "PhotoCrops",
    "SourceCrops",
    "augmented_crop",
    "build_dataset",
    "check_size",
    "data_variance",
    "item_rng",
    "iter_full_images",
    "random_crop",
    "random_crop_origin",
    "to_tensor",
    "training_set",
]

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("crop", "resize")
#: Seed of every held-out crop set: the evaluation set never depends on the training seed.
HELDOUT_SEED = 20_240_601
#: Decoded pixels a :class:`SourceCrops` keeps in memory (per process): a few dozen large photos.
DECODED_CACHE_BYTES = 512 << 20
#: Default number of crops per epoch of :class:`PhotoCrops`, by split.
DEFAULT_PHOTO_LENGTH: dict[str, int] = {"train": 10_000, "heldout": 512, "all": 10_000}


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, H, W)`` float32 in ``[0, 1]``."""
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    return torch.from_numpy(chw).to(torch.float32).div_(255.0)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item: a pure function of ``(seed, epoch, index)``."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


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


def augmented_crop(array: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(H, W, 3)`` → ``(size, size, 3)``: a random square window of side ``size / scale``, scale uniform in
    [0.5, 1] (so a crop sees up to twice the context, as if the photo were smaller), resized to ``size``
    (bicubic, antialiased), flipped left-right with probability 1/2."""
    array = ensure_min_side(array, size)
    scale = float(rng.uniform(0.5, 1.0))
    window = min(round(size / scale), *array.shape[:2])
    top, left = random_crop_origin(array.shape[0], array.shape[1], window, rng)
    crop = array[top : top + window, left : left + window]
    if window != size:
        crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC))
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def check_size(image_size: int) -> None:
    """Raise ``ValueError`` unless ``image_size`` is a positive int."""
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# --------------------------------------------------------------------------- crops of any source


class SourceCrops(Dataset[torch.Tensor]):
    """Every item of a source, as ``(3, S, S)`` float32 tensors in ``[0, 1]``.

    Args:
        source: any :class:`~vqtok.model.data.source.Source` with at least one item.
        image_size: side ``S`` of the square items.
        mode: ``"crop"`` - a random ``S`` x ``S`` crop (the image is first upscaled, aspect kept, when
            a side is shorter than ``S``); ``"resize"`` - the whole image resized to ``S`` x ``S``.
        seed: seed of the crops; item ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``.
        crops_per_image: items per image and epoch (item ``i`` is a crop of image ``i // crops_per_image``).
        augment: crop mode: random scale and flip (:func:`augmented_crop`) instead of a plain crop.
        cache_decoded: keep decoded images in memory (up to ``DECODED_CACHE_BYTES``) instead of decoding
            an image for every crop; an image that goes bad after its first use is then not noticed.

    Raises:
        ValueError: bad size or mode, or the source is empty (the source's message says why).
    """

    def __init__(self, source: Source, image_size: int, mode: str = "crop", seed: int = 0, *,
                 crops_per_image: int = 1, augment: bool = False, cache_decoded: bool = False) -> None:
        check_size(image_size)
        _check_mode(mode)
        if crops_per_image < 1:
            raise ValueError(f"crops_per_image must be >= 1, got {crops_per_image}")
        if isinstance(source, BaseSource):
            source.check_not_empty()  # the kind's own message (a folder tells skipped from split-empty)
        elif len(source) == 0:
            raise ValueError(f"data source {source.name!r} has no image in the {source.split!r} split")
        self.source = source
        self.image_size = image_size
        self.mode = mode
        self.seed = seed
        self.epoch = 0
        self.crops_per_image = crops_per_image
        self.augment = augment
        self.cache_decoded = cache_decoded
        # With cache_decoded, the decoded images of a small source are kept after their first use (a few dozen
        # photos decode once, not once per crop, in training); past DECODED_CACHE_BYTES, images decode per item.
        self._decoded: dict[int, np.ndarray] = {}
        self._decoded_bytes = 0

    @property
    def split(self) -> str:
        return self.source.split

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch`` (call before iterating, like ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source) * self.crops_per_image

    def __getitem__(self, index: int) -> torch.Tensor:
        """Item ``index`` (a crop of image ``index // crops_per_image``) as ``(3, S, S)`` float32 in ``[0, 1]``.

        If the item has become unreadable since the source was scanned, the next readable one
        (index + 1, + 2, ... modulo the length) is used instead, so the result stays deterministic.
        """
        total = len(self)
        if not -total <= index < total:
            raise IndexError(f"index {index} out of range for {total} items")
        index %= total
        n = len(self.source)
        rng = item_rng(self.seed, self.epoch, index)
        for offset in range(n):
            image_index = (index // self.crops_per_image + offset) % n
            try:
                array = self._pixels(image_index)
            except UnreadableImage as exc:  # the item went bad after the scan
                log.warning("%s: cannot read %s; using the next image", self.source.name, exc)
                continue
            return to_tensor(self._transform(array, rng))
        raise RuntimeError(f"{self.source.name}: no image of the split is readable any more")

    def _pixels(self, image_index: int) -> np.ndarray:
        """Image ``image_index`` of the source as ``(H, W, 3)`` uint8, from the cache when there."""
        cached = self._decoded.get(image_index)
        if cached is not None:
            return cached
        array = to_pixels(self.source[image_index].image)
        if self.cache_decoded and self._decoded_bytes + array.nbytes <= DECODED_CACHE_BYTES:
            self._decoded[image_index] = array
            self._decoded_bytes += array.nbytes
        return array

    def _transform(self, array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``(H, W, 3)`` → ``(S, S, 3)`` uint8 by ``self.mode`` (and ``self.augment``)."""
        if self.mode == "resize":
            return resize_square(array, self.image_size)
        if self.augment:
            return augmented_crop(array, self.image_size, rng)
        return random_crop(array, self.image_size, rng)


class ImageFolder(SourceCrops):
    """Every image under a folder, as ``(3, S, S)`` float32 tensors in ``[0, 1]``.

    Args:
        root: folder scanned recursively (hidden files and folders are ignored).
        image_size: side ``S`` of the square items.
        mode: ``"crop"`` or ``"resize"`` (see :class:`SourceCrops`).
        split: ``"train"``, ``"heldout"`` or ``"all"``; see ``is_heldout_path``.
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

    source: FolderSource

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int,
        mode: str = "crop",
        split: str = "train",
        heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
        seed: int = 0,
    ) -> None:
        check_size(image_size)
        _check_mode(mode)
        super().__init__(FolderSource(root, split, heldout_fraction), image_size, mode, seed)

    @classmethod
    def from_source(cls, source: FolderSource, image_size: int, mode: str = "crop", seed: int = 0,
                    **crops: Any) -> ImageFolder:
        """Crops of an already opened folder source (its scan is reused); ``crops``: see :class:`SourceCrops`."""
        dataset = cls.__new__(cls)
        SourceCrops.__init__(dataset, source, image_size, mode, seed, **crops)
        return dataset

    @property
    def root(self) -> Path:
        return self.source.root

    @property
    def heldout_fraction(self) -> float:
        return self.source.heldout_fraction

    @property
    def files(self) -> list[Path]:
        return self.source.files

    @property
    def skipped_paths(self) -> list[Path]:
        return self.source.skipped_paths

    @property
    def skipped(self) -> int:
        """Number of unreadable files found at scan time."""
        return len(self.source.index.skipped)

    def relative_name(self, index: int) -> str:
        """POSIX path of item ``index`` relative to the root."""
        return self.source.relative_name(index)


# --------------------------------------------------------------------------- CIFAR-10


class Cifar10(Dataset[torch.Tensor]):
    """CIFAR-10 from the python-pickle batches on disk; items ``(3, 32, 32)`` float32 in ``[0, 1]``.

    ``split="train"`` reads ``data_batch_1`` ... ``data_batch_5``, ``"heldout"`` reads
    ``test_batch`` and ``"all"`` both. ``root`` is the batch directory or a parent holding
    ``cifar-10-batches-py``. Nothing is ever downloaded. Labels are kept in ``labels`` ``(N,)``.

    Raises:
        FileNotFoundError: a batch file is missing (the message names it).
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "train") -> None:
        check_split(split)
        self._init_from(Cifar10Source(root, split))

    @classmethod
    def from_source(cls, source: Cifar10Source) -> Cifar10:
        """The images of an already opened CIFAR-10 source (its arrays are shared, not copied)."""
        dataset = cls.__new__(cls)
        dataset._init_from(source)
        return dataset

    def _init_from(self, source: Cifar10Source) -> None:
        self.source = source
        self.root = source.root
        self.split = source.split
        self.images = torch.from_numpy(source.images)  # (N, 3, 32, 32) uint8
        self.labels = torch.from_numpy(source.labels)  # (N,) int64

    def set_epoch(self, epoch: int) -> None:
        """No-op (no random transform), for a uniform training loop."""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        """``(3, 32, 32)`` float32 in ``[0, 1]``."""
        return self.images[index].to(torch.float32).div_(255.0)


# --------------------------------------------------------------------------- bundled photos


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
    Only images of ``split`` are ever used: see ``PHOTO_HELDOUT``.
    """

    def __init__(self, split: str, image_size: int, length: int, seed: int = 0) -> None:
        check_split(split)
        check_size(image_size)
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


# --------------------------------------------------------------------------- specs → datasets


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


def _capped(dataset: Dataset[torch.Tensor], length: int | None) -> Dataset[torch.Tensor]:
    return dataset if length is None else _Limited(dataset, length)


@functools.singledispatch
def training_set(source: Source, image_size: int, seed: int, length: int | None, mode: str,
                 **crops: Any) -> Dataset[torch.Tensor]:
    """The dataset of ``source``'s kind; items ``(3, S, S)`` float32 in ``[0, 1]``.

    Any source: :class:`SourceCrops` (``mode`` crops or resizes; ``length`` caps to evenly spaced
    items; ``crops``: its ``crops_per_image`` and ``augment``). Registered kinds: photos →
    :class:`PhotoCrops` (``length`` crops per epoch), CIFAR-10 → :class:`Cifar10` (``S`` must be 32),
    folder → :class:`ImageFolder`.
    """
    return _capped(SourceCrops(source, image_size, mode=mode, seed=seed, **crops), length)


@training_set.register
def _(source: PhotoSource, image_size: int, seed: int, length: int | None, mode: str,
      **crops: Any) -> Dataset[torch.Tensor]:  # its own crop count and flips
    n = DEFAULT_PHOTO_LENGTH[source.split] if length is None else length
    return PhotoCrops(source.split, image_size, n, seed=seed)


@training_set.register
def _(source: Cifar10Source, image_size: int, seed: int, length: int | None, mode: str,
      **crops: Any) -> Dataset[torch.Tensor]:  # whole 32x32 images: nothing to crop
    if image_size != 32:
        raise ValueError(f"CIFAR-10 images are 32x32; image_size must be 32, got {image_size}")
    return _capped(Cifar10.from_source(source), length)


@training_set.register
def _(source: FolderSource, image_size: int, seed: int, length: int | None, mode: str,
      **crops: Any) -> Dataset[torch.Tensor]:
    return _capped(ImageFolder.from_source(source, image_size, mode=mode, seed=seed, **crops), length)


def build_dataset(
    spec: DataSpec,
    image_size: int,
    split: str,
    seed: int = 0,
    length: int | None = None,
    mode: str = "crop",
    **crops: Any,
) -> Dataset[torch.Tensor]:
    """The dataset a spec names; items ``(3, S, S)`` float32 in ``[0, 1]`` (``S = 32`` for CIFAR-10).

    Args:
        spec: ``"photos"``, ``"cifar10:DIR"``, ``"folder:DIR"``, a folder path, or an opened source
            (re-split to ``split``; its scan is reused).
        image_size: side ``S`` of the items; must be 32 for CIFAR-10.
        split: ``"train"``, ``"heldout"`` or ``"all"``.
        seed: seed of the random crops. Held-out crops always use :data:`HELDOUT_SEED` instead,
            so the evaluation set does not depend on the training seed.
        length: photos - crops per epoch (default :data:`DEFAULT_PHOTO_LENGTH`); other kinds -
            optional cap (evenly spaced items).
        mode: crops of stored images (folder), ``"crop"`` or ``"resize"`` (see :class:`SourceCrops`).
        crops: folder and other crop sources: ``crops_per_image``, ``augment`` (random scale + flip,
            :func:`augmented_crop`) and ``cache_decoded`` of :class:`SourceCrops`; photos and CIFAR-10 ignore them.

    Raises:
        ValueError: bad spec, missing directory, empty split, or a wrong size for CIFAR-10.
    """
    check_split(split)
    check_size(image_size)
    source = open_source(spec, split)
    crop_seed = HELDOUT_SEED if split == "heldout" else seed
    return training_set(source, image_size, crop_seed, length, mode, **crops)


def iter_full_images(spec: DataSpec, split: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole images of a split (not crops): ``(key, (3, H, W) float32 in [0, 1])``.

    Keys are the source's: photos - the photo name (as in ``photo_sources``); folder - the relative
    path (files that fail to decode are skipped); cifar10 - ``"<split>/<index>"``.
    """
    for item in open_source(spec, split):
        try:
            array = to_pixels(item.image)
        except UnreadableImage as exc:
            log.warning("cannot decode %s (%s); skipped", item.key, exc)
            continue
        yield item.key, to_tensor(array)


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
