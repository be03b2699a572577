"""``POST /encode``: images -> token grids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from vqtok.model.layouts import Layout, LayoutError
from vqtok.service.dependencies import AcceptsNpy, ReadyModel, State
from vqtok.service.errors import InvalidRequest, NotAcceptable
from vqtok.service.imaging import (
    IMAGE_CONTENT_TYPES,
    BudgetBusy,
    DecodeBudget,
    FittedImage,
    ImageHeader,
    Size,
    check_image_grid,
    load_fitted,
    probe_image,
)
from vqtok.service.layouts import encode_layout, one_line
from vqtok.service.limits import check_encode_size, check_request_tokens
from vqtok.service.parsing import EncodeInput, read_encode_body
from vqtok.service.responses import ERROR_RESPONSES, NPY, model_headers, npy_bytes, timing_headers
from vqtok.service.schemas import (
    ENCODE_JSON_EXAMPLES,
    EncodedImage,
    EncodeJSONRequest,
    EncodeOptions,
    EncodeResponse,
    ImageSize,
)
from vqtok.service.settings import Settings
from vqtok.service.tokens import to_tokens

router = APIRouter(tags=["encode"])


def _form_field(schema: dict[str, Any]) -> dict[str, Any]:
    """A nullable option's schema as a form field: a form cannot send null, only leave the field out."""
    branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
    if len(branches) == 1:
        return {**{k: v for k, v in schema.items() if k != "anyOf"}, **branches[0]}
    return schema


# The body is read by parsing.read_encode_body (three content types), so the OpenAPI document states it here.
ENCODE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                              "description": "one or more image files (repeat the part); bytes that are no "
                              "image in a supported format are a 415"},
                    **{k: _form_field(v) for k, v in EncodeOptions.model_json_schema()["properties"].items()},
                },
                "required": ["image"],
                "additionalProperties": False,
            }},
            "application/json": {"schema": EncodeJSONRequest.model_json_schema(), "examples": ENCODE_JSON_EXAMPLES},
            **{ct: {"schema": {"type": "string", "format": "binary"}} for ct in IMAGE_CONTENT_TYPES},
        },
    }
}


# A small request is decoded and answered on the event loop: for a few small images two hops to a worker
# thread and back cost more than the work (bench/profile_service.py). Bounded before anything is decoded:
# at most INLINE_MAX_IMAGES files of INLINE_MAX_BYTES in all, INLINE_MAX_PIXELS in all by their headers,
# and INLINE_MAX_TOKENS grid cells to turn into JSON. Anything larger runs in the threadpool, as does an
# image whose share of the decode budget is not free at once.
INLINE_MAX_IMAGES = 4
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_PIXELS = 128 * 128
INLINE_MAX_TOKENS = 4096


def _check_headers(request: EncodeInput, settings: Settings, downsample: int) -> list[ImageHeader]:
    """Every image's header, checked: its pixels, its grid and the request's token total (nothing decoded)."""
    images, size, fit = request.images, request.size, request.options.fit
    headers = [probe_image(data, settings.max_pixels, where) for where, data in images]
    tokens = [check_image_grid(header, size, fit, downsample, settings.max_tokens_per_grid, where)
              for header, (where, _) in zip(headers, images, strict=True)]
    check_request_tokens(tokens, settings.max_tokens_per_request, "encoded images",
                         "send fewer images per request or a smaller size")
    return headers


def _fit_images(request: EncodeInput, settings: Settings, downsample: int, budget: DecodeBudget,
                headers: list[ImageHeader] | None = None, *, wait: bool = True) -> list[FittedImage]:
    """Check every image from its header (unless ``headers`` were checked already), then decode and fit them
    one at a time (in the threadpool; ``wait=False`` on the event loop, see ``DecodeBudget.reserve``).

    Nothing is decoded until every image's pixels, grid and the request's token total are known to be
    within the limits; each decode then holds its pixels in the process-wide ``budget``."""
    if headers is None:
        headers = _check_headers(request, settings, downsample)
    size, fit = request.size, request.options.fit
    return [load_fitted(data, header, size, fit, downsample, budget, settings.max_pixels, where, wait=wait)
            for header, (where, data) in zip(headers, request.images, strict=True)]


async def _fit_request(request: EncodeInput, settings: Settings, downsample: int,
                       budget: DecodeBudget) -> list[FittedImage]:
    """``_fit_images`` on the event loop for a small request (``INLINE_MAX_*``) whose decode budget is free at
    once, else in the threadpool; a small request's headers are checked once, on the loop, either way."""
    images, headers = request.images, None
    if len(images) <= INLINE_MAX_IMAGES and sum(len(data) for _, data in images) <= INLINE_MAX_BYTES:
        headers = _check_headers(request, settings, downsample)  # a few KiB of headers: cheap, and errors as usual
        if sum(header.size.pixels for header in headers) <= INLINE_MAX_PIXELS:
            try:
                return _fit_images(request, settings, downsample, budget, headers, wait=False)
            except BudgetBusy:  # the worker thread may wait for the budget; the loop may not
                pass
    return await run_in_threadpool(_fit_images, request, settings, downsample, budget, headers)


def _check_one_grid(fitted: Sequence[FittedImage]) -> None:
    """``NotAcceptable`` unless every image encodes to the same grid: one (N, h, w) array holds them."""
    if len({image.encoded for image in fitted}) > 1:
        sizes = ", ".join(f"{i.encoded.width}x{i.encoded.height}" for i in fitted)
        raise NotAcceptable(
            f"Accept: {NPY} needs every image to encode to the same grid, got sizes {sizes}; "
            "pass size=... (e.g. size=256&fit=crop) or accept application/json"
        )


def _image_size(size: Size) -> ImageSize:
    return ImageSize(width=size.width, height=size.height)


@router.post(
    "/encode",
    response_model=EncodeResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {NPY: {"description": "(N, h, w) int64 indices"}}}},
    openapi_extra=ENCODE_BODY,
    summary="Images -> token grids",
)
async def encode(
    request: Request,
    response: Response,
    query: Annotated[EncodeOptions, Query()],
    ready: ReadyModel,
    state: State,
    want_npy: AcceptsNpy,
) -> Any:
    """Encode one or many images to grids of codebook indices.

    Send multipart ``image`` parts, JSON ``{"images": [base64, ...]}``, or one raw image body. With
    ``Accept: application/x-npy`` the answer is one (N, h, w) int64 NumPy array (all grids must match).
    """
    settings, engine = ready.settings, ready.engine
    downsample = engine.config.downsample
    body = await read_encode_body(request, query, settings, engine.checkpoint.record.serving)
    assert state.layouts is not None  # built with the engine
    options = body.options
    layout_name, layout = encode_layout(options.layout, options.offset, options.bos, options.eos, state.layouts)
    if body.size is not None:  # from the numbers alone, before any image is read past its header
        check_encode_size(body.size, body.size_name, len(body.images), settings, downsample)
    fitted = await _fit_request(body, settings, downsample, ready.decode_budget)
    if want_npy:
        _check_one_grid(fitted)

    # (3, H, W) views of the (H, W, 3) pixels, no copy: copies of that size would run on this thread's own
    # OpenMP team, and the batcher's stacking on the inference thread makes the one copy needed.
    tensors = [torch.from_numpy(image.pixels).permute(2, 0, 1) for image in fitted]
    result = await ready.batcher.submit("encode", tensors)
    grids = [output.numpy() for output in result.outputs]  # each (h, w) int64
    ready.metrics.observe_work("encode", len(grids), sum(grid.size for grid in grids), result.queue_seconds)

    headers = {**timing_headers(result), **model_headers(engine)}
    if want_npy:
        headers["x-vqtok-content-sizes"] = ",".join(f"{i.content.width}x{i.content.height}" for i in fitted)
        return Response(npy_bytes(np.stack(grids)), media_type=NPY, headers=headers)
    response.headers.update(headers)
    if sum(grid.size for grid in grids) <= INLINE_MAX_TOKENS:
        tokens = _tokens(grids, options, layout_name, layout)
    else:
        tokens = await run_in_threadpool(_tokens, grids, options, layout_name, layout)
    return EncodeResponse(
        model=engine.identity(),
        fit=options.fit,
        size_from=body.size_from,
        offset=options.offset,
        bos=options.bos,
        eos=options.eos,
        layout=layout_name,
        images=[
            EncodedImage(
                indices=grid.tolist(),
                grid=(grid.shape[0], grid.shape[1]),
                original_size=_image_size(image.original),
                encoded_size=_image_size(image.encoded),
                content_size=_image_size(image.content),
                tokens=seq,
            )
            for grid, image, seq in zip(grids, fitted, tokens, strict=True)
        ],
    )


def _tokens(grids: Sequence[np.ndarray], options: EncodeOptions, layout_name: str | None,
            layout: Layout | None) -> list[list[int] | None]:
    """Each grid's ``tokens``: the layout's sequence, today's flat offset/bos/eos one, or None (not asked for)."""
    if layout is None:
        if not options.want_tokens and layout_name is None:
            return [None] * len(grids)
        return [to_tokens(grid, options.offset, options.bos, options.eos) for grid in grids]
    out: list[list[int] | None] = []
    for i, grid in enumerate(grids):
        try:
            out.append(layout.to_tokens(grid))
        except LayoutError as exc:
            raise InvalidRequest(f"images[{i}]: layout {layout.name!r}: {one_line(str(exc))}") from None
    return out
