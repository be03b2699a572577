"""``vqtok tokenize``: a dataset to token shards, resumable, split by shard across torchrun ranks.

    vqtok tokenize --checkpoint CK --input SPEC --out DIR [--size 256 --fit crop] [--layout NAME]
                   [--format wds|npy|parquet] [--batch-size B] [--workers W] [--shard-size S] [--device auto]

Inputs (``--input``): any data spec of :func:`vqtok.model.data.open_source`: an image folder (``folder:DIR``),
``photos``, ``cifar10:DIR``, a file list (``list:FILE`` or a bare ``*.txt``: one image path per line; ``*.jsonl``:
one object per line with ``"path"`` (or ``"image"``) and any metadata, carried through; paths relative to the
list file's folder), WebDataset-style tar shards (``x.tar``, or ``tar:DIR`` for every ``*.tar`` in DIR, sorted;
members grouped by key: ``000001.jpg`` + ``000001.json`` metadata), or Parquet files with an image-bytes column
(``x.parquet`` or ``parquet:FILE_OR_DIR[#COLUMN]``; the other columns carried as metadata; needs pyarrow).

Outputs (``--format``): ``wds`` (``shard-NNNNN.tar``: ``<index>.npy`` grid + ``<index>.json`` metadata per sample),
``npy`` (``shard-NNNNN.tokens.npy`` / ``.offsets.npy`` / ``.keys.json``) or ``parquet`` (``shard-NNNNN.parquet``:
columns key, index, grid, tokens, original_size, metadata (JSON text); needs pyarrow).

Images are read, decoded and fitted by the service's own preprocessing in ``--workers`` DataLoader processes
(0: in the main process), batches go to the model in source order, and each finished shard is written on a
writer thread while the next one is encoded: the bytes written do not depend on the worker count.

Shard ``i`` holds source items ``[i*S, (i+1)*S)`` in the source's order, so shards are deterministic; each is
written to a temporary name and renamed, then recorded in ``manifest.jsonl`` (one line per shard: its files with
byte size and sha256, samples, failures) and ``summary.json`` (model identity: model_id and weights sha256; the
options; counts of samples done, failed and skipped; every failure with key and reason). A rerun with the same
arguments skips the shards recorded and present on disk; a killed run, rerun, gives byte-identical files. Under
torchrun (``WORLD_SIZE`` > 1) rank ``r`` takes shards ``r, r+W, ...`` and writes ``manifest.rank-R.jsonl`` and
``summary.rank-R.json``; the last rank to finish merges the parts into ``manifest.jsonl`` and ``summary.json``.
Unreadable, truncated or oversized images (``--max-pixels``, read from the header) are failures, listed.
An output of the first format (one ``manifest.json``) is still verified and resumed.

This module lives in ``src/vqtok`` (not ``model/``) because it runs the service's preprocessing and engine
through :class:`vqtok.tokenizer.Tokenizer`, and ``model/`` must not import ``service/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vqtok.model.data.source import BaseSource, SourceItem, UnreadableImage, open_source
from vqtok.model.options import add_config_arguments, config_from_args
from vqtok.model.weights import bundled_checkpoints, resolve_checkpoint

ENV_PREFIX = "VQTOK_TOKENIZE_"
MANIFEST = "manifest.jsonl"  # one JSON line per finished shard
SUMMARY = "summary.json"  # model identity, options, counts, every failure
LEGACY_MANIFEST = "manifest.json"  # format 1 (one JSON file): read on resume and by --verify, replaced on resume
FORMAT_VERSION = 2
# The default --max-pixels: the service's max_pixels default (an image's header over it is a failure).
DEFAULT_MAX_PIXELS = 40_000_000
# The options that change what is written: a rerun with other values is refused.
OUTPUT_OPTIONS = ("checkpoint", "input", "size", "fit", "layout", "format", "shard_size", "max_pixels")
# Values of output options that older runs did not record (what they behaved as).
OPTION_DEFAULTS: dict[str, Any] = {"max_pixels": DEFAULT_MAX_PIXELS}


class TokenizeError(ValueError):
    """A bad argument or input: reported as one line, exit status 2."""


class TooManyFailures(RuntimeError):
    """More images failed than ``--max-failures`` allows: the run stops (exit status 4), summary saved."""


EXIT_FAILED_IMAGES = 3  # the run finished, but some images failed (listed in summary.json)
EXIT_TOO_MANY_FAILURES = 4  # stopped early by --max-failures


class StopAfterShards(RuntimeError):
    """Raised by the test hook ``run(..., stop_after_shards=N)`` to simulate a run killed after N shards."""


@dataclass
class TokenizeConfig:
    """Options of ``vqtok tokenize``.

    Attributes:
        checkpoint: checkpoint directory, or a bundled model's name ("default").
        input: data spec (image folder, folder:DIR, photos, cifar10:DIR), a *.txt / *.jsonl file list
            (list:FILE), tar shards (x.tar or tar:DIR) or Parquet files (x.parquet or parquet:PATH[#COLUMN]).
        out: output directory (shards, manifest.jsonl and summary.json).
        size: target size as /encode takes it (e.g. "256" or "256x192"); none: the checkpoint's native size
          (imported models record one), else each image's own size.
        fit: how an image is brought to size (as /encode: pad, crop, resize, none); none given: the checkpoint's
          own fit with its native size (imported models), else pad.
        layout: write the tokens in this layout preset (e.g. "emu3-like") instead of raw code indices.
        format: wds (WebDataset-style tar shards: <key>.npy + <key>.json per sample), npy (per shard:
            tokens, offsets, keys) or parquet (a shard-NNNNN.parquet per shard; needs pyarrow).
        batch_size: images per forward pass.
        workers: DataLoader worker processes that read, decode and fit images (0: in the main process);
            the output is byte-identical whatever the count.
        shard_size: source items per shard (shard i holds items [i*S, (i+1)*S)).
        max_pixels: an image whose header claims more pixels than this is a failure, never decoded.
        device: auto, cpu, cuda or cuda:N (under torchrun, auto/cuda take cuda:LOCAL_RANK).
        max_failures: stop (exit status 4) once more images than this failed in the run; -1: never stop.
        overwrite: an output folder holding a run with other options or another model is cleared first
            (its shards and manifests), instead of refused.
    """

    checkpoint: str
    input: str
    out: Path
    size: str | None = None
    fit: Literal["pad", "crop", "resize", "none"] | None = None
    layout: str | None = None
    format: Literal["wds", "npy", "parquet"] = "wds"
    batch_size: int = 16
    workers: int = 0
    shard_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"
    max_failures: int = -1
    overwrite: bool = False


def open_input(spec: str) -> BaseSource | Any:
    """The source ``--input`` names: any :func:`open_source` spec (a file list, tar shards, Parquet, a folder, ...)."""
    try:
        return open_source(spec, "all")
    except (ValueError, ImportError) as exc:
        raise TokenizeError(str(exc)) from None


# --- writing -----------------------------------------------------------------------------------------------------


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar holding ``members`` with fixed headers (no times, owners): the same samples give the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def shard_files(fmt: str, shard: int) -> list[str]:
    stem = f"shard-{shard:05d}"
    if fmt == "parquet":
        return [f"{stem}.parquet"]
    return [f"{stem}.tar"] if fmt == "wds" else [f"{stem}.tokens.npy", f"{stem}.offsets.npy", f"{stem}.keys.json"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the manifest ------------------------------------------------------------------------------------------------
#
# manifest.jsonl: one line per finished shard, in shard order:
#   {"shard": 3, "samples": 998, "failed": 2, "first_index": 3000, "stop_index": 4000,
#    "files": [{"file": "shard-00003.tar", "bytes": 123456, "sha256": "..."}],
#    "failures": [{"key": "a/b.jpg", "index": 3017, "shard": 3, "reason": "..."}]}
# summary.json: format_version, model (name, model_id, weights_sha256, K, f), options (the output options,
# checked on resume) and run (batch size, workers, device), source, num_shards, world_size, counts (shards_done,
# done, failed, skipped), failures (every one: key, index, shard, reason), complete.
# Both are rewritten whole (temp file + rename) after each shard, the lines first: a shard is done once its line
# is on disk, and its failures travel in that same line, so a kill between the two writes loses nothing.


def _record_files(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A shard record's files as ``[{"file", "bytes", "sha256"}]`` (format 1 stored ``{name: {bytes, sha256}}``)."""
    files = record.get("files", [])
    if isinstance(files, Mapping):
        return [{"file": name, "bytes": info.get("bytes"), "sha256": info.get("sha256")}
                for name, info in files.items()]
    return list(files)


def _shard_present(out: Path, record: Mapping[str, Any]) -> bool:
    files = _record_files(record)
    return bool(files) and all((out / f["file"]).is_file() and (out / f["file"]).stat().st_size == f["bytes"]
                               and _sha256(out / f["file"]) == f["sha256"] for f in files)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The shard records of a ``manifest*.jsonl`` (a line that does not parse is ignored: that shard is redone)."""
    records = []
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("shard"), int):
            records.append(record)
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _lines_bytes(records: Mapping[int, Mapping[str, Any]]) -> bytes:
    return b"".join(_json_bytes(records[shard]) + b"\n" for shard in sorted(records))


def _previous_runs(out: Path) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """(summaries, shard records by shard) of what earlier runs left in ``out``, this format or format 1."""
    summaries = [s for path in sorted(out.glob("summary*.json")) if (s := _read_json(path)) is not None]
    records: dict[int, dict[str, Any]] = {}
    for path in sorted(out.glob("manifest*.json")):  # format 1: shards and failures in one file
        legacy = _read_json(path)
        if legacy is None:
            continue
        summaries.append(legacy)
        by_shard: dict[int, list[dict[str, Any]]] = {}
        for failure in legacy.get("failures", []):
            if failure.get("shard") is not None:
                by_shard.setdefault(failure["shard"], []).append(failure)
        for record in legacy.get("shards", []):
            records[record["shard"]] = {**record, "files": _record_files(record),
                                        "failures": by_shard.get(record["shard"], [])}
    for path in sorted(out.glob("manifest*.jsonl")):
        for record in _read_lines(path):
            records[record["shard"]] = record
    return summaries, records


def _options_of(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The output options a summary (or a format-1 manifest's ``config``) records, defaults filled in."""
    recorded = summary.get("options", summary.get("config")) or {}
    return {name: recorded.get(name, OPTION_DEFAULTS.get(name)) for name in OUTPUT_OPTIONS}


def _summary(base: Mapping[str, Any], records: Mapping[int, Mapping[str, Any]],
             scan_failures: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
    """``base`` (format, model, options, run, source, num_shards, world_size, rank) with counts and failures."""
    failures = scan_failures + [f for shard in sorted(records) for f in records[shard].get("failures", [])]
    return {**base, "failures": failures, "complete": complete,
            "counts": {"shards_done": len(records), "done": sum(r["samples"] for r in records.values()),
                       "failed": len(failures) - len(scan_failures), "skipped": len(scan_failures)}}


# --- the run -----------------------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where this process stands among torchrun's ranks (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Placement:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ.get("RANK", "0"))
        if not 0 <= rank < world:
            raise TokenizeError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def manifest_name(self) -> str:
        """This rank's shard lines: ``manifest.jsonl`` alone, ``manifest.rank-R.jsonl`` under torchrun."""
        return MANIFEST if self.world_size == 1 else f"manifest.rank-{self.rank}.jsonl"

    @property
    def summary_name(self) -> str:
        return SUMMARY if self.world_size == 1 else f"summary.rank-{self.rank}.json"

    @property
    def legacy_name(self) -> str:
        return LEGACY_MANIFEST if self.world_size == 1 else f"manifest.rank-{self.rank}.json"


def _check_config(config: TokenizeConfig) -> None:
    if config.batch_size < 1:
        raise TokenizeError(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.shard_size < 1:
        raise TokenizeError(f"--shard-size must be >= 1, got {config.shard_size}")
    if config.workers < 0:
        raise TokenizeError(f"--workers must be >= 0, got {config.workers}")
    if config.max_pixels < 1:
        raise TokenizeError(f"--max-pixels must be >= 1, got {config.max_pixels}")
    if config.format not in ("wds", "npy", "parquet"):
        raise TokenizeError(f"unknown --format {config.format!r}; expected wds, npy or parquet")
    if config.format == "parquet":
        from vqtok.model.data.parquet import import_pyarrow

        try:
            import_pyarrow()
        except ImportError as exc:
            raise TokenizeError(str(exc)) from None
    if not resolve_checkpoint(config.checkpoint).is_dir():
        raise TokenizeError(f"checkpoint {config.checkpoint!r} does not exist (or is not a directory); bundled "
                            f"ones: {', '.join(bundled_checkpoints())}")
    if config.size is not None:
        from vqtok.service.imaging import parse_size

        try:
            parse_size(config.size)
        except Exception as exc:  # a ServiceError or ValueError: one line either way
            raise TokenizeError(f"--size {config.size!r}: {getattr(exc, 'message', exc)}") from None


@dataclass
class Prepared:
    """One source item after reading, decoding and fitting (in a DataLoader worker or the main process).

    Attributes:
        index: position in the source.
        key: the item's key (its path, tar member, Parquet row name).
        metadata: the item's metadata (a plain dict: it crosses process boundaries).
        pixels: (H, W, 3) uint8, H and W multiples of f; None when the item failed.
        original: (height, width) of the image as stored (after EXIF orientation).
        reason: why the item failed (None: it did not).
    """

    index: int
    key: str
    metadata: dict[str, Any]
    pixels: np.ndarray | None = None
    original: tuple[int, int] = (0, 0)
    reason: str | None = None


class PreparedImages:
    """A map-style dataset for ``torch.utils.data.DataLoader``: item ``i`` is source item ``i`` prepared as the
    service prepares an upload (``vqtok.tokenizer.prepare_image``), or the reason it could not be.

    Every failure of one item (unreadable, corrupt, truncated, over ``max_pixels``, an unsupported format, an
    unexpected decoder error) becomes a ``Prepared`` with a ``reason``: a bad image never stops the run.
    """

    def __init__(self, source: Any, size: str | None, fit: str, downsample: int, max_pixels: int) -> None:
        from vqtok.service.imaging import parse_size

        self.source = source
        self.target = parse_size(size) if size is not None else None
        self.fit = fit
        self.downsample = downsample
        self.max_pixels = max_pixels
        self._budget: Any = None  # made in the process that uses it (a worker has its own)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Prepared:
        from vqtok.service.errors import ServiceError
        from vqtok.service.imaging import DecodeBudget
        from vqtok.tokenizer import prepare_image

        key = _key_of(self.source, index)
        metadata: dict[str, Any] = {}
        try:
            item = source_item(self.source, index)
            key, metadata = item.key, dict(item.metadata)
            if self._budget is None:
                self._budget = DecodeBudget(1 << 62, timeout_s=0.0)  # the run decodes one image at a time
            fitted = prepare_image(item.image, self.target, self.fit, self.downsample,  # type: ignore[arg-type]
                                   self._budget, self.max_pixels, "image")
        except (UnreadableImage, ServiceError, ValueError, OSError, TypeError) as exc:
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            return Prepared(index, key, metadata, reason=reason)
        except (MemoryError, RecursionError, EOFError, SyntaxError, ArithmeticError, LookupError) as exc:
            return Prepared(index, key, metadata, reason=f"cannot decode the image: {type(exc).__name__}: {exc}")
        return Prepared(index, key, metadata, fitted.pixels, (fitted.original.height, fitted.original.width))


def source_item(source: Any, index: int) -> SourceItem:
    """Item ``index`` of ``source`` with its image as the file's encoded bytes wherever there is a file.

    A folder source decodes its files itself (for training); tokenize reads the bytes instead, so they go through
    the service's header-first path (``--max-pixels`` before decoding, JPEG draft decoding): the same grids as
    ``/encode``. Other sources' items are returned as they are (bytes, or pixels for photos and CIFAR-10).
    """
    from vqtok.model.data.folder import FolderSource
    from vqtok.model.data.lists import read_file_bytes

    if isinstance(source, FolderSource):
        path, key = source.files[source.check_index(index)], source.relative_name(index)
        return SourceItem(key, read_file_bytes(path, key), {"path": str(path)})
    return source[index]


def _key_of(source: Any, index: int) -> str:
    """Item ``index``'s key without reading it (names a failure): a list/tar/Parquet key, a folder's relative path."""
    for name in ("key_of", "relative_name"):
        method = getattr(source, name, None)
        if method is not None:
            try:
                return str(method(index))
            except (LookupError, ValueError, OSError):
                break
    return str(index)


def _as_list(batch: list[Prepared]) -> list[Prepared]:
    """The DataLoader's collate: a batch stays a list (images of one batch may differ in size)."""
    return batch


@dataclass
class Encoded:
    """One tokenized sample, as the shard writers take it (``grid``: (h, w) code indices)."""

    index: int
    key: str
    metadata: dict[str, Any]
    original: tuple[int, int]
    grid: np.ndarray


def run(config: TokenizeConfig, *, stop_after_shards: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``config.input`` into ``config.out``; returns this rank's summary (see the module docstring).

    Raises:
        TokenizeError: a bad option, checkpoint or input, or an output folder made with other options.
        TooManyFailures: more images failed than ``config.max_failures`` (the summary on disk says how far it got).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch
    from torch.utils.data import DataLoader

    from vqtok.tokenizer import Tokenizer

    _check_config(config)
    place = Placement.from_env()
    source = open_input(config.input)
    try:
        total = len(source)  # indexes a list, tar or Parquet source
    except (ValueError, ImportError) as exc:
        raise TokenizeError(f"input {config.input!r}: {exc}") from None
    if total == 0:
        raise TokenizeError(f"input {config.input!r} holds no image")
    device = config.device
    if place.world_size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{place.local_rank}"
    try:
        tokenizer = Tokenizer.from_checkpoint(config.checkpoint, device=device, batch_size=config.batch_size)
    except Exception as exc:  # CheckpointError, a bad device, ...: one line
        raise TokenizeError(f"cannot load checkpoint {config.checkpoint!r}: {exc}") from None
    if config.size is None or config.fit is None:  # the record's native size and fit, as /encode uses them
        default_size, default_fit, _ = tokenizer.defaults()
        config = dataclasses.replace(config, size=config.size if config.size is not None else default_size,
                                     fit=config.fit or (default_fit if config.size is None else "pad"))
    layout = None
    if config.layout:
        try:
            layout = tokenizer.layout(config.layout)
        except ValueError as exc:
            raise TokenizeError(f"--layout {config.layout!r}: {exc}") from None
    k = tokenizer.num_embeddings
    dtype = np.uint16 if k <= 65_536 else np.uint32
    checkpoint = tokenizer.engine.checkpoint
    model = {"name": checkpoint.name, "model_id": tokenizer.model_id, "weights_sha256": checkpoint.weights_sha256,
             "num_embeddings": k, "downsample": tokenizer.downsample}
    options = {name: str(getattr(config, name)) if name == "checkpoint" else getattr(config, name)
               for name in OUTPUT_OPTIONS}
    num_shards = -(-total // config.shard_size)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries, done = _previous_runs(out)
    if any(_options_of(previous) != options or previous.get("model", {}).get("model_id") != model["model_id"]
           for previous in summaries):
        if not config.overwrite:
            raise TokenizeError(f"{out} holds a run with other options or another model; use a new --out, "
                                "or --overwrite to replace it")
        for stale in [*out.glob("shard-*"), *out.glob("manifest*.json"), *out.glob("manifest*.jsonl"),
                      *out.glob("summary*.json")]:
            stale.unlink()
        done = {}

    root = getattr(source, "root", None)
    folder_skipped = [Path(p).relative_to(root).as_posix() if root is not None and Path(p).is_relative_to(root)
                      else str(p) for p in getattr(source, "skipped_paths", [])]
    scan_failures = [{"key": path, "index": None, "shard": None,
                      "reason": "skipped by the folder scan: Pillow cannot identify or verify it (unreadable)"}
                     for path in folder_skipped] if place.rank == 0 else []
    mine = list(range(place.rank, num_shards, place.world_size))
    base = {"format_version": FORMAT_VERSION, "model": model, "options": options,
            "run": {"batch_size": config.batch_size, "workers": config.workers, "device": str(tokenizer.engine.device)},
            "source": {"name": source.name, "num_items": total, "skipped_by_scan": folder_skipped},
            "num_shards": num_shards, "world_size": place.world_size, "rank": place.rank}
    records: dict[int, dict[str, Any]] = {}

    def save(complete: bool) -> dict[str, Any]:
        summary = _summary(base, records, scan_failures, complete)
        _atomic_write(out / place.manifest_name, _lines_bytes(records))
        _atomic_write(out / place.summary_name, json.dumps(summary, indent=1, sort_keys=True).encode() + b"\n")
        (out / place.legacy_name).unlink(missing_ok=True)  # a format-1 run's manifest, now carried over
        return summary

    # Temp files a killed run of this rank left behind (its own shards and manifest only: other ranks may
    # be writing theirs right now).
    for name in [place.manifest_name, place.summary_name, *(n for s in mine for n in shard_files(config.format, s))]:
        for stale in out.glob(f".{name}.tmp-*"):
            stale.unlink(missing_ok=True)
    todo = []
    for shard in mine:
        if shard in done and _shard_present(out, done[shard]):
            records[shard] = done[shard]
        else:
            todo.append(shard)
    save(complete=False)  # the options are on disk before any shard is

    from tqdm import tqdm

    chunks = {shard: [list(range(i, min(total, (shard + 1) * config.shard_size, i + config.batch_size)))
                      for i in range(shard * config.shard_size, min(total, (shard + 1) * config.shard_size),
                                     config.batch_size)] for shard in todo}
    loader = DataLoader(PreparedImages(source, config.size, config.fit, tokenizer.downsample, config.max_pixels),  # type: ignore[arg-type]
                        batch_sampler=[chunk for shard in todo for chunk in chunks[shard]],
                        num_workers=config.workers, collate_fn=_as_list)
    bar = tqdm(total=sum(len(c) for s in todo for c in chunks[s]), unit="img", file=sys.stderr,
               disable=None if progress else True,
               desc=f"tokenize rank {place.rank}" if place.world_size > 1 else "tokenize")
    started, written, failed_now = time.monotonic(), 0, 0
    failed_before = sum(len(r.get("failures", [])) for r in records.values())  # in shards kept from earlier runs

    def finish(shard: int, samples: list[Encoded], shard_failures: list[dict[str, Any]]) -> dict[str, Any]:
        """Write one shard, then its manifest line and the summary (on the writer thread, in shard order)."""
        files = _write_shard(out, config.format, shard, samples, layout, model, dtype)
        records[shard] = {"shard": shard, "samples": len(samples), "failed": len(shard_failures),
                          "first_index": shard * config.shard_size,
                          "stop_index": min(total, (shard + 1) * config.shard_size), "files": files,
                          "failures": shard_failures}
        return save(complete=False)

    batches = iter(loader) if todo else iter(())  # nothing to do: start no worker
    pending: Future[dict[str, Any]] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqtok-tokenize-writer") as writer:
        try:
            for count, shard in enumerate(todo):
                samples: list[Encoded] = []
                shard_failures: list[dict[str, Any]] = []
                for _ in chunks[shard]:
                    prepared: list[Prepared] = next(batches)
                    good = [p for p in prepared if p.pixels is not None]
                    shard_failures += [{"key": p.key, "index": p.index, "shard": shard, "reason": p.reason}
                                       for p in prepared if p.pixels is None]
                    if good:
                        pixels = [torch.from_numpy(p.pixels).permute(2, 0, 1) for p in good]  # type: ignore[arg-type]
                        grids = tokenizer._run(tokenizer.engine.encode_batch, pixels)
                        samples += [Encoded(p.index, p.key, p.metadata, p.original, grid)
                                    for p, grid in zip(good, grids, strict=True)]
                    bar.update(len(prepared))
                if shard_failures or failed_before or scan_failures:
                    bar.set_postfix(failed=failed_before + failed_now + len(shard_failures) + len(scan_failures))
                if pending is not None:
                    pending.result()  # one shard in writing at a time: memory stays bounded
                pending = writer.submit(finish, shard, samples, shard_failures)
                written += len(samples)
                failed_now += len(shard_failures)
                failed_so_far = failed_before + failed_now + len(scan_failures)
                if 0 <= config.max_failures < failed_so_far:
                    pending.result()
                    raise TooManyFailures(f"{failed_so_far} images failed, more than --max-failures "
                                          f"{config.max_failures}; stopped after shard {shard} "
                                          f"(see {out / place.summary_name})")
                if stop_after_shards is not None and count + 1 >= stop_after_shards:
                    pending.result()
                    raise StopAfterShards(f"stopped after {count + 1} shard(s) (test hook)")
            if pending is not None:
                pending.result()
        finally:
            bar.close()
            del batches  # stops the DataLoader's workers
    summary = save(complete=True)
    if place.world_size > 1:
        _merge_if_complete(out, place.world_size)
    elapsed = time.monotonic() - started
    rate = written / elapsed if elapsed > 0 else 0.0
    counts = summary["counts"]
    print(f"vqtok tokenize: {counts['done']} samples in {counts['shards_done']} shard(s), {counts['failed']} failed, "
          f"{counts['skipped']} skipped; this run encoded {written} images at {rate:.1f} images/s "
          f"({failed_now} failed) -> {out / place.summary_name}", file=sys.stderr)
    return summary


def _write_shard(out: Path, fmt: str, shard: int, samples: list[Encoded], layout: Any, model: dict[str, Any],
                 dtype: Any) -> list[dict[str, Any]]:
    """Write one shard's files atomically; returns ``[{"file", "bytes", "sha256"}]`` for its manifest line."""
    names = shard_files(fmt, shard)
    blobs: list[bytes]
    if fmt == "wds":
        members = []
        for sample in samples:
            grid = sample.grid
            meta = {"key": sample.key, "index": sample.index, "original_size": list(sample.original),
                    "grid": list(grid.shape), "model": model["name"], "model_id": model["model_id"],
                    "metadata": sample.metadata}
            if layout is not None:
                meta["tokens"] = [int(t) for t in layout.to_tokens(grid)]
            key = f"{sample.index:09d}"
            members += [(f"{key}.npy", _npy_bytes(grid.astype(dtype))), (f"{key}.json", _json_bytes(meta))]
        blobs = [_tar_bytes(members)]
    elif fmt == "parquet":
        blobs = [_parquet_bytes(samples, layout, model, dtype)]
    else:
        parts = [np.asarray(layout.to_tokens(s.grid), dtype=np.int64) if layout is not None
                 else s.grid.reshape(-1).astype(dtype) for s in samples]
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64 if layout is not None else dtype)
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p in parts])
        keys = [{"key": s.key, "index": s.index, "grid": list(s.grid.shape), "original_size": list(s.original),
                 "metadata": s.metadata} for s in samples]
        blobs = [_npy_bytes(tokens), _npy_bytes(offsets), json.dumps(keys, sort_keys=True, default=str).encode()]
    files = []
    for name, data in zip(names, blobs, strict=True):
        _atomic_write(out / name, data)
        files.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return files


def _parquet_bytes(samples: list[Encoded], layout: Any, model: dict[str, Any], dtype: Any) -> bytes:
    """One Parquet shard: key, index, grid [H, W], tokens (list<uint16|uint32>, or list<int64> in a layout),
    original_size [H, W], metadata (JSON text); the model identity in the schema's key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    token_type = pa.int64() if layout is not None else (pa.uint16() if dtype == np.uint16 else pa.uint32())
    schema = pa.schema([
        ("key", pa.string()), ("index", pa.int64()), ("grid", pa.list_(pa.int32(), 2)),
        ("tokens", pa.list_(token_type)), ("original_size", pa.list_(pa.int32(), 2)), ("metadata", pa.string()),
    ], metadata={"vqtok.model": _json_bytes(model)})
    tokens = [np.asarray(layout.to_tokens(s.grid), dtype=np.int64) if layout is not None
              else s.grid.reshape(-1).astype(dtype) for s in samples]
    columns = [
        pa.array([s.key for s in samples], pa.string()),
        pa.array([s.index for s in samples], pa.int64()),
        pa.array([list(s.grid.shape) for s in samples], pa.list_(pa.int32(), 2)),
        pa.array(tokens, pa.list_(token_type)),
        pa.array([list(s.original) for s in samples], pa.list_(pa.int32(), 2)),
        pa.array([_json_bytes(s.metadata).decode() for s in samples], pa.string()),
    ]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(columns, schema=schema), buffer)
    return buffer.getvalue()


def _merge_if_complete(out: Path, world_size: int) -> bool:
    """Write ``manifest.jsonl`` and ``summary.json`` from every rank's parts once all are complete (any rank may;
    the same bytes whichever does)."""
    parts, records = [], {}
    for rank in range(world_size):
        part = _read_json(out / f"summary.rank-{rank}.json")
        if part is None or not part.get("complete"):
            return False
        parts.append(part)
        records.update({r["shard"]: r for r in _read_lines(out / f"manifest.rank-{rank}.jsonl")})
    scan_failures = [f for p in parts for f in p["failures"] if f.get("shard") is None]
    base = {key: parts[0][key] for key in ("format_version", "model", "options", "run", "source", "num_shards")}
    merged = _summary({**base, "world_size": world_size, "rank": None}, records, scan_failures, complete=True)
    _atomic_write(out / MANIFEST, _lines_bytes(records))
    _atomic_write(out / SUMMARY, json.dumps(merged, indent=1, sort_keys=True).encode() + b"\n")
    (out / LEGACY_MANIFEST).unlink(missing_ok=True)
    return True


# --- verify ------------------------------------------------------------------------------------------------------

EXIT_VERIFY_FAILED = 5
# Re-encoding runs at another batch composition than the run did: tokens must agree on this share of
# positions (the hardening issue's rule; they may differ only at near-ties).
VERIFY_AGREEMENT = 0.999


def _stored_tokens(out: Path, fmt: str, record: Mapping[str, Any]) -> dict[int, np.ndarray]:
    """Every stored sample of one shard: source index -> its tokens as written (flat indices or layout ids)."""
    shard = int(record["shard"])
    stored: dict[int, np.ndarray] = {}
    if fmt == "wds":
        with tarfile.open(out / shard_files(fmt, shard)[0]) as archive:
            members = {m.name: m for m in archive.getmembers()}
            for name in members:
                if name.endswith(".json"):
                    meta = json.loads(archive.extractfile(members[name]).read())  # type: ignore[union-attr]
                    grid = np.load(io.BytesIO(archive.extractfile(members[name[:-5] + ".npy"]).read()))  # type: ignore[union-attr]
                    tokens = meta.get("tokens")
                    stored[int(meta["index"])] = np.asarray(tokens) if tokens is not None else grid.reshape(-1)
    elif fmt == "npy":
        tokens_name, offsets_name, keys_name = shard_files(fmt, shard)
        tokens, offsets = np.load(out / tokens_name), np.load(out / offsets_name)
        for i, entry in enumerate(json.loads((out / keys_name).read_text())):
            stored[int(entry["index"])] = tokens[offsets[i] : offsets[i + 1]]
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out / shard_files(fmt, shard)[0]).to_pydict()
        for index, tokens in zip(table["index"], table["tokens"], strict=True):
            stored[int(index)] = np.asarray(tokens)
    return stored


def _read_finished(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, shard records) of a finished output folder: ``summary.json`` + ``manifest.jsonl``, or a format-1
    ``manifest.json``."""
    summary = _read_json(out / SUMMARY)
    if summary is not None:
        return summary, _read_lines(out / MANIFEST)
    legacy = _read_json(out / LEGACY_MANIFEST)
    if legacy is not None:
        return legacy, list(legacy.get("shards", []))
    raise TokenizeError(f"{out / SUMMARY}: missing (not a vqtok tokenize output, or not all its ranks have finished)")


def verify(out: Path, samples: int = 8, seed: int = 0) -> list[str]:
    """Problems found in a finished output folder (empty: all good): every shard file against the manifest's
    size and sha256, then ``samples`` random stored samples re-encoded from the input with the manifest's
    checkpoint and options, their tokens compared by the batch-composition rule."""
    out = Path(out)
    summary, records = _read_finished(out)
    config, fmt = _options_of(summary), _options_of(summary)["format"]
    problems = []
    intact = []
    for record in records:
        broken = [f["file"] for f in _record_files(record) if not (out / f["file"]).is_file()
                  or (out / f["file"]).stat().st_size != f["bytes"] or _sha256(out / f["file"]) != f["sha256"]]
        problems += [f"shard {record['shard']}: {name} is missing or differs from the manifest (size/sha256)"
                     for name in broken]
        if not broken:
            intact.append(record)
    from vqtok.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(config["checkpoint"], device="cpu")
    if tokenizer.model_id != summary["model"]["model_id"]:
        return [*problems, f"checkpoint {config['checkpoint']!r} is model {tokenizer.model_id[:12]}, the output was "
                f"made by {summary['model']['model_id'][:12]}"]
    layout = tokenizer.layout(config["layout"]) if config.get("layout") else None
    source = open_input(config["input"])
    stored = {index: tokens for record in intact for index, tokens in _stored_tokens(out, fmt, record).items()}
    rng = np.random.default_rng(seed)
    for index in sorted(rng.choice(sorted(stored), size=min(samples, len(stored)), replace=False).tolist()):
        item = source_item(source, index)
        grid = tokenizer.encode(item.image, size=config["size"], fit=config["fit"])
        fresh = np.asarray(layout.to_tokens(grid)) if layout is not None else grid.reshape(-1)
        old = stored[index]
        agreement = float((fresh == old).mean()) if fresh.shape == old.shape else 0.0
        if agreement < VERIFY_AGREEMENT:
            problems.append(f"sample {index} ({item.key}): re-encoded tokens agree on {agreement:.2%} of "
                            f"positions (need {VERIFY_AGREEMENT:.1%})")
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqtok tokenize", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, TokenizeConfig, ENV_PREFIX, title="tokenize (env VQTOK_TOKENIZE_*)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every image tokenized; 3 finished, but some images failed (listed in the summary; 0 under
    torchrun, whose launcher stops every rank when one exits non-zero); 4 stopped by --max-failures; 2 bad arguments
    or input. ``--verify DIR``: 0 all good, 5 problems found."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--verify"]:  # vqtok tokenize --verify DIR [--samples N]
        verify_parser = argparse.ArgumentParser(prog="vqtok tokenize --verify")
        verify_parser.add_argument("--verify", type=Path, required=True, metavar="DIR")
        verify_parser.add_argument("--samples", type=int, default=8, help="stored samples to re-encode")
        verify_args = verify_parser.parse_args(argv)
        try:
            problems = verify(verify_args.verify, verify_args.samples)
        except TokenizeError as exc:
            print(f"vqtok tokenize: error: {exc}", file=sys.stderr)
            return 2
        for problem in problems:
            print(f"vqtok tokenize --verify: {problem}", file=sys.stderr)
        print(f"vqtok tokenize --verify {verify_args.verify}: " + (f"{len(problems)} problem(s)" if problems else "ok"))
        return EXIT_VERIFY_FAILED if problems else 0
    args = build_parser().parse_args(argv)
    config = config_from_args(TokenizeConfig, args)
    try:
        summary = run(config)
    except TokenizeError as exc:
        print(f"vqtok tokenize: error: {exc}", file=sys.stderr)
        return 2
    except TooManyFailures as exc:
        print(f"vqtok tokenize: {exc}", file=sys.stderr)
        return EXIT_TOO_MANY_FAILURES
    counts = summary["counts"]
    if not (counts["failed"] or counts["skipped"]):
        return 0
    if Placement.from_env().world_size > 1:
        # Under torchrun a rank's non-zero exit makes the launcher stop every other rank: a finished rank says
        # 0, and the failures are counted and listed in the (merged) summary.json.
        print(f"vqtok tokenize: rank finished; {counts['failed'] + counts['skipped']} image(s) failed or were "
              f"skipped, listed in {config.out}/summary*.json (exit status 0 under torchrun)", file=sys.stderr)
        return 0
    return EXIT_FAILED_IMAGES


__all__ = ["TokenizeConfig", "TokenizeError", "main", "open_input", "run"]

if __name__ == "__main__":
    raise SystemExit(main())
