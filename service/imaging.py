"""Image bytes <-> pixel arrays: format sniffing, pixel limits, fitting to a size, PNG/JPEG/WebP encoding.

Pixel arrays here are ``uint8`` numpy arrays of shape (H, W, 3), RGB. Nothing in this module knows
about the model beyond its downsample factor ``f``.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vqtok.model.data import to_rgb_array
from vqtok.service.errors import BadRequest, InvalidRequest, PayloadTooLarge, UnsupportedMediaType

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


@dataclass(frozen=True)
class Size:
    """An image size in pixels."""

    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


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


def decode_image(data: bytes, max_pixels: int, where: str) -> np.ndarray:
    """Image file bytes -> (H, W, 3) uint8 RGB, refusing bombs before any pixel is decoded.

    ``where`` names the image in messages (``"images[2]"``). Raises ``UnsupportedMediaType`` for
    bytes that are no supported image, ``PayloadTooLarge`` past ``max_pixels`` and ``BadRequest``
    for a truncated or corrupt file.
    """
    if not data:
        raise BadRequest(f"{where}: empty image")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaType(
            f"{where}: not an image in a supported format ({', '.join(SUPPORTED_FORMATS)}); "
            f"first bytes {data[:8]!r}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size  # read from the header: nothing decoded yet
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"{where}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels}"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb_array(image)  # alpha on white; 16-bit rescaled, not clipped
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{where}: image over the pixel limit of {max_pixels}; Pillow refused it: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(f"{where}: looks like {fmt} but Pillow cannot identify it") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadRequest(f"{where}: truncated or corrupt {fmt} image ({exc})") from exc
    return rgb  # a writable copy owned by the caller: torch.from_numpy needs one


def _resize(pixels: np.ndarray, size: Size) -> np.ndarray:
    """(H, W, 3) uint8 -> (size.height, size.width, 3) uint8, bicubic with Pillow's antialiasing."""
    if (pixels.shape[1], pixels.shape[0]) == (size.width, size.height):
        return pixels
    image = Image.fromarray(pixels).resize((size.width, size.height), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)


def _pad_edges(pixels: np.ndarray, size: Size) -> np.ndarray:
    """Grow (H, W, 3) to (size.height, size.width, 3) at the bottom and right by repeating the edge pixels.

    Edge replication keeps the border close to the picture, so the tokens there stay like the
    picture's own and the decoder does not smear a black band back into the cropped result.
    """
    return np.pad(pixels, ((0, size.height - pixels.shape[0]), (0, size.width - pixels.shape[1]), (0, 0)), mode="edge")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def fit_image(pixels: np.ndarray, target: Size | None, fit: FitMode, downsample: int, where: str) -> FittedImage:
    """Bring (H, W, 3) uint8 pixels to a size the model takes (multiples of ``downsample``).

    - ``pad``: without ``target``, pad bottom/right to the next multiple; with it, scale to fit inside
      ``target`` keeping the aspect ratio, then pad to ``target``. Padding replicates edge pixels.
    - ``crop``: scale so the short side covers ``target``, then centre-crop (``target`` defaults to the
      image size rounded down to a multiple).
    - ``resize``: stretch to ``target`` (default: the image size rounded to the nearest multiple).
    - ``none``: use the image as it is; its size must already be a multiple (and equal ``target``).
    """
    original = Size(width=pixels.shape[1], height=pixels.shape[0])
    f = downsample
    if target is not None and (target.width % f or target.height % f):
        raise InvalidRequest(
            f"size {target.width}x{target.height} is not a multiple of the downsample factor {f}; "
            f"try {round_up(target.width, f)}x{round_up(target.height, f)}"
        )
    if fit == "none":
        if original.width % f or original.height % f:
            raise InvalidRequest(
                f"{where}: {original.width}x{original.height} is not a multiple of the downsample factor {f} "
                f"and fit=none does not resize; use fit=pad, crop or resize"
            )
        if target is not None and target != original:
            raise InvalidRequest(
                f"{where}: fit=none keeps the image at {original.width}x{original.height}, "
                f"which differs from size {target.width}x{target.height}"
            )
        return FittedImage(pixels=pixels, original=original, content=original)
    if fit == "pad":
        if target is None:
            target = Size(width=round_up(original.width, f), height=round_up(original.height, f))
            content = original
        else:
            scale = min(target.width / original.width, target.height / original.height)
            content = Size(
                width=min(target.width, max(1, round(original.width * scale))),
                height=min(target.height, max(1, round(original.height * scale))),
            )
        return FittedImage(pixels=_pad_edges(_resize(pixels, content), target), original=original, content=content)
    if fit == "crop":
        if target is None:
            target = Size(width=max(f, original.width // f * f), height=max(f, original.height // f * f))
        scale = max(target.width / original.width, target.height / original.height)
        scaled = Size(
            width=max(target.width, round(original.width * scale)),
            height=max(target.height, round(original.height * scale)),
        )
        resized = _resize(pixels, scaled)
        top, left = (scaled.height - target.height) // 2, (scaled.width - target.width) // 2
        cropped = resized[top : top + target.height, left : left + target.width]
        return FittedImage(pixels=np.ascontiguousarray(cropped), original=original, content=target)
    if target is None:  # resize
        target = Size(width=max(f, round(original.width / f) * f), height=max(f, round(original.height / f) * f))
    return FittedImage(pixels=_resize(pixels, target), original=original, content=target)


def check_encoded_tokens(size: Size, downsample: int, max_tokens: int, where: str) -> None:
    """``InvalidRequest`` if an image of ``size`` would encode to a grid of more than ``max_tokens``."""
    h, w = size.height // downsample, size.width // downsample
    if h * w > max_tokens:
        raise InvalidRequest(
            f"{where}: a {size.width}x{size.height} image encodes to a {h}x{w} = {h * w} token grid, over the limit "
            f"of {max_tokens} tokens per grid; pass a smaller size"
        )


def encode_image_bytes(pixels: np.ndarray, fmt: OutputFormat, quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> PNG / JPEG / WebP file bytes (PNG is lossless; ``quality`` is for the others)."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()
