"""The HTTP endpoints: parse and check requests, hand tensors to the batcher, shape the answers.

No model math here: pixels become tensors, tensors go to ``MicroBatcher``, results come back as
JSON grids, NumPy arrays or image files.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    UnsupportedMediaType,
    validation_error,
)
from vqtok.service.imaging import (
    IMAGE_CONTENT_TYPES,
    MAX_SIDE,
    DecodeBudget,
    FittedImage,
    Size,
    check_image_grid,
    check_target_size,
    encode_image_bytes,
    grid_of,
    load_fitted,
    media_type,
    parse_size,
    probe_image,
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
    loaded: bool = False  # the model is loaded and warmed up
    draining: bool = False  # shutting down: no new work, queued work finishing
    failure: str | None = None  # why loading failed, if it did
    in_flight: int = 0  # admitted /encode and /decode requests in progress (AdmissionMiddleware)
    loading: asyncio.Task[None] | None = None  # the background load and warm-up
    # Pixels of uploaded images being decoded at once, across all requests (max_decode_pixels).
    decode_budget: DecodeBudget = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.decode_budget = DecodeBudget(self.settings.max_decode_pixels, self.settings.decode_wait_s)

    @property
    def ready(self) -> bool:
        """Loaded, warm, not draining, and the batcher's dispatcher is running."""
        return self.loaded and not self.draining and self.batcher is not None and self.batcher.alive

    def not_ready_reason(self) -> str:
        if self.failure:
            return f"the model failed to load: {self.failure}"
        if self.draining:
            return "the service is shutting down"
        if self.batcher is not None and self.batcher.failure:
            return f"{self.batcher.failure}; the service is not ready"
        return "the model is not loaded and warmed up yet; poll /ready"


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


@dataclass
class Ready:
    """The ready engine and batcher, for endpoints that need the model."""

    settings: Settings
    metrics: ServiceMetrics
    engine: Engine
    batcher: MicroBatcher


def require_ready(state: Annotated[ServiceState, Depends(get_state)]) -> Ready:
    if not state.ready or state.engine is None or state.batcher is None:
        raise NotReady(state.not_ready_reason())
    return Ready(state.settings, state.metrics, state.engine, state.batcher)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "malformed request"), (401, "missing or wrong API key"), (406, "Accept cannot be met"),
        (413, "body or image over the limit"), (415, "not an image / unsupported content type"),
        (422, "well-formed but invalid"), (429, "queue full, retry"), (503, "not ready"),
    )
}

# The API key of protected routes is checked by AdmissionMiddleware, before any body is read.
public = APIRouter()
protected = APIRouter()


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
    return {"x-vqtok-model": identity.name, "x-vqtok-weights-sha256": identity.weights_sha256,
            "x-vqtok-model-id": identity.model_id}


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


async def _read_encode_body(request: Request, query: EncodeOptions, settings: Settings
                            ) -> tuple[list[tuple[str, bytes]], EncodeOptions]:
    """The request's images as (name for messages, file bytes), and its options (body over query)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
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


def _check_request_tokens(counts: Sequence[int], limit: int, what: str, hint: str) -> None:
    """``InvalidRequest`` when the grids of one request hold more than ``max_tokens_per_request`` tokens."""
    total = sum(counts)
    if total > limit:
        raise InvalidRequest(
            f"{len(counts)} {what} hold {total} tokens in all, over the limit of {limit} tokens per request "
            f"(max_tokens_per_request); {hint}"
        )


def _prepare_images(images: Sequence[tuple[str, bytes]], size: Size | None, options: EncodeOptions,
                    settings: Settings, downsample: int, budget: DecodeBudget) -> list[FittedImage]:
    """Check every image from its header, then decode and fit them one at a time (runs in the threadpool).

    Nothing is decoded until every image's pixels, grid and the request's token total are known to be
    within the limits; each decode then holds its pixels in the process-wide ``budget``."""
    headers = [probe_image(data, settings.max_pixels, where) for where, data in images]
    tokens = [check_image_grid(header, size, options.fit, downsample, settings.max_tokens_per_grid, where)
              for header, (where, _) in zip(headers, images, strict=True)]
    _check_request_tokens(tokens, settings.max_tokens_per_request, "encoded images",
                          "send fewer images per request or a smaller size")
    return [load_fitted(data, header, size, options.fit, downsample, budget, settings.max_pixels, where)
            for header, (where, data) in zip(headers, images, strict=True)]


def _image_size(size: Size) -> ImageSize:
    return ImageSize(width=size.width, height=size.height)


def _form_field(schema: dict[str, Any]) -> dict[str, Any]:
    """A nullable option's schema as a form field: a form cannot send null, only leave the field out."""
    branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
    if len(branches) == 1:
        return {**{k: v for k, v in schema.items() if k != "anyOf"}, **branches[0]}
    return schema


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
    downsample = engine.config.downsample
    size_name = "size" if options.size is not None else "default_size"
    size_text = options.size if options.size is not None else settings.default_size
    size = parse_size(size_text) if size_text is not None else None
    if size is not None:  # from the numbers alone, before any image is read past its header
        check_target_size(size, downsample, settings.max_tokens_per_grid, settings.max_pixels, size_name)
        grid_h, grid_w = grid_of(size, downsample)
        _check_request_tokens([grid_h * grid_w] * len(images), settings.max_tokens_per_request,
                              f"images at {size_name} {size}", "send fewer images per request or a smaller size")
    budget = get_state(request).decode_budget
    fitted = await run_in_threadpool(_prepare_images, images, size, options, settings, downsample, budget)

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


@dataclass(frozen=True)
class _GridSources:
    """A /decode request's grids as sent (rows of indices, or flat token sequences), before any array exists."""

    sources: list[Any]
    names: list[str]  # for messages: "indices", "indices[2]", "tokens[0]", ...
    shapes: list[tuple[int, int] | None]  # (h, w) as declared (None: empty or malformed, refused later)
    single: bool


def _grid_sources(body: DecodeRequest, max_grids: int) -> _GridSources:
    """Split the request into its grids and read each one's declared shape: counts only, nothing built."""
    if body.indices is not None:
        single = bool(body.indices) and bool(body.indices[0]) and not isinstance(body.indices[0][0], list)
        sources: list[Any] = [body.indices] if single else list(body.indices)
        names = ["indices"] if single else [f"indices[{i}]" for i in range(len(sources))]
        _check_count(len(sources), max_grids, "grids")
        # The first row's length stands for the width; a ragged grid is refused before any array is built.
        shapes = [(len(rows), len(rows[0])) if rows and isinstance(rows[0], list) and rows[0] else None
                  for rows in sources]
        return _GridSources(sources, names, shapes, single)
    assert body.tokens is not None and body.grid is not None
    single = not body.tokens or not isinstance(body.tokens[0], list)
    sources = [body.tokens] if single else list(body.tokens)
    names = ["tokens"] if single else [f"tokens[{i}]" for i in range(len(sources))]
    _check_count(len(sources), max_grids, "token sequences")
    h, w = body.grid
    shape = (h, w) if h >= 1 and w >= 1 else None
    return _GridSources(sources, names, [shape] * len(sources), single)


def _check_decode_limits(grids: _GridSources, crops: Sequence[Size | None], body: DecodeRequest,
                         settings: Settings, downsample: int) -> None:
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
    _check_request_tokens([h * w for h, w in filter(None, grids.shapes)], settings.max_tokens_per_request,
                          "grids", "send fewer or smaller grids per request")
    limit = MAX_SIDE[body.format]
    for i, (name, shape, crop) in enumerate(zip(grids.names, grids.shapes, crops, strict=True)):
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


def _grids_from_request(body: DecodeRequest, grids: _GridSources, num_embeddings: int, max_tokens: int
                        ) -> list[np.ndarray]:
    """The request's grids as (h, w) int64 raw indices (runs in the threadpool, after the limits passed)."""
    if body.indices is not None:
        return [grid_from_rows(rows, body.offset, num_embeddings, max_tokens, name)
                for rows, name in zip(grids.sources, grids.names, strict=True)]
    assert body.grid is not None
    return [grid_from_tokens(seq, body.grid, body.offset, body.bos, body.eos, num_embeddings, max_tokens, name)
            for seq, name in zip(grids.sources, grids.names, strict=True)]


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
    f = engine.config.downsample
    sources = _grid_sources(body, settings.max_images_per_request)
    single = sources.single
    crops = _crop_sizes(body.crop_to, len(sources.sources))
    _check_decode_limits(sources, crops, body, settings, f)  # before any array is built
    grids = await run_in_threadpool(
        _grids_from_request, body, sources, engine.config.num_embeddings, settings.max_tokens_per_grid,
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
        raise NotReady(state.not_ready_reason())
    return ReadyResponse(ready=True, status="ready")


@public.get("/metrics", include_in_schema=False)
async def metrics(state: Annotated[ServiceState, Depends(get_state)]) -> Response:
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    state.metrics.ready.set(1 if state.ready else 0)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
