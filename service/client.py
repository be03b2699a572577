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
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np

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
    crop_to: dict[str, int] | list[dict[str, int]] | None = None,
) -> dict[str, Any]:
    """The JSON body of one /decode call (None fields left out)."""
    body = {"indices": indices, "tokens": tokens, "grid": list(grid) if grid else None, "offset": offset,
            "bos": bos, "eos": eos, "format": format, "crop_to": crop_to}
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

        ``options``: size, fit, offset, bos, eos, tokens (see /docs).
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

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncVQTokClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------------------------- CLI

def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("VQTOK_URL", DEFAULT_URL),
                        help=f"service URL [env VQTOK_URL, default {DEFAULT_URL}]")
    parser.add_argument("--api-key", default=os.environ.get("VQTOK_API_KEY"), help="bearer key [env VQTOK_API_KEY]")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")


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


def encode_main(argv: list[str]) -> int:
    """``vqtok encode IMAGE... [-o out.json]``: print each grid, or write the service's JSON."""
    parser = argparse.ArgumentParser(prog="vqtok encode", description="Encode images to token grids.")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--size", help="target size 'N' or 'WxH'")
    parser.add_argument("--fit", choices=["pad", "crop", "resize", "none"], help="how to reach the size (pad)")
    parser.add_argument("--offset", type=int, help="added to every token (LLM vocabulary placement)")
    parser.add_argument("--bos", type=int, help="begin-of-image token")
    parser.add_argument("--eos", type=int, help="end-of-image token")
    parser.add_argument("--tokens", action="store_true", help="include the flat token sequence")
    parser.add_argument("-o", "--output", type=Path, help="write the JSON answer here instead of printing grids")
    _connection_args(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        options = {"size": args.size, "fit": args.fit, "offset": args.offset, "bos": args.bos, "eos": args.eos,
                   "tokens": True if args.tokens else None}
        with VQTokClient(args.url, args.api_key, args.timeout) as client:
            result = client.encode(args.images, **options)
        assert isinstance(result, dict)
        if args.output is not None:
            args.output.write_text(json.dumps(result) + "\n", encoding="utf-8")
            print(f"wrote {len(result['images'])} grid(s) to {args.output}")
            return
        for path, image in zip(args.images, result["images"], strict=True):
            h, w = image["grid"]
            print(f"{path}: grid {h}x{w}, content {image['content_size']['width']}x{image['content_size']['height']}")
            for row in image["indices"]:
                print(" ".join(str(v) for v in row))
            if image.get("tokens") is not None:
                print("tokens:", " ".join(str(v) for v in image["tokens"]))

    return _run("encode", action)


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
        keys = ("indices", "tokens", "grid", "offset", "bos", "eos", "crop_to", "format")
        return {k: document[k] for k in keys if k in document}
    raise ValueError("expected the JSON of 'vqtok encode', or an object with 'indices' or 'tokens' and 'grid'")


def decode_main(argv: list[str]) -> int:
    """``vqtok decode TOKENS.json -o out.png``: decode grids back to image files."""
    parser = argparse.ArgumentParser(prog="vqtok decode", description="Decode token grids to images.")
    parser.add_argument("tokens_file", type=Path, help="JSON from 'vqtok encode', or {indices} / {tokens, grid}")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="image file; several grids write NAME-0.png, NAME-1.png, ...")
    parser.add_argument("--format", choices=["png", "jpeg", "webp"], help="default: from the output suffix, else png")
    _connection_args(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        request = decode_requests(json.loads(args.tokens_file.read_text(encoding="utf-8")))
        suffix = args.output.suffix.lower().lstrip(".")
        fmt = args.format or request.pop("format", None) or {"jpg": "jpeg"}.get(suffix, suffix)
        request["format"] = fmt if fmt in ("png", "jpeg", "webp") else "png"
        with VQTokClient(args.url, args.api_key, args.timeout) as client:
            result = client.decode(**request)
        if isinstance(result, bytes):
            args.output.write_bytes(result)
            print(f"wrote {args.output}")
            return
        for i, data in enumerate(result):
            path = args.output.with_name(f"{args.output.stem}-{i}{args.output.suffix}")
            path.write_bytes(data)
            print(f"wrote {path}")

    return _run("decode", action)
