"""Data for training and evaluating the VQ-VAE: sources of images, and the torch datasets built on them.

One job per module:

* :mod:`~vqtok.model.data.source` - the :class:`Source` protocol (a split of ``(key, image, metadata)``
  items with a ``describe()`` record computed once) and the one parser of spec strings,
  :func:`open_source` (``"photos"``, ``"cifar10:DIR"``, ``"folder:DIR"`` or a folder path).
* :mod:`~vqtok.model.data.folder` - :class:`FolderSource`: every image Pillow can open under a folder,
  unreadable files skipped and counted, a hash-of-the-path held-out split, verified once per folder state.
* :mod:`~vqtok.model.data.lists`, :mod:`~vqtok.model.data.tar`, :mod:`~vqtok.model.data.parquet` -
  :class:`ListSource` (``*.txt`` / ``*.jsonl`` file lists), :class:`TarSource` (WebDataset-style shards),
  :class:`ParquetSource` (an image-bytes column; pyarrow, imported lazily), on :class:`KeyedSource`
  (:mod:`~vqtok.model.data.keyed`: entries indexed once, split by the hash of the key).
* :mod:`~vqtok.model.data.cifar` - :class:`Cifar10Source`: the python-pickle CIFAR-10 batches (never downloaded).
* :mod:`~vqtok.model.data.photos` - :class:`PhotoSource`: the photos bundled in scikit-image, scikit-learn
  and matplotlib, with a FIXED split by image (:data:`PHOTO_HELDOUT`).
* :mod:`~vqtok.model.data.pixels` - neutral pixel helpers (:func:`to_rgb_array`, :func:`load_image`,
  :func:`to_pixels`, resizes); NumPy and Pillow only, shared with the service.
* :mod:`~vqtok.model.data.datasets` - the torch datasets (random crops of any source, :class:`ImageFolder`,
  :class:`Cifar10`, :class:`PhotoCrops`), :func:`build_dataset`, :func:`iter_full_images`,
  :func:`data_variance`.

Every image tensor the datasets yield is ``float32`` in ``[0, 1]`` with shape ``(3, H, W)``.
A caller that needs a spec several times opens it once (``source = open_source(spec)``) and passes
the source to :func:`build_dataset`, :func:`iter_full_images` and :func:`describe`; spec strings work too.
"""

from vqtok.model.data.cifar import (
    CIFAR_BATCHES,
    CIFAR_HELDOUT_BATCHES,
    CIFAR_SUBDIR,
    CIFAR_TRAIN_BATCHES,
    Cifar10Source,
    read_cifar_batch,
    read_cifar_split,
    resolve_cifar_dir,
)
from vqtok.model.data.datasets import (
    DEFAULT_PHOTO_LENGTH,
    HELDOUT_SEED,
    MODES,
    Cifar10,
    CropInfo,
    ImageFolder,
    PhotoCrops,
    SourceCrops,
    augmented_crop,
    build_dataset,
    data_variance,
    item_rng,
    iter_full_images,
    random_crop,
    random_crop_origin,
    to_tensor,
    training_set,
)
from vqtok.model.data.folder import (
    DEFAULT_HELDOUT_FRACTION,
    SPLIT_RULE,
    FolderIndex,
    FolderScan,
    FolderSource,
    heldout_files,
    index_folder,
    is_heldout_path,
    parse_heldout,
    scan_folder,
)
from vqtok.model.data.keyed import KeyedSource
from vqtok.model.data.lists import ListSource
from vqtok.model.data.parquet import ParquetSource
from vqtok.model.data.photos import PHOTO_HELDOUT, PhotoSource, load_photo, load_photos, photo_names, photo_sources
from vqtok.model.data.pixels import (
    UnreadableImage,
    array_to_rgb,
    ensure_min_side,
    load_image,
    resize_square,
    to_pixels,
    to_rgb_array,
)
from vqtok.model.data.source import (
    SPEC_HELP,
    SPLITS,
    BaseSource,
    DataSpec,
    Source,
    SourceItem,
    check_split,
    describe,
    open_source,
    parse_spec,
    source_kinds,
)
from vqtok.model.data.tar import TarSource

__all__ = [
    "CIFAR_BATCHES",
    "CIFAR_HELDOUT_BATCHES",
    "CIFAR_SUBDIR",
    "CIFAR_TRAIN_BATCHES",
    "DEFAULT_HELDOUT_FRACTION",
    "DEFAULT_PHOTO_LENGTH",
    "HELDOUT_SEED",
    "MODES",
    "PHOTO_HELDOUT",
    "SPEC_HELP",
    "SPLITS",
    "SPLIT_RULE",
    "BaseSource",
    "Cifar10",
    "Cifar10Source",
    "CropInfo",
    "DataSpec",
    "FolderIndex",
    "FolderScan",
    "FolderSource",
    "ImageFolder",
    "KeyedSource",
    "ListSource",
    "ParquetSource",
    "PhotoCrops",
    "PhotoSource",
    "Source",
    "SourceCrops",
    "SourceItem",
    "TarSource",
    "UnreadableImage",
    "array_to_rgb",
    "augmented_crop",
    "build_dataset",
    "check_split",
    "data_variance",
    "describe",
    "ensure_min_side",
    "heldout_files",
    "index_folder",
    "is_heldout_path",
    "item_rng",
    "iter_full_images",
    "load_image",
    "load_photo",
    "load_photos",
    "open_source",
    "parse_heldout",
    "parse_spec",
    "photo_names",
    "photo_sources",
    "random_crop",
    "random_crop_origin",
    "read_cifar_batch",
    "read_cifar_split",
    "resize_square",
    "resolve_cifar_dir",
    "scan_folder",
    "source_kinds",
    "to_pixels",
    "to_rgb_array",
    "to_tensor",
    "training_set",
]
