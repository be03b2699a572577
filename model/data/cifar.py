"""CIFAR-10 as a source: the python-pickle batches from a local directory (never downloaded).

``split="train"`` reads ``data_batch_1`` ... ``data_batch_5``, ``"heldout"`` reads ``test_batch`` and
``"all"`` both. The batches are unpickled with an unpickler that only rebuilds NumPy arrays, so a batch
file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Self

import numpy as np

from vqtok.model.data.source import BaseSource, SourceItem, check_split, require_directory

__all__ = [
    "CIFAR_BATCHES",
    "CIFAR_HELDOUT_BATCHES",
    "CIFAR_SUBDIR",
    "CIFAR_TRAIN_BATCHES",
    "Cifar10Source",
    "read_cifar_batch",
    "read_cifar_split",
    "resolve_cifar_dir",
]

CIFAR_TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_HELDOUT_BATCHES: tuple[str, ...] = ("test_batch",)
#: Batch files of each split.
CIFAR_BATCHES: dict[str, tuple[str, ...]] = {
    "train": CIFAR_TRAIN_BATCHES,
    "heldout": CIFAR_HELDOUT_BATCHES,
    "all": CIFAR_TRAIN_BATCHES + CIFAR_HELDOUT_BATCHES,
}
CIFAR_SUBDIR = "cifar-10-batches-py"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds NumPy arrays: a batch file cannot run arbitrary code."""

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.numeric", "_frombuffer"),  # protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # bytes written with pickle protocol <= 2 by Python 3
            ("copy_reg", "_reconstructor"),
            ("copyreg", "_reconstructor"),
            ("__builtin__", "object"),
            ("builtins", "object"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which is not allowed")


def resolve_cifar_dir(root: str | os.PathLike[str]) -> Path:
    """``root`` itself, or ``root/cifar-10-batches-py`` when that exists."""
    root = Path(root)
    nested = root / CIFAR_SUBDIR
    return nested if nested.is_dir() else root


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-pickle batch → images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64."""
    with open(path, "rb") as f:
        batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ValueError(f"CIFAR-10 batch {path} is not a dict with a b'data' entry")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"CIFAR-10 batch {path}: data has shape {data.shape}, expected (N, 3072)")
    labels = np.asarray(batch.get(b"labels", [-1] * len(data)), dtype=np.int64)
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The batches of ``split`` in ``directory`` → images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64.

    Raises:
        FileNotFoundError: a batch file is missing (the message names it).
    """
    check_split(split)
    images, labels = [], []
    for name in CIFAR_BATCHES[split]:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 batch file {str(path)!r} not found; expected the python version "
                f"(cifar-10-python.tar.gz extracted) in {str(directory)!r}. vqtok never downloads data."
            )
        batch_images, batch_labels = read_cifar_batch(path)
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


class Cifar10Source(BaseSource):
    """CIFAR-10 images of one split; items ``("<split>/<i>", (32, 32, 3) uint8, {"label": int})``.

    ``root`` is the batch directory or a parent holding ``cifar-10-batches-py``. The batches are read
    on first use (``len``, an item, :attr:`images`), once.

    Raises:
        FileNotFoundError: (on first use) a batch file is missing.
    """

    kind = "cifar10"

    def __init__(self, root: str | os.PathLike[str], split: str = "all") -> None:
        super().__init__(split)
        self.root = resolve_cifar_dir(root)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def check_argument(cls, spec: str, argument: str) -> None:
        require_directory(spec, argument, "CIFAR-10 directory")

    @classmethod
    def from_spec(cls, argument: str, split: str) -> Self:
        return cls(argument, split)

    @property
    def name(self) -> str:
        return f"cifar10:{self.root}"

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = read_cifar_split(self.root, self.split)
        return self._arrays

    @property
    def images(self) -> np.ndarray:
        """``(N, 3, 32, 32)`` uint8."""
        return self._load()[0]

    @property
    def labels(self) -> np.ndarray:
        """``(N,)`` int64 class indices (``-1`` where a batch has no labels)."""
        return self._load()[1]

    def with_split(self, split: str) -> Self:
        return type(self)(self.root, split)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> SourceItem:
        """``("<split>/<i>", (32, 32, 3) uint8 view, {"label": int})``."""
        i = self.check_index(index)
        return SourceItem(f"{self.split}/{i}", self.images[i].transpose(1, 2, 0), {"label": int(self.labels[i])})

    def _describe(self) -> dict[str, Any]:
        return {"source": str(self.root.resolve()), "num_images": len(self)}
