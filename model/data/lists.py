"""A file list as a source: ``*.txt`` (one image path per line) or ``*.jsonl`` (one object per line).

A JSONL line is ``{"path": ..., **metadata}`` (or ``"image"`` instead of ``"path"``); the other fields are the
item's metadata, carried through. Relative paths are relative to the list file's folder. Items are
``(path as written, encoded bytes, metadata)``; a missing file is an :class:`UnreadableImage` for that item.
Spec: ``list:FILE``, or a bare path ending in ``.txt`` or ``.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

from vqtok.model.data.keyed import KeyedSource
from vqtok.model.data.pixels import UnreadableImage
from vqtok.model.data.source import SourceItem

__all__ = ["ListSource", "read_file_bytes"]


def read_file_bytes(path: Path, key: str) -> bytes:
    """The bytes of ``path``, or :class:`UnreadableImage` naming ``key``."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UnreadableImage(f"{key}: {exc.strerror or exc}") from exc


class ListSource(KeyedSource):
    """Images named by a ``*.txt`` (a path per line) or ``*.jsonl`` (``{"path" | "image": ..., **metadata}``) file.

    Raises (on first use):
        ValueError: a JSONL line that is not an object with a ``path`` (or ``image``) string.
    """

    kind = "list"
    suffixes: ClassVar[tuple[str, ...]] = (".txt", ".jsonl")

    def __init__(self, path: str | Path, split: str = "all", **kwargs: Any) -> None:
        super().__init__(split, **kwargs)
        self.path = Path(path)

    @property
    def name(self) -> str:
        return f"list:{self.path}"

    def _index(self) -> list[tuple[str, Path, dict[str, Any]]]:
        base = self.path.parent
        entries = []
        jsonl = self.path.suffix.lower() == ".jsonl"
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if not jsonl:
                entries.append((line.strip(), base / line.strip(), {}))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path}:{number}: not a JSON object ({exc.msg})") from None
            field = "path" if isinstance(record, dict) and "path" in record else "image"
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{self.path}:{number}: expected an object with a 'path' (or 'image') string")
            location = record.pop(field)
            entries.append((location, base / location, record))
        return entries

    def _read(self, entry: tuple[Any, ...]) -> SourceItem:
        key, path, metadata = entry
        return SourceItem(key, read_file_bytes(path, key), metadata)

    def _describe(self) -> dict[str, Any]:
        return {"source": str(self.path.resolve()), **self._split_description()}

    @classmethod
    def check_argument(cls, spec: str, argument: str) -> None:
        if not Path(argument).is_file():
            raise ValueError(f"dataset spec {spec!r}: file list {argument!r} does not exist")

    @classmethod
    def from_spec(cls, argument: str, split: str) -> Self:
        return cls(Path(argument), split)
