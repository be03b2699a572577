"""The :class:`Source` protocol: a split of keyed images, and the ONE parser of data spec strings.

A source is what a data spec names (``"photos"``, ``"cifar10:DIR"``, ``"folder:DIR"`` or a folder path)
restricted to one split (``"train"``, ``"heldout"`` or ``"all"``). It is random access: item ``i`` is a
:class:`SourceItem` ``(key, image, metadata)`` where ``image`` is either ``(H, W, 3)`` uint8 pixels or
the encoded bytes of an image file (decode with :func:`vqtok.model.data.pixels.to_pixels`). Sources
hold no torch and no training randomness: the torch datasets (``model/data/datasets.py``) and bulk
tokenization are built on top of them.

Kinds (one class each, one module each): ``photos`` (:class:`~vqtok.model.data.photos.PhotoSource`),
``cifar10`` (:class:`~vqtok.model.data.cifar.Cifar10Source`), ``folder``
(:class:`~vqtok.model.data.folder.FolderSource`), ``list`` (:class:`~vqtok.model.data.lists.ListSource`),
``tar`` (:class:`~vqtok.model.data.tar.TarSource`) and ``parquet``
(:class:`~vqtok.model.data.parquet.ParquetSource`; needs pyarrow). The last three items are
``(key, image bytes, metadata)`` indexed once (:class:`~vqtok.model.data.keyed.KeyedSource`). A new kind
subclasses :class:`BaseSource`, implements ``check_argument`` / ``from_spec`` (and ``suffixes`` for bare
paths) and joins the table in :func:`source_kinds`; nothing else switches on the kind.
"""

from __future__ import annotations

import abc
import copy
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Protocol, Self, runtime_checkable

import numpy as np

from vqtok.model.data.pixels import UnreadableImage

__all__ = [
    "SPEC_HELP",
    "SPLITS",
    "BaseSource",
    "DataSpec",
    "Source",
    "SourceItem",
    "UnreadableImage",
    "check_split",
    "describe",
    "open_source",
    "parse_spec",
    "require_directory",
    "source_kinds",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "heldout", "all")
SPEC_HELP = ("expected 'photos', 'cifar10:DIR', 'folder:DIR', 'list:FILE', 'tar:FILE_OR_DIR', "
             "'parquet:FILE_OR_DIR[#COLUMN]', the path of an image folder, or a *.txt, *.jsonl, *.tar or "
             "*.parquet file")

#: Read-only empty metadata shared by items that carry none.
NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class SourceItem(NamedTuple):
    """One image of a source.

    Attributes:
        key: stable name within the source: a relative path, a photo name, ``"heldout/3"``, a tar member.
        image: ``(H, W, 3)`` uint8 pixels, or the encoded file's bytes (decode with ``to_pixels``).
        metadata: per-item extras (a CIFAR-10 label, a Parquet row's caption); may be empty, read-only.
    """

    key: str
    image: np.ndarray | bytes
    metadata: Mapping[str, Any] = NO_METADATA


@runtime_checkable
class Source(Protocol):
    """A split of keyed images: what every consumer of a data spec is written against.

    Attributes:
        kind: the spec prefix of the class (``"photos"``, ``"cifar10"``, ``"folder"``).
        name: a spec string that opens the same data again (e.g. ``"folder:/data/imgs"``).
        split: ``"train"``, ``"heldout"`` or ``"all"``.
    """

    kind: str
    split: str

    @property
    def name(self) -> str: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> SourceItem:
        """Item ``index``; raises ``IndexError`` out of range and :class:`UnreadableImage` for a bad item."""
        ...

    def __iter__(self) -> Iterator[SourceItem]:
        """Every readable item in index order (unreadable ones are logged and skipped)."""
        ...

    def with_split(self, split: str) -> Source:
        """The same data restricted to another split (sharing whatever was already scanned)."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able record (``kind``, ``split``, ``source``, ``num_images``, ...), computed once."""
        ...


class BaseSource(abc.ABC):
    """Shared behaviour of the source kinds: split check, index check, skipping iteration, cached describe.

    Subclasses set ``kind``, implement ``name``, ``__len__``, ``__getitem__``, ``with_split``,
    ``_describe`` (the kind-specific keys, computed at most once per instance) and the two class
    methods the spec parser uses, ``check_argument`` and ``from_spec``.
    """

    kind: str = ""
    #: Whether the spec needs ``kind:ARGUMENT``; a kind without one is also spelled by its bare name.
    takes_argument: ClassVar[bool] = True
    #: File name endings that make a bare path (not a folder) this kind, e.g. ``(".tar",)``.
    suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, split: str) -> None:
        check_split(split)
        self.split = split
        self._description: dict[str, Any] | None = None

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A spec string that opens the same data again."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> SourceItem: ...

    @abc.abstractmethod
    def with_split(self, split: str) -> Self: ...

    @abc.abstractmethod
    def _describe(self) -> dict[str, Any]:
        """The record's keys after ``kind`` and ``split``."""

    @classmethod
    @abc.abstractmethod
    def check_argument(cls, spec: str, argument: str) -> None:
        """Raise ``ValueError`` (naming ``spec``) when ``argument`` (the part after ``kind:``) is unusable."""

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, argument: str, split: str) -> Self:
        """The source that ``kind:argument`` names, restricted to ``split`` (argument already checked)."""

    def check_index(self, index: int) -> int:
        """``index`` in ``[0, len)`` (negative indices count from the end), else ``IndexError``."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images of {self.name} ({self.split})")
        return index % n

    def check_not_empty(self) -> None:
        """Raise ``ValueError`` when the split holds no image (training needs at least one)."""
        if len(self) == 0:
            raise ValueError(f"data source {self.name!r} has no image in the {self.split!r} split")

    def __iter__(self) -> Iterator[SourceItem]:
        for i in range(len(self)):
            try:
                yield self[i]
            except UnreadableImage as exc:
                log.warning("%s: cannot read item %d (%s); skipped", self.name, i, exc)

    def describe(self) -> dict[str, Any]:
        """``{"kind", "split", "source", "num_images", ...}``: computed on the first call, a copy after."""
        if self._description is None:
            self._description = {"kind": self.kind, "split": self.split, **self._describe()}
        return copy.deepcopy(self._description)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r})"


#: A data spec string, or a source already opened from one.
DataSpec = str | Source


def source_kinds() -> dict[str, type[BaseSource]]:
    """Spec prefix → source class. A bare path (no known prefix) is a ``folder``."""
    # Deferred: the kind modules import this one.
    from vqtok.model.data.cifar import Cifar10Source
    from vqtok.model.data.folder import FolderSource
    from vqtok.model.data.lists import ListSource
    from vqtok.model.data.parquet import ParquetSource
    from vqtok.model.data.photos import PhotoSource
    from vqtok.model.data.tar import TarSource

    return {cls.kind: cls for cls in (PhotoSource, Cifar10Source, FolderSource, ListSource, TarSource, ParquetSource)}


def _kind_by_suffix(spec: str, kinds: dict[str, type[BaseSource]]) -> str | None:
    """The kind whose ``suffixes`` end the bare path ``spec`` (a ``#COLUMN`` tail ignored), unless it is a folder."""
    if Path(spec).is_dir():
        return None
    for path in dict.fromkeys((spec, spec.partition("#")[0])):  # "a#b.txt" is a name; "x.parquet#col" a column
        kind = next((k for k, cls in kinds.items() if cls.suffixes and path.lower().endswith(cls.suffixes)), None)
        if kind is not None:
            return kind
    return None


def require_directory(spec: str, argument: str, what: str) -> None:
    """The check of kinds whose argument is a directory: present and existing, else ``ValueError``."""
    if not argument:
        raise ValueError(f"dataset spec {spec!r} names no directory; {SPEC_HELP}")
    if not Path(argument).is_dir():
        raise ValueError(f"dataset spec {spec!r}: {what} {argument!r} does not exist (or is not a directory)")


def parse_spec(spec: str) -> tuple[str, str]:
    """``spec`` → ``(kind, argument)``, checked by the kind (e.g. the directory exists).

    ``"photos"`` → ``("photos", "")``; ``"cifar10:DIR"`` → ``("cifar10", "DIR")``; ``"folder:DIR"`` and a
    bare path → ``("folder", "DIR")``; ``"list:F"``, ``"tar:P"``, ``"parquet:P[#COL]"`` → that kind, as is a bare
    path (not a folder) ending in one of the kind's ``suffixes`` (``.txt``/``.jsonl``, ``.tar``, ``.parquet``).
    A ``word:`` prefix that is no known kind (and not part of an
    existing path) is refused rather than read as a folder.

    Raises:
        ValueError: empty spec, unknown ``kind:`` prefix, or an argument the kind refuses.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError(f"empty dataset spec; {SPEC_HELP}")
    kinds = source_kinds()
    if spec in kinds and not kinds[spec].takes_argument:
        kind, argument = spec, ""
    else:
        prefix, sep, rest = spec.partition(":")
        if sep and prefix in kinds:
            kind, argument = prefix, rest
        elif sep and prefix.isidentifier() and len(prefix) > 1 and not Path(spec).exists():
            raise ValueError(f"unknown dataset kind {prefix!r} in spec {spec!r}; {SPEC_HELP}")
        else:
            kind, argument = _kind_by_suffix(spec, kinds) or "folder", spec
    kinds[kind].check_argument(spec, argument)
    return kind, argument


def open_source(spec: DataSpec, split: str = "all") -> Source:
    """The source a spec names, restricted to ``split``; a :class:`Source` is re-split (never re-parsed).

    Nothing is read here beyond the spec's own checks: each source scans or loads lazily, once.

    Raises:
        ValueError: a bad split or spec (see :func:`parse_spec`).
    """
    check_split(split)
    if not isinstance(spec, str):
        return spec if spec.split == split else spec.with_split(split)
    kind, argument = parse_spec(spec)
    return source_kinds()[kind].from_spec(argument, split)


def describe(spec: DataSpec, split: str) -> dict[str, Any]:
    """A small JSON-able record of a dataset (stored in checkpoints by training).

    Keys: ``kind``, ``source``, ``split``, ``num_images``; photos add ``heldout`` (the held-out
    names) and ``images`` (name → ``[H, W]``); folders add ``skipped`` and the split rule. A folder is
    verified once: a later call on the unchanged folder reuses that scan (see ``index_folder``).
    """
    return open_source(spec, split).describe()
