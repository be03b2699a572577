"""Neutral pixel helpers: any Pillow image, array or encoded file → ``(H, W, 3)`` uint8 RGB, and resizes.

No torch and no training code: the service (``service/imaging``), the library and the data sources
share these. Every array here is ``uint8`` ``(H, W, 3)`` unless a docstring says otherwise.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "UnreadableImage",
    "array_to_rgb",
    "ensure_min_side",
    "load_image",
    "resize_square",
    "to_pixels",
    "to_rgb_array",
]


class UnreadableImage(OSError):
    """A stored image (a file, an archive member, a blob) that cannot be read or decoded.

    Data sources raise it from ``__getitem__``; iteration and the training datasets skip such items.
    """


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a Pillow image of any mode to an RGB array.

    Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index, ...) is composited on white;
    16/32-bit integer and float greyscale (``I;16``, ``I``, ``F``) are rescaled to 8 bits rather
    than clipped; ``CMYK``, ``YCbCr``, ``1``, ``L`` and palettes go through Pillow's conversion.

    Returns:
        ``(H, W, 3)`` ``uint8`` array (C-contiguous, a copy owned by the caller).
    """
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        return _grey_to_rgb(_high_depth_to_uint8(img))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = (img.convert("LA") if mode == "La" else img).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """``I;16*`` / ``I`` / ``F`` greyscale → ``(H, W)`` uint8, rescaling instead of clipping."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and values.max(initial=0.0) > 255.0):
        values = values / 257.0  # 16-bit range 0..65535 → 0..255
    elif img.mode == "F" and values.max(initial=0.0) <= 1.0:
        values = values * 255.0  # float image in [0, 1]
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 → ``(H, W, 3)`` uint8."""
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """A ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 array → ``(H, W, 3)`` uint8 via :func:`to_rgb_array`."""
    return to_rgb_array(Image.fromarray(np.ascontiguousarray(array)))


def _decode(img: Image.Image) -> np.ndarray:
    """First frame of an opened image, EXIF orientation applied → ``(H, W, 3)`` uint8."""
    img.load()
    return to_rgb_array(ImageOps.exif_transpose(img))


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file (first frame, EXIF orientation applied).

    Returns:
        ``(H, W, 3)`` uint8.

    Raises:
        OSError / ValueError / Image.DecompressionBombError: when the file cannot be decoded.
    """
    with Image.open(path) as img:
        return _decode(img)


def to_pixels(image: np.ndarray | bytes | Image.Image) -> np.ndarray:
    """What a data source yields (pixels or encoded bytes) → ``(H, W, 3)`` uint8.

    An ``(H, W, 3)`` uint8 array is returned as is (no copy); other arrays (``(H, W)``, ``(H, W, 4)``)
    and Pillow images go through :func:`to_rgb_array`; bytes are decoded like :func:`load_image`.

    Raises:
        UnreadableImage: bytes that Pillow cannot decode (the cause is chained).
    """
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            return image
        return array_to_rgb(np.asarray(image, dtype=np.uint8))
    if isinstance(image, Image.Image):
        return to_rgb_array(image)
    try:
        with Image.open(io.BytesIO(image)) as img:
            return _decode(img)
    except Exception as exc:  # any decoder error (OSError, SyntaxError, DecompressionBombError, ...)
        raise UnreadableImage(f"cannot decode {len(image)} bytes as an image: {exc}") from exc


def ensure_min_side(array: np.ndarray, size: int) -> np.ndarray:
    """Upscale (bicubic, aspect kept) so that both sides are at least ``size``.

    Args:
        array: ``(H, W, 3)`` uint8.

    Returns:
        ``(H', W', 3)`` uint8 with ``min(H', W') >= size``; ``array`` itself when already large enough.
    """
    h, w = array.shape[:2]
    if min(h, w) >= size:
        return array
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    return np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.Resampling.BICUBIC))


def resize_square(array: np.ndarray, size: int) -> np.ndarray:
    """Resize (bicubic, antialiased when shrinking) to ``(size, size, 3)`` uint8, ignoring aspect."""
    if array.shape[:2] == (size, size):
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BICUBIC))
