"""A base for sources whose items are listed once from files (file lists, tar shards, Parquet files).

Subclasses implement :meth:`KeyedSource._index` (every entry, its key first; read once and shared by
every split derived with :meth:`~KeyedSource.with_split`) and :meth:`KeyedSource._read` (one entry's
:class:`SourceItem`). The train / held-out split is a hash of each key, as a folder's is of each path
(:func:`vqtok.model.data.folder.heldout_files`), so ``vqtok train --data`` can use these kinds too.
"""

from __future__ import annotations

import abc
import copy
from typing import Any, Self

from vqtok.model.data.folder import DEFAULT_HELDOUT_FRACTION, SPLIT_RULE, heldout_files
from vqtok.model.data.source import BaseSource, SourceItem, check_split

__all__ = ["KeyedSource"]


class KeyedSource(BaseSource):
    """Entries ``(key, ...)`` indexed once; split by the hash of the key (``all`` keeps the listed order)."""

    def __init__(self, split: str = "all", heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> None:
        super().__init__(split)
        self.heldout_fraction = heldout_fraction
        self._shared: dict[str, Any] = {}
        self._picked: list[int] | None = None

    @abc.abstractmethod
    def _index(self) -> list[tuple[Any, ...]]:
        """Every entry of the source (all splits), key first; called once."""

    @abc.abstractmethod
    def _read(self, entry: tuple[Any, ...]) -> SourceItem:
        """The item of one entry; raises :class:`UnreadableImage` when it cannot be read."""

    @property
    def entries(self) -> list[tuple[Any, ...]]:
        """Every entry (all splits), indexed on first use by this source or any split of it."""
        if "entries" not in self._shared:
            self._shared["entries"] = self._index()
        return self._shared["entries"]

    @property
    def picked(self) -> list[int]:
        """Positions in :attr:`entries` of this split's items."""
        if self._picked is None:
            entries = self.entries
            if self.split == "all":
                self._picked = list(range(len(entries)))
            else:
                heldout = heldout_files(tuple(dict.fromkeys(str(e[0]) for e in entries)), self.heldout_fraction)
                want = self.split == "heldout"
                self._picked = [i for i, e in enumerate(entries) if (str(e[0]) in heldout) == want]
        return self._picked

    def __len__(self) -> int:
        return len(self.picked)

    def key_of(self, index: int) -> str:
        """Item ``index``'s key without reading the image (names a failure)."""
        return str(self.entries[self.picked[self.check_index(index)]][0])

    def __getitem__(self, index: int) -> SourceItem:
        return self._read(self.entries[self.picked[self.check_index(index)]])

    def with_split(self, split: str) -> Self:
        check_split(split)
        other = copy.copy(self)  # shares self._shared: the index is read once for every split
        other.split, other._picked, other._description = split, None, None
        return other

    def _split_description(self) -> dict[str, Any]:
        return {"num_images": len(self), "heldout_fraction": self.heldout_fraction,
                "split_rule": SPLIT_RULE.replace("relative path", "key")}
