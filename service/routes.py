"""The HTTP endpoints: parse and check requests, hand tensors to the batcher, shape the answers.

No model math here: pixels become tensors, tensors go to ``MicroBatcher``, results come back as
JSON grids, NumPy arrays or image files.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from vqtok.service import __version__
from vqtok.service.batching import BatchResult, MicroBatcher
from vqtok.service.engine import Engine
from vqtok.service.errors import (
    BadRequest,
    InvalidRequest,
    NotAcceptable,
    NotReady,
    Unauthorized,
    UnsupportedMediaType,
    validation_error,
)
from vqtok.service.imaging import (
    IMAGE_CONTENT_TYPES,
    FittedImage,
    Size,
    check_encoded_tokens,
    decode_image,
    encode_image_bytes,
    fit_image,
    media_type,
    parse_size,
)
from vqtok.service.metrics import ServiceMetrics
from vqtok.service.schemas import (
    CodebookResponse,
    DecodedImage,
    DecodeRequest,
    DecodeResponse,
    EncodedImage,
    EncodeJSONRequest,
    EncodeOptions,
    EncodeResponse,
    ErrorResponse,
    HealthResponse,
    ImageSize,
    InfoResponse,
    ReadyResponse,
)
from vqtok.service.settings import Settings
from vqtok.service.tokens import grid_from_rows, grid_from_tokens, to_tokens

NPY = "application/x-npy"


@dataclass
class ServiceState:
    """What the endpoints share: settings, metrics, and (once ready) the engine and the batcher."""

    settings: Settings
    metrics: ServiceMetrics
    engine: Engine | None = None
    batcher: MicroBatcher | None = None
    ready: bool = False


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def require_api_key(request: Request, state: Annotated[ServiceState, Depends(get_state)]) -> None:
    """401 unless ``Authorization: Bearer <VQTOK_API_KEY>`` (constant-time compare); a no-op without a key."""
    if state.settings.api_key is None:
        return
    expected = state.settings.api_key.get_secret_value().encode()
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if not header:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", headers=challenge)
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise Unauthorized("wrong API key", headers=challenge)


@dataclass
class Ready:
    """The ready engine and batcher, for endpoints that need the model."""

    settings: Settings
    metrics: ServiceMetrics
    engine: Engine
    batcher: MicroBatcher


def require_ready(state: Annotated[ServiceState, Depends(get_state)]) -> Ready:
    if not state.ready or state.engine is None or state.batcher is None:
        raise NotReady("the model is not loaded and warmed up yet; poll /ready")
    return Ready(state.settings, state.metrics, state.engine, state.batcher)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "malformed request"), (401, "missing or wrong API key"), (406, "Accept cannot be met"),
        (413, "body or image over the limit"), (415, "not an image / unsupported content type"),
        (422, "well-formed but invalid"), (429, "queue full, retry"), (503, "not ready"),
    )
}

public = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)])


def _accepts(request: Request, media: str) -> bool:
    return media in request.headers.get("accept", "").lower()


def _timing_headers(result: BatchResult) -> dict[str, str]:
    return {
        "x-queue-time-ms": f"{result.queue_seconds * 1000.0:.2f}",
        "x-inference-time-ms": f"{result.inference_seconds * 1000.0:.2f}",
        "x-batch-size": ",".join(str(size) for size in result.batch_sizes),
    }


def _model_headers(engine: Engine) -> dict[str, str]:
    identity = engine.identity()
    return {"x-vqtok-model": identity.name, "x-vqtok-weights-sha256": identity.weights_sha256}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- /encode

def _decode_base64(text: str, where: str) -> bytes:
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{where}: not valid base64 ({exc})") from exc


def _merge_options(query: EncodeOptions, fields: dict[str, Any], prefix: str) -> EncodeOptions:
    try:
        return EncodeOptions.model_validate({**query.model_dump(exclude_unset=True), **fields})
    except ValidationError as exc:
        raise validation_error(exc, (prefix,)) from exc


async def _read_encode_body(request: Request, query: EncodeOptions, settings: Settings
                            ) -> tuple[list[tuple[str, bytes]], EncodeOptions]:
    """The request's images as (name for messages, file bytes), and its options (body over query)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
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
    if content_type == "application/json":
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"request body is not valid JSON ({exc})") from exc
        try:
            parsed = EncodeJSONRequest.model_validate(payload)
        except ValidationError as exc:
            raise validation_error(exc, ("body",)) from exc
        fields = parsed.model_dump(exclude_unset=True, exclude={"images"})
        images = [(f"images[{i}]", _decode_base64(text, f"images[{i}]")) for i, text in enumerate(parsed.images)]
        return images, _merge_options(query, fields, "body")
    if content_type in IMAGE_CONTENT_TYPES or content_type == "application/octet-stream":
        return [("body", await request.body())], query
    shown = content_type or "none"
    raise UnsupportedMediaType(
        f"Content-Type {shown!r} is not supported by /encode: send multipart/form-data with 'image' parts, "
        f"application/json with base64 'images', or one image as image/png, image/jpeg, image/webp, ..."
    )


def _prepare_images(images: Sequence[tuple[str, bytes]], size: Size | None, options: EncodeOptions,
                    settings: Settings, downsample: int) -> list[FittedImage]:
    """Decode and fit every image (runs in the threadpool)."""
    fitted = []
    for where, data in images:
        pixels = decode_image(data, settings.max_pixels, where)
        image = fit_image(pixels, size, options.fit, downsample, where)
        check_encoded_tokens(image.encoded, downsample, settings.max_tokens_per_grid, where)
        fitted.append(image)
    return fitted


def _image_size(size: Size) -> ImageSize:
    return ImageSize(width=size.width, height=size.height)


ENCODE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "description": "one or more image files (repeat the part)"},
                    **{k: v for k, v in EncodeOptions.model_json_schema()["properties"].items()},
                },
                "required": ["image"],
            }},
            "application/json": {"schema": EncodeJSONRequest.model_json_schema()},
            **{ct: {"schema": {"type": "string", "format": "binary"}} for ct in IMAGE_CONTENT_TYPES[:4]},
        },
    }
}


@protected.post(
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
    ready: Annotated[Ready, Depends(require_ready)],
) -> Any:
    """Encode one or many images to grids of codebook indices.

    Send multipart ``image`` parts, JSON ``{"images": [base64, ...]}``, or one raw image body. With
    ``Accept: application/x-npy`` the answer is one (N, h, w) int64 NumPy array (all grids must match).
    """
    settings, engine = ready.settings, ready.engine
    images, options = await _read_encode_body(request, query, settings)
    if not images:
        raise InvalidRequest("no images in the request: send at least one")
    if len(images) > settings.max_images_per_request:
        raise InvalidRequest(
            f"{len(images)} images in one request, the limit is {settings.max_images_per_request}"
        )
    size_text = options.size if options.size is not None else settings.default_size
    size = parse_size(size_text) if size_text is not None else None
    downsample = engine.config.downsample
    fitted = await run_in_threadpool(_prepare_images, images, size, options, settings, downsample)

    want_npy = _accepts(request, NPY)
    if want_npy and len({image.encoded for image in fitted}) > 1:
        sizes = ", ".join(f"{i.encoded.width}x{i.encoded.height}" for i in fitted)
        raise NotAcceptable(
            f"Accept: {NPY} needs every image to encode to the same grid, got sizes {sizes}; "
            "pass size=... (e.g. size=256&fit=crop) or accept application/json"
        )
    tensors = [torch.from_numpy(image.pixels).permute(2, 0, 1).contiguous() for image in fitted]
    result = await ready.batcher.submit("encode", tensors)
    grids = [output.numpy() for output in result.outputs]  # each (h, w) int64

    ready.metrics.images.labels("encode").inc(len(grids))
    ready.metrics.tokens.labels("encode").inc(sum(grid.size for grid in grids))
    ready.metrics.queue_seconds.labels("encode").observe(result.queue_seconds)
    headers = {**_timing_headers(result), **_model_headers(engine)}
    if want_npy:
        headers["x-vqtok-content-sizes"] = ",".join(f"{i.content.width}x{i.content.height}" for i in fitted)
        return Response(_npy_bytes(np.stack(grids)), media_type=NPY, headers=headers)
    response.headers.update(headers)
    return EncodeResponse(
        model=engine.identity(),
        fit=options.fit,
        offset=options.offset,
        bos=options.bos,
        eos=options.eos,
        images=[
            EncodedImage(
                indices=grid.tolist(),
                grid=(grid.shape[0], grid.shape[1]),
                original_size=_image_size(image.original),
                encoded_size=_image_size(image.encoded),
                content_size=_image_size(image.content),
                tokens=to_tokens(grid, options.offset, options.bos, options.eos) if options.want_tokens else None,
            )
            for grid, image in zip(grids, fitted, strict=True)
        ],
    )


# ---------------------------------------------------------------------------------------------- /decode

def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type {content_type or 'none'!r} is not supported by /decode: send application/json"
        )


def _grids_from_request(body: DecodeRequest, num_embeddings: int, max_tokens: int, max_grids: int
                        ) -> tuple[list[np.ndarray], bool]:
    """The request's grids as (h, w) int64 raw indices, and whether it named a single grid."""
    if body.indices is not None:
        single = bool(body.indices) and bool(body.indices[0]) and not isinstance(body.indices[0][0], list)
        grids_rows: list[Any] = [body.indices] if single else list(body.indices)
        names = ["indices"] if single else [f"indices[{i}]" for i in range(len(grids_rows))]
        _check_count(len(grids_rows), max_grids, "grids")
        grids = [grid_from_rows(rows, body.offset, num_embeddings, max_tokens, name)
                 for rows, name in zip(grids_rows, names, strict=True)]
        return grids, single
    assert body.tokens is not None and body.grid is not None
    single = not body.tokens or not isinstance(body.tokens[0], list)
    sequences: list[Any] = [body.tokens] if single else list(body.tokens)
    names = ["tokens"] if single else [f"tokens[{i}]" for i in range(len(sequences))]
    _check_count(len(sequences), max_grids, "token sequences")
    grids = [grid_from_tokens(seq, body.grid, body.offset, body.bos, body.eos, num_embeddings, max_tokens, name)
             for seq, name in zip(sequences, names, strict=True)]
    return grids, single


def _check_count(count: int, limit: int, what: str) -> None:
    if count == 0:
        raise InvalidRequest(f"no {what} in the request: send at least one")
    if count > limit:
        raise InvalidRequest(f"{count} {what} in one request, the limit is {limit}")


def _crop_sizes(crop_to: ImageSize | list[ImageSize] | None, count: int) -> list[Size | None]:
    if crop_to is None:
        return [None] * count
    if isinstance(crop_to, ImageSize):
        return [Size(crop_to.width, crop_to.height)] * count
    if len(crop_to) != count:
        raise InvalidRequest(f"crop_to lists {len(crop_to)} sizes for {count} grids: give one, or one per grid")
    return [Size(c.width, c.height) for c in crop_to]


def _render_images(pixels: Sequence[np.ndarray], crops: Sequence[Size | None], body: DecodeRequest) -> list[bytes]:
    """Crop (top-left) and encode every decoded (H, W, 3) uint8 image (runs in the threadpool)."""
    files = []
    for image, crop in zip(pixels, crops, strict=True):
        cropped = np.ascontiguousarray(image[: crop.height, : crop.width]) if crop is not None else image
        files.append(encode_image_bytes(cropped, body.format, body.quality))
    return files


@protected.post(
    "/decode",
    responses={
        **ERROR_RESPONSES,
        200: {
            "description": "one grid: the image file; several grids (or Accept: application/json): JSON",
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
async def decode(body: DecodeRequest, request: Request, ready: Annotated[Ready, Depends(require_ready)]) -> Response:
    """Decode ``indices`` (raw or offset) or an LLM's flat ``tokens`` back to images."""
    settings, engine = ready.settings, ready.engine
    grids, single = await run_in_threadpool(
        _grids_from_request, body, engine.config.num_embeddings, settings.max_tokens_per_grid,
        settings.max_images_per_request,
    )
    crops = _crop_sizes(body.crop_to, len(grids))
    f = engine.config.downsample
    for i, (grid, crop) in enumerate(zip(grids, crops, strict=True)):
        if crop is not None and (crop.width > grid.shape[1] * f or crop.height > grid.shape[0] * f):
            where = "crop_to" if not isinstance(body.crop_to, list) else f"crop_to[{i}]"
            raise InvalidRequest(
                f"{where}: {crop.width}x{crop.height} is larger than the decoded image "
                f"{grid.shape[1] * f}x{grid.shape[0] * f} of grid {i}"
            )
    result = await ready.batcher.submit("decode", [torch.from_numpy(grid) for grid in grids])
    pixels = [output.numpy() for output in result.outputs]  # each (H, W, 3) uint8
    files = await run_in_threadpool(_render_images, pixels, crops, body)

    ready.metrics.images.labels("decode").inc(len(grids))
    ready.metrics.tokens.labels("decode").inc(sum(grid.size for grid in grids))
    ready.metrics.queue_seconds.labels("decode").observe(result.queue_seconds)
    headers = {**_timing_headers(result), **_model_headers(engine)}
    mime = media_type(body.format)
    if single and not _accepts(request, "application/json"):
        grid = grids[0]
        headers["x-grid"] = f"{grid.shape[0]},{grid.shape[1]}"
        return Response(files[0], media_type=mime, headers=headers)
    payload = DecodeResponse(
        model=engine.identity(),
        images=[
            DecodedImage(
                image=base64.b64encode(data).decode("ascii"),
                media_type=mime,
                width=(crop.width if crop else grid.shape[1] * f),
                height=(crop.height if crop else grid.shape[0] * f),
                grid=(grid.shape[0], grid.shape[1]),
            )
            for data, grid, crop in zip(files, grids, crops, strict=True)
        ],
    )
    return JSONResponse(payload.model_dump(mode="json"), headers=headers)


# ---------------------------------------------------------------------------------------------- the rest

@protected.get(
    "/codebook",
    response_model=CodebookResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {NPY: {"description": "(K, D) float32 vectors"}}}},
    summary="Codebook size, usage and vectors",
)
async def codebook(
    request: Request,
    ready: Annotated[Ready, Depends(require_ready)],
    include: Annotated[Literal["vectors"] | None, Query(description="'vectors' adds the (K, D) vectors")] = None,
) -> Any:
    engine = ready.engine
    if _accepts(request, NPY):
        vectors = await ready.batcher.run_in_inference_thread(engine.codebook_vectors)
        assert isinstance(vectors, torch.Tensor)
        return Response(_npy_bytes(vectors.numpy().astype(np.float32)), media_type=NPY, headers=_model_headers(engine))
    usage, perplexity, codes_used = engine.codebook_usage()
    vectors_list = None
    if include == "vectors":
        vectors = await ready.batcher.run_in_inference_thread(engine.codebook_vectors)
        assert isinstance(vectors, torch.Tensor)
        vectors_list = vectors.tolist()
    config = engine.config
    return CodebookResponse(
        model=engine.identity(), num_embeddings=config.num_embeddings, embedding_dim=config.embedding_dim,
        downsample=config.downsample, usage=usage, perplexity=perplexity, codes_used=codes_used, vectors=vectors_list,
    )


@protected.get("/info", response_model=InfoResponse, responses=ERROR_RESPONSES, summary="Model, device and limits")
async def info(ready: Annotated[Ready, Depends(require_ready)]) -> InfoResponse:
    engine, settings = ready.engine, ready.settings
    return InfoResponse(
        model=engine.identity(), config=engine.config.to_dict(), checkpoint=engine.checkpoint_info(),
        device=str(engine.device), dtype=engine.dtype, limits=settings.limits(), auth=settings.api_key is not None,
        version=__version__, ready=True,
    )


@public.get("/health", response_model=HealthResponse, summary="Liveness (never needs the model)")
async def health() -> HealthResponse:
    return HealthResponse()


@public.get("/ready", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}}, summary="Readiness")
async def ready_endpoint(state: Annotated[ServiceState, Depends(get_state)]) -> ReadyResponse:
    if not state.ready:
        raise NotReady("the model is not loaded and warmed up yet")
    return ReadyResponse(ready=True, status="ready")


@public.get("/metrics", include_in_schema=False)
async def metrics(state: Annotated[ServiceState, Depends(get_state)]) -> Response:
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
