"""``POST /decode``: token grids (or an LLM's flat tokens) -> images."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Body, Depends, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from vqtok.service.dependencies import AcceptsJson, ReadyModel, State, require_json
from vqtok.service.errors import InvalidRequest
from vqtok.service.imaging import Size, encode_image_bytes, media_type
from vqtok.service.layouts import LayoutGrids, decode_layout, parse_with_layout, repair_headers, repairs_json
from vqtok.service.limits import check_decode_limits
from vqtok.service.parsing import DecodeInput, build_grids, crop_sizes, parse_decode
from vqtok.service.responses import ERROR_RESPONSES, model_headers, timing_headers
from vqtok.service.schemas import DECODE_EXAMPLES, DecodedImage, DecodeRequest, DecodeResponse, RepairInfo

router = APIRouter(tags=["decode"])


def _render_images(pixels: Sequence[np.ndarray], crops: Sequence[Size | None], body: DecodeRequest) -> list[bytes]:
    """Crop (top-left) and encode every decoded (H, W, 3) uint8 image (runs in the threadpool)."""
    files = []
    for image, crop in zip(pixels, crops, strict=True):
        cropped = np.ascontiguousarray(image[: crop.height, : crop.width]) if crop is not None else image
        files.append(encode_image_bytes(cropped, body.format, body.quality))
    return files


@router.post(
    "/decode",
    responses={
        **ERROR_RESPONSES,
        200: {
            "description": "one grid: the image file (with a layout, x-vqtok-repairs and x-vqtok-repairs-detail "
            "say what lenient decoding repaired); several grids, extract=true or Accept: application/json: JSON",
            "content": {
                "image/png": {}, "image/jpeg": {}, "image/webp": {},
            },
            "model": DecodeResponse,
        },
    },
    response_class=Response,
    dependencies=[Depends(require_json)],
    summary="Token grids -> images",
)
async def decode(body: Annotated[DecodeRequest, Body(openapi_examples=DECODE_EXAMPLES)], ready: ReadyModel,
                 state: State, want_json: AcceptsJson) -> Response:
    """Decode ``indices`` (raw or offset) or an LLM's ``tokens`` (flat, or in a layout) back to images."""
    settings, engine = ready.settings, ready.engine
    f = engine.config.downsample
    assert state.layouts is not None  # built with the engine
    layout = decode_layout(body, state.layouts, engine.config.num_embeddings)
    if layout is None and body.tokens is not None and body.grid is None:
        raise InvalidRequest("'tokens' needs 'grid': [h, w] (or a 'layout' that carries the grid)")
    sent = parse_decode(body, settings.max_images_per_request)
    check_decode_limits(sent, body, settings, f)  # before any array is built (declared shapes)
    read: LayoutGrids | None = None
    if layout is None:
        grids = await run_in_threadpool(
            build_grids, body, sent, engine.config.num_embeddings, settings.max_tokens_per_grid,
        )
    else:
        read = await run_in_threadpool(parse_with_layout, body, layout, sent.names, sent.sources,
                                       settings.max_tokens_per_grid)
        grids = read.grids
        sent = DecodeInput(grids, read.names, [(g.shape[0], g.shape[1]) for g in grids],
                           crop_sizes(body.crop_to, len(grids)), sent.single and not body.extract)
        check_decode_limits(sent, body, settings, f)  # the shapes the layout read

    result = await ready.batcher.submit("decode", [torch.from_numpy(grid) for grid in grids])
    pixels = [output.numpy() for output in result.outputs]  # each (H, W, 3) uint8
    files = await run_in_threadpool(_render_images, pixels, sent.crops, body)
    ready.metrics.observe_work("decode", len(grids), sum(grid.size for grid in grids), result.queue_seconds)

    headers = {**timing_headers(result), **model_headers(engine)}
    if layout is not None:
        headers["x-vqtok-layout"] = layout.name
    mime = media_type(body.format)
    if sent.single and not want_json:
        grid = grids[0]
        headers["x-grid"] = f"{grid.shape[0]},{grid.shape[1]}"
        if read is not None:
            headers.update(repair_headers(read.repairs[0]))
        return Response(files[0], media_type=mime, headers=headers)
    payload = DecodeResponse(
        model=engine.identity(),
        layout=layout.name if layout is not None else None,
        images=[
            DecodedImage(
                image=base64.b64encode(data).decode("ascii"),
                media_type=mime,
                width=(crop.width if crop else grid.shape[1] * f),
                height=(crop.height if crop else grid.shape[0] * f),
                grid=(grid.shape[0], grid.shape[1]),
                repairs=[RepairInfo(**r) for r in repairs_json(read.repairs[k])] if read is not None else None,
                sequence=read.sequences[k] if read is not None else None,
                span=read.spans[k] if read is not None else None,
            )
            for k, (data, grid, crop) in enumerate(zip(files, grids, sent.crops, strict=True))
        ],
    )
    return JSONResponse(payload.model_dump(mode="json", exclude_none=True), headers=headers)
