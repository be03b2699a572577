"""Every GPU figure of issue 14 in one prepared run: the bundled models on a GPU, in-process and over HTTP.

One call on a lent GPU machine (an H200 with 16 CPU cores, a few minutes) measures, section by section,
each guarded (a section that fails prints why, is recorded as ``skipped`` and the run goes on):

- ``inprocess``: encode and decode images/s of each bundled model (``default``: f=4 K=512; ``f8``: f=8
  K=8192), loaded as the service loads them (``Engine.load(Path(name), device)``) and run through
  ``Engine.encode_batch`` / ``decode_batch`` (uint8 CPU pixels in, int64 CPU indices out: the host-device
  copies count), at each ``--shapes`` (default 32x32 at batch 16 and 256, 256x256 at batch 16 and 64), in
  ``float32`` (``engine.autocast_dtype = None``) and ``bf16`` (the engine's CUDA policy: bf16 autocast for
  the convolutions, the nearest-code search in float32). Each case is warmed up first (its GPU memory is
  read then: ``torch.cuda.max_memory_allocated``, and that peak less what was allocated before), then
  timed in ``--rounds`` interleaved rounds (each round times every variant once, in a rotated order, a
  block of ~``--block-seconds``, the GPU synchronised before and after); the figure is the median images/s
  and the ratio to float32 is the median over the rounds of float32's block time / the variant's.
- ``agreement``: the fraction of token indices that bf16 autocast leaves identical to float32, on real
  photographs (``data/photos-v1/heldout``, else the bundled held-out photos, as ``bench/model_paths.py``
  finds them), each photo at its full size (cropped to a multiple of f) and as a 256x256 center crop; the
  issue's target is 99.5%. The reference is strict float32 (TF32 off); float32 with torch's default TF32
  setting for cuDNN convolutions is compared to it too, as the floor that float32 itself reaches.
- ``decode``: the CPU side's bound: the service's own image decoding (``probe_image`` + ``load_fitted``
  of ``service/imaging.py``: header, decode, RGB, fit) of 32x32 and 256x256 PNGs of the photos, images/s
  with 1, 2, 4, 8 and 16 threads (each thread decodes in a loop for ``--decode-seconds``; Pillow releases
  the GIL while decoding), optionally processes (``--decode-processes``), and how many threads it takes to keep up with
  the GPU's best in-process encode rate of the ``inprocess`` section.
- ``http``: a real server process on the device, ``python -m vqtok.service --checkpoint default --device
  cuda --host 127.0.0.1 --port P``, ready once ``GET /ready`` answers 200, loaded from the machine's CPU
  cores by Debian's ``wrk`` when it is on PATH (the Lua script and body of ``bench/profile_service.py``),
  else by asyncio httpx clients (``bench/service_load.py``'s ``fire``) in ``--load-workers`` processes
  started together. Cases of ``bench/service_ab.py``: ``small`` (one 32x32 PNG per request, 32
  connections) and ``large`` (one 256x256 PNG per request, 16 connections): req/s, p50, p99 and the share
  of the in-process batch-16 encode rate (the engine's policy) measured in this section first. The
  server's GPU memory is read under load from ``nvidia-smi --query-compute-apps`` (and the GPU's used
  memory before and under load, since a container may hide the server's pid).
- ``memory``: the peak GPU memory of every in-process case (from ``inprocess``, else measured here by
  one warm-up call each) and the server's GPU memory from ``http``.
- ``compile``: ``torch.compile`` (default mode, ``dynamic=False``) of each model's encoder and decoder
  networks, swapped into a second engine of the same checkpoint (the input normalisation, the pre/post-VQ
  1x1 convolutions, the code search and the lookup stay eager), run with the engine's policy, interleaved
  with float32 and bf16 at ``--compile-shapes`` (default 32x32 and 256x256 at batch 16). The first call
  of each shape (the compilation) is reported as ``setup s``; once ``--compile-budget`` seconds of
  compilation are spent, the remaining cases are skipped. It runs last: a slow compilation costs nothing
  else. Skipped in ``--quick`` mode (compiling takes minutes on a CPU).

The report starts with the GPU's name, torch and CUDA versions, the CPU count, the date and the git commit
(when the tree is a git checkout: the device machine's copy may have no ``.git``), prints every section's
elapsed seconds, and writes everything to ``--json`` (default ``$OUT/gpu_figures.json`` when ``$OUT`` is
set) after each section, so that a run cut short still leaves what it measured. The default settings are
sized for about 4-5 minutes on an H200 (an estimate: this script has not run there yet); the compilation,
the least predictable part, stops starting new cases after ``--compile-budget`` (120 s).

    python bench/gpu_figures.py                                  # every section, on cuda
    python bench/gpu_figures.py --sections inprocess agreement --rounds 9
    python bench/gpu_figures.py --device cpu --quick --json /tmp/x.json   # 30-45 s smoke run on 2 CPU cores

On the lent GPU machine (see /work/.library/device/README.md). It has torch, Pillow, numpy, safetensors,
httpx, uvloop and scikit-image, not the service's web stack: carry that as wheels, once, from the repository
root here (``/.whl/`` is already in .gitignore; the versions are those of this checkout's environment):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(pip freeze | grep -iE \\
        '^(fastapi|fastapi.offline|starlette|pydantic|pydantic.core|pydantic.settings|python.dotenv|annotated.types|annotated.doc|typing.inspection|typing.extensions|anyio|python.multipart|uvicorn|opentelemetry.api)==')

then one ``run`` call, ``carry`` = ``[".whl", "data/photos-v1/heldout"]`` (the photos are git-ignored and
travel only when carried; without them the bundled held-out photos are used), ``timeout_s`` = 480, command:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; \\
        PYTHONUNBUFFERED=1 python3 bench/gpu_figures.py --json $OUT/gpu_figures.json 2>&1 | tee $OUT/gpu_figures.log

The copy there is not pip-installed: when ``vqtok`` is not importable, this script lays it out from the
checkout (``src/vqtok`` + ``model/`` + ``service/``, linked into a temporary folder) for itself and for the
server it starts. Without ``wrk`` there, the httpx clients load the server (one could carry Debian's
``wrk`` and ``libluajit-5.1-2`` packages, ``dpkg -x`` them into /tmp/wrk and put its ``usr/bin`` on PATH and
``usr/lib/x86_64-linux-gnu`` on LD_LIBRARY_PATH: untried).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def ensure_vqtok_importable() -> None:
    """Make ``import vqtok`` work in a checkout that was never installed (the device machine's copy): link
    ``src/vqtok``'s files, ``model/`` and ``service/`` into a temporary ``vqtok`` folder, first on the import
    path of this process and (through PYTHONPATH) of every process it starts."""
    if importlib.util.find_spec("vqtok") is not None:
        return
    from package_layout import assemble_vqtok  # bench/ is on the import path (below)

    package = assemble_vqtok(REPO, Path(tempfile.mkdtemp(prefix="vqtok-checkout-")) / "vqtok",
                             lambda part, destination: destination.symlink_to(part))
    atexit.register(shutil.rmtree, package.parent, ignore_errors=True)
    sys.path.insert(0, str(package.parent))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(package.parent), os.environ.get("PYTHONPATH")) if p)


sys.path.insert(0, str(REPO / "bench"))
ensure_vqtok_importable()
try:  # the other bench scripts import the service too
    from model_paths import block, load_photos, parse_shape, photo_batches, quiet, reason_of, usable_cores
    from profile_service import parse_wrk, write_wrk_post
    from service_ab import CASES, Case
    from service_load import fire, free_port, wait_ready

    from vqtok.service.engine import Engine
    from vqtok.service.imaging import DecodeBudget, encode_image_bytes, load_fitted, probe_image
except ImportError as missing:  # the device machine without the carried wheels: say what to carry
    raise SystemExit(f"cannot import the service ({missing}): carry its web stack as wheels, as this script's "
                     "docstring says") from missing

SECTIONS = ["inprocess", "agreement", "decode", "http", "memory", "compile"]  # the order they run in
MODELS = ["default", "f8"]
TARGET_AGREEMENT = 0.995  # issue 14: bf16 must leave at least 99.5% of the tokens as float32 gives them
HTTP_CASES = ["small", "large"]
DECODE_SIDES = (32, 256)
MAX_PIXELS = 40_000_000  # the service's default --max-pixels
MIB = 2**20


class SectionSkipped(Exception):
    """A section that cannot run here; its message is the reason recorded in the JSON."""


@dataclass
class Context:
    """What the sections share: the arguments, the device, the photos, the loaded engines and the results."""

    args: argparse.Namespace
    device: torch.device
    photos_source: str
    photos: list[np.ndarray]
    results: dict[str, Any]
    engines: dict[str, Engine] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def policy(self) -> str:
        """The variant the service runs on this device: bf16 autocast on CUDA, float32 on the CPU."""
        return "bf16" if self.cuda else "float32"

    def engine(self, name: str) -> Engine:
        """The bundled model ``name`` loaded as the service loads it (once per run)."""
        if name not in self.engines:
            self.engines[name] = Engine.load(Path(name), self.device.type)
        return self.engines[name]

    def section(self, name: str) -> dict[str, Any]:
        return self.results["sections"].get(name, {})


# --- timing ----------------------------------------------------------------------------------------------
VARIANT_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def operation(engine: Engine, op: str, dtype: torch.dtype | None, data: torch.Tensor) -> Callable[[], Any]:
    """One ``Engine.encode_batch`` / ``decode_batch`` call of ``data`` with the autocast dtype ``dtype``."""
    run = engine.encode_batch if op == "encode" else engine.decode_batch

    def call() -> Any:
        engine.autocast_dtype = dtype
        return run(data)

    return call


def gpu_memory(device: torch.device, call: Callable[[], Any]) -> dict[str, float | None]:
    """GPU memory of one ``call`` (MiB): ``peak_mib``, torch.cuda.max_memory_allocated while it runs (every
    tensor this process holds, the loaded models' weights too), and ``working_mib``, that peak less what was
    allocated before the call (the call's own activations and outputs). None off CUDA."""
    if device.type != "cuda":
        call()
        return {"peak_mib": None, "working_mib": None}
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mib": peak / MIB, "working_mib": (peak - before) / MIB}


def interleaved_rates(calls: dict[str, Callable[[], Any]], batch: int, rounds: int, block_seconds: float,
                      device: torch.device) -> dict[str, tuple[float, float]]:
    """name -> (median images/s, median ratio of the first call's block time to this one's), over ``rounds``
    rounds that each time every call once for a block of ~``block_seconds``, in a rotated order."""
    names = list(calls)
    synchronize(device)
    iterations = max(1, round(block_seconds / max(block(calls[names[0]], 1), 1e-6)))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order:
            synchronize(device)
            seconds[name].append(block(calls[name], iterations))
            synchronize(device)
    first = seconds[names[0]]
    return {name: (batch * iterations / statistics.median(seconds[name]),
                   statistics.median(a / b for a, b in zip(first, seconds[name], strict=True))) for name in names}


def shape_data(ctx: Context, engine: Engine, side: int, batch: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(side rounded down to a multiple of f, a uint8 batch of photo tiles, its token grids)."""
    f = engine.config.downsample
    side = max(f, side // f * f)
    pixels = photo_batches(ctx.photos, side, batch, batch)[0][0]
    return side, pixels, engine.encode_batch(pixels)


def measure_variants(ctx: Context, model: str, variants: dict[str, tuple[Engine, torch.dtype | None]],
                     shapes: list[tuple[int, int]], ops: tuple[str, ...] = ("encode", "decode"),
                     note: Callable[[str], str | None] | None = None) -> list[dict[str, Any]]:
    """Rows of (model, op, shape, variant): images/s, ratio to the first variant, GPU memory, setup seconds.

    Each variant is warmed up (a first call, timed as its setup: e.g. a compilation; then a second one for its
    GPU memory) before the interleaved rounds. ``note(variant)`` may return a reason to leave a variant out;
    a variant whose warm-up fails is left out with the error as the reason (the first one must not fail)."""
    rows: list[dict[str, Any]] = []
    first_engine = next(iter(variants.values()))[0]
    for side, batch in shapes:
        side, pixels, tokens = shape_data(ctx, first_engine, side, batch)
        for op in ops:
            data = pixels if op == "encode" else tokens
            calls, figures = {}, {}
            for name, (engine, dtype) in variants.items():
                call = operation(engine, op, dtype, data)
                started = time.perf_counter()
                try:
                    reason = note(name) if note else None
                    if reason is None:
                        with quiet():
                            call()
                        figures[name] = {"setup_s": round(time.perf_counter() - started, 3),
                                         **gpu_memory(ctx.device, call)}
                        calls[name] = call
                except Exception as error:  # e.g. a compilation that fails here: the other variants go on
                    if not calls:
                        raise
                    reason = f"failed: {reason_of(error)}"
                if reason is not None:
                    figures[name] = {"skipped": reason, "setup_s": round(time.perf_counter() - started, 3)}
            rates = interleaved_rates(calls, batch, ctx.args.rounds, ctx.args.block_seconds, ctx.device)
            for name, (rate, ratio) in rates.items():
                figures[name].update(images_per_s=rate, ratio_to_first=ratio)
            rows += [{"model": model, "op": op, "side": side, "batch": batch, "variant": name, **figures[name]}
                     for name in variants]
    return rows


def print_rate_rows(rows: list[dict[str, Any]], baseline: str) -> None:
    print(f"{'model':<8} {'op':<7} {'shape':>12} {'variant':<16} {'images/s':>11} {'x ' + baseline:>10} "
          f"{'peak MiB':>9} {'work MiB':>9} {'setup s':>8}")
    for row in rows:
        shape = f"{row['side']}x{row['side']} b{row['batch']}"
        head = f"{row['model']:<8} {row['op']:<7} {shape:>12} {row['variant']:<16}"
        if "skipped" in row:
            print(f"{head} skipped: {row['skipped']}")
            continue
        peak, work = ("-" if row[k] is None else f"{row[k]:.0f}" for k in ("peak_mib", "working_mib"))
        print(f"{head} {row['images_per_s']:11.1f} {row['ratio_to_first']:9.2f}x {peak:>9} {work:>9} "
              f"{row['setup_s']:8.2f}")


def restore_policies(ctx: Context) -> None:
    """Give every loaded engine back its own policy (the sections switch ``autocast_dtype``)."""
    for engine in ctx.engines.values():
        engine.autocast_dtype = torch.bfloat16 if engine.device.type == "cuda" else None


# --- sections ----------------------------------------------------------------------------------------------
def section_inprocess(ctx: Context) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for model in ctx.args.models:
        engine = ctx.engine(model)
        variants = {name: (engine, dtype) for name, dtype in VARIANT_DTYPES.items()}
        rows += measure_variants(ctx, model, variants, ctx.args.shapes)
    restore_policies(ctx)
    bf16 = ("bf16 autocast on CUDA (the engine's policy)" if ctx.cuda
            else "bf16 autocast on the CPU (not the engine's CPU policy)")
    print(f"float32: engine.autocast_dtype = None; bf16: {bf16}; x float32 = median over rounds of float32 "
          "block time / variant block time")
    print_rate_rows(rows, "float32")
    return {"rows": rows, "policy": ctx.policy, "rounds": ctx.args.rounds, "block_seconds": ctx.args.block_seconds}


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """Float32 without TF32 (cuDNN convolutions and matmuls), whatever torch's defaults are."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def agreement_inputs(ctx: Context, f: int) -> dict[str, list[torch.Tensor]]:
    """'full size': each photo (1, 3, H, W) cropped to multiples of f; '256x256 crops': center crops, batched.
    With ``--agreement-photos N``, only the N smallest photos."""
    photos = ctx.photos
    if ctx.args.agreement_photos:
        photos = sorted(photos, key=lambda p: p.shape[0] * p.shape[1])[: ctx.args.agreement_photos]
    full = [torch.from_numpy(np.ascontiguousarray(p[: p.shape[0] // f * f, : p.shape[1] // f * f]))
            .permute(2, 0, 1).unsqueeze(0).contiguous() for p in photos]
    crops, count = photo_batches(photos, 256, len(photos), len(photos))
    return {"full size": full, "256x256 crops": [crops[0][:count]]}


def same_fraction(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, int]:
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    total = sum(x.numel() for x in a)
    return same / total, total


def section_agreement(ctx: Context) -> dict[str, Any]:
    rows = []
    print(f"photos: {ctx.photos_source}; reference: strict float32 (TF32 off); target: bf16 agrees >= "
          f"{TARGET_AGREEMENT:.1%}")
    print(f"{'model':<8} {'images':<14} {'tokens':>9} {'bf16 agree':>11} {'target':>7} {'fp32 default TF32':>18}")
    for model in ctx.args.models:
        engine = ctx.engine(model)
        for kind, batches in agreement_inputs(ctx, engine.config.downsample).items():
            engine.autocast_dtype = None
            with strict_float32():
                reference = [engine.encode_batch(x) for x in batches]
            tf32 = None
            if ctx.cuda:  # float32 as torch runs it by default: cuDNN may use TF32 for convolutions
                tf32 = same_fraction([engine.encode_batch(x) for x in batches], reference)[0]
            engine.autocast_dtype = torch.bfloat16
            agree, tokens = same_fraction([engine.encode_batch(x) for x in batches], reference)
            rows.append({"model": model, "images": kind, "count": sum(x.shape[0] for x in batches),
                         "tokens": tokens, "bf16_agreement": agree, "meets_target": agree >= TARGET_AGREEMENT,
                         "float32_default_tf32_agreement": tf32})
            tf32_text = "-" if tf32 is None else f"{tf32:.5f}"
            print(f"{model:<8} {kind:<14} {tokens:9d} {agree:11.5f} {'yes' if agree >= TARGET_AGREEMENT else 'NO':>7} "
                  f"{tf32_text:>18}")
    restore_policies(ctx)
    return {"rows": rows, "target": TARGET_AGREEMENT, "photos": ctx.photos_source,
            "bf16": "CUDA bf16 autocast" if ctx.cuda else "CPU bf16 autocast (the service runs float32 on the CPU)",
            "cudnn_allow_tf32_default": torch.backends.cudnn.allow_tf32}


def decode_pngs(ctx: Context, side: int) -> list[bytes]:
    """PNG files of ``side`` x ``side`` photo tiles, as a client would send them."""
    tiles = photo_batches(ctx.photos, side, 1, 64 if side <= 64 else len(ctx.photos))[0]
    return [encode_image_bytes(np.ascontiguousarray(t[0].permute(1, 2, 0).numpy()), "png") for t in tiles]


def decode_and_fit(png: bytes, budget: DecodeBudget) -> None:
    """What the service does with one uploaded image before batching: header, decode, RGB, fit."""
    header = probe_image(png, MAX_PIXELS, "bench")
    load_fitted(png, header, None, "pad", 8, budget, MAX_PIXELS, "bench")  # f=8: 32 and 256 need no padding


def decode_until(pngs: list[bytes], start_at: float, stop_at: float) -> tuple[int, float]:
    """Decode ``pngs`` over and over on this thread (or process) from ``start_at`` until ``stop_at``
    (time.monotonic, the same clock in every process): (images decoded, when the last one ended)."""
    budget = DecodeBudget(MAX_PIXELS * 64, 30.0)
    time.sleep(max(0.0, start_at - time.monotonic()))
    count = 0
    while time.monotonic() < stop_at:
        decode_and_fit(pngs[count % len(pngs)], budget)
        count += 1
    return count, time.monotonic()


def decode_rate(pngs: list[bytes], workers: int, seconds: float, pool: Any) -> float:
    """Images/s of ``workers`` workers of ``pool`` decoding together for about ``seconds``."""
    start_at = time.monotonic() + 0.05
    futures = [pool.submit(decode_until, pngs, start_at, start_at + seconds) for _ in range(workers)]
    done = [future.result() for future in futures]
    return sum(count for count, _ in done) / (max(end for _, end in done) - start_at)


def gpu_encode_rates(ctx: Context) -> dict[tuple[str, int], tuple[float, str]]:
    """(model, side) -> (best encode images/s of the engine's policy in ``inprocess``, at which batch)."""
    best: dict[tuple[str, int], tuple[float, str]] = {}
    for row in ctx.section("inprocess").get("rows", []):
        if row["op"] == "encode" and row["variant"] == ctx.policy and "images_per_s" in row:
            key = (row["model"], row["side"])
            if row["images_per_s"] > best.get(key, (0.0, ""))[0]:
                best[key] = (row["images_per_s"], f"b{row['batch']}")
    return best


def section_decode(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    rows = []
    kinds: list[tuple[str, Callable[[int], Any]]] = [("threads", lambda n: ThreadPoolExecutor(n))]
    if args.decode_processes:
        kinds.append(("processes", lambda n: ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))))
    print(f"the service's probe_image + load_fitted of PNGs of photo tiles; {usable_cores()} usable cores")
    print(f"{'PNG':>9} {'workers':>12} {'images/s':>10} {'per worker':>11}")
    for side in DECODE_SIDES:
        pngs = decode_pngs(ctx, side)
        decode_until(pngs, 0.0, time.monotonic() + 0.05)  # warm up
        for kind, make_pool in kinds:
            for workers in args.decode_threads:
                with make_pool(workers) as pool:
                    if kind == "processes":
                        decode_rate(pngs, workers, 0.05, pool)  # start the processes before timing
                    rate = decode_rate(pngs, workers, args.decode_seconds, pool)
                rows.append({"side": side, "kind": kind, "workers": workers, "images_per_s": rate,
                             "per_worker": rate / workers, "png_bytes": int(np.mean([len(p) for p in pngs]))})
                print(f"{side:>4}x{side:<4} {workers:>3} {kind:<8} {rate:10.0f} {rate / workers:11.0f}")
    keep_up = []
    gpu = gpu_encode_rates(ctx)
    if not gpu:
        print("keep up: unknown (no encode rate: the inprocess section did not run or failed)")
    for (model, side), (gpu_rate, batch) in sorted(gpu.items()):
        measured = [r for r in rows if r["side"] == side and r["kind"] == "threads"]
        one = next((r["images_per_s"] for r in measured if r["workers"] == 1), measured[0]["per_worker"])
        enough = [r["workers"] for r in measured if r["images_per_s"] >= gpu_rate]
        keep_up.append({"model": model, "side": side, "gpu_encode_images_per_s": gpu_rate, "gpu_batch": batch,
                        "threads_linear_estimate": math.ceil(gpu_rate / one),
                        "threads_measured": min(enough) if enough else None})
        fastest = max(measured, key=lambda r: r["images_per_s"])
        verdict = (f"{min(enough)} thread(s) measured keep up" if enough else
                   f"no measured count keeps up (best: {fastest['images_per_s']:.0f}/s with {fastest['workers']})")
        print(f"keep up with {model} {ctx.policy} encode at {side}x{side} ({gpu_rate:.0f} images/s, {batch}): "
              f"{math.ceil(gpu_rate / one)} thread(s) at 1 thread's rate ({one:.0f}/s); {verdict}")
    return {"rows": rows, "keep_up": keep_up, "decode_seconds": args.decode_seconds}


# --- http --------------------------------------------------------------------------------------------------
def gpu_memory_used_mib() -> float | None:
    """The GPU's used memory (MiB, all processes) from nvidia-smi; None when it cannot be read."""
    output = nvidia_smi("--query-gpu=memory.used", "--format=csv,noheader,nounits")
    with contextlib.suppress(ValueError, IndexError):  # "[N/A]" where the driver does not tell
        return float(output.splitlines()[0]) if output else None
    return None


def nvidia_smi(*query: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def compute_apps() -> list[dict[str, Any]] | None:
    """nvidia-smi's compute processes: pid and used MiB; None when nvidia-smi is missing or fails."""
    output = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    if output is None:
        return None
    apps = []
    for line in output.splitlines():
        pid, _, used = line.partition(",")
        with contextlib.suppress(ValueError):
            apps.append({"pid": int(pid), "used_mib": float(used)})
    return apps


def httpx_worker(url: str, body: bytes, connections: int, start_at: float, seconds: float
                 ) -> tuple[list[float], int, float]:
    """One load process: ``connections`` asyncio httpx clients from ``start_at`` (time.monotonic, shared by
    the processes of a machine) for ``seconds``: (latencies s, errors, wall seconds)."""
    time.sleep(max(0.0, start_at - time.monotonic()))
    return asyncio.run(fire(url, "encode", body, 10**9, connections, start_at + seconds))


def httpx_load(url: str, body: bytes, connections: int, seconds: float, pool: ProcessPoolExecutor | None,
               workers: int) -> dict[str, float | None]:
    """Requests, errors, req/s, p50 and p99 (ms) of ``connections`` httpx clients, spread over ``workers``
    processes of ``pool`` (all starting at once), or in this process when ``pool`` is None."""
    if pool is None:
        parts = [httpx_worker(url, body, connections, time.monotonic(), seconds)]
    else:
        workers = min(workers, connections)
        shares = [connections // workers + (i < connections % workers) for i in range(workers)]
        start_at = time.monotonic() + 0.5
        parts = [f.result() for f in [pool.submit(httpx_worker, url, body, n, start_at, seconds) for n in shares]]
    latencies = [latency for part in parts for latency in part[0]]
    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000.0).tolist() if latencies else (None, None)
    return {"requests": float(len(latencies)), "errors": float(sum(part[1] for part in parts)),
            "rate": len(latencies) / max(part[2] for part in parts), "p50": p50, "p99": p99}


def wrk_load(url: str, post: Path, connections: int, seconds: float, threads: int) -> dict[str, float | None]:
    """wrk's figures (requests, errors, req/s, p50 and p99 in ms) of ``connections`` connections."""
    command = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
               "--timeout", "60s", "--latency", "-s", str(post), f"{url}/encode"]
    figures: dict[str, float | None] = {**parse_wrk(subprocess.run(command, capture_output=True, text=True,
                                                                    check=True).stdout)}
    figures["requests"] -= figures["errors"]
    if not figures["requests"]:  # wrk prints 0.00us percentiles when nothing was answered
        figures["p50"] = figures["p99"] = None
    return figures


def start_server(ctx: Context, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``python -m vqtok.service`` serving the bundled default model on the device, its output in ``log``."""
    warmup = max(s.size for s in (CASES[c] for c in HTTP_CASES)) if not ctx.args.quick else 32
    command = [sys.executable, "-m", "vqtok.service", "--checkpoint", "default", "--device", ctx.device.type,
               "--host", "127.0.0.1", "--port", str(port), "--warmup-size", str(warmup),
               "--max-queue-depth", "4096", "--log-level", "warning"]
    with open(log, "wb") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)


def in_process_batch16(ctx: Context, side: int) -> float:
    """Encode images/s of the default model at batch 16, the engine's policy (what the server runs)."""
    engine = ctx.engine("default")
    side, pixels, _ = shape_data(ctx, engine, side, 16)
    call = operation(engine, "encode", VARIANT_DTYPES[ctx.policy], pixels)
    call()
    return interleaved_rates({"policy": call}, 16, ctx.args.rounds, ctx.args.block_seconds, ctx.device)["policy"][0]


def server_memory(pid: int, before: float | None) -> dict[str, Any]:
    apps = compute_apps()
    used = gpu_memory_used_mib()
    mine = [a["used_mib"] for a in apps or [] if a["pid"] == pid]
    return {"server_pid": pid, "server_mib": mine[0] if mine else None, "compute_apps": apps,
            "gpu_used_before_mib": before, "gpu_used_under_load_mib": used,
            "gpu_used_delta_mib": used - before if used is not None and before is not None else None}


def encoded_so_far(url: str) -> float:
    """The server's ``vqtok_images_total{operation="encode"}`` (from /metrics)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith('vqtok_images_total{operation="encode"}'):
            return float(line.split()[-1])
    return 0.0


def wait_idle(url: str, quiet_seconds: float, timeout: float) -> None:
    """Wait until the server has encoded nothing for ``quiet_seconds`` (or ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    last = encoded_so_far(url)
    while time.monotonic() < deadline:
        time.sleep(quiet_seconds)
        now = encoded_so_far(url)
        if now == last:
            return
        last = now


def run_case(ctx: Context, url: str, case: Case, folder: Path, client: str, pool: ProcessPoolExecutor | None,
             batch_seconds: float) -> dict[str, float | None]:
    """One case: a short unmeasured load (connections, the server's first batches), then the measured one,
    each once the server is idle (nothing encoded for longer than a batch of 16 takes in-process)."""
    post = write_wrk_post(folder, case.size, case.images_per_request)
    body = (folder / "body").read_bytes()
    args = ctx.args
    for seconds in (args.warmup_seconds, args.seconds):
        wait_idle(url, max(0.25, 1.5 * batch_seconds), 60.0)  # what a previous load left queued must not count
        if client == "wrk":
            figures = wrk_load(url, post, case.connections, seconds, args.load_workers)
        else:
            figures = httpx_load(url, body, case.connections, seconds, pool, args.load_workers)
    return figures


def section_http(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    try:
        importlib.import_module("vqtok.service.app")
    except ImportError as error:
        raise SectionSkipped(f"the service cannot be imported ({reason_of(error)}): carry its web stack as "
                             "wheels (bench/gpu_figures.py's docstring)") from error
    client = args.load_client if args.load_client != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    if client == "wrk" and shutil.which("wrk") is None:
        raise SectionSkipped("--load-client wrk, but wrk is not on PATH")
    in_process = {side: in_process_batch16(ctx, side) for side in sorted({CASES[c].size for c in HTTP_CASES})}
    if ctx.cuda:
        torch.cuda.empty_cache()
    before = gpu_memory_used_mib() if ctx.cuda else None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cases, memory = [], {}
    with tempfile.TemporaryDirectory(prefix="vqtok-gpu-http-") as workdir:
        log = Path(workdir) / "server.log"
        started = time.perf_counter()
        server = start_server(ctx, port, log)
        pool = None
        try:
            try:
                wait_ready(url, server, timeout=args.server_timeout)
            except RuntimeError as error:
                tail = log.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{error}; server output ends: {tail}") from error
            startup = time.perf_counter() - started
            print(f"server ready in {startup:.1f} s (python -m vqtok.service --device {ctx.device.type}); load: "
                  f"{client}" + (f", {args.load_workers} worker(s)" if args.load_workers > 1 else ""))
            if client == "httpx" and args.load_workers > 1:
                pool = ProcessPoolExecutor(args.load_workers, mp_context=multiprocessing.get_context("spawn"))
            print(f"{'case':<6} {'PNG':>7} {'conns':>5} {'requests':>9} {'errors':>6} {'req/s':>9} {'p50 ms':>8} "
                  f"{'p99 ms':>8} {'in-proc b16':>11} {'share':>7}")
            for name in HTTP_CASES:
                case = CASES[name]
                folder = Path(workdir) / name
                folder.mkdir()
                figures = run_case(ctx, url, case, folder, client, pool, 16 / in_process[case.size])
                if ctx.cuda:
                    memory[name] = server_memory(server.pid, before)
                images = figures["rate"] * case.images_per_request
                share = images / in_process[case.size]
                cases.append({"case": name, "size": case.size, "connections": case.connections,
                              "images_per_request": case.images_per_request, "requests": figures["requests"],
                              "errors": figures["errors"], "req_per_s": figures["rate"], "p50_ms": figures["p50"],
                              "p99_ms": figures["p99"], "in_process_b16_images_per_s": in_process[case.size],
                              "share_of_in_process": share})
                p50, p99 = ("-" if figures[k] is None else f"{figures[k]:.1f}" for k in ("p50", "p99"))
                print(f"{name:<6} {case.size:>3}x{case.size:<3} {case.connections:>5} {figures['requests']:9.0f} "
                      f"{figures['errors']:6.0f} {figures['rate']:9.1f} {p50:>8} {p99:>8} "
                      f"{in_process[case.size]:11.0f} {share:7.1%}")
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    if memory:
        peak = max(memory.values(), key=lambda m: m["gpu_used_delta_mib"] or m["server_mib"] or 0)
        print(f"server GPU memory under load: nvidia-smi pid {peak['server_pid']}: {peak['server_mib']} MiB; "
              f"GPU used {peak['gpu_used_before_mib']} -> {peak['gpu_used_under_load_mib']} MiB")
    return {"client": client, "load_workers": args.load_workers, "seconds": args.seconds,
            "server_startup_s": startup, "cases": cases,
            "server_gpu_memory": memory or {"skipped": "no CUDA device: the server runs on the CPU"}}


def section_memory(ctx: Context) -> dict[str, Any]:
    if not ctx.cuda:
        raise SectionSkipped("no CUDA device (--device cpu): torch.cuda.max_memory_allocated and nvidia-smi "
                             "need one")
    keys = ("model", "op", "side", "batch", "variant", "peak_mib", "working_mib")
    rows = [{k: r[k] for k in keys} for r in ctx.section("inprocess").get("rows", []) if r.get("peak_mib") is not None]
    source = "inprocess section (peak over the warm-up calls)"
    if not rows:
        source = "measured here: one warm-up call each"
        for model in ctx.args.models:
            engine = ctx.engine(model)
            for side, batch in ctx.args.shapes:
                side, pixels, tokens = shape_data(ctx, engine, side, batch)
                for op, data in (("encode", pixels), ("decode", tokens)):
                    for name, dtype in VARIANT_DTYPES.items():
                        rows.append({"model": model, "op": op, "side": side, "batch": batch, "variant": name,
                                     **gpu_memory(ctx.device, operation(engine, op, dtype, data))})
        restore_policies(ctx)
    print(f"in-process GPU memory: peak = torch.cuda.max_memory_allocated (every tensor held, all loaded "
          f"models' weights too), work = peak less what was allocated before the call; {source}:")
    for row in rows:
        print(f"  {row['model']:<8} {row['op']:<7} {row['side']:>4}x{row['side']:<4} b{row['batch']:<4} "
              f"{row['variant']:<8} peak {row['peak_mib']:9.1f} MiB, work {row['working_mib']:9.1f} MiB")
    server = ctx.section("http").get("server_gpu_memory") or {"skipped": "the http section did not run"}
    if "skipped" not in server:
        for name, reading in server.items():
            shown = reading["server_mib"] if reading["server_mib"] is not None else "unavailable (pid not listed)"
            print(f"  server under the {name} load: nvidia-smi {shown} MiB; GPU used "
                  f"+{reading['gpu_used_delta_mib']} MiB over before the server started")
    elif shutil.which("nvidia-smi") is None:
        server = {"skipped": "nvidia-smi is not on PATH: the server's GPU memory is unavailable"}
    print(f"  server: {server.get('skipped', 'see above')}")
    return {"in_process": rows, "source": source, "server": server}


def compiled_engine(model: str, device: torch.device) -> Engine:
    """A second engine of ``model`` whose encoder and decoder networks run through ``torch.compile``."""
    engine = Engine.load(Path(model), device.type)
    engine.model.encoder = torch.compile(engine.model.encoder, dynamic=False)
    engine.model.decoder = torch.compile(engine.model.decoder, dynamic=False)
    return engine


def section_compile(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    if args.quick:
        raise SectionSkipped("skipped in --quick mode: compiling takes minutes on a CPU")
    spent = [0.0]
    rows: list[dict[str, Any]] = []
    label = f"compiled {ctx.policy}"

    def over_budget(variant: str) -> str | None:
        if variant == label and spent[0] > args.compile_budget:
            return f"--compile-budget of {args.compile_budget:.0f} s spent ({spent[0]:.0f} s of compilation)"
        return None

    for model in args.models:
        engine = ctx.engine(model)
        variants = {name: (engine, dtype) for name, dtype in VARIANT_DTYPES.items()}
        variants[label] = (compiled_engine(model, ctx.device), VARIANT_DTYPES[ctx.policy])
        for shape in args.compile_shapes:  # one case at a time: the budget is checked before each compilation
            for op in ("encode", "decode"):
                case_rows = measure_variants(ctx, model, variants, [shape], (op,), over_budget)
                spent[0] += sum(r["setup_s"] for r in case_rows if r["variant"] == label)
                rows += case_rows
    restore_policies(ctx)
    print(f"{label}: torch.compile(dynamic=False) of the encoder and decoder; setup s = first call (compilation)")
    print_rate_rows(rows, "float32")
    return {"rows": rows, "compile_seconds": spent[0], "budget_s": args.compile_budget}


SECTION_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "inprocess": section_inprocess, "agreement": section_agreement, "decode": section_decode,
    "http": section_http, "memory": section_memory, "compile": section_compile,
}


# --- run ----------------------------------------------------------------------------------------------------
def git_commit() -> str:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        return "unknown (no git checkout here)"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode:
        return f"unknown ({head.stderr.strip()[:80]})"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def machine(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    driver = nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader") if cuda else None
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else f"none (--device {device.type})",
        "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "usable_cores": usable_cores(), "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "commit": git_commit(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "wrk": shutil.which("wrk"),
    }


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def run_section(ctx: Context, name: str) -> None:
    """Run one section, never letting its failure stop the others; record its figures or why it has none."""
    print(f"\n== {name} ==", flush=True)
    started = time.perf_counter()
    try:
        figures = SECTION_FUNCTIONS[name](ctx)
    except SectionSkipped as skip:
        figures = {"skipped": str(skip)}
    except Exception as error:  # a failing section must not cost the others: report it and go on
        traceback.print_exc()
        figures = {"skipped": f"failed: {reason_of(error)}"}
        restore_policies(ctx)
        if ctx.cuda:
            torch.cuda.empty_cache()
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    if "skipped" in figures:
        print(f"{name}: skipped, {figures['skipped']}")
    print(f"({name}: {figures['elapsed_s']:.1f} s)", flush=True)
    ctx.results["sections"][name] = figures
    write_json(ctx.args.json, ctx.results)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device (use --device cpu to try the script)")
    meta = machine(device)
    print(f"gpu: {meta['gpu']} (driver {meta['driver']}); torch {meta['torch']}, CUDA {meta['cuda']}, "
          f"python {meta['python']}")
    print(f"cpus: {meta['cpu_count']} ({meta['usable_cores']} usable, torch threads {meta['torch_threads']}); "
          f"date {meta['date']}; commit {meta['commit']}; wrk: {meta['wrk'] or 'not on PATH'}")
    source, photos = load_photos(args.photos)
    results: dict[str, Any] = {"meta": meta, "args": vars(args), "sections": {}}
    ctx = Context(args, device, source, photos, results)
    for name in SECTIONS:
        if name in args.sections:
            run_section(ctx, name)
        else:
            results["sections"][name] = {"skipped": "not selected (--sections)"}
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(args.json, results)
    print(f"\nall sections: {results['elapsed_s']:.0f} s" + (f"; figures in {args.json}" if args.json else ""))
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    out = os.environ.get("OUT")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS, help="sections to run")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="SIDE:BATCH",
                        default=[(32, 16), (32, 256), (256, 16), (256, 64)], help="in-process shapes")
    parser.add_argument("--compile-shapes", nargs="+", type=parse_shape, metavar="SIDE:BATCH",
                        default=[(32, 16), (256, 16)])
    parser.add_argument("--compile-budget", type=float, default=120.0,
                        help="seconds of compilation after which the remaining compiled cases are skipped")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per case")
    parser.add_argument("--block-seconds", type=float, default=0.2, help="about how long one timed block runs")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured HTTP load per case")
    parser.add_argument("--warmup-seconds", type=float, default=2.0, help="unmeasured HTTP load before each case")
    parser.add_argument("--load-client", choices=["auto", "wrk", "httpx"], default="auto",
                        help="auto: wrk when it is on PATH, else asyncio httpx clients")
    parser.add_argument("--load-workers", type=int,
                        help="wrk threads, or httpx client processes (default: half the cores, at most 8; 1 "
                             "with --quick)")
    parser.add_argument("--server-timeout", type=float, default=240.0, help="seconds for the server to be ready")
    parser.add_argument("--decode-threads", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--decode-seconds", type=float, default=1.0, help="about how long one decode count runs")
    parser.add_argument("--decode-processes", action="store_true", help="also decode in processes")
    parser.add_argument("--photos", type=Path, default=REPO / "data" / "photos-v1" / "heldout")
    parser.add_argument("--agreement-photos", type=int, default=0, help="use only the N smallest photos (0: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run (30-45 s on 2 CPU cores): default model, tiny shapes, 1 round, "
                             "3 s of HTTP load, decode with 1 and 2 threads, agreement on the 2 smallest photos, "
                             "no compile")
    parser.add_argument("--json", type=Path, default=Path(out) / "gpu_figures.json" if out else None,
                        help="write the figures here (default: $OUT/gpu_figures.json when OUT is set)")
    args = parser.parse_args(argv)
    if args.load_workers is None:
        args.load_workers = 1 if args.quick else max(1, min(8, usable_cores() // 2))
    if args.quick:
        defaults = {"models": ["default"], "shapes": [(32, 4), (256, 1)], "decode_threads": [1, 2]}
        for name, value in defaults.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        args.rounds, args.block_seconds, args.seconds, args.warmup_seconds = 1, 0.02, 3.0, 0.5
        args.decode_seconds = 0.1
        args.agreement_photos = args.agreement_photos or 2
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
