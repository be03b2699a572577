"""The model on CPU: in-process encode and decode throughput of the bundled models, path by path.

For each bundled model (``model/weights/default``, f=4 K=512, and ``model/weights/f8``, f=8 K=8192, loaded
as the service's ``Engine`` loads them) the script measures, side by side in one run, these paths against
the eager float32 baseline (what ``Engine.encode_batch`` / ``decode_batch`` do on the CPU today):

- ``channels_last``: the model (a copy) and the input in channels_last memory format;
- ``threads 1`` (and ``threads N``, all cores, when torch's default is not already all cores):
  ``torch.set_num_threads`` around each call;
- ``bf16 autocast`` and ``channels_last+bf16`` (the engine's CUDA policy, on the CPU): the convolutions
  under ``torch.autocast("cpu", torch.bfloat16)``, the nearest-code search in float32 as the engine keeps it
  (the quantizer turns autocast off for the search and the lookup);
- ``compile``: ``torch.compile`` in its default mode; the first call of each shape (the compilation) is
  reported separately, as ``setup s``, with whether inductor's on-disk cache was already there;
- ``jit freeze`` and ``jit freeze+ofi``: ``torch.jit.trace``, then ``torch.jit.freeze``, then
  ``torch.jit.optimize_for_inference``; ``channels_last+jit freeze``: the trace and freeze of the
  channels_last copy (what the service runs eager), fed channels_last input;
- ``onnxruntime``: ``torch.onnx.export`` (the dynamo exporter, which needs ``onnxscript``; else the
  TorchScript one), run by ONNX Runtime's CPU provider with torch's thread count. ``onnx``, ``onnxruntime``
  and ``onnxscript`` are optional, not project dependencies: without them the path is skipped with the reason.

Every path transforms the two convolutional networks only (encoder + pre-VQ conv, post-VQ conv + decoder);
the input normalisation, the shape checks, the nearest-code search and the code lookup are the engine's
own, in float32, for every path. So a path changes tokens only through the latents its encoder computes.

For every path and shape (``--shapes``, default 32x32 batch 16 and 256x256 batch 4) it prints images/s and
the ratio to eager float32 measured in the same run: repetitions are interleaved (each round times every
path once, in a rotated order) and the ratio is the median over the rounds of eager time / path time.
Correctness is measured on real photos (``data/photos-v1/heldout``, else the bundled held-out photos):
256x256 center crops cut into tiles of each shape's side, batched at that shape's batch size (padding the
last batch with repeats that are not counted). ``agree`` is the fraction of token indices identical to eager
float32's (``1`` only when every index is); ``dec max|d|`` is the largest difference of a decoded pixel
from eager float32's decode of the same (eager) tokens, in 0-255 levels. Float32 itself is not bit-exact
across kernels: the ``threads`` row is eager float32 with its sums split differently, and at 512x512 it
already flips a token or two in 10^5 (a near-tie in the search); the last line of each model says how
far that floor is, so that a path's agreement can be read against it.

    python bench/model_paths.py                  # both models, every path: about 5 minutes on 2 cores
    python bench/model_paths.py --quick          # ~30 s smoke run: default model, small shapes, no compile/ORT
    python bench/model_paths.py --models f8 --paths eager channels_last onnxruntime --repeats 9
    python bench/model_paths.py --shapes 64:32 512:1 --json out.json

``--interop-threads`` sets torch's inter-op pool at start (it can be set once per process, before any
parallel work): it only serves ``torch.jit.fork`` and asynchronous ops, never a convolution's inner loops,
so run the script twice to compare values. The service runs its model on one Python thread (see
``service/engine.py``); its intra-op thread count is torch's default unless a deployment changes it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vqtok.model.data.pixels import ensure_min_side, load_image  # noqa: E402
from vqtok.service.engine import Engine  # noqa: E402

GAIN = 1.05  # a path "gains" when it is more than 5% faster than eager float32
CROP = 256  # side of the center crop taken from every photo (tiles of each shape's side are cut from it)
ORT_HINT = "pip install onnx onnxruntime onnxscript (optional, not project dependencies)"


# --- inputs ----------------------------------------------------------------------------------------------
def load_photos(folder: Path) -> tuple[str, list[np.ndarray]]:
    """(where from, the held-out photos as (H, W, 3) uint8): ``folder``'s images, else the bundled ones."""
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}) \
        if folder.is_dir() else []
    if files:
        return f"{folder} ({len(files)} photos)", [load_image(p) for p in files]
    from vqtok.model.data.photos import load_photos as bundled

    photos = bundled("heldout")
    return f"bundled held-out photos ({', '.join(n for n, _ in photos)})", [np.asarray(a) for _, a in photos]


def photo_batches(photos: list[np.ndarray], side: int, batch: int, limit: int) -> tuple[list[torch.Tensor], int]:
    """(uint8 (batch, 3, side, side) batches, real images among them): tiles of ``side`` from each photo's
    center crop (at least ``side``), spread evenly over each crop and taken round-robin over the photos, at
    most ``limit`` tiles; the last batch is padded with repeats of its first tile."""
    crop = max(CROP, side) // side * side
    per_photo = []
    for photo in photos:
        photo = ensure_min_side(photo, crop)
        h, w = photo.shape[:2]
        top, left = (h - crop) // 2, (w - crop) // 2
        square = torch.from_numpy(np.ascontiguousarray(photo[top : top + crop, left : left + crop]))
        tiles = square.permute(2, 0, 1).unfold(1, side, side).unfold(2, side, side)  # (3, n, n, side, side)
        per_photo.append(tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, side, side))
    quota = min(per_photo[0].shape[0], -(-max(limit, 1) // len(per_photo)))  # tiles per photo, spread evenly
    picks = np.linspace(0, per_photo[0].shape[0] - 1, quota).round().astype(int)
    tiles = [t[i] for i in picks for t in per_photo][: max(limit, 1)]  # round-robin over the photos
    count = len(tiles)
    tiles += [tiles[-(count % batch or batch)]] * (-count % batch)
    return [torch.stack(tiles[i : i + batch]).contiguous() for i in range(0, len(tiles), batch)], count


# --- paths ---------------------------------------------------------------------------------------------
@dataclass
class RunPath:
    """One way of running the two networks. ``encoder``/``decoder`` map float32 tensors to float tensors."""

    name: str
    encoder: Callable[[torch.Tensor], torch.Tensor]
    decoder: Callable[[torch.Tensor], torch.Tensor]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    channels_last: bool = False
    setup_seconds: float = 0.0
    note: str = ""


@dataclass
class Skipped:
    name: str
    reason: str


def networks(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(encoder + pre-VQ conv, post-VQ conv + decoder) of a VQVAE, sharing its weights."""
    encoder = nn.Sequential(model.encoder, model.pre_vq_conv).eval()
    return encoder, nn.Sequential(model.post_vq_conv, model.decoder).eval()


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bf16_autocast() -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' and tracers' progress lines and warnings."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch._inductor", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def reason_of(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:160] if lines else ''}".rstrip(": ")


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as a container or taskset sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use: ``$CXX`` when set (None when it does not resolve), else g++/clang++."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def inductor_cache_state() -> str:
    """Whether inductor's on-disk cache (compiled kernels of earlier runs) is there: a warm cache compiles
    several times faster than a fresh machine does."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        directory = Path(cache_dir())
        return f"{'warm' if directory.is_dir() and any(directory.iterdir()) else 'cold'} ({directory})"
    except (ImportError, OSError):
        return "unknown"


def onnx_session(net: nn.Module, example: torch.Tensor, workdir: Path, name: str) -> tuple[Callable, str]:
    """Export ``net`` (dynamic batch, height and width) and open it in ONNX Runtime: (run, exporter used)."""
    import onnxruntime as ort

    path = workdir / f"{name}.onnx"
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)

        dim = torch.export.Dim.AUTO
        with quiet(), torch.no_grad():
            torch.onnx.export(net, (example,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes={"input": {0: dim, 2: dim, 3: dim}})
        exporter = "dynamo exporter"
    except ImportError:
        with quiet(), torch.no_grad():
            torch.onnx.export(net, (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b", 2: "h", 3: "w"}})
        exporter = "TorchScript exporter (onnxscript missing)"
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.contiguous().numpy()})[0])

    return run, exporter


def build_path(name: str, model: nn.Module, examples: tuple[torch.Tensor, torch.Tensor],
               workdir: Path) -> RunPath | Skipped:
    """The path ``name`` for ``model`` (the engine's, never modified), or why it cannot run here.

    ``examples`` are an encoder input and a decoder input, for the tracers and exporters."""
    enc, dec = networks(model)
    cores = usable_cores()
    started = time.perf_counter()
    if name == "eager":
        return RunPath("eager fp32", enc, dec)
    if name == "channels_last":
        enc_cl, dec_cl = networks(copy.deepcopy(model).to(memory_format=torch.channels_last))
        return RunPath("channels_last", enc_cl, dec_cl, channels_last=True)
    if name == "threads1":
        if torch.get_num_threads() == 1:
            return Skipped("threads 1", "torch already runs on 1 thread (the baseline)")
        return RunPath("threads 1", enc, dec, context=lambda: num_threads(1))
    if name == "threads_all":
        if torch.get_num_threads() == cores:
            return Skipped(f"threads {cores}", f"torch's default is already all {cores} cores (the baseline)")
        return RunPath(f"threads {cores}", enc, dec, context=lambda: num_threads(cores))
    if name == "bf16":
        return RunPath("bf16 autocast", enc, dec, context=bf16_autocast)
    if name == "channels_last_bf16":
        enc_cl, dec_cl = networks(copy.deepcopy(model).to(memory_format=torch.channels_last))
        return RunPath("channels_last+bf16", enc_cl, dec_cl, context=bf16_autocast, channels_last=True)
    if name == "compile":
        if cxx_compiler() is None:
            return Skipped("compile", "no working C++ compiler (inductor's CPU backend needs g++ or clang++; "
                           f"CXX={os.environ.get('CXX', 'unset')})")
        cache = inductor_cache_state()
        note = f"setup s = the first call of each shape (the compilation); inductor cache {cache} at start"
        return RunPath("compile", torch.compile(enc), torch.compile(dec), note=note)
    if name in ("jit_freeze", "jit_ofi", "channels_last_jit"):
        channels_last = name == "channels_last_jit"
        if channels_last:  # trace the channels_last copy with channels_last examples
            enc, dec = networks(copy.deepcopy(model).to(memory_format=torch.channels_last))
            examples = tuple(e.contiguous(memory_format=torch.channels_last) for e in examples)
        try:
            with quiet(), torch.no_grad():
                pairs = zip((enc, dec), examples, strict=True)
                frozen = [torch.jit.freeze(torch.jit.trace(net, example)) for net, example in pairs]
                if name == "jit_ofi":
                    frozen = [torch.jit.optimize_for_inference(f) for f in frozen]
        except Exception as error:  # any failure is reported as the reason
            return Skipped(name.replace("_", " "), reason_of(error))
        label = {"jit_ofi": "jit freeze+ofi", "channels_last_jit": "channels_last+jit freeze"}.get(name, "jit freeze")
        return RunPath(label, frozen[0], frozen[1], setup_seconds=time.perf_counter() - started,
                       channels_last=channels_last)
    if name == "onnxruntime":
        try:
            import onnxruntime
        except ImportError:
            return Skipped("onnxruntime", f"onnxruntime is not installed: {ORT_HINT}")
        try:
            import onnx  # noqa: F401  (both exporters write the model with it)
        except ImportError:
            return Skipped("onnxruntime", f"onnx is not installed (torch.onnx.export needs it): {ORT_HINT}")
        try:
            encoder, exporter = onnx_session(enc, examples[0], workdir, "encoder")
            decoder, _ = onnx_session(dec, examples[1], workdir, "decoder")
        except ImportError as error:
            return Skipped("onnxruntime", f"the ONNX exporter needs {error.name or error}: {ORT_HINT}")
        except Exception as error:
            return Skipped("onnxruntime", f"export failed: {reason_of(error)}")
        return RunPath("onnxruntime", encoder, decoder, setup_seconds=time.perf_counter() - started,
                       note=f"{exporter}, onnxruntime {onnxruntime.__version__}")
    raise ValueError(f"unknown path {name!r}")


PATHS = ["eager", "channels_last", "threads1", "threads_all", "bf16", "channels_last_bf16", "compile",
         "jit_freeze", "jit_ofi", "channels_last_jit", "onnxruntime"]


# --- the engine's encode and decode around a path's networks -------------------------------------------
def encode(engine: Engine, path: RunPath, pixels: torch.Tensor) -> torch.Tensor:
    """``Engine.encode_batch`` on the CPU, with the path's encoder: uint8 (B, 3, H, W) -> (B, H/f, W/f)."""
    x = engine.config.normalize(pixels.float().div_(255.0))
    if path.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with path.context():
        engine.model.check_images(x)
        latents = path.encoder(x)
        return engine.model.quantizer.quantize_indices(latents)  # float32: autocast is off inside


def decode(engine: Engine, path: RunPath, indices: torch.Tensor) -> torch.Tensor:
    """``Engine.decode_batch`` on the CPU, with the path's decoder: (B, h, w) -> uint8 (B, H, W, 3)."""
    model = engine.model
    model.check_indices(indices)
    vectors = model.quantizer.lookup(indices.long()).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w) float32
    if path.channels_last:
        vectors = vectors.contiguous(memory_format=torch.channels_last)
    with path.context():
        x = path.decoder(vectors)
    pixels = engine.config.denormalize(x.float()).mul_(255.0).round_().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


# --- measurement ---------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One path at one shape: throughputs, ratios, agreement."""

    encode_rate: float = float("nan")
    encode_ratio: float = float("nan")
    decode_rate: float = float("nan")
    decode_ratio: float = float("nan")
    agree: float = float("nan")
    decode_max_diff: int = -1
    setup_seconds: float = 0.0


@dataclass
class Row:
    path: RunPath
    cells: dict[str, Cell] = field(default_factory=dict)
    failed: str = ""


def block(function: Callable[[], Any], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        function()
    return time.perf_counter() - start


def measure_shape(engine: Engine, rows: list[Row], batches: list[torch.Tensor], real: int, label: str,
                  repeats: int, block_seconds: float) -> None:
    """Fill every row's cell for one shape: warm-up (setup), correctness on every batch, then timed rounds."""
    eager = rows[0].path
    reference = [encode(engine, eager, b) for b in batches]
    reference_pixels = [decode(engine, eager, t) for t in reference]
    batch = batches[0].shape[0]
    for row in rows:
        if row.failed:
            continue
        cell = row.cells.setdefault(label, Cell())
        try:
            started = time.perf_counter()
            with quiet():
                tokens0 = encode(engine, row.path, batches[0])
                decode(engine, row.path, tokens0)
            cell.setup_seconds = time.perf_counter() - started
            same = total = 0
            worst = 0
            checked = zip(batches, reference, reference_pixels, strict=True)
            for i, (pixels, ref_tokens, ref_pixels) in enumerate(checked):
                keep = min(batch, real - i * batch)  # padded repeats are not counted
                tokens = encode(engine, row.path, pixels)[:keep]
                same += int((tokens == ref_tokens[:keep]).sum())
                total += tokens.numel()
                decoded = decode(engine, row.path, ref_tokens)[:keep]
                worst = max(worst, int((decoded.int() - ref_pixels[:keep].int()).abs().max()))
            cell.agree, cell.decode_max_diff = same / total, worst
        except Exception as error:  # a path that fails at this shape is reported, not fatal
            row.failed = f"{label}: {reason_of(error)}"
    live = [row for row in rows if not row.failed]
    pixels, tokens = batches[0], reference[0]
    ops = {
        "encode": lambda path: (lambda: encode(engine, path, pixels)),
        "decode": lambda path: (lambda: decode(engine, path, tokens)),
    }
    for op, make in ops.items():
        one = block(make(eager), 1)
        iterations = max(1, round(block_seconds / max(one, 1e-6)))
        times: dict[str, list[float]] = {row.path.name: [] for row in live}
        for round_index in range(repeats):
            shift = round_index % len(live)
            for row in live[shift:] + live[:shift]:  # rotate the order: no path always runs first or last
                times[row.path.name].append(block(make(row.path), iterations))
        base = times[eager.name]
        for row in live:
            cell = row.cells[label]
            mine = times[row.path.name]
            rate = batch * iterations / statistics.median(mine)
            ratio = statistics.median(b / m for b, m in zip(base, mine, strict=True))
            if op == "encode":
                cell.encode_rate, cell.encode_ratio = rate, ratio
            else:
                cell.decode_rate, cell.decode_ratio = rate, ratio


# --- reporting -------------------------------------------------------------------------------------------
def fmt_agree(value: float) -> str:
    if value != value:
        return "-"
    return "1" if value == 1.0 else f"{min(value, 0.9999):.4f}"


def fmt_rate(rate: float, ratio: float) -> str:
    if rate != rate:
        return "-"
    return f"{rate:8.1f} {ratio:5.2f}x"


def print_table(rows: list[Row], skipped: list[Skipped], labels: list[str]) -> None:
    width = max(len(r.path.name) for r in rows) + 1
    head = f"{'path':<{width}}"
    for op in ("enc", "dec"):
        for label in labels:
            head += f" {op + ' ' + label:>15}"
    head += "".join(f" {'agree ' + label.split()[0]:>12}" for label in labels)
    head += f" {'dec max|d|':>10} {'setup s':>8}"
    print(head)
    for row in rows:
        line = f"{row.path.name:<{width}}"
        cells = [row.cells.get(label, Cell()) for label in labels]
        for op in ("encode", "decode"):
            for cell in cells:
                line += f" {fmt_rate(getattr(cell, op + '_rate'), getattr(cell, op + '_ratio')):>15}"
        line += "".join(f" {fmt_agree(cell.agree):>12}" for cell in cells)
        worst = max((c.decode_max_diff for c in cells), default=-1)
        setup = row.path.setup_seconds + sum(c.setup_seconds for c in cells)
        line += f" {worst if worst >= 0 else '-':>10} {setup:>8.1f}"
        print(line)
    for row in rows:
        if row.path.note or row.failed:
            notes = (row.path.note, row.failed and f"FAILED {row.failed}")
            print(f"  {row.path.name}: " + "; ".join(note for note in notes if note))
    for skip in skipped:
        print(f"  {skip.name}: skipped, {skip.reason}")


def recommendation(model_name: str, rows: list[Row], labels: list[str]) -> str:
    """Paths more than 5% faster than eager fp32 on every encode shape, with every token identical and no
    decode shape more than 5% slower; then the paths that gain somewhere but miss a condition, and why."""
    good, other = [], []
    for row in rows[1:]:
        if row.failed:
            continue
        cells = [row.cells[label] for label in labels]
        exact = all(c.agree == 1.0 for c in cells)
        enc = "/".join(f"{c.encode_ratio:.2f}" for c in cells)
        dec = "/".join(f"{c.decode_ratio:.2f}" for c in cells)
        summary = f"{row.path.name} (enc {enc}x, dec {dec}x"
        faster = all(c.encode_ratio > GAIN for c in cells)
        no_loss = all(c.decode_ratio > 2 - GAIN for c in cells)
        if exact and faster and no_loss:
            good.append(summary + ")")
        elif any(c.encode_ratio > GAIN or c.decode_ratio > GAIN for c in cells):
            why = [] if exact else ["tokens agree " + "/".join(fmt_agree(c.agree) for c in cells)]
            why += [] if faster else ["encode not >5% faster at every shape"]
            why += [] if no_loss else ["decode >5% slower at a shape"]
            other.append(summary + "; " + ", ".join(why) + ")")
    none = "none (no path gains >5% on every encode shape with 100% token agreement and no decode loss)"
    line = f"recommend for {model_name}: " + ("; ".join(good) if good else none)
    if other:
        line += "\n  gains, not recommended: " + "; ".join(other)
    floor = [r for r in rows if r.path.name.startswith("threads ") and not r.failed]
    if floor:
        agree = "/".join(fmt_agree(floor[0].cells[label].agree) for label in labels)
        line += (f"\n  floor: eager fp32 on {floor[0].path.name.split()[1]} thread(s) agrees {agree} with eager fp32 "
                 "on the default threads (float32 sums in another order)")
    return line


def cpu_info() -> str:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    bf16 = (f"native bf16: yes ({', '.join(native)})" if native
            else "native bf16: no (no avx512_bf16/amx_bf16: bf16 is emulated)")
    isa = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    return f"{model}, {usable_cores()} usable cores, torch cpu capability {isa}, {bf16}"


def parse_shape(text: str) -> tuple[int, int]:
    side, _, batch = text.partition(":")
    try:
        return int(side), int(batch or 1)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected SIDE:BATCH, e.g. 32:16, got {text!r}") from error


def model_dir(name: str) -> Path:
    candidate = Path(name)
    return candidate if candidate.is_dir() else REPO / "model" / "weights" / name


def run(args: argparse.Namespace) -> dict[str, Any]:
    source, photos = load_photos(args.photos)
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.system()} {platform.machine()}")
    print(f"cpu: {cpu_info()}")
    print(f"threads: intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"photos: {source}; {args.repeats} interleaved rounds of ~{args.block_seconds}s blocks per path; "
          f"ratios are eager fp32 time / path time (median over rounds)")
    results: dict[str, Any] = {"torch": torch.__version__, "cpu": cpu_info(), "models": {}}
    labels = [f"{side}x{side} b{batch}" for side, batch in args.shapes]
    for name in args.models:
        directory = model_dir(name)
        started = time.perf_counter()
        engine = Engine.load(directory, "cpu")
        config = engine.config
        f = config.downsample
        print(f"\n== {name} ({directory.relative_to(REPO) if directory.is_relative_to(REPO) else directory}): "
              f"f={f} K={config.num_embeddings} D={config.embedding_dim} arch={getattr(config, 'arch', 'seed')} ==")
        shapes = [(side // f * f, batch) for side, batch in args.shapes]
        side0, batch0 = shapes[0]
        examples = (torch.zeros(batch0, 3, side0, side0),
                    torch.zeros(batch0, config.embedding_dim, side0 // f, side0 // f))
        rows: list[Row] = []
        skipped: list[Skipped] = []
        with tempfile.TemporaryDirectory(prefix="vqtok-paths-") as workdir:
            for path_name in ["eager", *[p for p in args.paths if p != "eager"]]:
                built = build_path(path_name, engine.model, examples, Path(workdir))
                if isinstance(built, Skipped):
                    skipped.append(built)
                else:
                    rows.append(Row(built))
            with torch.inference_mode():
                first = photo_batches(photos, side0, batch0, batch0)[0][0]
                if not torch.equal(engine.encode_batch(first), encode(engine, rows[0].path, first)):
                    raise SystemExit("the bench's eager encode differs from Engine.encode_batch: fix the bench")
                for (side, batch), label in zip(shapes, labels, strict=True):
                    batches, real = photo_batches(photos, side, batch, args.agreement_images)
                    measure_shape(engine, rows, batches, real, label, args.repeats, args.block_seconds)
        # A path that failed before any measurement (e.g. compile without a working compiler) is a skip.
        skipped += [Skipped(r.path.name, f"failed: {r.failed}") for r in rows if r.failed and not any(
            c.encode_rate == c.encode_rate for c in r.cells.values())]
        rows = [r for r in rows if r.path.name not in {s.name for s in skipped}]
        print_table(rows, skipped, labels)
        print(recommendation(name, rows, labels))
        setup = sum(r.path.setup_seconds + sum(c.setup_seconds for c in r.cells.values()) for r in rows)
        print(f"({name}: {time.perf_counter() - started:.0f} s in all, {setup:.0f} s of it setup: compile, "
              "trace, export, first calls)")
        results["models"][name] = {
            "rows": {r.path.name: {"failed": r.failed, "note": r.path.note, "setup_seconds": r.path.setup_seconds,
                                   "cells": {k: vars(c) for k, c in r.cells.items()}} for r in rows},
            "skipped": {s.name: s.reason for s in skipped},
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default", "f8"],
                        help="names under model/weights/ or checkpoint folders")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(32, 16), (256, 4)], metavar="SIDE:BATCH",
                        help="square image side and batch size of each measured shape (default 32:16 256:4)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=PATHS, help="paths to measure (eager always)")
    parser.add_argument("--skip", nargs="+", choices=PATHS, default=[], help="paths to leave out")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per shape and operation")
    parser.add_argument("--block-seconds", type=float, default=0.25,
                        help="about how long one timed block of eager fp32 calls runs")
    parser.add_argument("--agreement-images", type=int, default=64,
                        help="at most this many photo tiles per shape for the token agreement")
    parser.add_argument("--photos", type=Path, default=REPO / "data" / "photos-v1" / "heldout")
    parser.add_argument("--interop-threads", type=int, help="torch.set_num_interop_threads at start")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the baseline (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~30 s): default model, shapes 32:4 64:2, 2 rounds, no compile or onnxruntime")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        if args.models == parser.get_default("models"):
            args.models = ["default"]
        if args.shapes == parser.get_default("shapes"):
            args.shapes = [(32, 4), (64, 2)]
        if args.paths == PATHS:
            args.paths = [p for p in PATHS if p not in ("compile", "onnxruntime")]  # their setup alone is >20 s
        args.repeats, args.block_seconds, args.agreement_images = 2, 0.05, min(args.agreement_images, 8)
    args.paths = [p for p in args.paths if p not in args.skip]
    if args.interop_threads:
        torch.set_num_interop_threads(args.interop_threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
