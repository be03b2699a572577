"""The service's token layouts: the presets (for the checkpoint's K) plus the layout files, by name.

``build_registry(settings, K)`` runs at startup (``vqtok serve`` before binding, and the app when it loads
the model); a bad file, an unknown default or a layout whose codebook size is not the checkpoint's K raises
``LayoutError`` with one line naming the file or layout. ``one_line`` makes any such message one line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from vqtok.model.layouts import PRESETS, Layout, LayoutError, Pad, Repair, get_layout
from vqtok.service.errors import InvalidRequest
from vqtok.service.schemas import DecodeRequest
from vqtok.service.settings import Settings

logger = logging.getLogger("vqtok.service.layouts")

DEFAULT_LAYOUT = "flat"


def one_line(message: str) -> str:
    """A (pydantic, multi-line) message as one line, without pydantic's documentation links."""
    lines = [line.strip() for line in str(message).splitlines()]
    return "; ".join(line for line in lines if line and not line.startswith("For further information"))


@dataclass(frozen=True)
class LayoutRegistry:
    """The loaded layouts by name, and the default one's name."""

    layouts: dict[str, Layout]
    default: str

    def get(self, name: str) -> Layout:
        try:
            return self.layouts[name]
        except KeyError:
            raise LayoutError(f"layout {name!r} is not loaded; loaded: {', '.join(sorted(self.layouts))}") from None


def build_registry(settings: Settings, num_embeddings: int, checkpoint_layout: str | None = None) -> LayoutRegistry:
    """Presets instantiated for K = ``num_embeddings`` (a preset whose placeholder ids cannot fit K is left out,
    with a warning, unless it is the default), then every ``layout_files`` entry (a file's layout replaces a
    preset of the same name). ``LayoutError`` (one line) for anything that cannot serve.

    The default layout: the ``layout`` setting when it was given (flag or environment), else the checkpoint's
    (``checkpoint_layout``, the record's ``serving.layout``: an imported model names its LLM family's), else
    the setting's default, ``flat``."""
    layouts: dict[str, Layout] = {}
    skipped: dict[str, str] = {}
    for name in PRESETS:
        try:
            layouts[name] = get_layout(name, codebook_size=num_embeddings)
        except (LayoutError, ValueError) as exc:
            skipped[name] = one_line(str(exc))
    from_files: dict[str, str] = {}
    for path in settings.layout_files or []:
        try:
            layout = Layout.from_file(path)
        except (LayoutError, ValueError) as exc:
            raise LayoutError(one_line(str(exc))) from None
        if layout.num_codes != num_embeddings:
            raise LayoutError(f"layout file {path}: layout {layout.name!r} has codebook_size {layout.num_codes} "
                              f"but the checkpoint's codebook has K = {num_embeddings} codes")
        if layout.name in from_files:
            raise LayoutError(f"layout file {path}: layout name {layout.name!r} is also in {from_files[layout.name]}")
        from_files[layout.name] = str(path)
        layouts[layout.name] = layout
        skipped.pop(layout.name, None)
    default = settings.layout
    if checkpoint_layout is not None and "layout" not in settings.model_fields_set:
        default = checkpoint_layout
    if default not in layouts:
        why = f" (the preset does not fit K = {num_embeddings}: {skipped[default]})" if default in skipped else ""
        raise LayoutError(f"layout: the default layout {default!r} is not loaded{why}; "
                          f"loaded: {', '.join(sorted(layouts))}")
    for name, why in skipped.items():
        logger.warning("layout preset %r left out: its placeholder ids do not fit K = %d (%s); load a layout "
                       "file with your ids", name, num_embeddings, why)
    return LayoutRegistry(layouts, default)


# ---------------------------------------------------------------------------------------------- requests


def _plain_flat(layout: Layout) -> bool:
    """The flat preset as vqtok has always served it: offset 0, no bos/eos, no map, no fixed grid."""
    return (layout.vocabulary is None and not layout.offset and layout.bos is None and layout.eos is None
            and layout.grid is None)


def _lookup(registry: LayoutRegistry, name: str) -> Layout:
    try:
        return registry.get(name)
    except LayoutError as exc:
        raise InvalidRequest(str(exc)) from None


def _conflict(name: str) -> InvalidRequest:
    return InvalidRequest(f"layout {name!r} conflicts with offset/bos/eos: those belong to the flat layout; "
                          f"leave them out (the layout has its own ids) or use layout=flat")


def encode_layout(layout: str | None, offset: int, bos: int | None, eos: int | None,
                  registry: LayoutRegistry) -> tuple[str | None, Layout | None]:
    """(the layout name to report, the layout to lay tokens out with) for an /encode request.

    ``(None, None)``: today's flat path, no layout reported; ``("flat", None)``: the flat path with the
    request's offset/bos/eos, reported as flat; else the named (or the server's default) layout."""
    framing = offset != 0 or bos is not None or eos is not None
    name = layout
    if name is None:
        if framing:
            return None, None
        name = registry.default
        if name == "flat" and _plain_flat(_lookup(registry, name)):
            return None, None
    chosen = _lookup(registry, name)
    if name != "flat" and framing:
        raise _conflict(name)
    if name == "flat" and (framing or _plain_flat(chosen)):
        return "flat", None
    return name, chosen


def decode_layout(body: DecodeRequest, registry: LayoutRegistry, num_embeddings: int) -> Layout | None:
    """The layout a /decode request's ``tokens`` are read with; None: today's flat offset/bos/eos path
    (``grid`` required, strict, no extraction)."""
    if body.tokens is None:
        return None
    framing = body.flat_framing
    name = body.layout if body.layout is not None else ("flat" if framing else registry.default)
    chosen = _lookup(registry, name)
    if name != "flat" and framing:
        raise _conflict(name)
    simple = body.repair == "strict" and not body.extract
    if name == "flat" and simple and (framing or _plain_flat(chosen)):
        return None
    if name == "flat" and framing:
        try:
            return get_layout("flat", codebook_size=num_embeddings, offset=body.offset, bos=body.bos, eos=body.eos)
        except (LayoutError, ValueError) as exc:
            raise InvalidRequest(f"layout 'flat' with offset {body.offset}, bos {body.bos}, eos {body.eos}: "
                                 f"{one_line(str(exc))}") from None
    return chosen


@dataclass
class LayoutGrids:
    """What a /decode read with a layout: each image's grid, repairs, and (extract) its sequence and span."""

    grids: list[np.ndarray]
    names: list[str]
    repairs: list[list[Repair]]
    sequences: list[int | None]
    spans: list[tuple[int, int] | None]


def parse_with_layout(body: DecodeRequest, layout: Layout, names: list[str], sources: list[list[int]],
                      max_tokens: int) -> LayoutGrids:
    """Every ``tokens`` sequence read with ``layout`` (runs in the threadpool); ``InvalidRequest`` naming the
    sequence, the layout and the position for what does not fit it."""
    out = LayoutGrids([], [], [], [], [])
    pad: Pad = body.pad
    for k, (seq, where) in enumerate(zip(sources, names, strict=True)):
        try:
            if body.extract:
                found = layout.extract_images(seq, body.grid, body.repair, pad)
                if not found:
                    raise LayoutError(f"no image (begin-of-image id {layout.boi} .. end-of-image id {layout.eoi}) "
                                      "in the sequence")
                for j, (start, end, parsed) in enumerate(found):
                    out.grids.append(parsed.grid)
                    out.names.append(f"{where} image {j}")
                    out.repairs.append(parsed.repairs)
                    out.sequences.append(k)
                    out.spans.append((start, end))
                continue
            grid = body.grid if body.grid is not None else layout.infer_grid(seq)
            h, w = int(grid[0]), int(grid[1])
            if h >= 1 and w >= 1 and h * w > max_tokens:
                raise InvalidRequest(f"{where}: grid {h}x{w} = {h * w} tokens is over the limit of {max_tokens} "
                                     "tokens per grid")
            parsed = layout.parse(seq, (h, w), body.repair, pad)
        except LayoutError as exc:
            raise InvalidRequest(f"{where}: layout {layout.name!r}: {one_line(str(exc))}") from None
        out.grids.append(parsed.grid)
        out.names.append(where)
        out.repairs.append(parsed.repairs)
        out.sequences.append(None)
        out.spans.append(None)
    return out


MAX_REPAIRS_HEADER = 2048  # characters of x-vqtok-repairs-detail


def repairs_json(repairs: list[Repair]) -> list[dict[str, Any]]:
    return [{"position": r.position, "kind": r.kind, "detail": r.detail} for r in repairs]


def repair_headers(repairs: list[Repair]) -> dict[str, str]:
    """``x-vqtok-repairs`` (count) and ``x-vqtok-repairs-detail`` (compact JSON list of the first repairs that fit
    in ``MAX_REPAIRS_HEADER`` characters; ``x-vqtok-repairs-truncated`` counts the ones left out)."""
    entries = repairs_json(repairs)
    headers = {"x-vqtok-repairs": str(len(entries))}
    kept = len(entries)
    text = json.dumps(entries, separators=(",", ":"))
    while len(text) > MAX_REPAIRS_HEADER and kept:
        kept -= 1
        text = json.dumps(entries[:kept], separators=(",", ":"))
    headers["x-vqtok-repairs-detail"] = text
    if kept < len(entries):
        headers["x-vqtok-repairs-truncated"] = str(len(entries) - kept)
    return headers
