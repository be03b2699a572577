"""``Tokenizer``: images to token grids and back in this process, with no server.

    tokenizer = Tokenizer.from_checkpoint("default")               # the bundled model; or a checkpoint dir
    grids = tokenizer.encode(["cat.png", pil_image, pixels], size="256", fit="crop")   # (3, 64, 64) int64
    images = tokenizer.decode(grids)                               # three (256, 256, 3) uint8 arrays
    ids = tokenizer.tokenize("cat.png", layout="emu3-like", size="256", fit="crop")  # an LLM's token ids
    image, repairs = tokenizer.detokenize(generated_ids, layout="emu3-like", repair="lenient")

It runs exactly what the service runs (the same preprocessing: sniffing, header-first limits,
``size`` / ``fit``; the same engine and precision policy), so a grid made here equals the grid
``POST /encode`` answers for the same image and options at the same batch composition. Refusals
raise the service's errors (``vqtok.service.errors.ServiceError``, with ``.message`` and
``.error_type``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vqtok.model.data import to_rgb_array
from vqtok.model.layouts import PRESETS, Layout, LayoutError, get_layout
from vqtok.model.weights import resolve_checkpoint
from vqtok.service.engine import Engine
from vqtok.service.imaging import (
    DecodeBudget,
    FitMode,
    FittedImage,
    Size,
    fit_image,
    load_fitted,
    parse_size,
    probe_image,
)

# An image: a file path, the bytes of an image file, a Pillow image, or (H, W) / (H, W, 3|4) uint8 pixels.
ImageLike = Any
# Far above anything one process decodes at once here: the caller owns its memory.
_NO_LIMIT = 1 << 62


class Tokenizer:
    """A checkpoint on a device: ``encode`` images to (h, w) grids of codes in [0, K), ``decode`` them back."""

    def __init__(self, engine: Engine, batch_size: int = 16) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self._budget = DecodeBudget(_NO_LIMIT, timeout_s=0.0)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str] = "default", device: str = "auto",
                        batch_size: int = 16) -> Tokenizer:
        """Load a checkpoint directory or a bundled model by name (``"default"``) on ``device``
        (auto, cpu, cuda)."""
        return cls(Engine.load(resolve_checkpoint(path), device), batch_size=batch_size)

    # --- what the model is -------------------------------------------------------------------------
    @property
    def num_embeddings(self) -> int:
        """K: codes are in [0, K)."""
        return self.engine.config.num_embeddings

    @property
    def downsample(self) -> int:
        """f: a (H, W) image becomes a (H/f, W/f) grid."""
        return self.engine.config.downsample

    @property
    def model_id(self) -> str:
        """Hash over the weights and every config field that changes tokens (as the service reports it)."""
        return self.engine.checkpoint.model_id

    @property
    def codebook(self) -> np.ndarray:
        """(K, D) float32 code vectors."""
        return self.engine.codebook_vectors().numpy()

    # --- images -> grids -----------------------------------------------------------------------------
    def defaults(self) -> tuple[str | None, FitMode, str]:
        """(size, fit, layout) used when a call names none: the checkpoint record's serving defaults (an imported
        model's native size, fit and layout, as ``/encode`` uses them), else each image's own size, "pad", "flat"."""
        serving = self.engine.checkpoint.record.serving
        size = str(serving.size) if serving is not None and serving.size else None
        fit = serving.fit if serving is not None and serving.fit and size is not None else "pad"
        layout = serving.layout if serving is not None and serving.layout else "flat"
        return size, fit, layout  # type: ignore[return-value]  # the record's fit is checked against FIT_MODES

    def prepare(self, images: Sequence[ImageLike], size: str | None = None, fit: FitMode | None = None
                ) -> list[FittedImage]:
        """Each image as the model takes it: (H, W, 3) uint8 brought to ``size`` by ``fit`` (see /encode); with no
        ``size``, the record's native size and fit (``defaults``)."""
        if size is None:
            size, default_fit, _ = self.defaults()
            fit = fit or default_fit
        fit = fit or "pad"
        target = parse_size(size) if size is not None else None
        return [prepare_image(image, target, fit, self.downsample, self._budget, _NO_LIMIT, f"images[{i}]")
                for i, image in enumerate(images)]

    def encode(self, images: Sequence[ImageLike] | ImageLike, size: str | None = None, fit: FitMode | None = None
               ) -> np.ndarray | list[np.ndarray]:
        """Images -> token grids: one (N, h, w) int64 array when all grids have one shape, else a list.

        A single image (not in a list) gives its (h, w) grid.
        """
        single = not isinstance(images, list | tuple)
        batch = [images] if single else list(images)
        pixels = [torch.from_numpy(image.pixels).permute(2, 0, 1) for image in self.prepare(batch, size, fit)]
        grids = self._run(self.engine.encode_batch, pixels)
        if single:
            return grids[0]
        return np.stack(grids) if len({g.shape for g in grids}) == 1 else grids

    # --- grids -> images -----------------------------------------------------------------------------
    def decode(self, indices: Any, output: Literal["numpy", "pil"] = "numpy") -> Any:
        """Grids of codes in [0, K) -> images: (h, w) gives one image, (N, h, w) or a list gives a list.

        ``output="numpy"``: (h*f, w*f, 3) uint8 arrays; ``"pil"``: Pillow images.
        """
        single = isinstance(indices, np.ndarray | torch.Tensor) and indices.ndim == 2
        grids = [indices] if single else list(indices)
        tensors = []
        for i, grid in enumerate(grids):
            tensor = torch.as_tensor(np.asarray(grid), dtype=torch.int64)
            if tensor.ndim != 2 or tensor.numel() == 0:
                raise ValueError(f"indices[{i}]: expected a non-empty (h, w) grid, got shape {tuple(tensor.shape)}")
            bad = (tensor < 0) | (tensor >= self.num_embeddings)
            if bool(bad.any()):
                r, c = (int(v) for v in bad.nonzero()[0])
                raise ValueError(f"indices[{i}][{r}][{c}] = {int(tensor[r, c])} is outside [0, {self.num_embeddings})")
            tensors.append(tensor)
        images = self._run(self.engine.decode_batch, tensors)
        if output == "pil":
            from PIL import Image

            images = [Image.fromarray(image) for image in images]
        elif output != "numpy":
            raise ValueError(f"output must be 'numpy' or 'pil', got {output!r}")
        return images[0] if single else images

    # --- grids <-> LLM token sequences ---------------------------------------------------------------
    def layout(self, layout: str | os.PathLike[str] | Layout | None = None, **overrides: Any) -> Layout:
        """A layout for this tokenizer's K: a preset name (with ``overrides`` of its placeholder ids), a layout
        JSON file, or a ``Layout`` (checked against K); None: the record's default layout, else "flat"."""
        if layout is None:
            layout = self.defaults()[2]
        if isinstance(layout, Layout):
            resolved = layout
        elif isinstance(layout, str) and layout in PRESETS:
            resolved = get_layout(layout, **{"codebook_size": self.num_embeddings, **overrides})
        else:
            resolved = Layout.from_file(Path(layout))
        if resolved.num_codes != self.num_embeddings:
            raise LayoutError(f"layout {resolved.name!r} is for {resolved.num_codes} codes; this tokenizer has "
                              f"{self.num_embeddings}")
        return resolved

    def tokenize(self, images: Sequence[ImageLike] | ImageLike, layout: str | os.PathLike[str] | Layout | None = None,
                 size: str | None = None, fit: FitMode | None = None) -> list[int] | list[list[int]]:
        """Images -> LLM token ids in ``layout`` (see ``layout``): one list per image (one list for one image)."""
        chosen = self.layout(layout)
        grids = self.encode(images, size=size, fit=fit)
        if isinstance(grids, np.ndarray) and grids.ndim == 2:
            return chosen.to_tokens(grids)
        return [chosen.to_tokens(grid) for grid in grids]

    def detokenize(self, tokens: Sequence[int], layout: str | os.PathLike[str] | Layout | None = None,
                   grid: tuple[int, int] | None = None, repair: Literal["strict", "lenient"] = "strict",
                   pad: str | int = "repeat_last_row", output: Literal["numpy", "pil"] = "numpy") -> tuple[Any, list]:
        """An LLM's token ids -> (image, repairs): the grid parsed by ``layout`` (inferred where it carries it;
        ``repair`` strict raises ``LayoutError`` naming the position, lenient repairs and reports), decoded."""
        parsed = self.layout(layout).parse(list(tokens), grid=grid, repair=repair, pad=pad)
        return self.decode(parsed.grid, output=output), parsed.repairs

    def _run(self, operation: Any, items: list[torch.Tensor]) -> list[np.ndarray]:
        """``operation`` over same-shaped runs of ``items``, ``batch_size`` at a time; outputs in order."""
        outputs: list[np.ndarray | None] = [None] * len(items)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(items):
            by_shape.setdefault(tuple(item.shape), []).append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                results = operation(torch.stack([items[i] for i in chunk]))
                for i, result in zip(chunk, results, strict=True):
                    outputs[i] = result.numpy()
        return [output for output in outputs if output is not None]


def prepare_image(image: ImageLike, target: Size | None, fit: FitMode, downsample: int, budget: DecodeBudget,
                  max_pixels: int = _NO_LIMIT, where: str = "image") -> FittedImage:
    """One image as the model takes it (``Tokenizer.prepare``'s work, usable without a model, e.g. in a
    DataLoader worker): ``(H, W, 3)`` uint8 pixels brought to ``target`` by ``fit``, a multiple of ``downsample``.

    Encoded bytes (or a path) go through the service's header-first path: ``probe_image`` refuses more than
    ``max_pixels`` before decoding, ``load_fitted`` decodes under ``budget``. Raises the service's errors
    (``ServiceError``) for a refused or corrupt image, ``ValueError`` / ``TypeError`` for a bad array or object.
    """
    if isinstance(image, str | os.PathLike):
        image = Path(image).read_bytes()
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        header = probe_image(data, max_pixels, where)
        return load_fitted(data, header, target, fit, downsample, budget, max_pixels, where)
    return fit_image(_pixels(image, where), target, fit, downsample, where)


def _pixels(image: ImageLike, where: str) -> np.ndarray:
    """A Pillow image or a uint8 array as (H, W, 3) uint8 RGB (alpha on white, as the service does)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"{where}: a pixel array must be (H, W), (H, W, 3) or (H, W, 4) uint8, "
                             f"got {image.shape} {image.dtype}")
        from PIL import Image

        image = Image.fromarray(image)
    if hasattr(image, "mode") and hasattr(image, "convert"):
        return to_rgb_array(image)
    raise TypeError(f"{where}: cannot read {type(image).__name__} as an image: give a path, file bytes, a PIL "
                    "image or a uint8 array")


__all__ = ["Tokenizer", "prepare_image"]
