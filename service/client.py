"""Python client for the vqtok service (httpx, sync and async) and the ``vqtok encode`` / ``decode`` CLI.

    with VQTokClient("http://127.0.0.1:8000") as client:
        result = client.encode(["cat.png"], size="256", offset=32000)   # JSON answer as a dict
        png = client.decode(indices=result["images"][0]["indices"])     # image bytes

Errors from the server raise ``ServiceClientError`` carrying its ``error`` and ``error_type``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx
import numpy as np

from vqtok.model.options import add_config_arguments, config_from_args  # light: neither torch nor pydantic-settings

DEFAULT_URL = "http://127.0.0.1:8000"
NPY = "application/x-npy"
# A file path, the bytes of an image file, a Pillow image, or pixels: (H, W, 3) / (H, W) uint8.
ImageInput = Any


class ServiceClientError(Exception):
    """The service answered with an error (or could not be reached: ``status`` 0)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(f"{message} ({error_type}, HTTP {status})" if status else message)
        self.status = status
        self.error_type = error_type
        self.message = message


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
        message, error_type = str(body["error"]), str(body["error_type"])
    except (ValueError, KeyError, TypeError):
        message, error_type = response.text[:500] or response.reason_phrase, "http_error"
    raise ServiceClientError(response.status_code, error_type, message)


def image_file_bytes(image: ImageInput) -> tuple[str, bytes]:
    """(a name, image file bytes) for a path, file bytes, a Pillow image or a uint8 pixel array.

    Pillow images and arrays are sent as lossless PNG (Pillow is imported only for them).
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return "image", bytes(image)
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"a pixel array must be (H, W), (H, W, 3) or (H, W, 4) uint8, got {image.shape} "
                             f"{image.dtype}")
        from PIL import Image

        image = Image.fromarray(image)
    if hasattr(image, "save") and hasattr(image, "mode"):  # a Pillow image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue()
    raise TypeError(f"cannot send {type(image).__name__} as an image: give a path, file bytes, a PIL image or "
                    "a uint8 array")


def _image_part(image: ImageInput, index: int) -> tuple[str, tuple[str, bytes, str]]:
    name, data = image_file_bytes(image)
    return ("image", (name if name != "image" else f"image-{index}", data, "application/octet-stream"))


def _encode_request(images: Sequence[ImageInput], options: dict[str, Any], as_numpy: bool) -> dict[str, Any]:
    """httpx keyword arguments of one /encode call: multipart ``image`` parts, options as query parameters."""
    params = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in options.items() if v is not None}
    return {
        "files": [_image_part(image, i) for i, image in enumerate(images)],
        "params": params,
        "headers": {"accept": NPY if as_numpy else "application/json"},
    }


def _json_or_array(response: httpx.Response, as_numpy: bool) -> dict[str, Any] | np.ndarray:
    _raise_for_error(response)
    if as_numpy:
        return np.load(io.BytesIO(response.content), allow_pickle=False)
    return response.json()


def decode_body(
    indices: Any = None, tokens: Any = None, grid: Sequence[int] | None = None, offset: int = 0,
    bos: int | None = None, eos: int | None = None, format: str = "png",
    crop_to: dict[str, int] | list[dict[str, int]] | None = None, layout: str | None = None,
    repair: str | None = None, pad: str | int | None = None, extract: bool | None = None,
) -> dict[str, Any]:
    """The JSON body of one /decode call (None fields left out). ``layout``/``repair``/``pad``/``extract`` read
    ``tokens`` in a token layout (see /docs)."""
    body = {"indices": indices, "tokens": tokens, "grid": list(grid) if grid else None, "offset": offset,
            "bos": bos, "eos": eos, "format": format, "crop_to": crop_to, "layout": layout, "repair": repair,
            "pad": pad, "extract": extract}
    return {k: v for k, v in body.items() if v is not None}


def _decode_result(response: httpx.Response, output: str = "bytes") -> Any:
    """One grid: the image; several: a list. ``output``: ``bytes`` (image files), ``pil`` or ``numpy``
    ((H, W, 3) uint8 arrays)."""
    _raise_for_error(response)
    if response.headers.get("content-type", "").startswith("application/json"):
        files: bytes | list[bytes] = [base64.b64decode(item["image"]) for item in response.json()["images"]]
    else:
        files = response.content
    if output == "bytes":
        return files
    from PIL import Image

    def convert(data: bytes) -> Any:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image if output == "pil" else np.asarray(image.convert("RGB"))

    return convert(files) if isinstance(files, bytes) else [convert(data) for data in files]


def _check_output(output: str) -> None:
    if output not in ("bytes", "pil", "numpy"):
        raise ValueError(f"output must be 'bytes', 'pil' or 'numpy', got {output!r}")


def _jsonable(body: dict[str, Any]) -> dict[str, Any]:
    """NumPy grids (``indices`` / ``tokens`` as arrays) as plain lists for the JSON body."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in body.items()}


def _codebook_request(vectors: bool, as_numpy: bool) -> dict[str, Any]:
    return {"params": {"include": "vectors"} if vectors else {}, "headers": {"accept": NPY} if as_numpy else {}}


def _allowed_body(prefix: Sequence[int], grid: Sequence[int] | None) -> dict[str, Any]:
    ids = prefix.tolist() if isinstance(prefix, np.ndarray) else [int(i) for i in prefix]
    return {"prefix": ids, **({"grid": [int(grid[0]), int(grid[1])]} if grid is not None else {})}


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class VQTokClient:
    """Blocking client. ``encode`` / ``decode`` / ``codebook`` mirror the endpoints."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def encode(self, images: Sequence[ImageInput], *, as_numpy: bool = False, **options: Any
               ) -> dict[str, Any] | np.ndarray:
        """Images (paths, file bytes, PIL images or uint8 arrays) -> the /encode JSON, or an (N, h, w) array
        with ``as_numpy``.

        ``options``: size, fit, offset, bos, eos, tokens, layout (see /docs).
        """
        return _json_or_array(self._http.post("/encode", **_encode_request(images, options, as_numpy)), as_numpy)

    def decode(self, *, output: str = "bytes", **body: Any) -> Any:
        """``decode_body`` arguments -> the image (one grid) or a list (several), as file bytes,
        Pillow images (``output="pil"``) or (H, W, 3) uint8 arrays (``output="numpy"``)."""
        _check_output(output)
        return _decode_result(self._http.post("/decode", json=decode_body(**_jsonable(body))), output)

    def codebook(self, vectors: bool = False, as_numpy: bool = False) -> dict[str, Any] | np.ndarray:
        response = self._http.get("/codebook", **_codebook_request(vectors, as_numpy))
        return _json_or_array(response, as_numpy)

    def layouts(self) -> dict[str, Any]:
        """``GET /layouts``: ``{"default": name, "layouts": {name: spec}}``."""
        return _json_or_array(self._http.get("/layouts"), False)  # type: ignore[return-value]

    def allowed(self, layout: str, prefix: Sequence[int], grid: Sequence[int] | None = None) -> list[int]:
        """``POST /layouts/{layout}/allowed``: the ids that may follow ``prefix``."""
        response = self._http.post(f"/layouts/{layout}/allowed", json=_allowed_body(prefix, grid))
        return _json_or_array(response, False)["allowed"]  # type: ignore[index]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VQTokClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVQTokClient:
    """The same client for asyncio code."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout, transport=transport)

    async def encode(self, images: Sequence[ImageInput], *, as_numpy: bool = False, **options: Any
                     ) -> dict[str, Any] | np.ndarray:
        response = await self._http.post("/encode", **_encode_request(images, options, as_numpy))
        return _json_or_array(response, as_numpy)

    async def decode(self, *, output: str = "bytes", **body: Any) -> Any:
        _check_output(output)
        return _decode_result(await self._http.post("/decode", json=decode_body(**_jsonable(body))), output)

    async def codebook(self, vectors: bool = False, as_numpy: bool = False) -> dict[str, Any] | np.ndarray:
        response = await self._http.get("/codebook", **_codebook_request(vectors, as_numpy))
        return _json_or_array(response, as_numpy)

    async def layouts(self) -> dict[str, Any]:
        return _json_or_array(await self._http.get("/layouts"), False)  # type: ignore[return-value]

    async def allowed(self, layout: str, prefix: Sequence[int], grid: Sequence[int] | None = None) -> list[int]:
        response = await self._http.post(f"/layouts/{layout}/allowed", json=_allowed_body(prefix, grid))
        return _json_or_array(response, False)["allowed"]  # type: ignore[index]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncVQTokClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------------------------- CLI

@dataclass(frozen=True)
class ClientConfig:
    """Where the service is, for ``vqtok encode`` and ``vqtok decode`` (env ``VQTOK_URL``, ``VQTOK_API_KEY``,
    ``VQTOK_TIMEOUT``: the service reads ``VQTOK_API_KEY`` too).

    Attributes:
      url: service URL.
      api_key: bearer key.
      timeout: seconds per request.
    """

    url: str = DEFAULT_URL
    api_key: str | None = None
    timeout: float = 120.0


@dataclass(frozen=True)
class EncodeOptions:
    """The options of ``vqtok encode`` (env ``VQTOK_ENCODE_*``).

    Attributes:
      size: target size 'N' or 'WxH'.
      fit: how to reach the size (the service's default: pad).
      offset: added to every token (LLM vocabulary placement).
      bos: begin-of-image token.
      eos: end-of-image token.
      tokens: include the flat token sequence.
      layout: token layout of the tokens (a preset or a layout the server loaded; GET /layouts).
      layout_file: a layout JSON file applied here, to the grids the server answers (the server need not
        know it): the answer's ``tokens`` and ``layout`` are this layout's.
      output: write the JSON answer here instead of printing grids.
    """

    size: str | None = None
    fit: Literal["pad", "crop", "resize", "none"] | None = None
    offset: int | None = None
    bos: int | None = None
    eos: int | None = None
    tokens: bool = False
    layout: str | None = None
    layout_file: Path | None = None
    output: Path | None = None


@dataclass(frozen=True)
class DecodeOptions:
    """The options of ``vqtok decode`` (env ``VQTOK_DECODE_*``).

    Attributes:
      output: image file; several grids write NAME-0.png, NAME-1.png, ...
      format: default: from the output suffix, else png.
      layout: token layout of the tokens (default: the file's, else the server's).
      repair: strict (default: any deviation from the layout is an error) or lenient (repair and report).
    """

    output: Path
    format: Literal["png", "jpeg", "webp"] | None = None
    layout: str | None = None
    repair: Literal["strict", "lenient"] | None = None


CLIENT_ENV_PREFIX = "VQTOK_"
ENCODE_ENV_PREFIX = "VQTOK_ENCODE_"
DECODE_ENV_PREFIX = "VQTOK_DECODE_"


def _connection_args(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ClientConfig, CLIENT_ENV_PREFIX, title="service connection (env VQTOK_*)")


def _run(command: str, action: Any) -> int:
    """Run ``action()``; print a server or connection error as one line and return 1."""
    try:
        action()
    except ServiceClientError as exc:
        print(f"vqtok {command}: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"vqtok {command}: cannot reach the service: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"vqtok {command}: {exc}", file=sys.stderr)
        return 1
    return 0


def build_encode_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqtok encode", description="Encode images to token grids.")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    add_config_arguments(parser, EncodeOptions, ENCODE_ENV_PREFIX, title="encoding (env VQTOK_ENCODE_*)",
                         short={"output": "-o"})
    _connection_args(parser)
    return parser


def build_decode_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqtok decode", description="Decode token grids to images.")
    parser.add_argument("tokens_file", type=Path, help="JSON from 'vqtok encode', or {indices} / {tokens, grid}")
    add_config_arguments(parser, DecodeOptions, DECODE_ENV_PREFIX, title="decoding (env VQTOK_DECODE_*)",
                         short={"output": "-o"})
    _connection_args(parser)
    return parser


def encode_main(argv: list[str]) -> int:
    """``vqtok encode IMAGE... [-o out.json]``: print each grid, or write the service's JSON."""
    args = build_encode_parser().parse_args(argv)
    connection, opts = config_from_args(ClientConfig, args), config_from_args(EncodeOptions, args)

    def action() -> None:
        options = {"size": opts.size, "fit": opts.fit, "offset": opts.offset, "bos": opts.bos, "eos": opts.eos,
                   "tokens": True if opts.tokens else None, "layout": opts.layout}
        server_side = opts.layout or opts.offset or opts.bos is not None or opts.eos is not None
        if opts.layout_file is not None and server_side:
            raise ValueError("--layout-file lays the tokens out here: give it without --layout, --offset, --bos, --eos")
        with VQTokClient(connection.url, connection.api_key, connection.timeout) as client:
            result = client.encode(args.images, **options)
        assert isinstance(result, dict)
        if opts.layout_file is not None:
            apply_layout_file(result, opts.layout_file)
        if opts.output is not None:
            opts.output.write_text(json.dumps(result) + "\n", encoding="utf-8")
            print(f"wrote {len(result['images'])} grid(s) to {opts.output}")
            return
        for path, image in zip(args.images, result["images"], strict=True):
            h, w = image["grid"]
            print(f"{path}: grid {h}x{w}, content {image['content_size']['width']}x{image['content_size']['height']}")
            for row in image["indices"]:
                print(" ".join(str(v) for v in row))
            if image.get("tokens") is not None:
                label = f"tokens ({result['layout']})" if result.get("layout") else "tokens"
                print(f"{label}:", " ".join(str(v) for v in image["tokens"]))

    return _run("encode", action)


def apply_layout_file(result: dict[str, Any], path: Path) -> None:
    """Lay out every grid of an /encode answer with the layout in ``path`` (checked against the model's K)."""
    from vqtok.model.layouts import Layout  # pydantic and NumPy only: the client stays free of torch

    layout = Layout.from_file(path)
    k = int(result["model"]["num_embeddings"])
    if layout.codebook_size != k:
        raise ValueError(f"{path}: layout {layout.name!r} is for {layout.codebook_size} codes, the model has {k}")
    for image in result["images"]:
        image["tokens"] = layout.to_tokens(np.asarray(image["indices"], dtype=np.int64))
    result["layout"] = layout.name


def decode_requests(document: dict[str, Any]) -> dict[str, Any]:
    """``decode_body`` arguments from a ``vqtok encode`` JSON file, or an ``{"indices"}`` / ``{"tokens", "grid"}``."""
    if "images" in document:  # what /encode answered: decode every grid, cropped back to its content
        images = document["images"]
        if not isinstance(images, list) or not images:
            raise ValueError("'images' holds no encoded images")
        if len(images) == 1:
            return {"indices": images[0]["indices"], "crop_to": images[0].get("content_size")}
        return {"indices": [image["indices"] for image in images],
                "crop_to": [image.get("content_size") for image in images]}
    if "indices" in document or "tokens" in document:
        keys = ("indices", "tokens", "grid", "offset", "bos", "eos", "crop_to", "format", "layout", "repair", "pad",
                "extract")
        return {k: document[k] for k in keys if k in document}
    raise ValueError("expected the JSON of 'vqtok encode', or an object with 'indices' or 'tokens' and 'grid'")


def decode_main(argv: list[str]) -> int:
    """``vqtok decode TOKENS.json -o out.png``: decode grids back to image files."""
    args = build_decode_parser().parse_args(argv)
    connection, opts = config_from_args(ClientConfig, args), config_from_args(DecodeOptions, args)

    def action() -> None:
        request = decode_requests(json.loads(args.tokens_file.read_text(encoding="utf-8")))
        if "tokens" in request:  # the layout options read tokens ('indices' are raw codes, in no layout)
            request.update({k: v for k, v in (("layout", opts.layout), ("repair", opts.repair)) if v is not None})
        suffix = opts.output.suffix.lower().lstrip(".")
        fmt = opts.format or request.pop("format", None) or {"jpg": "jpeg"}.get(suffix, suffix)
        request["format"] = fmt if fmt in ("png", "jpeg", "webp") else "png"
        with VQTokClient(connection.url, connection.api_key, connection.timeout) as client:
            result = client.decode(**request)
        if isinstance(result, bytes):
            opts.output.write_bytes(result)
            print(f"wrote {opts.output}")
            return
        for i, data in enumerate(result):
            path = opts.output.with_name(f"{opts.output.stem}-{i}{opts.output.suffix}")
            path.write_bytes(data)
            print(f"wrote {path}")

    return _run("decode", action)
