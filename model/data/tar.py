"""WebDataset-style tar shards as a source.

Members are grouped by key (the member path up to the basename's first dot): the first image member of a
group (by extension, :data:`IMAGE_EXTENSIONS`) is the item's encoded bytes, a ``.json`` member its metadata;
groups without an image are ignored. The shards are indexed once (member offsets), and an item is read by
offset. Spec: ``tar:FILE``, ``tar:DIR`` (every ``*.tar`` in DIR, sorted), or a bare path ending in ``.tar``.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, ClassVar, Self

from vqtok.model.data.keyed import KeyedSource
from vqtok.model.data.pixels import UnreadableImage
from vqtok.model.data.source import SourceItem

__all__ = ["IMAGE_EXTENSIONS", "TarSource"]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"})


class TarSource(KeyedSource):
    """WebDataset-style tar shards; items ``(member key, image bytes, .json metadata)``.

    Raises (on first use):
        ValueError: a shard that cannot be read as a tar file.
    """

    kind = "tar"
    suffixes: ClassVar[tuple[str, ...]] = (".tar",)

    def __init__(self, paths: list[Path] | list[str], split: str = "all", **kwargs: Any) -> None:
        super().__init__(split, **kwargs)
        self.paths = [Path(p) for p in paths]
        self.origin: str | None = None  # the folder a tar:DIR spec named

    @property
    def name(self) -> str:
        if self.origin is not None:  # a folder spec: the same folder again (with any shards added since)
            return f"tar:{self.origin}"
        return f"tar:{self.paths[0]}" if len(self.paths) == 1 else f"tar:{','.join(map(str, self.paths))}"

    def _index(self) -> list[tuple[str, Path, int, int, dict[str, Any]]]:
        items = []
        for path in self.paths:
            groups: dict[str, dict[str, Any]] = {}
            try:
                with tarfile.open(path) as archive:
                    for member in archive:
                        if not member.isfile():
                            continue
                        directory, _, base = member.name.rpartition("/")
                        stem, dot, ext = base.partition(".")
                        if not dot:
                            continue
                        key = f"{directory}/{stem}" if directory else stem
                        group = groups.setdefault(key, {})
                        ext = ext.lower()
                        if ext in IMAGE_EXTENSIONS and "image" not in group:
                            group["image"] = (member.offset_data, member.size)
                        elif ext == "json":
                            handle = archive.extractfile(member)
                            try:
                                metadata = json.loads(handle.read()) if handle else {}
                            except ValueError:
                                metadata = {}
                            group["json"] = metadata if isinstance(metadata, dict) else {"json": metadata}
            except (OSError, tarfile.TarError) as exc:
                raise ValueError(f"cannot read tar shard {path}: {exc}") from None
            for key, group in groups.items():
                if "image" in group:
                    offset, size = group["image"]
                    items.append((key, path, offset, size, group.get("json", {})))
        return items

    def _read(self, entry: tuple[Any, ...]) -> SourceItem:
        key, path, offset, size, metadata = entry
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as exc:
            raise UnreadableImage(f"{key}: {exc}") from exc
        if len(data) != size:
            raise UnreadableImage(f"{key}: truncated tar member ({len(data)} of {size} bytes)")
        return SourceItem(key, data, metadata)

    def _describe(self) -> dict[str, Any]:
        return {"source": [str(p.resolve()) for p in self.paths], **self._split_description()}

    @classmethod
    def check_argument(cls, spec: str, argument: str) -> None:
        path = Path(argument)
        if not (path.is_file() or (path.is_dir() and any(path.glob("*.tar")))):
            raise ValueError(f"dataset spec {spec!r}: {argument!r} is neither a tar file nor a folder of *.tar files")

    @classmethod
    def from_spec(cls, argument: str, split: str) -> Self:
        path = Path(argument)
        source = cls(sorted(path.glob("*.tar")) if path.is_dir() else [path], split)
        source.origin = argument if path.is_dir() else None
        return source
