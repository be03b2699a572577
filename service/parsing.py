"""Request bodies -> typed inputs, before any model work.

``/encode``: the images of a multipart, JSON (base64) or raw-image body, the options (body fields over
query parameters) and the target size (``EncodeInput``). ``/decode``: the grids as sent, with their
declared shapes and crop sizes (``DecodeInput``), then, once the limits passed, the grids as arrays.
Everything refused here is a ``ServiceError``: 400 for what cannot be read, 415 for a content type
``/encode`` does not take, 422 for what is readable but invalid.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from vqtok.model.record import ServingDefaults
from vqtok.service.dependencies import content_type
from vqtok.service.errors import BadRequest, InvalidRequest, UnsupportedMediaType
from vqtok.service.imaging import IMAGE_CONTENT_TYPES, Size, parse_size
from vqtok.service.limits import check_count
from vqtok.service.schemas import DecodeRequest, EncodeJSONRequest, EncodeOptions, ImageSize, SizeSource
from vqtok.service.settings import Settings
from vqtok.service.tokens import grid_from_rows, grid_from_tokens

# ---------------------------------------------------------------------------------------------- /encode


@dataclass(frozen=True)
class EncodeInput:
    """An ``/encode`` request as read: its image files, options and target size (nothing decoded yet)."""

    images: list[tuple[str, bytes]]  # (name for messages: "body", "images[0]", ..., file bytes)
    options: EncodeOptions
    size: Size | None  # the target size: the request's, else the server's default_size, else the checkpoint's
    size_name: str  # where the size came from, for messages: "size", "default_size" or "the checkpoint's native size"
    size_from: SizeSource | None = None  # where the size came from, for the response; None: each image's own size


def _decode_base64(text: str, where: str) -> bytes:
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{where}: not valid base64 ({exc})") from exc


def _merge_options(query: EncodeOptions, fields: dict[str, Any], prefix: str) -> EncodeOptions:
    """The body's option fields over the query's, validated as one ``EncodeOptions``."""
    try:
        return EncodeOptions.model_validate({**query.model_dump(exclude_unset=True), **fields})
    except ValidationError as exc:
        raise InvalidRequest.from_validation(exc, (prefix,)) from exc


async def _check_multipart_complete(request: Request) -> None:
    """``BadRequest`` unless the multipart body ends with its closing boundary: the parser silently
    drops an unterminated last part, which would lose an image without a word."""
    params = dict(
        part.strip().split("=", 1) for part in request.headers.get("content-type", "").split(";")[1:] if "=" in part
    )
    boundary = params.get("boundary", "").strip('"')
    if not boundary:
        raise BadRequest("unreadable multipart body: the Content-Type has no boundary parameter")
    if not (await request.body()).rstrip(b"\r\n").endswith(f"--{boundary}--".encode("latin-1")):
        raise BadRequest(f"unreadable multipart body: it does not end with its closing boundary '--{boundary}--' "
                         "(truncated?)")


async def _read_multipart(request: Request, query: EncodeOptions, settings: Settings
                          ) -> tuple[list[tuple[str, bytes]], EncodeOptions]:
    await _check_multipart_complete(request)
    try:
        form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=100,
                                  max_part_size=1 << 20)
    except Exception as exc:  # python-multipart / starlette parse failures of every kind
        raise BadRequest(f"unreadable multipart body: {exc}") from exc
    images: list[tuple[str, bytes]] = []
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name == "image":
            if not isinstance(value, UploadFile):
                raise BadRequest(f"multipart part 'image' #{len(images)} must be a file, not a text field")
            images.append((f"images[{len(images)}]", await value.read()))
        elif isinstance(value, UploadFile):
            raise InvalidRequest(f"unexpected file part {name!r}: image files go in parts named 'image'")
        else:
            fields[name] = value
    await form.close()
    return images, _merge_options(query, fields, "form")


async def _read_json(request: Request, query: EncodeOptions) -> tuple[list[tuple[str, bytes]], EncodeOptions]:
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON ({exc})") from exc
    try:
        parsed = EncodeJSONRequest.model_validate(payload)
    except ValidationError as exc:
        raise InvalidRequest.from_validation(exc, ("body",)) from exc
    fields = parsed.model_dump(exclude_unset=True, exclude={"images"})
    images = [(f"images[{i}]", _decode_base64(text, f"images[{i}]")) for i, text in enumerate(parsed.images)]
    return images, _merge_options(query, fields, "body")


async def read_encode_body(request: Request, query: EncodeOptions, settings: Settings,
                           native: ServingDefaults | None = None) -> EncodeInput:
    """The request's images as (name for messages, file bytes), its options (body over query) and its
    target size; at least one and at most ``max_images_per_request`` images.

    The size: the request's ``size``, else the ``default_size`` setting, else the checkpoint's native size
    (``native``, the record's ``serving`` section), with the checkpoint's fit unless the request names a fit."""
    media = content_type(request)
    if media == "multipart/form-data":
        images, options = await _read_multipart(request, query, settings)
    elif media == "application/json":
        images, options = await _read_json(request, query)
    elif media in IMAGE_CONTENT_TYPES or media == "application/octet-stream":
        images, options = [("body", await request.body())], query
    else:
        raise UnsupportedMediaType(
            f"Content-Type {media or 'none'!r} is not supported by /encode: send multipart/form-data with 'image' "
            f"parts, application/json with base64 'images', or one image as image/png, image/jpeg, image/webp, ..."
        )
    check_count(len(images), settings.max_images_per_request, "images")
    if options.size is not None:
        return EncodeInput(images, options, parse_size(options.size), "size", "request")
    if settings.default_size is not None:
        return EncodeInput(images, options, parse_size(settings.default_size), "default_size", "default_size")
    if native is not None and native.size is not None:
        if native.fit is not None and "fit" not in options.model_fields_set:
            options = options.model_copy(update={"fit": native.fit})
        return EncodeInput(images, options, Size(native.size, native.size), "the checkpoint's native size",
                           "checkpoint")
    return EncodeInput(images, options, None, "default_size")


# ---------------------------------------------------------------------------------------------- /decode


@dataclass(frozen=True)
class DecodeInput:
    """A /decode request's grids as sent (rows of indices, or flat token sequences), before any array exists."""

    sources: list[Any]
    names: list[str]  # for messages: "indices", "indices[2]", "tokens[0]", ...
    shapes: list[tuple[int, int] | None]  # (h, w) as declared (None: empty or malformed, refused later)
    crops: list[Size | None]  # crop_to per grid
    single: bool  # one grid sent bare (not in a list): answered with the image file itself


def crop_sizes(crop_to: ImageSize | list[ImageSize] | None, count: int) -> list[Size | None]:
    if crop_to is None:
        return [None] * count
    if isinstance(crop_to, ImageSize):
        return [Size(crop_to.width, crop_to.height)] * count
    if len(crop_to) != count:
        raise InvalidRequest(f"crop_to lists {len(crop_to)} sizes for {count} grids: give one, or one per grid")
    return [Size(c.width, c.height) for c in crop_to]


def parse_decode(body: DecodeRequest, max_grids: int) -> DecodeInput:
    """Split the request into its grids and read each one's declared shape and crop: counts only, nothing built."""
    if body.indices is not None:
        single = bool(body.indices) and bool(body.indices[0]) and not isinstance(body.indices[0][0], list)
        sources: list[Any] = [body.indices] if single else list(body.indices)
        names = ["indices"] if single else [f"indices[{i}]" for i in range(len(sources))]
        check_count(len(sources), max_grids, "grids")
        # The first row's length stands for the width; a ragged grid is refused before any array is built.
        shapes = [(len(rows), len(rows[0])) if rows and isinstance(rows[0], list) and rows[0] else None
                  for rows in sources]
    else:
        assert body.tokens is not None
        single = not body.tokens or not isinstance(body.tokens[0], list)
        sources = [body.tokens] if single else list(body.tokens)
        names = ["tokens"] if single else [f"tokens[{i}]" for i in range(len(sources))]
        check_count(len(sources), max_grids, "token sequences")
        if body.grid is None:  # a layout infers each grid: the limits are checked once it has
            shapes: list[tuple[int, int] | None] = [None] * len(sources)
        else:
            h, w = body.grid
            shapes = [(h, w) if h >= 1 and w >= 1 else None] * len(sources)
    return DecodeInput(sources, names, shapes, crop_sizes(body.crop_to, len(sources)), single)


def build_grids(body: DecodeRequest, grids: DecodeInput, num_embeddings: int, max_tokens: int) -> list[np.ndarray]:
    """The request's grids as (h, w) int64 raw indices (runs in the threadpool, after the limits passed);
    ``InvalidRequest`` naming the first ragged row or the first value outside ``[offset, offset + K)``."""
    if body.indices is not None:
        return [grid_from_rows(rows, body.offset, num_embeddings, max_tokens, name)
                for rows, name in zip(grids.sources, grids.names, strict=True)]
    assert body.grid is not None
    return [grid_from_tokens(seq, body.grid, body.offset, body.bos, body.eos, num_embeddings, max_tokens, name)
            for seq, name in zip(grids.sources, grids.names, strict=True)]
