"""Image bytes <-> pixel arrays: format sniffing, limits read from headers, bounded decoding, fitting, encoding.

Pixel arrays here are ``uint8`` numpy arrays of shape (H, W, 3), RGB. Nothing in this module knows
about the model beyond its downsample factor ``f``.

Memory is bounded before it is spent: ``probe_image`` reads only an image's header (its size and
format); the caller checks that size against the limits; ``load_fitted`` then decodes under a
``DecodeBudget`` reservation (JPEG at a reduced scale when the fit allows it) and materialises only
the region the fit keeps, at the size the target needs.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import threading
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vqtok.model.data import to_rgb_array
from vqtok.service.errors import BadRequest, InvalidRequest, PayloadTooLarge, QueueFull, UnsupportedMediaType

FitMode = Literal["pad", "crop", "resize", "none"]
OutputFormat = Literal["png", "jpeg", "webp"]

# Magic bytes of the formats /encode reads -> Pillow format name.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_CONTENT_TYPES = (
    "image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/tiff",
)
_MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_SIZE_PATTERN = re.compile(r"^\s*(\d{1,6})\s*(?:[xX×]\s*(\d{1,6}))?\s*$")

# The longest side each output format can store (WebP: 14-bit sizes; JPEG: 16-bit; PNG: 31-bit, so
# in practice the service's max_pixels bounds it first).
MAX_SIDE: dict[str, int] = {"png": 2**31 - 1, "jpeg": 65_535, "webp": 16_383}
# A JPEG with a target size is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves at
# least this many times the pixels the fit needs, so the last step is a real antialiased resample (the
# same margin Pillow's ``thumbnail`` keeps).
JPEG_DRAFT_MARGIN = 2.0
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Size:
    """An image size in pixels."""

    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding a pixel."""

    format: str  # Pillow's name: PNG, JPEG, WEBP, GIF, BMP, TIFF
    size: Size  # as stored: an EXIF orientation may swap width and height once decoded


@dataclass(frozen=True)
class FitPlan:
    """How ``fit`` brings an image of size ``original`` to the model's input, decided from sizes alone.

    Attributes:
      original: the image's size (after its EXIF orientation).
      box: the region of the original that is kept, in its pixel coordinates (left, top, right, bottom).
      content: the size that region is resampled to.
      encoded: ``content`` padded at the bottom and right (``fit=pad``) to multiples of the factor.
    """

    original: Size
    box: tuple[float, float, float, float]
    content: Size
    encoded: Size


@dataclass(frozen=True)
class FittedImage:
    """An image ready for the model, and where it came from.

    Attributes:
      pixels: (H, W, 3) uint8, H and W multiples of the downsample factor.
      original: the uploaded image's size.
      content: the top-left region of ``pixels`` that holds the picture (smaller than ``pixels`` only
        when ``fit=pad`` added a border): pass it to ``/decode`` as ``crop_to``.
    """

    pixels: np.ndarray
    original: Size
    content: Size

    @property
    def encoded(self) -> Size:
        return Size(width=self.pixels.shape[1], height=self.pixels.shape[0])


def media_type(fmt: OutputFormat) -> str:
    return _MEDIA_TYPES[fmt]


def parse_size(text: str) -> Size:
    """``"256"`` -> 256x256, ``"320x240"`` -> width 320, height 240. ``InvalidRequest`` otherwise."""
    match = _SIZE_PATTERN.match(text)
    if not match:
        raise InvalidRequest(f"size {text!r} is not 'N' or 'WxH' (e.g. '256' or '320x240')")
    width = int(match.group(1))
    height = int(match.group(2) or match.group(1))
    if width < 1 or height < 1:
        raise InvalidRequest(f"size {text!r} must be positive")
    return Size(width=width, height=height)


def sniff_format(data: bytes) -> str | None:
    """The image format named by ``data``'s magic bytes, or None if it is no image format we read."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------------------------------- limits


def grid_of(size: Size, downsample: int) -> tuple[int, int]:
    """(h, w) of the token grid an image of ``size`` encodes to."""
    return size.height // downsample, size.width // downsample


def encoded_size(original: Size, target: Size | None, fit: FitMode, downsample: int) -> Size:
    """The size ``fit`` brings an ``original``-sized image to: ``target`` when given, else pad rounds
    each side up to a multiple of ``downsample``, crop rounds down, resize rounds to the nearest, none keeps it.
    Swapping width and height of ``original`` swaps the answer's, so its pixel and token counts can be
    taken from a header before any EXIF orientation is known."""
    f = downsample
    if target is not None:
        return target
    if fit == "pad":
        return Size(width=round_up(original.width, f), height=round_up(original.height, f))
    if fit == "crop":
        return Size(width=max(f, original.width // f * f), height=max(f, original.height // f * f))
    if fit == "resize":
        return Size(width=max(f, round(original.width / f) * f), height=max(f, round(original.height / f) * f))
    return original


def check_target_size(target: Size, downsample: int, max_tokens: int, max_pixels: int, name: str = "size") -> None:
    """``InvalidRequest`` unless a requested ``size`` (``name`` says which setting gave it) is a multiple of
    the downsample factor, encodes to at most ``max_tokens`` tokens and has at most ``max_pixels`` pixels.

    Needs nothing but the numbers: call it before reading any image."""
    f = downsample
    if target.width % f or target.height % f:
        raise InvalidRequest(
            f"{name} {target} is not a multiple of the downsample factor {f}; "
            f"try {round_up(target.width, f)}x{round_up(target.height, f)}"
        )
    h, w = grid_of(target, f)
    if h * w > max_tokens:
        raise InvalidRequest(
            f"{name} {target} encodes to a {h}x{w} = {h * w} token grid, over the limit of {max_tokens} tokens "
            f"per grid; pass a smaller size"
        )
    if target.pixels > max_pixels:
        raise InvalidRequest(
            f"{name} {target} = {target.pixels} pixels is over the limit of {max_pixels} pixels per image; "
            f"pass a smaller size"
        )


def check_image_grid(header: ImageHeader, target: Size | None, fit: FitMode, downsample: int, max_tokens: int,
                     where: str) -> int:
    """The number of tokens the image of ``header`` encodes to under ``fit``; ``InvalidRequest`` over
    ``max_tokens``, or when ``fit=none`` cannot take it. Decides from the header alone, before any pixel is
    decoded (``plan_fit`` checks again once the EXIF orientation is known)."""
    size, f = header.size, downsample
    if fit == "none" and (size.width % f or size.height % f):
        raise InvalidRequest(
            f"{where}: {size} is not a multiple of the downsample factor {f} "
            f"and fit=none does not resize; use fit=pad, crop or resize"
        )
    if fit == "none" and target is not None and target not in (size, Size(size.height, size.width)):
        raise InvalidRequest(f"{where}: fit=none keeps the image at {size}, which differs from size {target}")
    encoded = encoded_size(header.size, target, fit, downsample)
    h, w = grid_of(encoded, downsample)
    if h * w > max_tokens:
        raise InvalidRequest(
            f"{where}: a {header.size} image encodes (fit={fit}) to a {h}x{w} = {h * w} token grid, over the "
            f"limit of {max_tokens} tokens per grid; pass a smaller size (e.g. size=256&fit=crop)"
        )
    return h * w


# ---------------------------------------------------------------------------------------------- reading


def _webp_size(data: bytes) -> Size | None:
    """A WebP's canvas size from its first chunk (VP8X, VP8L or VP8), or None when that is not readable.

    Pillow's WebP reader creates libwebp's decoder, and with it the canvas buffers, when it opens a file;
    this reads the size without it."""
    if len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        width, height = 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    else:
        return None
    return Size(width, height) if width and height else None


@contextlib.contextmanager
def _pillow_errors(fmt: str, max_pixels: int, where: str) -> Iterator[None]:
    """Pillow's failures as service errors: 413 for its bomb guard, 400 for a corrupt file (its magic
    bytes name a supported format, so the media type is fine and the content is broken)."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{where}: image over the pixel limit of {max_pixels}; Pillow refused it: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadRequest(f"{where}: truncated or corrupt {fmt} image (its header cannot be read)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadRequest(f"{where}: truncated or corrupt {fmt} image ({exc})") from exc


def probe_image(data: bytes, max_pixels: int, where: str) -> ImageHeader:
    """An image's format and size from its header, refusing bombs before any pixel is decoded.

    ``where`` names the image in messages (``"images[2]"``). Raises ``UnsupportedMediaType`` for
    bytes that are no supported image, ``PayloadTooLarge`` past ``max_pixels`` and ``BadRequest``
    for a header Pillow cannot read.
    """
    if not data:
        raise BadRequest(f"{where}: empty image")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaType(
            f"{where}: not an image in a supported format ({', '.join(SUPPORTED_FORMATS)}); "
            f"first bytes {data[:8]!r}"
        )
    size = _webp_size(data) if fmt == "WEBP" else None
    if size is None:
        with _pillow_errors(fmt, max_pixels, where), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:  # reads the header only
                size = Size(*image.size)
    if size.pixels > max_pixels:
        raise PayloadTooLarge(f"{where}: {size} = {size.pixels} pixels is over the limit of {max_pixels}")
    return ImageHeader(format=fmt, size=size)


class BudgetBusy(Exception):
    """A non-blocking reservation of the ``DecodeBudget`` could not be granted at once (not an HTTP error:
    the caller decodes on a worker thread instead, where it may wait)."""


class DecodeBudget:
    """A process-wide bound on the pixels being decoded at once (``max_decode_pixels``).

    Decoding runs on threadpool threads. Each image reserves its pixel count (as decoded: after a JPEG
    draft) before its pixels are decoded and gives it back once its fitted copy exists, so the decoded
    buffers of all requests together stay under ``capacity`` pixels (times a few bytes a pixel: the
    README's memory table). Reservations are served first come, first served, so a large image is not
    starved by a stream of small ones; one that is not served within ``timeout_s`` raises ``QueueFull``
    (429 with Retry-After): the service is busy, another replica or a later retry can take it.
    """

    def __init__(self, capacity: int, timeout_s: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.timeout_s = timeout_s
        self._used = 0
        self._waiting: deque[object] = deque()
        self._condition = threading.Condition()

    @property
    def in_use(self) -> int:
        """Pixels reserved right now."""
        with self._condition:
            return self._used

    @contextlib.contextmanager
    def reserve(self, pixels: int, where: str, *, wait: bool = True) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block (blocking; call it from a worker thread).

        ``wait=False`` never blocks (for the event loop): the pixels are granted only when nobody is
        waiting and they fit now, else ``BudgetBusy`` is raised and nothing is held."""
        want = max(0, min(pixels, self.capacity))  # callers keep images under max_pixels <= capacity
        with self._condition:
            if not wait:
                if self._waiting or self._used + want > self.capacity:  # never ahead of a waiting reservation
                    raise BudgetBusy(where)
                granted = True
            else:
                ticket = object()
                self._waiting.append(ticket)
                try:
                    granted = self._condition.wait_for(
                        lambda: self._waiting[0] is ticket and self._used + want <= self.capacity,
                        timeout=self.timeout_s,
                    )
                finally:
                    self._waiting.remove(ticket)
                    self._condition.notify_all()
            if not granted:
                raise QueueFull(
                    f"{where}: busy: images of {self._used} pixels are being decoded, this one needs {pixels} and "
                    f"the limit is {self.capacity} pixels at once (max_decode_pixels); waited {self.timeout_s:g} s "
                    f"(decode_wait_s); retry shortly",
                    headers={"Retry-After": "1"},
                )
            self._used += want
        try:
            yield
        finally:
            with self._condition:
                self._used -= want
                self._condition.notify_all()


# ---------------------------------------------------------------------------------------------- fitting


def plan_fit(original: Size, target: Size | None, fit: FitMode, downsample: int, where: str) -> FitPlan:
    """How ``fit`` brings an ``original``-sized image to a size the model takes (multiples of ``downsample``).

    - ``pad``: without ``target``, pad bottom/right to the next multiple; with it, scale to fit inside
      ``target`` keeping the aspect ratio, then pad to ``target``. Padding replicates edge pixels.
    - ``crop``: the centred region of ``target``'s aspect ratio, scaled to ``target`` (``target``
      defaults to the image size rounded down to a multiple).
    - ``resize``: stretch to ``target`` (default: the image size rounded to the nearest multiple).
    - ``none``: use the image as it is; its size must already be a multiple (and equal ``target``).

    Only the kept region is ever resampled, and only to the size the answer needs: no step makes an
    image larger than ``target`` (or, without one, than ``original`` rounded to a multiple).
    """
    f = downsample
    if target is not None and (target.width % f or target.height % f):
        raise InvalidRequest(
            f"size {target} is not a multiple of the downsample factor {f}; "
            f"try {round_up(target.width, f)}x{round_up(target.height, f)}"
        )
    full = (0.0, 0.0, float(original.width), float(original.height))
    if fit == "none":
        if original.width % f or original.height % f:
            raise InvalidRequest(
                f"{where}: {original} is not a multiple of the downsample factor {f} "
                f"and fit=none does not resize; use fit=pad, crop or resize"
            )
        if target is not None and target != original:
            raise InvalidRequest(f"{where}: fit=none keeps the image at {original}, which differs from size {target}")
        return FitPlan(original=original, box=full, content=original, encoded=original)
    encoded = encoded_size(original, target, fit, f)
    if fit == "pad":
        if target is None:
            return FitPlan(original=original, box=full, content=original, encoded=encoded)
        scale = min(target.width / original.width, target.height / original.height)
        content = Size(
            width=min(target.width, max(1, round(original.width * scale))),
            height=min(target.height, max(1, round(original.height * scale))),
        )
        return FitPlan(original=original, box=full, content=content, encoded=encoded)
    if fit == "crop":
        scale = max(encoded.width / original.width, encoded.height / original.height)
        if scale == 1.0:  # a plain crop: keep whole pixels, no resampling
            left, top = (original.width - encoded.width) // 2, (original.height - encoded.height) // 2
            box = (float(left), float(top), float(left + encoded.width), float(top + encoded.height))
        else:  # the region that, scaled by `scale`, covers the target exactly
            width = min(float(original.width), encoded.width / scale)
            height = min(float(original.height), encoded.height / scale)
            left, top = (original.width - width) / 2, (original.height - height) / 2
            box = (left, top, left + width, top + height)
        return FitPlan(original=original, box=box, content=encoded, encoded=encoded)
    return FitPlan(original=original, box=full, content=encoded, encoded=encoded)  # resize


def _pad_edges(pixels: np.ndarray, size: Size) -> np.ndarray:
    """Grow (H, W, 3) to (size.height, size.width, 3) at the bottom and right by repeating the edge pixels.

    Edge replication keeps the border close to the picture, so the tokens there stay like the
    picture's own and the decoder does not smear a black band back into the cropped result.
    """
    return np.pad(pixels, ((0, size.height - pixels.shape[0]), (0, size.width - pixels.shape[1]), (0, 0)), mode="edge")


def apply_fit(image: Image.Image, plan: FitPlan, scale: float = 1.0) -> np.ndarray:
    """Carry out ``plan`` on an RGB ``image``: the original at ``scale`` (below 1 when a JPEG draft decoded
    it smaller). Returns (H, W, 3) uint8 of ``plan.encoded``'s size, a copy owned by the caller."""
    box = tuple(min(v * scale, limit) for v, limit in zip(plan.box, (*image.size, *image.size), strict=True))
    content = plan.content
    if box == (0, 0, *image.size) and image.size == (content.width, content.height):
        region = image
    elif all(float(v).is_integer() for v in box) and (box[2] - box[0], box[3] - box[1]) == (
            content.width, content.height):
        region = image.crop(tuple(int(v) for v in box))
    else:
        region = image.resize((content.width, content.height), Image.Resampling.BICUBIC, box=box)
    pixels = np.array(region, dtype=np.uint8)
    if plan.encoded != content:
        pixels = _pad_edges(pixels, plan.encoded)
    return pixels


def fit_image(pixels: np.ndarray, target: Size | None, fit: FitMode, downsample: int, where: str) -> FittedImage:
    """Fit an in-memory (H, W, 3) uint8 image (see ``plan_fit``)."""
    plan = plan_fit(Size(pixels.shape[1], pixels.shape[0]), target, fit, downsample, where)
    return FittedImage(pixels=apply_fit(Image.fromarray(pixels), plan), original=plan.original, content=plan.content)


def _draft_jpeg(image: Image.Image, stored: Size, target: Size, fit: FitMode, downsample: int, where: str) -> float:
    """Ask the JPEG decoder for the smallest DCT scale that still leaves ``JPEG_DRAFT_MARGIN`` times what
    the fit needs. Returns the scale the image will decode at (1.0 when no reduction applies)."""
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)  # a JPEG's EXIF is in its header
    transposed = orientation in _TRANSPOSING_ORIENTATIONS
    original = Size(stored.height, stored.width) if transposed else stored
    plan = plan_fit(original, target, fit, downsample, where)
    left, top, right, bottom = plan.box
    needed = JPEG_DRAFT_MARGIN * max(plan.content.width / (right - left), plan.content.height / (bottom - top))
    if needed >= 0.5:  # no DCT scale below 1/2 would keep enough pixels
        return 1.0
    want = (max(1, math.ceil(stored.width * needed)), max(1, math.ceil(stored.height * needed)))
    drafted = image.draft("RGB", want)
    if drafted is None:
        return 1.0
    return drafted[1][2] / stored.width  # draft's box: the full image in the drafted pixels


# What decoding one pixel costs, relative to an 8-bit RGB one (about 4.3 bytes with Pillow's buffers),
# measured on a 4000x3000 image each (README, "Memory and time are bounded"): the budget counts
# RGB-pixel equivalents, so its memory bound holds whatever the formats being decoded.
_DECODE_COST_WEBP = 3.7  # libwebp's canvases: ~16 bytes a pixel
_DECODE_COST_ALPHA = 2.8  # RGBA/LA/transparent palettes, composited on white: ~12 bytes
_DECODE_COST_HIGH_DEPTH = 6.0  # 16-bit and float greyscale, rescaled in float64: ~26 bytes
_DECODE_COST_GREY = 1.25  # greyscale, palette, GIF: ~5.3 bytes


def decode_cost(fmt: str, mode: str | None, transparent: bool = False) -> float:
    """RGB-pixel equivalents one pixel of this image costs to decode (``mode`` None: not known yet)."""
    if fmt == "WEBP":
        return _DECODE_COST_WEBP
    if mode is None or mode in ("RGB", "YCbCr", "CMYK"):
        return 1.0
    if mode.startswith("I") or mode == "F":
        return _DECODE_COST_HIGH_DEPTH
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or transparent:
        return _DECODE_COST_ALPHA
    return _DECODE_COST_GREY


def load_fitted(data: bytes, header: ImageHeader, target: Size | None, fit: FitMode, downsample: int,
                budget: DecodeBudget, max_pixels: int, where: str, *, wait: bool = True) -> FittedImage:
    """Decode the image ``probe_image`` read the header of, and fit it (see ``plan_fit``).

    A JPEG with a ``target`` decodes at a reduced DCT scale when that keeps enough pixels. The decoded
    pixels, weighted by what a pixel of that format and mode costs (``decode_cost``), are reserved in
    ``budget`` before decoding, and given back once the fitted copy (the only array that leaves)
    exists. Pillow allocates a WebP's canvases when it opens the file, so a WebP reserves before it
    is opened. Errors as ``probe_image``, plus ``QueueFull`` when the budget stays full; with
    ``wait=False`` (the event loop), ``BudgetBusy`` when the budget cannot be granted at once.
    """
    fmt = header.format
    with _pillow_errors(fmt, max_pixels, where):
        if fmt == "WEBP":
            with budget.reserve(math.ceil(header.size.pixels * decode_cost(fmt, None)), where, wait=wait), \
                    Image.open(io.BytesIO(data), formats=[fmt]) as image:
                return _decode_and_fit(image, header, 1.0, target, fit, downsample, where)
        image = Image.open(io.BytesIO(data), formats=[fmt])
        try:
            scale = 1.0
            if fmt == "JPEG" and target is not None and fit != "none":
                scale = _draft_jpeg(image, header.size, target, fit, downsample, where)
            cost = decode_cost(fmt, image.mode, transparent="transparency" in image.info)
            with budget.reserve(math.ceil(image.size[0] * image.size[1] * cost), where, wait=wait):
                fitted = _decode_and_fit(image, header, scale, target, fit, downsample, where)
                image.close()  # the decoded buffer goes before the reservation does
        finally:
            image.close()
    return fitted


def _decode_and_fit(image: Image.Image, header: ImageHeader, scale: float, target: Size | None, fit: FitMode,
                    downsample: int, where: str) -> FittedImage:
    """Decode (inside the caller's budget reservation), orient, convert to RGB and fit."""
    image.load()
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    ImageOps.exif_transpose(image, in_place=True)
    if scale == 1.0:
        original = Size(*image.size)
    else:
        stored = header.size
        original = Size(stored.height, stored.width) if orientation in _TRANSPOSING_ORIENTATIONS else stored
    plan = plan_fit(original, target, fit, downsample, where)
    pixels = apply_fit(_to_rgb_image(image), plan, scale)
    return FittedImage(pixels=pixels, original=plan.original, content=plan.content)


def _to_rgb_image(image: Image.Image) -> Image.Image:
    """``to_rgb_array``'s conversion (the one training uses), the same Pillow operations, kept a Pillow image.

    RGB is used as it is; alpha is composited on white and other 8-bit modes (L, P, CMYK, 1, ...) go
    through ``convert("RGB")``, as ``to_rgb_array`` does, minus its numpy copies and with each
    intermediate dropped as soon as it is used (``tests/test_service_limits.py`` holds the two equal).
    16-bit and float greyscale (rescaled, in float64) go through ``to_rgb_array`` itself."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(to_rgb_array(image))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image if mode == "RGBA" else (image.convert("LA") if mode == "La" else image).convert("RGBA")
        composite = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        del rgba
        return composite.convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------- writing


def encode_image_bytes(pixels: np.ndarray, fmt: OutputFormat, quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> PNG / JPEG / WebP file bytes (PNG is lossless; ``quality`` is for the others).

    Callers check the size against ``MAX_SIDE[fmt]`` first."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()
