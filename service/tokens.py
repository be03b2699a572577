"""Token grids <-> LLM-facing sequences, and the checks every grid sent to /decode must pass.

Conventions (also in the OpenAPI description):

- ``indices`` are always raw codebook indices in ``[0, K)``, as an ``h x w`` row-major grid.
- ``tokens`` are the grid read row by row, each index plus ``offset``, with ``bos`` before and ``eos``
  after when given: ``[bos] + [offset + i for i in grid.flat] + [eos]``.
- ``/decode`` undoes exactly that: it strips a leading ``bos`` and a trailing ``eos`` if present,
  subtracts ``offset``, and checks every value lands in ``[0, K)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vqtok.service.errors import InvalidRequest


def to_tokens(grid: np.ndarray, offset: int, bos: int | None, eos: int | None) -> list[int]:
    """(h, w) raw indices -> flat row-major sequence with ``offset`` added and bos/eos around it."""
    tokens = (grid.reshape(-1).astype(np.int64) + offset).tolist()
    return ([bos] if bos is not None else []) + tokens + ([eos] if eos is not None else [])


def _check_token_limit(h: int, w: int, max_tokens: int, where: str) -> None:
    if h * w > max_tokens:
        raise InvalidRequest(
            f"{where}: grid {h}x{w} = {h * w} tokens is over the limit of {max_tokens} tokens per grid"
        )


def _check_range(values: np.ndarray, offset: int, num_embeddings: int, name: str, first: int = 0) -> np.ndarray:
    """Subtract ``offset`` and check ``[0, K)``; the message names the first bad position as given.

    ``values`` is (h, w) for a grid (position ``name[i][j]``) or (n,) for a sequence (``name[first + n]``,
    ``first`` being how many entries were stripped before it). Returns the raw indices, same shape, int64.
    """
    raw = values - offset
    bad = (raw < 0) | (raw >= num_embeddings)
    if bad.any():
        position = tuple(int(p) for p in np.argwhere(bad)[0])
        value = int(values[position])
        shown = (position[0] + first, *position[1:])
        where = name + "".join(f"[{p}]" for p in shown)
        allowed = f"[{offset}, {offset + num_embeddings})" if offset else f"[0, {num_embeddings})"
        hint = f" (offset {offset} + codebook size {num_embeddings})" if offset else ""
        raise InvalidRequest(f"{where} = {value} is outside {allowed}{hint}")
    return raw


def grid_from_rows(rows: Sequence[Sequence[int]], offset: int, num_embeddings: int, max_tokens: int,
                   where: str) -> np.ndarray:
    """One ``h x w`` grid given as rows -> (h, w) int64 raw indices, or ``InvalidRequest`` saying why."""
    if not rows or not rows[0]:
        raise InvalidRequest(f"{where}: empty grid")
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise InvalidRequest(
                f"{where}: ragged grid: row {i} has {len(row)} entries, row 0 has {width}; "
                "every row needs the same length"
            )
    _check_token_limit(len(rows), width, max_tokens, where)
    return _check_range(np.asarray(rows, dtype=np.int64), offset, num_embeddings, where)


def grid_from_tokens(tokens: Sequence[int], grid: tuple[int, int], offset: int, bos: int | None, eos: int | None,
                     num_embeddings: int, max_tokens: int, where: str) -> np.ndarray:
    """A flat LLM sequence -> (h, w) int64 raw indices: strip bos/eos, check the count and the range."""
    h, w = grid
    if h < 1 or w < 1:
        raise InvalidRequest(f"grid [{h}, {w}] must have positive sides")
    _check_token_limit(h, w, max_tokens, where)
    values = np.asarray(tokens, dtype=np.int64)
    start, stop = 0, len(values)
    if bos is not None and stop > 0 and values[0] == bos:
        start = 1
    if eos is not None and stop > start and values[stop - 1] == eos:
        stop -= 1
    body = values[start:stop]
    if body.size != h * w:
        stripped = [name for name, cut in (("bos", start == 1), ("eos", stop < len(values))) if cut]
        after = f" after stripping {' and '.join(stripped)}" if stripped else ""
        raise InvalidRequest(
            f"{where} has {body.size} entries{after}, but grid [{h}, {w}] needs {h} * {w} = {h * w}"
        )
    return _check_range(body, offset, num_embeddings, where, first=start).reshape(h, w)
