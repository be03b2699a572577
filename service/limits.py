"""Per-request limits checked from the numbers a request states, before the work they bound.

Counts of images and grids, tokens per request, an ``/encode`` target size, and a ``/decode``'s grids,
decoded pixels, ``crop_to`` and output-format sides: all from declared sizes, before any image is
decoded or any array is built. Each refusal is an ``InvalidRequest`` (422) naming the value and the limit.
(Limits read from an image's header live in ``imaging``; the body's size and time in ``middleware``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vqtok.service.errors import InvalidRequest
from vqtok.service.imaging import MAX_SIDE, Size, check_target_size, grid_of
from vqtok.service.schemas import DecodeRequest
from vqtok.service.settings import Settings

if TYPE_CHECKING:
    from vqtok.service.parsing import DecodeInput


def check_count(count: int, limit: int, what: str) -> None:
    """At least one and at most ``limit`` images (or grids, token sequences) in one request."""
    if count == 0:
        raise InvalidRequest(f"no {what} in the request: send at least one")
    if count > limit:
        raise InvalidRequest(f"{count} {what} in one request, the limit is {limit}")


def check_request_tokens(counts: Sequence[int], limit: int, what: str, hint: str) -> None:
    """``InvalidRequest`` when the grids of one request hold more than ``max_tokens_per_request`` tokens."""
    total = sum(counts)
    if total > limit:
        raise InvalidRequest(
            f"{len(counts)} {what} hold {total} tokens in all, over the limit of {limit} tokens per request "
            f"(max_tokens_per_request); {hint}"
        )


def check_encode_size(size: Size, size_name: str, images: int, settings: Settings, downsample: int) -> None:
    """An ``/encode`` target size against the per-grid, per-image and per-request limits, from the numbers
    alone: before any image is read past its header."""
    check_target_size(size, downsample, settings.max_tokens_per_grid, settings.max_pixels, size_name)
    grid_h, grid_w = grid_of(size, downsample)
    check_request_tokens([grid_h * grid_w] * images, settings.max_tokens_per_request,
                         f"images at {size_name} {size}", "send fewer images per request or a smaller size")


def check_decode_limits(grids: DecodeInput, body: DecodeRequest, settings: Settings, downsample: int) -> None:
    """Refuse, from the declared shapes alone, a /decode whose grids, images or files would be over a limit:
    tokens per grid and per request, pixels per decoded image, crop_to inside the image, and the longest
    side the output format can store."""
    f, max_tokens = downsample, settings.max_tokens_per_grid
    for name, shape in zip(grids.names, grids.shapes, strict=True):
        if shape is not None and shape[0] * shape[1] > max_tokens:
            raise InvalidRequest(
                f"{name}: grid {shape[0]}x{shape[1]} = {shape[0] * shape[1]} tokens is over the limit of "
                f"{max_tokens} tokens per grid"
            )
    check_request_tokens([h * w for h, w in filter(None, grids.shapes)], settings.max_tokens_per_request,
                         "grids", "send fewer or smaller grids per request")
    limit = MAX_SIDE[body.format]
    for i, (name, shape, crop) in enumerate(zip(grids.names, grids.shapes, grids.crops, strict=True)):
        if shape is None:
            continue
        h, w = shape
        decoded = Size(width=w * f, height=h * f)
        if decoded.pixels > settings.max_pixels:
            raise InvalidRequest(
                f"{name}: grid {h}x{w} decodes to a {decoded} image = {decoded.pixels} pixels, over the limit of "
                f"{settings.max_pixels} pixels per image"
            )
        if crop is not None and (crop.width > decoded.width or crop.height > decoded.height):
            where = "crop_to" if not isinstance(body.crop_to, list) else f"crop_to[{i}]"
            raise InvalidRequest(
                f"{where}: {crop} is larger than the decoded image {decoded} of grid {i}"
            )
        out = crop or decoded
        if out.width > limit or out.height > limit:
            cropped = f", cropped to {crop}" if crop is not None else ""
            raise InvalidRequest(
                f"{name}: {body.format} images are at most {limit} pixels on a side; grid {h}x{w} decodes to "
                f"{decoded}{cropped}; ask for format=png, or crop_to or a grid within the limit"
            )
