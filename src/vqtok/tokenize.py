"""``vqtok tokenize``: a dataset to token shards, resumable, split by shard across torchrun ranks.

    vqtok tokenize --checkpoint CK --input SPEC --out DIR [--size 256 --fit crop] [--layout NAME]
                   [--format wds|npy|parquet] [--batch-size B] [--shard-size S] [--device auto]

Inputs (``--input``): any data spec of :func:`vqtok.model.data.open_source`: an image folder (``folder:DIR``),
``photos``, ``cifar10:DIR``, a file list (``list:FILE`` or a bare ``*.txt``: one image path per line; ``*.jsonl``:
one object per line with ``"path"`` (or ``"image"``) and any metadata, carried through; paths relative to the
list file's folder), WebDataset-style tar shards (``x.tar``, or ``tar:DIR`` for every ``*.tar`` in DIR, sorted;
members grouped by key: ``000001.jpg`` + ``000001.json`` metadata), or Parquet files with an image-bytes column
(``x.parquet`` or ``parquet:FILE_OR_DIR[#COLUMN]``; the other columns carried as metadata; needs pyarrow).

Outputs (``--format``): ``wds`` (``shard-NNNNN.tar``: ``<index>.npy`` grid + ``<index>.json`` metadata per sample),
``npy`` (``shard-NNNNN.tokens.npy`` / ``.offsets.npy`` / ``.keys.json``) or ``parquet`` (``shard-NNNNN.parquet``:
columns key, index, grid, tokens, original_size, metadata (JSON text); needs pyarrow).

Shard ``i`` holds source items ``[i*S, (i+1)*S)`` in the source's order, so shards are deterministic; each is
written to a temporary name and renamed, then recorded in the manifest. A rerun with the same arguments skips
the shards recorded and present on disk; a killed run, rerun, gives byte-identical files. Under torchrun
(``WORLD_SIZE`` > 1) rank ``r`` takes shards ``r, r+W, ...`` and writes ``manifest.rank-R.json``; the last
rank to finish merges the parts into ``manifest.json``. Unreadable images are skipped and listed in the
manifest's ``failures``.

This module lives in ``src/vqtok`` (not ``model/``) because it runs the service's preprocessing and engine
through :class:`vqtok.tokenizer.Tokenizer`, and ``model/`` must not import ``service/``.
"""

from __future__ import annotations

import argparse
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

ENV_PREFIX = "VQTOK_TOKENIZE_"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# The options that change what is written: a rerun with other values is refused.
OUTPUT_OPTIONS = ("checkpoint", "input", "size", "fit", "layout", "format", "shard_size")


class TokenizeError(ValueError):
    """A bad argument or input: reported as one line, exit status 2."""


class TooManyFailures(RuntimeError):
    """More images failed than ``--max-failures`` allows: the run stops (exit status 4), manifest saved."""


EXIT_FAILED_IMAGES = 3  # the run finished, but some images failed (listed in the manifest)
EXIT_TOO_MANY_FAILURES = 4  # stopped early by --max-failures


class StopAfterShards(RuntimeError):
    """Raised by the test hook ``run(..., stop_after_shards=N)`` to simulate a run killed after N shards."""


@dataclass
class TokenizeConfig:
    """Options of ``vqtok tokenize``.

    Attributes:
        checkpoint: checkpoint directory, or "default" for the bundled model.
        input: data spec (image folder, folder:DIR, photos, cifar10:DIR), a *.txt / *.jsonl file list
            (list:FILE), tar shards (x.tar or tar:DIR) or Parquet files (x.parquet or parquet:PATH[#COLUMN]).
        out: output directory (shards and manifest.json).
        size: target size as /encode takes it (e.g. "256" or "256x192"); none keeps each image's size.
        fit: how an image is brought to size (as /encode: pad, crop, resize, none).
        layout: write the tokens in this layout preset (e.g. "emu3-like") instead of raw code indices.
        format: wds (WebDataset-style tar shards: <key>.npy + <key>.json per sample), npy (per shard:
            tokens, offsets, keys) or parquet (a shard-NNNNN.parquet per shard; needs pyarrow).
        batch_size: images per forward pass.
        shard_size: source items per shard (shard i holds items [i*S, (i+1)*S)).
        device: auto, cpu, cuda or cuda:N (under torchrun, auto/cuda take cuda:LOCAL_RANK).
        max_failures: stop (exit status 4) once more images than this failed in the run; -1: never stop.
        overwrite: an output folder holding a run with other options or another model is cleared first
            (its shards and manifests), instead of refused.
    """

    checkpoint: str
    input: str
    out: Path
    size: str | None = None
    fit: Literal["pad", "crop", "resize", "none"] = "pad"
    layout: str | None = None
    format: Literal["wds", "npy", "parquet"] = "wds"
    batch_size: int = 16
    shard_size: int = 1000
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


def _shard_present(out: Path, record: Mapping[str, Any]) -> bool:
    files = record.get("files", {})
    return bool(files) and all((out / name).is_file() and (out / name).stat().st_size == info.get("bytes")
                               and _sha256(out / name) == info.get("sha256") for name, info in files.items())


# --- the run -----------------------------------------------------------------------------------------------------


@dataclass
class Placement:
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
        return MANIFEST if self.world_size == 1 else f"manifest.rank-{self.rank}.json"


def _check_config(config: TokenizeConfig) -> None:
    if config.batch_size < 1:
        raise TokenizeError(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.shard_size < 1:
        raise TokenizeError(f"--shard-size must be >= 1, got {config.shard_size}")
    if config.format not in ("wds", "npy", "parquet"):
        raise TokenizeError(f"unknown --format {config.format!r}; expected wds, npy or parquet")
    if config.format == "parquet":
        from vqtok.model.data.parquet import import_pyarrow

        try:
            import_pyarrow()
        except ImportError as exc:
            raise TokenizeError(str(exc)) from None
    if config.checkpoint != "default" and not Path(config.checkpoint).is_dir():
        raise TokenizeError(f"checkpoint {config.checkpoint!r} does not exist (or is not a directory)")
    if config.size is not None:
        from vqtok.service.imaging import parse_size

        try:
            parse_size(config.size)
        except Exception as exc:  # a ServiceError or ValueError: one line either way
            raise TokenizeError(f"--size {config.size!r}: {getattr(exc, 'message', exc)}") from None


def _load_manifests(out: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(out.glob("manifest*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def run(config: TokenizeConfig, *, stop_after_shards: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``config.input`` into ``config.out``; returns this rank's manifest (see the module docstring).

    Raises:
        TokenizeError: a bad option, checkpoint or input, or an output folder made with other options.
    """
    from vqtok.service.errors import ServiceError
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
    if place.world_size > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{place.local_rank}"
    try:
        tokenizer = Tokenizer.from_checkpoint(config.checkpoint, device=device, batch_size=config.batch_size)
    except Exception as exc:  # CheckpointError, a bad device, ...: one line
        raise TokenizeError(f"cannot load checkpoint {config.checkpoint!r}: {exc}") from None
    layout = None
    if config.layout:
        try:
            layout = tokenizer.layout(config.layout)
        except ValueError as exc:
            raise TokenizeError(f"--layout {config.layout!r}: {exc}") from None
    k = tokenizer.num_embeddings
    dtype = np.uint16 if k <= 65_536 else np.uint32
    model = {"name": tokenizer.engine.checkpoint.name, "model_id": tokenizer.model_id, "num_embeddings": k,
             "downsample": tokenizer.downsample}
    options = {name: str(getattr(config, name)) if name == "checkpoint" else getattr(config, name)
               for name in OUTPUT_OPTIONS}
    num_shards = -(-total // config.shard_size)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[int, dict[str, Any]] = {}
    failures_by_shard: dict[int, list[dict[str, Any]]] = {}
    previous_runs = _load_manifests(out)
    if any(previous.get("config") != options or previous.get("model", {}).get("model_id") != model["model_id"]
           for previous in previous_runs):
        if not config.overwrite:
            raise TokenizeError(f"{out} holds a run with other options or another model; use a new --out, "
                                "or --overwrite to replace it")
        for stale in [*out.glob("shard-*"), *out.glob("manifest*.json")]:
            stale.unlink()
        previous_runs = []
    for previous in previous_runs:
        for record in previous.get("shards", []):
            done[record["shard"]] = record
        for failure in previous.get("failures", []):
            if failure.get("shard") is None:  # a folder scan's skip: found again below
                continue
            failures_by_shard.setdefault(failure["shard"], []).append(failure)

    key_of = getattr(source, "key_of", None)
    folder_skipped = [str(p) for p in getattr(source, "skipped_paths", [])]
    scan_failures = [{"key": path, "index": None, "shard": None,
                      "reason": "unreadable: skipped by the folder scan (Pillow cannot identify or verify it)"}
                     for path in folder_skipped] if place.rank == 0 else []
    mine = list(range(place.rank, num_shards, place.world_size))
    manifest: dict[str, Any] = {
        "format_version": MANIFEST_VERSION, "model": model, "config": options,
        "source": {"name": source.name, "num_items": total, "skipped_by_scan": folder_skipped},
        "num_shards": num_shards, "world_size": place.world_size, "rank": place.rank,
        "shards": [], "failures": [], "totals": {}, "complete": False,
    }
    records: dict[int, dict[str, Any]] = {}
    failures: dict[int, list[dict[str, Any]]] = {}

    def save(complete: bool) -> None:
        manifest["shards"] = [records[i] for i in sorted(records)]
        manifest["failures"] = scan_failures + [f for i in sorted(failures) for f in failures[i]]
        manifest["totals"] = {"shards_done": len(records), "samples": sum(r["samples"] for r in records.values()),
                              "failed": len(manifest["failures"])}
        manifest["complete"] = complete
        _atomic_write(out / place.manifest_name, json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")

    # Temp files a killed run of this rank left behind (its own shards and manifest only: other ranks may
    # be writing theirs right now).
    for name in [place.manifest_name, *(n for shard in mine for n in shard_files(config.format, shard))]:
        for stale in out.glob(f".{name}.tmp-*"):
            stale.unlink(missing_ok=True)
    todo = []
    for shard in mine:
        if shard in done and _shard_present(out, done[shard]):
            records[shard] = done[shard]
            failures[shard] = failures_by_shard.get(shard, [])
        else:
            todo.append(shard)

    from tqdm import tqdm

    remaining = sum(min(total, (s + 1) * config.shard_size) - s * config.shard_size for s in todo)
    bar = tqdm(total=remaining, unit="img", file=sys.stderr, disable=None if progress else True,
               desc=f"tokenize rank {place.rank}" if place.world_size > 1 else "tokenize")
    started, written = time.monotonic(), 0
    for count, shard in enumerate(todo):
        samples: list[tuple[SourceItem, int, Any, np.ndarray]] = []  # (item, index, fitted, grid)
        shard_failures: list[dict[str, Any]] = []
        start, stop = shard * config.shard_size, min(total, (shard + 1) * config.shard_size)
        for chunk_start in range(start, stop, config.batch_size):
            batch = []
            for index in range(chunk_start, min(stop, chunk_start + config.batch_size)):
                key = key_of(index) if key_of is not None else str(index)
                try:
                    item = source[index]
                    key = item.key
                    (fitted,) = tokenizer.prepare([item.image], size=config.size, fit=config.fit)
                    batch.append((item, index, fitted))
                except (UnreadableImage, ServiceError, ValueError, OSError, TypeError) as exc:
                    reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                    shard_failures.append({"key": key, "index": index, "shard": shard, "reason": reason})
            if batch:
                import torch

                pixels = [torch.from_numpy(fitted.pixels).permute(2, 0, 1) for _, _, fitted in batch]
                grids = tokenizer._run(tokenizer.engine.encode_batch, pixels)
                samples += [(*entry, grid) for entry, grid in zip(batch, grids, strict=True)]
            bar.update(min(stop, chunk_start + config.batch_size) - chunk_start)
        files = _write_shard(out, config.format, shard, samples, layout, model, dtype)
        records[shard] = {"shard": shard, "samples": len(samples), "failed": len(shard_failures),
                          "first_index": start, "stop_index": stop, "files": files}
        failures[shard] = shard_failures
        written += len(samples)
        save(complete=False)
        failed_so_far = sum(len(f) for f in failures.values()) + len(scan_failures)
        if 0 <= config.max_failures < failed_so_far:
            bar.close()
            raise TooManyFailures(f"{failed_so_far} images failed, more than --max-failures {config.max_failures}; "
                                  f"stopped after shard {shard} (see {out / place.manifest_name})")
        if stop_after_shards is not None and count + 1 >= stop_after_shards:
            bar.close()
            raise StopAfterShards(f"stopped after {count + 1} shard(s) (test hook)")
    bar.close()
    save(complete=True)
    if place.world_size > 1:
        _merge_if_complete(out, place.world_size)
    elapsed = time.monotonic() - started
    rate = written / elapsed if elapsed > 0 else 0.0
    print(f"vqtok tokenize: {manifest['totals']['samples']} samples in {len(records)} shard(s), "
          f"{manifest['totals']['failed']} failed; this run encoded {written} images at {rate:.1f} images/s "
          f"-> {out / place.manifest_name}", file=sys.stderr)
    return manifest


def _write_shard(out: Path, fmt: str, shard: int, samples: list[tuple[SourceItem, int, Any, np.ndarray]],
                 layout: Any, model: dict[str, Any], dtype: Any) -> dict[str, dict[str, Any]]:
    names = shard_files(fmt, shard)
    blobs: list[bytes]
    if fmt == "wds":
        members = []
        for item, index, fitted, grid in samples:
            key = f"{index:09d}"
            meta = {"key": item.key, "index": index, "original_size": [fitted.original.height, fitted.original.width],
                    "grid": list(grid.shape), "model": model["name"], "model_id": model["model_id"],
                    "metadata": dict(item.metadata)}
            if layout is not None:
                meta["tokens"] = [int(t) for t in layout.to_tokens(grid)]
            members += [(f"{key}.npy", _npy_bytes(grid.astype(dtype))), (f"{key}.json", _json_bytes(meta))]
        blobs = [_tar_bytes(members)]
    elif fmt == "parquet":
        blobs = [_parquet_bytes(samples, layout, model, dtype)]
    else:
        parts = [np.asarray(layout.to_tokens(grid), dtype=np.int64) if layout is not None
                 else grid.reshape(-1).astype(dtype) for _, _, _, grid in samples]
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64 if layout is not None else dtype)
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p in parts])
        keys = [{"key": item.key, "index": index, "grid": list(grid.shape),
                 "original_size": [fitted.original.height, fitted.original.width], "metadata": dict(item.metadata)}
                for item, index, fitted, grid in samples]
        blobs = [_npy_bytes(tokens), _npy_bytes(offsets), json.dumps(keys, sort_keys=True, default=str).encode()]
    files = {}
    for name, data in zip(names, blobs, strict=True):
        _atomic_write(out / name, data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def _parquet_bytes(samples: list[tuple[SourceItem, int, Any, np.ndarray]], layout: Any, model: dict[str, Any],
                   dtype: Any) -> bytes:
    """One Parquet shard: key, index, grid [H, W], tokens (list<uint16|uint32>, or list<int64> in a layout),
    original_size [H, W], metadata (JSON text); the model identity in the schema's key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    token_type = pa.int64() if layout is not None else (pa.uint16() if dtype == np.uint16 else pa.uint32())
    schema = pa.schema([
        ("key", pa.string()), ("index", pa.int64()), ("grid", pa.list_(pa.int32(), 2)),
        ("tokens", pa.list_(token_type)), ("original_size", pa.list_(pa.int32(), 2)), ("metadata", pa.string()),
    ], metadata={"vqtok.model": _json_bytes(model)})
    tokens = [np.asarray(layout.to_tokens(grid), dtype=np.int64) if layout is not None
              else grid.reshape(-1).astype(dtype) for _, _, _, grid in samples]
    columns = [
        pa.array([item.key for item, _, _, _ in samples], pa.string()),
        pa.array([index for _, index, _, _ in samples], pa.int64()),
        pa.array([list(grid.shape) for _, _, _, grid in samples], pa.list_(pa.int32(), 2)),
        pa.array(tokens, pa.list_(token_type)),
        pa.array([[fitted.original.height, fitted.original.width] for _, _, fitted, _ in samples],
                 pa.list_(pa.int32(), 2)),
        pa.array([_json_bytes(dict(item.metadata)).decode() for item, _, _, _ in samples], pa.string()),
    ]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(columns, schema=schema), buffer)
    return buffer.getvalue()


def _merge_if_complete(out: Path, world_size: int) -> bool:
    """Write ``manifest.json`` from every rank's part once all are complete (any rank may; same bytes)."""
    parts = []
    for rank in range(world_size):
        try:
            part = json.loads((out / f"manifest.rank-{rank}.json").read_text())
        except (OSError, ValueError):
            return False
        if not part.get("complete"):
            return False
        parts.append(part)
    shards = sorted((r for p in parts for r in p["shards"]), key=lambda r: r["shard"])
    failures = sorted((f for p in parts for f in p["failures"]),
                      key=lambda f: (f["index"] is not None, f["index"] or 0, f["key"]))
    merged = {key: parts[0][key] for key in ("format_version", "model", "config", "source", "num_shards")}
    merged.update({"world_size": world_size, "shards": shards, "failures": failures, "complete": True,
                   "totals": {"shards_done": len(shards), "samples": sum(r["samples"] for r in shards),
                              "failed": len(failures)}})
    _atomic_write(out / MANIFEST, json.dumps(merged, indent=1, sort_keys=True).encode() + b"\n")
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


def verify(out: Path, samples: int = 8, seed: int = 0) -> list[str]:
    """Problems found in a finished output folder (empty: all good): every shard file against the manifest's
    size and sha256, then ``samples`` random stored samples re-encoded from the input with the manifest's
    checkpoint and options, their tokens compared by the batch-composition rule."""
    manifest_path = Path(out) / "manifest.json"
    if not manifest_path.is_file():
        raise TokenizeError(f"{manifest_path}: missing (not a vqtok tokenize output, or not all its ranks "
                            "have finished)")
    manifest = json.loads(manifest_path.read_text())
    config, fmt = manifest["config"], manifest["config"]["format"]
    problems = []
    intact = []
    for record in manifest["shards"]:
        broken = [name for name, meta in record["files"].items() if not (Path(out) / name).is_file()
                  or (Path(out) / name).stat().st_size != meta["bytes"] or _sha256(Path(out) / name) != meta["sha256"]]
        problems += [f"shard {record['shard']}: {name} is missing or differs from the manifest (size/sha256)"
                     for name in broken]
        if not broken:
            intact.append(record)
    from vqtok.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(config["checkpoint"], device="cpu")
    if tokenizer.model_id != manifest["model"]["model_id"]:
        return [*problems, f"checkpoint {config['checkpoint']!r} is model {tokenizer.model_id[:12]}, the output was "
                f"made by {manifest['model']['model_id'][:12]}"]
    layout = tokenizer.layout(config["layout"]) if config.get("layout") else None
    source = open_input(config["input"])
    stored = {index: tokens for record in intact for index, tokens in _stored_tokens(Path(out), fmt, record).items()}
    rng = np.random.default_rng(seed)
    for index in sorted(rng.choice(sorted(stored), size=min(samples, len(stored)), replace=False).tolist()):
        grid = tokenizer.encode(source[index].image, size=config["size"], fit=config["fit"])
        fresh = np.asarray(layout.to_tokens(grid)) if layout is not None else grid.reshape(-1)
        old = stored[index]
        agreement = float((fresh == old).mean()) if fresh.shape == old.shape else 0.0
        if agreement < VERIFY_AGREEMENT:
            problems.append(f"sample {index} ({source[index].key}): re-encoded tokens agree on {agreement:.2%} of "
                            f"positions (need {VERIFY_AGREEMENT:.1%})")
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqtok tokenize", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, TokenizeConfig, ENV_PREFIX, title="tokenize (env VQTOK_TOKENIZE_*)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every image tokenized; 3 finished, but some images failed (listed in the manifest);
    4 stopped by --max-failures; 2 bad arguments or input. ``--verify DIR``: 0 all good, 5 problems found."""
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
        manifest = run(config)
    except TokenizeError as exc:
        print(f"vqtok tokenize: error: {exc}", file=sys.stderr)
        return 2
    except TooManyFailures as exc:
        print(f"vqtok tokenize: {exc}", file=sys.stderr)
        return EXIT_TOO_MANY_FAILURES
    return EXIT_FAILED_IMAGES if manifest["totals"]["failed"] else 0


__all__ = ["TokenizeConfig", "TokenizeError", "main", "open_input", "run"]

if __name__ == "__main__":
    raise SystemExit(main())
