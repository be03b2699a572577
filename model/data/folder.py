"""An image folder as a source: every file Pillow can open under a folder, recursively.

Files are not filtered by extension: every non-hidden file is tried with Pillow, and the ones it cannot
identify or verify are skipped and counted. The train / held-out split is a hash of each file's POSIX
relative path (:func:`is_heldout_path`), so a file keeps its split when others are added or removed; a
folder laid out as ``train/`` + ``heldout/`` has that fixed split instead (:func:`fixed_heldout`).

Verifying means opening every file, so it is done once per folder state: :func:`index_folder` keeps
the last few results keyed by the folder's listing (names, sizes, inodes, modification and change
times), and a :class:`FolderSource` keeps its index for all its splits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Self

from PIL import Image

from vqtok.model.data.pixels import UnreadableImage, load_image
from vqtok.model.data.source import BaseSource, SourceItem, check_split, require_directory

__all__ = [
    "DEFAULT_HELDOUT_FRACTION",
    "SPLIT_RULE",
    "FolderIndex",
    "FolderScan",
    "FolderSource",
    "heldout_files",
    "index_folder",
    "is_heldout_path",
    "parse_heldout",
    "scan_folder",
]

log = logging.getLogger(__name__)

#: Default expected fraction of a folder's files in the held-out split.
DEFAULT_HELDOUT_FRACTION = 0.05
SPLIT_RULE = ("sha256(relative path)[:8] / 2**64 < heldout_fraction, or the heldout_count lowest; with two files "
              "or more each split keeps one")
#: Number of folder states whose verification :func:`index_folder` remembers.
INDEX_CACHE_SIZE = 8


def _path_hash(relative_path: str) -> float:
    """A file's place in [0, 1): SHA-256 of its POSIX relative path, first 8 bytes as a fraction of 2**64."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout_path(relative_path: str, heldout_fraction: float) -> bool:
    """Whether a file's hash puts it in the held-out split of ``heldout_fraction``.

    A pure function of the POSIX relative path, so a file keeps its split when other files are added,
    removed or the training seed changes (``heldout_files`` adds the small-folder guarantees).
    """
    return _path_hash(relative_path) < heldout_fraction


def parse_heldout(text: str | float | int) -> tuple[float, int | None]:
    """``--heldout`` -> (fraction, count): ``"0.05"`` or ``"5%"`` is a fraction, ``"3"`` a count of images.

    Raises:
        ValueError: not a fraction in [0, 1), a percentage or a non-negative whole count.
    """
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            fraction = float(raw[:-1]) / 100.0
        elif raw.isdigit() and int(raw) >= 1:
            return DEFAULT_HELDOUT_FRACTION, int(raw)
        else:
            fraction = float(raw)
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--heldout {raw!r}: give a fraction in [0, 1) ('0.05' or '5%') or a count of images ('3')")
    return fraction, None


def heldout_files(readable: tuple[str, ...], heldout_fraction: float, heldout_count: int | None = None
                  ) -> frozenset[str]:
    """The held-out files of a folder: by count, the ``heldout_count`` files of lowest hash; by fraction,
    those whose hash is under ``heldout_fraction``. With two files or more, each split keeps at least
    one file (a fraction that picks none holds out the lowest hash; the training split is never empty);
    a single image trains."""
    if len(readable) < 2:
        return frozenset()  # one image: it trains
    ranked = sorted(readable, key=_path_hash)
    if heldout_count is not None:
        return frozenset(ranked[: min(heldout_count, len(ranked) - 1)])
    chosen = [rel for rel in ranked if is_heldout_path(rel, heldout_fraction)]
    if not chosen and heldout_fraction > 0.0:
        chosen = ranked[:1]
    return frozenset(chosen[: len(ranked) - 1])


def fixed_heldout(readable: tuple[str, ...]) -> frozenset[str] | None:
    """A folder laid out as ``train/`` and ``heldout/`` (every image in one of the two, both non-empty) has a
    fixed split by folder: the images under ``heldout/``, whatever ``--heldout`` says. None otherwise."""
    tops = {rel.split("/", 1)[0] if "/" in rel else "" for rel in readable}
    if tops != {"train", "heldout"}:
        return None
    return frozenset(rel for rel in readable if rel.startswith("heldout/"))


def _heldout_of(readable: tuple[str, ...], heldout_fraction: float, heldout_count: int | None = None
                ) -> frozenset[str]:
    fixed = fixed_heldout(readable)
    return fixed if fixed is not None else heldout_files(readable, heldout_fraction, heldout_count)


def _in_split(relative_path: str, split: str, heldout: frozenset[str]) -> bool:
    return split == "all" or (relative_path in heldout) == (split == "heldout")


def _verify_image(path: Path) -> bool:
    """Cheap scan-time check: Pillow identifies the file and ``verify()`` passes."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception:  # any decoder error means "not a usable image"
        return False
    return True


def _walk_files(root: Path) -> Iterator[Path]:
    """Every non-hidden file under ``root``, in a sorted (deterministic) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _check_fraction(heldout_fraction: float) -> None:
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction!r}")


def _require_dir(root: Path) -> None:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")


class FolderIndex(NamedTuple):
    """Every file of a folder (all splits), verified once: POSIX paths relative to ``root``, walk order."""

    root: Path
    readable: tuple[str, ...]
    skipped: tuple[str, ...]


_index_cache: OrderedDict[tuple[str, bytes], tuple[tuple[str, ...], tuple[str, ...]]] = OrderedDict()
_index_lock = threading.Lock()


def _fingerprint(root: Path, relative: list[str]) -> bytes:
    """Digest of the listing: names, sizes, inodes, mtimes and ctimes (a rewrite always moves ctime)."""
    digest = hashlib.sha256()
    for rel in relative:
        try:
            st = os.stat(root / rel)
            stamp = f"{st.st_size}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        except OSError:
            stamp = "gone"
        digest.update(f"{rel}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return digest.digest()


def index_folder(root: str | os.PathLike[str]) -> FolderIndex:
    """Verify every non-hidden file under ``root`` with Pillow; reuse the result while the folder is unchanged.

    The listing is walked and stat-ed on every call (cheap); files are opened only when the listing's
    fingerprint is new. The last :data:`INDEX_CACHE_SIZE` folder states are kept.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    root = Path(root)
    _require_dir(root)
    relative = [path.relative_to(root).as_posix() for path in _walk_files(root)]
    key = (str(root.resolve()), _fingerprint(root, relative))
    with _index_lock:
        cached = _index_cache.get(key)
        if cached is not None:
            _index_cache.move_to_end(key)
    if cached is None:
        readable: list[str] = []
        skipped: list[str] = []
        for rel in relative:
            (readable if _verify_image(root / rel) else skipped).append(rel)
        if skipped:
            first = root / skipped[0]
            log.warning("image folder %s: skipped %d unreadable file(s), e.g. %s", root, len(skipped), first)
        cached = (tuple(readable), tuple(skipped))
        with _index_lock:
            _index_cache[key] = cached
            while len(_index_cache) > INDEX_CACHE_SIZE:
                _index_cache.popitem(last=False)
    return FolderIndex(root, *cached)


class FolderScan(NamedTuple):
    """What :func:`scan_folder` found: readable files of the split and every skipped file."""

    root: Path
    files: list[Path]
    skipped: list[Path]
    readable: int  # readable images in all splits


def scan_folder(
    root: str | os.PathLike[str], split: str = "all", heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> FolderScan:
    """Recursively list the readable images of one split of a folder.

    Files are not filtered by extension: every non-hidden file is tried with Pillow, and the ones
    it cannot identify or verify are returned in ``skipped`` (whatever their split).

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    check_split(split)
    _check_fraction(heldout_fraction)
    index = index_folder(root)
    heldout = _heldout_of(index.readable, heldout_fraction)
    files = [index.root / rel for rel in index.readable if _in_split(rel, split, heldout)]
    return FolderScan(index.root, files, [index.root / rel for rel in index.skipped], len(index.readable))


class _SharedIndex:
    """The index of one folder, computed on first use and shared by the sources of its splits."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._index: FolderIndex | None = None

    def get(self) -> FolderIndex:
        if self._index is None:
            self._index = index_folder(self.root)
        return self._index


class FolderSource(BaseSource):
    """The readable images of one split of a folder; items ``(relative path, (H, W, 3) uint8, {"path"})``.

    Args:
        root: folder scanned recursively (hidden files and folders are ignored).
        split: ``"train"``, ``"heldout"`` or ``"all"``; see :func:`is_heldout_path`.
        heldout_fraction: expected fraction of files in the held-out split.

    The folder is verified lazily, on first use, once for this source and every split :meth:`with_split`
    derives from it.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """

    kind = "folder"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "all",
        heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
        *,
        heldout_count: int | None = None,
        shared: _SharedIndex | None = None,
    ) -> None:
        super().__init__(split)
        _check_fraction(heldout_fraction)
        if heldout_count is not None and heldout_count < 0:
            raise ValueError(f"heldout_count must be >= 0, got {heldout_count}")
        self.root = Path(root)
        _require_dir(self.root)
        self.heldout_fraction = heldout_fraction
        self.heldout_count = heldout_count
        self._shared = shared if shared is not None else _SharedIndex(self.root)
        self._files: list[Path] | None = None

    @classmethod
    def check_argument(cls, spec: str, argument: str) -> None:
        require_directory(spec, argument, "image folder")

    @classmethod
    def from_spec(cls, argument: str, split: str) -> Self:
        return cls(argument, split)

    @property
    def name(self) -> str:
        return f"folder:{self.root}"

    @property
    def index(self) -> FolderIndex:
        """Every file of the folder (all splits), verified on first access by this source or any split of it."""
        return self._shared.get()

    @property
    def files(self) -> list[Path]:
        """The readable images of the split, in walk (sorted) order."""
        if self._files is None:
            heldout = _heldout_of(self.index.readable, self.heldout_fraction, self.heldout_count)
            self._files = [self.root / rel for rel in self.index.readable if _in_split(rel, self.split, heldout)]
        return self._files

    @property
    def skipped_paths(self) -> list[Path]:
        """Files that Pillow could not open or verify (all splits)."""
        return [self.root / rel for rel in self.index.skipped]

    def with_split(self, split: str) -> Self:
        return type(self)(self.root, split, self.heldout_fraction, heldout_count=self.heldout_count,
                          shared=self._shared)

    def with_heldout(self, heldout: str | float | int) -> Self:
        """The same folder (its scan reused) with a ``--heldout`` rule: a fraction or a count of images."""
        fraction, count = parse_heldout(heldout)
        return type(self)(self.root, self.split, fraction, heldout_count=count, shared=self._shared)

    def __len__(self) -> int:
        return len(self.files)

    def relative_name(self, index: int) -> str:
        """POSIX path of item ``index`` relative to the root."""
        return self.files[index].relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> SourceItem:
        """``(relative path, (H, W, 3) uint8, {"path": str})``; decoded now, EXIF orientation applied.

        Raises:
            UnreadableImage: the file went bad (or away) since the scan.
        """
        path = self.files[self.check_index(index)]
        try:
            array = load_image(path)
        except Exception as exc:  # any decoder or I/O error
            raise UnreadableImage(f"{path}: {exc}") from exc
        return SourceItem(path.relative_to(self.root).as_posix(), array, {"path": str(path)})

    def check_not_empty(self) -> None:
        if self.files:
            return
        readable, skipped = len(self.index.readable), len(self.index.skipped)
        if readable == 0:
            raise ValueError(
                f"image folder {str(self.root)!r} holds no readable image ({skipped} file(s) skipped as unreadable)"
            )
        raise ValueError(
            f"image folder {str(self.root)!r} has no image in the {self.split!r} split "
            f"({readable} readable in all, heldout_fraction={self.heldout_fraction}); "
            "add images or change heldout_fraction"
        )

    def _describe(self) -> dict[str, Any]:
        return {
            "source": str(self.root.resolve()),
            "num_images": len(self.files),
            "skipped": len(self.index.skipped),
            "heldout_fraction": self.heldout_fraction,
            "heldout_count": self.heldout_count,
            "split_rule": SPLIT_RULE,
        }
