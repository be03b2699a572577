"""Token layouts: raw code grids <-> the token sequences LLMs read and write, both ways.

A :class:`Layout` is data (a pydantic model, loadable from JSON) describing how an ``(h, w)`` grid of raw
codebook indices ``[0, K)`` becomes a sequence of vocabulary ids, read row by row::

    [bos] [boi] [size...] [img] r0c0 r0c1 r0c2 [eol] r1c0 r1c1 r1c2 [eol] [eof] [eoi] [eos]

Every bracketed part is optional (``None`` leaves it out). A cell's id is ``offset + code`` or, with a
vocabulary map, ``vocabulary[code]``. The size prefix is either ``size_base + h / size_unit`` and
``size_base + w / size_unit`` (two ids) or the ids listed in ``size_table["HxW"]`` (a text rendering such as
"32*32" exactly as the caller's text tokenizer produced it). ``eol`` follows every row, the last one included.

Decoding (:meth:`Layout.parse`) infers the grid from the sequence where it can (size prefix, end-of-row ids),
and either rejects any deviation (``repair="strict"``, :class:`LayoutError` naming the position and what was
expected) or repairs it (``repair="lenient"``), reporting every change as one :class:`Repair`.
:meth:`Layout.allowed_next`, :meth:`Layout.logits_mask` and :func:`hf_prefix_allowed_tokens_fn` constrain an
LLM to emit exactly the layout for a target grid.

The presets (:func:`flat`, :func:`chameleon_like`, :func:`emu3_like`, :func:`lumina_like`) follow other
projects' conventions, but their ids are **placeholders**: vqtok ships no third-party vocabularies, so pass the
ids your LLM's tokenizer uses (or load a layout file).

This module needs only NumPy and pydantic: no torch, no web stack, nothing from ``vqtok.service``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    RootModel,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "PRESETS",
    "Layout",
    "LayoutError",
    "ParsedImage",
    "Repair",
    "VocabularyMap",
    "chameleon_like",
    "emu3_like",
    "flat",
    "get_layout",
    "hf_prefix_allowed_tokens_fn",
    "lumina_like",
]

RepairPolicy = Literal["strict", "lenient"]
Pad = Literal["repeat_last_row"] | int
RepairKind = Literal["missing", "short_row", "cut_short", "long_row", "replaced", "unexpected", "extra", "size"]

_IMAGE = -1  # template slot: any image id
_SPECIALS = ("bos", "eos", "boi", "eoi", "eol", "eof", "img")
_NAMES = {
    "bos": "bos", "eos": "eos", "boi": "begin-of-image", "eoi": "end-of-image", "eol": "end-of-row",
    "eof": "end-of-frame", "img": "image-start marker", "size": "size prefix",
}
_GRID_KEY = re.compile(r"^\s*(\d+)\s*[xX*,]\s*(\d+)\s*$")


class LayoutError(ValueError):
    """A token sequence, grid or layout spec that does not fit the layout; the message names where and why."""


@dataclass(frozen=True)
class Repair:
    """One change lenient parsing made.

    ``position`` is the index in the token list where it applies (for a missing token: where it was assumed);
    ``dropped`` counts input tokens it discarded (or replaced), ``filled`` counts the layout's tokens it supplied
    (padded cells, assumed structure). Every input token is matched or dropped, every layout token matched or
    filled, so ``len(tokens) == consumed + sum(dropped)`` and ``len(to_tokens(grid)) == consumed + sum(filled)
    + omitted`` (see :class:`ParsedImage`).
    """

    position: int
    kind: RepairKind
    detail: str
    dropped: int = 0
    filled: int = 0


@dataclass
class ParsedImage:
    """A decoded grid: ``grid`` (h, w) int64 raw codes and the ``repairs`` made (empty for a clean sequence).

    ``consumed`` counts input tokens matched as they were; ``omitted`` counts optional bos/eos the sequence left
    out (not a repair).
    """

    grid: np.ndarray
    repairs: list[Repair] = field(default_factory=list)
    consumed: int = 0
    omitted: int = 0


class VocabularyMap(RootModel[list[int]]):
    """Code -> vocabulary id: entry ``k`` is the id of code ``k``; ids need not be contiguous or ordered.

    Given as a JSON list (``[id_of_code_0, id_of_code_1, ...]``), a JSON object (``{"0": id, "1": id, ...}``,
    keys exactly ``0 .. K-1``), or a 1-D integer ``.npy`` file (:meth:`load`). Duplicate ids are rejected.
    """

    @field_validator("root", mode="before")
    @classmethod
    def _coerce(cls, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
                raise ValueError(f"a vocabulary map array must be 1-D integers, got {value.dtype} {value.shape}")
            return value.tolist()
        if isinstance(value, dict):
            try:
                by_code = {int(k): v for k, v in value.items()}
            except ValueError as e:
                raise ValueError(f"vocabulary map keys must be codes 0 .. K-1: {e}") from None
            missing = [k for k in range(len(by_code)) if k not in by_code]
            if missing:
                raise ValueError(f"vocabulary map keys must be codes 0 .. {len(by_code) - 1}; code {missing[0]} "
                                 "is missing")
            return [by_code[k] for k in range(len(by_code))]
        return value

    @field_validator("root")
    @classmethod
    def _check(cls, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("vocabulary map is empty")
        first: dict[int, int] = {}
        for code, token in enumerate(ids):
            if token < 0:
                raise ValueError(f"vocabulary map: code {code} maps to negative id {token}")
            if token in first:
                raise ValueError(f"vocabulary map has duplicate id {token} (codes {first[token]} and {code})")
            first[token] = code
        return ids

    @classmethod
    def load(cls, path: str | Path) -> VocabularyMap:
        """Read a map from a ``.npy`` file or a JSON file (list or object); errors name the file."""
        path = Path(path)
        try:
            if path.suffix == ".npy":
                return cls.model_validate(np.load(path, allow_pickle=False))
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise LayoutError(f"vocabulary map {path}: {e}") from e


class Layout(BaseModel):
    """A token layout: how a raw code grid is laid out as vocabulary ids (see the module docstring).

    Fields (all ids are vocabulary ids; ``None`` leaves the part out):

    - ``codebook_size``: K, the number of codes. Required with ``offset``; with a ``vocabulary`` it defaults to
      (and must equal) the map's length.
    - ``offset`` or ``vocabulary``: a cell's id is ``offset + code``, or ``vocabulary[code]``. Neither: offset 0.
    - ``bos`` / ``eos``: sequence framing, optional on decode.
    - ``boi`` / ``eoi``: begin / end of image. ``eol``: after every row (the last too). ``eof``: end of frame,
      after the rows. ``img``: image-start marker after the size prefix.
    - ``size_base`` (+ ``size_unit``, ``size_max``): the size prefix ``size_base + h / size_unit``,
      ``size_base + w / size_unit``; ids ``size_base .. size_base + size_max`` are reserved for it.
    - ``size_table``: the size prefix as the ids listed per grid, keys ``"HxW"`` (e.g. ``"32x32"``).
    - ``grid``: the fixed ``(h, w)`` to decode with when neither the sequence nor the caller gives one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    codebook_size: int | None = Field(default=None, ge=1)
    offset: int | None = Field(default=None, ge=0)
    vocabulary: VocabularyMap | None = None
    bos: int | None = Field(default=None, ge=0)
    eos: int | None = Field(default=None, ge=0)
    boi: int | None = Field(default=None, ge=0)
    eoi: int | None = Field(default=None, ge=0)
    eol: int | None = Field(default=None, ge=0)
    eof: int | None = Field(default=None, ge=0)
    img: int | None = Field(default=None, ge=0)
    size_base: int | None = Field(default=None, ge=0)
    size_unit: int = Field(default=1, ge=1)
    size_max: int = Field(default=256, ge=1)
    size_table: dict[str, list[int]] | None = None
    grid: tuple[int, int] | None = None
    _cache: dict[str, Any] = PrivateAttr(default_factory=dict)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Layout:
        """A copy with fresh caches; ``update`` is validated (unlike pydantic's default), so a copy stays sound."""
        if update:
            return type(self).model_validate({**self.model_dump(), **update})
        copied = super().model_copy(deep=deep)
        copied._cache = {}
        return copied

    # ---------------------------------------------------------------- loading and validation

    @field_validator("vocabulary", mode="before")
    @classmethod
    def _vocabulary_file(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str | Path):  # a path, relative to the layout file's folder
            base = Path((info.context or {}).get("base_dir", "."))
            return VocabularyMap.load(base / value)
        return value

    @field_validator("grid")
    @classmethod
    def _positive_grid(cls, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        if grid is not None and (grid[0] < 1 or grid[1] < 1):
            raise ValueError(f"grid {list(grid)} must have positive sides")
        return grid

    @field_validator("size_table")
    @classmethod
    def _check_table(cls, table: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        if table is None:
            return None
        if not table:
            raise ValueError("size_table is empty")
        seen: dict[tuple[int, ...], str] = {}
        grids: dict[tuple[int, int], str] = {}
        for key, ids in table.items():
            match = _GRID_KEY.match(key)
            if not match or int(match[1]) < 1 or int(match[2]) < 1:
                raise ValueError(f"size_table key {key!r} is not a grid like '32x32'")
            grid = (int(match[1]), int(match[2]))
            if grid in grids:
                raise ValueError(f"size_table keys {grids[grid]!r} and {key!r} name the same grid")
            grids[grid] = key
            if not ids or any(i < 0 for i in ids):
                raise ValueError(f"size_table[{key!r}] must be a non-empty list of non-negative ids")
            if tuple(ids) in seen:
                raise ValueError(f"size_table[{key!r}] and size_table[{seen[tuple(ids)]!r}] have the same ids {ids}")
            seen[tuple(ids)] = key
        return table

    @model_validator(mode="after")
    def _consistent(self) -> Layout:
        if self.offset is not None and self.vocabulary is not None:
            raise ValueError("offset and vocabulary: give one of them, not both")
        if self.vocabulary is not None:
            n = len(self.vocabulary.root)
            if self.codebook_size is not None and self.codebook_size != n:
                raise ValueError(f"vocabulary has {n} entries but codebook_size is {self.codebook_size}; "
                                 "the map needs one id per code")
        elif self.codebook_size is None:
            raise ValueError("codebook_size is required with an offset (or give a vocabulary map)")
        if self.size_base is not None and self.size_table is not None:
            raise ValueError("size_base and size_table: give one size prefix, not both")
        specials = {name: getattr(self, name) for name in _SPECIALS if getattr(self, name) is not None}
        owner: dict[int, str] = {}
        for name, token in specials.items():
            if token in owner:
                raise ValueError(f"{name} ({token}) collides with {owner[token]} ({token})")
            owner[token] = name
        for name, token in specials.items():
            if self.is_image(token):
                raise ValueError(f"{name} ({token}) collides with image ids ({self._describe_image_ids()})")
        if self.size_base is not None:
            lo, hi = self.size_base, self.size_base + self.size_max
            if self._image_range_overlaps(lo, hi):
                raise ValueError(f"size_base: size ids [{lo}, {hi}] collide with image ids "
                                 f"({self._describe_image_ids()})")
            for name, token in specials.items():
                if lo <= token <= hi:
                    raise ValueError(f"size_base: size ids [{lo}, {hi}] collide with {name} ({token})")
        if self.size_table is not None:
            for key, ids in self.size_table.items():
                for token in ids:
                    if self.is_image(token):
                        raise ValueError(f"size_table[{key!r}]: id {token} collides with image ids "
                                         f"({self._describe_image_ids()})")
                    if token in owner:
                        raise ValueError(f"size_table[{key!r}]: id {token} collides with {owner[token]}")
        return self

    @classmethod
    def from_json(cls, text: str | bytes, base_dir: str | Path = ".") -> Layout:
        """A layout from JSON text; a ``vocabulary`` given as a string is a file path relative to ``base_dir``."""
        try:
            return cls.model_validate_json(text, context={"base_dir": str(base_dir)})
        except ValueError as e:
            raise LayoutError(f"invalid layout: {e}") from e

    @classmethod
    def from_file(cls, path: str | Path) -> Layout:
        """A layout from a JSON file; every error names the file and the field."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise LayoutError(f"layout file {path}: {e}") from e
        try:
            return cls.model_validate_json(text, context={"base_dir": str(path.parent)})
        except ValueError as e:
            raise LayoutError(f"layout file {path}: {e}") from e

    # ---------------------------------------------------------------- ids

    @property
    def num_codes(self) -> int:
        """K: the number of codes (the map's length, or ``codebook_size``)."""
        return len(self.vocabulary.root) if self.vocabulary is not None else int(self.codebook_size or 0)

    @property
    def image_ids(self) -> np.ndarray:
        """The id of each code, in code order: ``image_ids[code]`` (int64, length K)."""
        cached = self._cache.get("_image_ids")
        if cached is None:
            if self.vocabulary is not None:
                cached = np.asarray(self.vocabulary.root, dtype=np.int64)
            else:
                cached = np.arange(self.num_codes, dtype=np.int64) + (self.offset or 0)
            self._cache["_image_ids"] = cached
        return cached

    def _inverse(self) -> dict[int, int]:
        cached = self._cache.get("_inverse_map")
        if cached is None:
            cached = {int(t): c for c, t in enumerate(self.image_ids.tolist())}
            self._cache["_inverse_map"] = cached
        return cached

    def is_image(self, token: int) -> bool:
        """Whether ``token`` is the id of some code."""
        if self.vocabulary is None:
            offset = self.offset or 0
            return offset <= token < offset + self.num_codes
        return token in self._inverse()

    def code_of(self, token: int) -> int:
        """The code of an image id (``LayoutError`` if it is none)."""
        if self.vocabulary is None:
            if not self.is_image(token):
                raise LayoutError(f"id {token} is not an image id ({self._describe_image_ids()})")
            return token - (self.offset or 0)
        try:
            return self._inverse()[token]
        except KeyError:
            raise LayoutError(f"id {token} is not an image id ({self._describe_image_ids()})") from None

    def _describe_image_ids(self) -> str:
        if self.vocabulary is None:
            offset = self.offset or 0
            return f"offset {offset} + codebook_size {self.num_codes} = [{offset}, {offset + self.num_codes})"
        return f"the {self.num_codes} ids of the vocabulary map"

    def _image_range_overlaps(self, lo: int, hi: int) -> bool:
        if self.vocabulary is None:
            offset = self.offset or 0
            return lo < offset + self.num_codes and offset <= hi
        ids = self.image_ids
        return bool(((ids >= lo) & (ids <= hi)).any())

    # ---------------------------------------------------------------- encoding

    def size_ids(self, grid: tuple[int, int]) -> list[int]:
        """The size prefix for ``grid`` (empty if the layout has none)."""
        h, w = grid
        if self.size_base is not None:
            for name, side in (("height", h), ("width", w)):
                if side % self.size_unit or not 1 <= side // self.size_unit <= self.size_max:
                    raise LayoutError(f"grid {h}x{w}: {name} {side} is not a multiple n * size_unit "
                                      f"({self.size_unit}) with 1 <= n <= size_max ({self.size_max})")
            return [self.size_base + h // self.size_unit, self.size_base + w // self.size_unit]
        if self.size_table is not None:
            ids = self._table_by_grid().get((h, w))
            if ids is None:
                raise LayoutError(f"grid {h}x{w} has no entry in size_table (keys like '{h}x{w}')")
            return list(ids)
        return []

    def _table_by_grid(self) -> dict[tuple[int, int], list[int]]:
        cached = self._cache.get("_table")
        if cached is None:
            cached = {}
            for key, ids in (self.size_table or {}).items():
                match = _GRID_KEY.match(key)
                assert match is not None  # checked at load
                cached[(int(match[1]), int(match[2]))] = ids
            self._cache["_table"] = cached
        return cached

    def _slots(self, grid: tuple[int, int]) -> list[tuple[str, Any]]:
        """The layout for ``grid`` as slots: (kind, id) for structure, ("size", ids), ("cell", (r, c))."""
        h, w = grid
        slots: list[tuple[str, Any]] = []
        if self.bos is not None:
            slots.append(("bos", self.bos))
        if self.boi is not None:
            slots.append(("boi", self.boi))
        if self.size_base is not None or self.size_table is not None:
            slots.append(("size", self.size_ids(grid)))
        if self.img is not None:
            slots.append(("img", self.img))
        for r in range(h):
            slots.extend(("cell", (r, c)) for c in range(w))
            if self.eol is not None:
                slots.append(("eol", self.eol))
        for name in ("eof", "eoi", "eos"):
            if getattr(self, name) is not None:
                slots.append((name, getattr(self, name)))
        return slots

    def template(self, grid: tuple[int, int]) -> list[int]:
        """``to_tokens`` for ``grid`` with every cell as -1: the exact sequence a generator must follow."""
        out: list[int] = []
        for kind, value in self._slots(grid):
            if kind == "cell":
                out.append(_IMAGE)
            elif kind == "size":
                out.extend(value)
            else:
                out.append(value)
        return out

    def to_tokens(self, grid: np.ndarray | Sequence[Sequence[int]]) -> list[int]:
        """An ``(h, w)`` grid of raw codes ``[0, K)`` -> the layout's token sequence."""
        codes = np.asarray(grid)
        if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
            raise LayoutError(f"grid must be a non-empty (h, w) array, got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise LayoutError(f"grid must hold integer codes, got {codes.dtype}")
        codes = codes.astype(np.int64)
        bad = (codes < 0) | (codes >= self.num_codes)
        if bad.any():
            r, c = (int(p) for p in np.argwhere(bad)[0])
            raise LayoutError(f"grid[{r}][{c}] = {int(codes[r, c])} is outside [0, {self.num_codes})")
        ids = self.image_ids[codes]
        template = self.template((int(codes.shape[0]), int(codes.shape[1])))
        flat = iter(ids.reshape(-1).tolist())
        return [next(flat) if t == _IMAGE else t for t in template]

    # ---------------------------------------------------------------- decoding

    def _read_size(self, tokens: Sequence[int], i: int) -> tuple[tuple[int, int], int] | None:
        """A size prefix at ``tokens[i:]``: (grid, its length), or None."""
        if self.size_base is not None:
            if i + 2 > len(tokens):
                return None
            lo, hi = self.size_base + 1, self.size_base + self.size_max
            a, b = tokens[i], tokens[i + 1]
            if lo <= a <= hi and lo <= b <= hi:
                return ((a - self.size_base) * self.size_unit, (b - self.size_base) * self.size_unit), 2
            return None
        if self.size_table is not None:
            entries = self._cache.get("_longest_first")
            if entries is None:
                entries = sorted(self._table_by_grid().items(), key=lambda e: -len(e[1]))
                self._cache["_longest_first"] = entries
            for grid, ids in entries:  # longest first: "3*32" before "3*3"
                if list(tokens[i:i + len(ids)]) == ids:
                    return grid, len(ids)
        return None

    def infer_grid(self, tokens: Sequence[int]) -> tuple[int, int]:
        """The grid shape a sequence carries (size prefix, else end-of-row ids), else the layout's fixed grid."""
        n = len(tokens)
        i = 1 if self.bos is not None and n and tokens[0] == self.bos else 0
        if self.boi is not None and i < n and tokens[i] == self.boi:
            i += 1
        if self.size_base is not None or self.size_table is not None:
            found = self._read_size(tokens, i)
            if found is None:
                got = tokens[i] if i < n else "end of sequence"
                raise LayoutError(f"position {i}: expected a size prefix, got {got}; "
                                  "pass grid=(h, w) to decode without one")
            return found[0]
        if self.eol is not None:
            if self.img is not None and i < n and tokens[i] == self.img:
                i += 1
            ends = {t for t in (self.eof, self.eoi, self.eos) if t is not None}
            stop = next((k for k in range(i, n) if tokens[k] in ends), n)
            body = list(tokens[i:stop])
            if self.eol not in body:
                raise LayoutError(f"positions {i}..{stop}: no end-of-row id ({self.eol}) to infer the grid from; "
                                  "pass grid=(h, w)")
            width = body.index(self.eol)
            if width == 0:
                raise LayoutError(f"position {i}: the first row is empty; pass grid=(h, w)")
            height = body.count(self.eol)
            last = len(body) - 1 - body[::-1].index(self.eol)
            if last < len(body) - 1:
                height += 1
            return height, width
        if self.grid is not None:
            return self.grid
        raise LayoutError(f"layout {self.name!r} carries no grid shape (no size prefix, no end-of-row id) "
                          "and has no fixed grid; pass grid=(h, w)")

    def parse(self, tokens: Sequence[int] | np.ndarray, grid: tuple[int, int] | None = None,
              repair: RepairPolicy = "strict", pad: Pad = "repeat_last_row") -> ParsedImage:
        """A token sequence -> :class:`ParsedImage` (see the module docstring for the policies).

        ``grid`` is the target shape; without it the shape comes from the sequence (:meth:`infer_grid`).
        ``pad`` fills cells lenient parsing supplies: a code, or ``"repeat_last_row"`` (the cell above; in row 0
        the cell to the left, else code 0).
        """
        return self._parse(_as_list(tokens), grid, repair, pad, origin=0)

    def _parse(self, tokens: list[int], grid: tuple[int, int] | None, repair: RepairPolicy, pad: Pad,
               origin: int) -> ParsedImage:
        if repair not in ("strict", "lenient"):
            raise LayoutError(f"repair must be 'strict' or 'lenient', got {repair!r}")
        if pad != "repeat_last_row" and not (isinstance(pad, int) and 0 <= pad < self.num_codes):
            raise LayoutError(f"pad must be 'repeat_last_row' or a code in [0, {self.num_codes}), got {pad!r}")
        if grid is None:
            try:
                grid = self.infer_grid(tokens)
            except LayoutError as e:
                raise LayoutError(_shift(str(e), origin)) from None
        h, w = int(grid[0]), int(grid[1])
        if h < 1 or w < 1:
            raise LayoutError(f"grid [{h}, {w}] must have positive sides")
        strict = repair == "strict"
        slots = self._slots((h, w))
        later_ids = _later_structure(slots)
        grid_end = max(k for k, (kind, _) in enumerate(slots) if kind == "cell") + 1
        if self.eol is not None:
            grid_end += 1
        post_grid = {value for kind, value in slots[grid_end:] if kind != "size"}
        out = np.zeros((h, w), dtype=np.int64)
        result = ParsedImage(out)
        repairs = result.repairs

        def fill(r: int, c: int) -> None:
            if pad != "repeat_last_row":
                out[r, c] = pad
            elif r > 0:
                out[r, c] = out[r - 1, c]
            elif c > 0:
                out[r, c] = out[r, c - 1]
            else:
                out[r, c] = 0

        def fail(i: int, expected: str) -> LayoutError:
            got = f"{tokens[i]}" if i < len(tokens) else "the end of the sequence"
            return LayoutError(f"position {origin + i}: expected {expected}, got {got}")

        n = len(tokens)
        i = j = 0
        while j < len(slots):
            kind, value = slots[j]
            x = tokens[i] if i < n else None
            if kind in ("bos", "eos"):  # optional framing
                if x == value:
                    i += 1
                    result.consumed += 1
                else:
                    result.omitted += 1
                j += 1
            elif kind == "size":
                if tokens[i:i + len(value)] == value:
                    i += len(value)
                    result.consumed += len(value)
                    j += 1
                    continue
                found = self._read_size(tokens, i)
                if strict:
                    raise fail(i, f"the size prefix {value} for grid {h}x{w}"
                               + (f" (the sequence says {found[0][0]}x{found[0][1]})" if found else ""))
                if found:
                    repairs.append(Repair(origin + i, "size", f"size prefix for {found[0][0]}x{found[0][1]} "
                                          f"replaced by the one for {h}x{w}", dropped=found[1], filled=len(value)))
                    i += found[1]
                else:
                    repairs.append(Repair(origin + i, "missing", f"size prefix for {h}x{w} assumed",
                                          filled=len(value)))
                j += 1
            elif kind == "cell":
                r, c = value
                if x is not None and self.is_image(x):
                    out[r, c] = self.code_of(x)
                    i += 1
                    j += 1
                    result.consumed += 1
                    continue
                if strict:
                    raise fail(i, f"an image id for row {r}, column {c} ({self._describe_image_ids()})")
                if x is None or x in post_grid:
                    remaining = h * w - (r * w + c)
                    for k in range(r * w + c, h * w):
                        fill(k // w, k % w)
                    repairs.append(Repair(origin + i, "cut_short", f"image ended at row {r}, column {c}: "
                                          f"{remaining} cells padded", filled=grid_end - j))
                    j = grid_end
                elif x == self.eol:
                    for k in range(c, w):
                        fill(r, k)
                    repairs.append(Repair(origin + i, "short_row", f"row {r} ended after {c} cells: "
                                          f"{w - c} cells padded", filled=w - c))
                    j += w - c
                else:
                    fill(r, c)
                    repairs.append(Repair(origin + i, "replaced", f"id {x} at row {r}, column {c} is not an image "
                                          f"id; replaced by code {int(out[r, c])}", dropped=1, filled=1))
                    i += 1
                    j += 1
            else:  # structure: boi, img, eol, eof, eoi
                if x == value:
                    i += 1
                    j += 1
                    result.consumed += 1
                    continue
                if strict:
                    raise fail(i, f"{_NAMES[kind]} id {value}" + (f" after row {slots[j - 1][1][0]}"
                                                                  if kind == "eol" else ""))
                if x is not None and kind == "eol" and self.is_image(x):
                    run = i
                    while run < n and self.is_image(tokens[run]):
                        run += 1
                    extra = run - i
                    if run < n and tokens[run] == self.eol and extra < w:
                        repairs.append(Repair(origin + i, "long_row", f"row {slots[j - 1][1][0]} had {extra} "
                                              "cells too many; dropped", dropped=extra))
                        i = run
                        continue
                if x is None or self.is_image(x) or x in later_ids[j]:
                    repairs.append(Repair(origin + i, "missing", f"{_NAMES[kind]} id {value} assumed", filled=1))
                    j += 1
                else:
                    repairs.append(Repair(origin + i, "unexpected", f"id {x} where {_NAMES[kind]} id {value} was "
                                          "expected; dropped", dropped=1))
                    i += 1
        if i < n:
            if strict:
                raise fail(i, "the end of the sequence")
            repairs.append(Repair(origin + i, "extra", f"{n - i} tokens after the end dropped", dropped=n - i))
        return result

    def extract_images(self, tokens: Sequence[int] | np.ndarray, grid: tuple[int, int] | None = None,
                       repair: RepairPolicy = "strict",
                       pad: Pad = "repeat_last_row") -> list[tuple[int, int, ParsedImage]]:
        """Every ``boi .. eoi`` span in a mixed sequence (text ids around): ``(start, end, parsed)``, end exclusive.

        Repair positions are indices into ``tokens``. An image with no ``eoi`` before the next ``boi`` (or the
        end) is an error in ``strict``; in ``lenient`` its span runs to there.
        """
        if self.boi is None or self.eoi is None:
            raise LayoutError(f"layout {self.name!r} has no boi/eoi ids: extract_images needs both")
        seq = _as_list(tokens)
        n = len(seq)
        found: list[tuple[int, int, ParsedImage]] = []
        i = 0
        while True:
            start = next((k for k in range(i, n) if seq[k] == self.boi), None)
            if start is None:
                return found
            next_boi = next((k for k in range(start + 1, n) if seq[k] == self.boi), n)
            end_at = next((k for k in range(start + 1, next_boi) if seq[k] == self.eoi), None)
            if end_at is None:
                if repair == "strict":
                    raise LayoutError(f"position {start}: image has no end-of-image id {self.eoi} before "
                                      + ("the end of the sequence" if next_boi == n else f"position {next_boi}"))
                end = next_boi
            else:
                end = end_at + 1
            found.append((start, end, self._parse(seq[start:end], grid, repair, pad, origin=start)))
            i = end

    # ---------------------------------------------------------------- constrained generation

    def _target(self, grid: tuple[int, int] | None) -> tuple[int, int]:
        if grid is not None:
            return int(grid[0]), int(grid[1])
        if self.grid is not None:
            return self.grid
        raise LayoutError(f"layout {self.name!r} has no fixed grid: pass the target grid=(h, w)")

    def allowed_at(self, template: Sequence[int], position: int, after_end: Sequence[int] = ()) -> np.ndarray:
        """The ids allowed at ``position`` of ``template`` (from :meth:`template`); past its end, ``after_end``."""
        if position >= len(template):
            return np.asarray(sorted(set(after_end)), dtype=np.int64)
        token = template[position]
        if token == _IMAGE:
            return np.sort(self.image_ids)
        return np.asarray([token], dtype=np.int64)

    def allowed_next(self, prefix: Sequence[int], grid: tuple[int, int] | None = None) -> np.ndarray:
        """The ids that may follow ``prefix`` (the layout's sequence so far, from its first token) for ``grid``.

        Without ``grid``: the layout's fixed grid, or the grid the size prefix in ``prefix`` names.

        Follows :meth:`to_tokens` exactly (bos and eos included where the layout has them); a prefix that already
        left the layout is a :class:`LayoutError` naming the position. After the last token: an empty array.
        """
        seq = _as_list(prefix)
        if grid is None and self.grid is None:  # a size prefix already in ``prefix`` names the grid
            start = int(self.bos is not None and seq[:1] == [self.bos])
            start += int(self.boi is not None and seq[start:start + 1] == [self.boi])
            found = self._read_size(seq, start)
            if found is not None and self.size_ids(found[0]) == seq[start:start + found[1]]:
                grid = found[0]
        template = self.template(self._target(grid))
        for k, token in enumerate(seq):
            if k >= len(template):
                raise LayoutError(f"position {k}: the image is complete; expected nothing, got {token}")
            expected = template[k]
            if (expected == _IMAGE and not self.is_image(token)) or (expected != _IMAGE and token != expected):
                want = "an image id" if expected == _IMAGE else f"id {expected}"
                raise LayoutError(f"position {k}: expected {want}, got {token}")
        return self.allowed_at(template, len(seq))

    def logits_mask(self, prefix: Sequence[int], vocab_size: int, grid: tuple[int, int] | None = None) -> np.ndarray:
        """``allowed_next`` as a boolean mask of length ``vocab_size`` (True = may be sampled)."""
        allowed = self.allowed_next(prefix, grid)
        if allowed.size and allowed.max() >= vocab_size:
            raise LayoutError(f"allowed id {int(allowed.max())} is outside the vocabulary of size {vocab_size}")
        mask = np.zeros(vocab_size, dtype=bool)
        mask[allowed] = True
        return mask


def hf_prefix_allowed_tokens_fn(layout: Layout, grid: tuple[int, int] | None, prompt_length: int, *,
                                primed: int = 0,
                                after_end: Sequence[int] | None = None) -> Callable[[int, Any], list[int]]:
    """A ``prefix_allowed_tokens_fn(batch_id, input_ids) -> list[int]`` for Hugging Face ``generate``.

    ``input_ids`` (a tensor or a list) is the whole row: ``prompt_length`` prompt tokens, then what was generated.
    ``primed`` says how many of the layout's first tokens the prompt already ends with (Emu3 prompts end with
    ``boi size img``: pass ``layout.template(grid).index(-1)``, the tokens before the first cell). Once the image is
    complete the callable allows ``after_end`` (default: ``[layout.eos]`` if the layout has one, else ``[eoi]``,
    else the image ids), so generation can always go on. No transformers import: a plain function.
    """
    template = layout.template(layout._target(grid))
    if after_end is None:
        last = layout.eos if layout.eos is not None else layout.eoi
        after = [last] if last is not None else layout.image_ids.tolist()
    else:
        after = list(after_end)
    image = np.sort(layout.image_ids).tolist()
    after = sorted(set(after))

    def allowed(batch_id: int, input_ids: Any) -> list[int]:
        length = len(input_ids)  # a 1-D tensor, array or list: only its length matters
        position = primed + length - prompt_length
        if position >= len(template):
            return after
        token = template[max(position, 0)]
        return image if token == _IMAGE else [token]

    return allowed


def _as_list(tokens: Sequence[int] | np.ndarray) -> list[int]:
    values = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
    return [int(t) for t in values]


def _later_structure(slots: list[tuple[str, Any]]) -> list[set[int]]:
    """For each slot, the structural ids that appear after it (to tell a missing token from a stray one)."""
    later: list[set[int]] = [set() for _ in slots]
    seen: set[int] = set()
    for k in range(len(slots) - 1, -1, -1):
        later[k] = set(seen)
        kind, value = slots[k]
        if kind not in ("cell", "size", "bos"):
            seen.add(value)
    return later


def _shift(message: str, origin: int) -> str:
    if not origin:
        return message
    return re.sub(r"position(s?) (\d+)", lambda m: f"position{m[1]} {int(m[2]) + origin}", message)


# -------------------------------------------------------------------- presets


def flat(codebook_size: int = 8192, offset: int = 0, bos: int | None = None, eos: int | None = None,
         grid: tuple[int, int] | None = None) -> Layout:
    """vqtok's own default: the grid read row by row, each code plus ``offset``, bos/eos optional::

        [bos] (r0c0 r0c1 r0c2 r1c0 r1c1 r1c2) + offset [eos]

    2x3 grid ``[[0, 1, 2], [3, 4, 5]]``, ``offset=100, bos=1, eos=2``: ``[1, 100, 101, 102, 103, 104, 105, 2]``.
    Decoding strips a leading bos and a trailing eos if present. The sequence carries no shape: decode needs
    ``grid`` (or a fixed ``grid`` in the layout).
    """
    return Layout(name="flat", codebook_size=codebook_size, offset=offset, bos=bos, eos=eos, grid=grid)


def chameleon_like(codebook_size: int = 8192, vocabulary: VocabularyMap | Sequence[int] | None = None,
                   boi: int = 8197, eoi: int = 8196, grid: tuple[int, int] = (32, 32)) -> Layout:
    """Chameleon's convention: begin/end of image around a fixed grid, codes mapped to BPE ids by a table::

        [boi] map[r0c0] map[r0c1] map[r0c2] map[r1c0] map[r1c1] map[r1c2] [eoi]

    Chameleon puts a fixed 32x32 grid (1024 image ids) between a begin-of-image token (``<racm3:break>``) and an
    end-of-image token (``<eoss>``); each code is a BPE token named in the tokenizer's vocabulary, so code -> id
    goes through a map read from the tokenizer file, not an offset. Placeholders, not checked against
    Chameleon's code in this change: ``boi=8197``, ``eoi=8196`` (the numbers commonly seen for Chameleon) and
    the map ``code -> 4 + code``; pass the ids and the map built from your tokenizer.

    2x3 grid ``[[0, 1, 2], [3, 4, 5]]``, ``vocabulary=[50, 7, 33, 12, 90, 61, 5, 8]``, ``boi=3, eoi=4``,
    ``grid=(2, 3)``: ``[3, 50, 7, 33, 12, 90, 61, 4]``.
    """
    ids = list(vocabulary.root if isinstance(vocabulary, VocabularyMap) else vocabulary) if vocabulary is not None \
        else [4 + code for code in range(codebook_size)]
    return Layout(name="chameleon-like", vocabulary=VocabularyMap(ids), boi=boi, eoi=eoi, grid=grid)


def emu3_like(codebook_size: int = 32768, offset: int = 151854, boi: int = 151852, eoi: int = 151853,
              img: int = 151851, eol: int = 151846, eof: int = 151847,
              size_table: dict[str, list[int]] | None = None, max_side: int = 64,
              digit_ids: Sequence[int] = tuple(range(15, 25)), times_id: int = 9) -> Layout:
    """Emu3's convention: size as text, an image-start marker, end-of-row after every row, end of frame::

        [boi] "H*W" [img] r0c0 r0c1 r0c2 [eol] r1c0 r1c1 r1c2 [eol] [eof] [eoi]

    Checked against Emu3's own code (github baaivision/Emu3): ``emu3/mllm/processing_emu3.py`` builds the image
    prompt as ``boi_token + prefix_template.format(H=h, W=w) + img_token + imgstr + eol_token + eof_token +
    eoi_token`` with ``prefix_template = "{H}*{W}"`` and ``imgstr`` the rows joined by ``eol_token`` (so an eol
    follows every row, the last one included); ``emu3/mllm/utils_emu3.py`` (``Emu3PrefixConstrainedLogitsHelper``)
    constrains generation the same way: counting from the img token, eol every ``width + 1`` tokens, then eof,
    eoi, eos. The "H*W" text is tokenized by the text tokenizer, so its ids come from ``size_table`` (keys
    ``"HxW"``), exactly as your tokenizer renders it.

    Placeholders: all ids. The default table renders ``H*W`` one character per id (``digit_ids[d]`` for digit d,
    ``times_id`` for ``*``; GPT-2/Qwen-style single-character ids) for every grid up to ``max_side``; build
    yours by running your tokenizer on ``f"{h}*{w}"``.

    2x3 grid ``[[0, 1, 2], [3, 4, 5]]``, ``offset=100, boi=1, eoi=2, img=3, eol=4, eof=5``, default table:
    ``[1, 17, 9, 18, 3, 100, 101, 102, 4, 103, 104, 105, 4, 5, 2]``.
    """
    if size_table is None:
        def render(text: str) -> list[int]:
            return [times_id if ch == "*" else int(digit_ids[int(ch)]) for ch in text]

        size_table = {f"{h}x{w}": render(f"{h}*{w}") for h in range(1, max_side + 1) for w in range(1, max_side + 1)}
    return Layout(name="emu3-like", codebook_size=codebook_size, offset=offset, boi=boi, eoi=eoi, img=img, eol=eol,
                  eof=eof, size_table=size_table)


def lumina_like(codebook_size: int = 8192, offset: int = 4, boi: int = 8197, eoi: int = 8196, eol: int = 8803,
                size_base: int = 8804, size_unit: int = 1, size_max: int = 256) -> Layout:
    """Lumina-mGPT's convention: height and width as ``size_base + side / size_unit`` ids, end-of-row per row::

        [boi] [base+h/u] [base+w/u] r0c0 r0c1 r0c2 [eol] r1c0 r1c1 r1c2 [eol] [eoi]

    Modelled on the Lumina-mGPT convention as vqtok's issue 9 describes it (a Chameleon-based model whose image
    sequence carries its height and width as ``base + side / unit`` tokens and an end-of-row token after every
    row); not checked against Lumina-mGPT's code in this change. Placeholders: all ids; ``size_unit`` is how many
    grid rows/columns one size step stands for.

    2x3 grid ``[[0, 1, 2], [3, 4, 5]]``, ``offset=100, boi=1, eoi=2, eol=3, size_base=10``:
    ``[1, 12, 13, 100, 101, 102, 3, 103, 104, 105, 3, 2]``.
    """
    return Layout(name="lumina-like", codebook_size=codebook_size, offset=offset, boi=boi, eoi=eoi, eol=eol,
                  size_base=size_base, size_unit=size_unit, size_max=size_max)


PRESETS: dict[str, Callable[..., Layout]] = {
    "flat": flat,
    "chameleon-like": chameleon_like,
    "emu3-like": emu3_like,
    "lumina-like": lumina_like,
}


def get_layout(name: str, **overrides: Any) -> Layout:
    """A preset by name, with keyword overrides (its ids are placeholders: override them)."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise LayoutError(f"unknown layout {name!r}; presets: {', '.join(PRESETS)}") from None
    return factory(**overrides)
