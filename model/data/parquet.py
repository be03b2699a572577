"""Parquet files as a source: one item per row, the image's encoded bytes in one column.

The image column is named by a ``#COLUMN`` suffix of the spec, else it is the first binary column (or the
first struct column with a binary ``bytes`` field, as Hugging Face ``datasets`` stores an ``Image``). A
string ``key`` (or ``__key__``) column names the items; otherwise a row's key is ``FILE_STEM/ROW``. The other
columns (except binary ones) are the item's metadata, carried through. Row groups are read on demand and the
last one is kept, so reading in order decodes each once. Spec: ``parquet:FILE_OR_DIR[#COLUMN]`` (a folder:
every ``*.parquet`` in it, sorted), or a bare path ending in ``.parquet`` (``#COLUMN`` allowed).

Needs ``pyarrow`` (``pip install 'vqtok[tokenize]'``), imported only when such a source is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self

from vqtok.model.data.keyed import KeyedSource
from vqtok.model.data.pixels import UnreadableImage
from vqtok.model.data.source import SourceItem

__all__ = ["KEY_COLUMNS", "ParquetSource", "import_pyarrow"]

KEY_COLUMNS = ("key", "__key__")


def import_pyarrow() -> Any:
    """``pyarrow`` (and ``pyarrow.parquet``), or an ``ImportError`` that says how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError("Parquet input and output need pyarrow: pip install 'vqtok[tokenize]' "
                          "(or pip install 'pyarrow>=15')") from exc
    return pyarrow


def _split_column(argument: str) -> tuple[str, str | None]:
    path, sep, column = argument.partition("#")
    return path, (column or None) if sep else None


def _parquet_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path]


class ParquetSource(KeyedSource):
    """Rows of Parquet files; items ``(key, image bytes, the row's other columns)``.

    Raises (on first use):
        ValueError: an unreadable file, a missing image column, or files whose image column differs.
        ImportError: pyarrow is not installed.
    """

    kind = "parquet"
    suffixes: ClassVar[tuple[str, ...]] = (".parquet",)

    def __init__(self, paths: list[Path] | list[str], split: str = "all", *, image_column: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(split, **kwargs)
        self.paths = [Path(p) for p in paths]
        self.image_column = image_column
        self.origin: str | None = None  # the folder a parquet:DIR spec named
        self._cache: tuple[tuple[Path, int], list[Any]] | None = None

    @property
    def name(self) -> str:
        column = f"#{self.image_column}" if self.image_column else ""
        if self.origin is not None:  # a folder spec: the same folder again
            return f"parquet:{self.origin}{column}"
        return f"parquet:{','.join(map(str, self.paths))}{column}"

    def _find_image_column(self, schema: Any, path: Path) -> tuple[str, bool]:
        """(column, is a struct with a ``bytes`` field) of one file."""
        pa = import_pyarrow()

        def kind_of(field: Any) -> bool | None:
            if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
                return False
            if pa.types.is_struct(field.type):
                index = field.type.get_field_index("bytes")
                if index >= 0 and (pa.types.is_binary(field.type[index].type)
                                   or pa.types.is_large_binary(field.type[index].type)):
                    return True
            return None

        if self.image_column is not None:
            if self.image_column not in schema.names:
                raise ValueError(f"{path}: no column {self.image_column!r} (columns: {', '.join(schema.names)})")
            struct = kind_of(schema.field(self.image_column))
            if struct is None:
                raise ValueError(f"{path}: column {self.image_column!r} holds no image bytes "
                                 f"({schema.field(self.image_column).type})")
            return self.image_column, struct
        for field in schema:
            struct = kind_of(field)
            if struct is not None:
                return field.name, struct
        raise ValueError(f"{path}: no binary (image bytes) column; name one with '#COLUMN'")

    def _index(self) -> list[tuple[Any, ...]]:
        pa = import_pyarrow()
        import pyarrow.parquet as pq

        entries: list[tuple[Any, ...]] = []
        for path in self.paths:
            try:
                handle = pq.ParquetFile(path)
            except (OSError, pa.ArrowException) as exc:
                raise ValueError(f"cannot read Parquet file {path}: {exc}") from None
            schema = handle.schema_arrow
            column, struct = self._find_image_column(schema, path)
            others = [f.name for f in schema if f.name != column and not pa.types.is_binary(f.type)
                      and not pa.types.is_large_binary(f.type)]
            key_column = next((c for c in KEY_COLUMNS if c in others and pa.types.is_string(schema.field(c).type)),
                              None)
            row = 0
            for group in range(handle.num_row_groups):
                table = handle.read_row_group(group, columns=others) if others else None
                rows = table.to_pylist() if table is not None else [{}] * handle.metadata.row_group(group).num_rows
                for position, record in enumerate(rows):
                    key = record.pop(key_column) if key_column else f"{path.stem}/{row}"
                    entries.append((str(key), path, group, position, column, struct, record))
                    row += 1
        return entries

    def _read(self, entry: tuple[Any, ...]) -> SourceItem:
        key, path, group, position, column, struct, metadata = entry
        if self._cache is None or self._cache[0] != (path, group):
            import pyarrow.parquet as pq

            try:
                values = pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).to_pylist()
            except Exception as exc:  # I/O or Arrow errors: this item is unreadable
                raise UnreadableImage(f"{key}: {exc}") from exc
            self._cache = ((path, group), values)
        value = self._cache[1][position]
        if struct:
            value = value.get("bytes") if value else None
        if not value:
            raise UnreadableImage(f"{key}: no image bytes in column {column!r}")
        return SourceItem(key, bytes(value), metadata)

    def with_split(self, split: str) -> Self:
        other = super().with_split(split)
        other._cache = None
        return other

    def _describe(self) -> dict[str, Any]:
        return {"source": [str(p.resolve()) for p in self.paths], "image_column": self.image_column,
                **self._split_description()}

    @classmethod
    def check_argument(cls, spec: str, argument: str) -> None:
        path = Path(_split_column(argument)[0])
        if not (path.is_file() or (path.is_dir() and any(path.glob("*.parquet")))):
            raise ValueError(f"dataset spec {spec!r}: {str(path)!r} is neither a Parquet file nor a folder of "
                             "*.parquet files")
        import_pyarrow_or_value_error()

    @classmethod
    def from_spec(cls, argument: str, split: str) -> Self:
        path, column = _split_column(argument)
        source = cls(_parquet_files(Path(path)), split, image_column=column)
        source.origin = path if Path(path).is_dir() else None
        return source


def import_pyarrow_or_value_error() -> None:
    """The spec check's form of :func:`import_pyarrow`: a ``ValueError`` (one line for the CLIs)."""
    try:
        import_pyarrow()
    except ImportError as exc:
        raise ValueError(str(exc)) from None
