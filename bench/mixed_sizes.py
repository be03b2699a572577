"""Batch by budget with mixed sizes: small and large images together, batches bounded by pixels or by count.

The micro-batcher bounds a forward pass twice: ``--max-batch-size`` items and ``--max-batch-pixels``
pixels (TEI's ``--max-batch-tokens``), so 32x32 images may form batches of 256 while 768x768 ones run
alone. This script starts a real ``python -m vqtok.service`` process (the bundled default model, CPU)
once per configuration, one after the other, and drives each with the same load:

- ``--small-clients`` clients, each POSTing one 32x32 PNG to ``/encode`` after another (no pause);
- ``--large-clients`` clients, each POSTing one ``--large-side`` square PNG, then pausing a random time
  (exponential, mean ``--large-think`` s; the same seeded pauses and start offsets in every configuration).

The configurations (the same flags otherwise; ``--warmup-size 32`` for all, see below):

- ``budget``: ``--max-batch-size 256`` and the service's default pixel budget (read back from /info);
- ``count-only``: ``--max-batch-size 256`` and a budget of 2**40 pixels, which never binds;
- ``budget, 16``: the service's default ``--max-batch-size 16`` with the default budget.

Clients are lean: one keep-alive HTTP/1.1 connection each over asyncio streams. After ``--warm`` seconds
of load the script measures ``--seconds`` seconds and prints, side by side with the ratios: small and
large throughput and p50/p99 latency (requests answered within the window), the batches each kind
formed (from the ``x-batch-size`` header of every answer: /metrics counts encode passes of every
shape together), encode passes from /metrics, the server's and this client's CPU seconds per wall
second, and the server's RSS when ready and its peak (``VmHWM`` from /proc) at the end of the window.

    python bench/mixed_sizes.py                 # about 3 minutes on 2 cores
    python bench/mixed_sizes.py --quick         # a ~30 s smoke run (the first two configurations)
    python bench/mixed_sizes.py --seconds 90 --large-side 1024
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_paths import load_photos
from reliability import REPO, Server, Servers, own_cpu_seconds, percentiles_ms, png_bytes, proc_cpu_seconds
from service_load import _mean_between

UNBOUNDED_PIXELS = 1 << 40  # "count only": no batch of this service ever reaches it
SMALL_SIDE = 32


@dataclass(frozen=True)
class Config:
    label: str
    max_batch_size: int
    max_batch_pixels: int | None  # None: the service's default, not passed


@dataclass(frozen=True)
class Sample:
    kind: str  # "small" or "large"
    done: float  # perf_counter when the answer was read
    seconds: float
    status: int  # 0: transport error
    batch: int  # x-batch-size of the answer (0 if absent)


# ------------------------------------------------------------------------------------------------ client


class Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: far less client CPU per request than httpx."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "image/png"
                      ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers in lower case, body); the answer must carry a Content-Length (the service's do).

        A kept-alive connection that the server closed meanwhile (idle past its keep-alive timeout) is
        reopened and the request sent again, once."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        reused = self.writer is not None
        try:
            first = await self._send(head.encode() + b"\r\n" + body)
        except (ConnectionError, asyncio.IncompleteReadError):
            if not reused:
                raise
            self.close()
            first = await self._send(head.encode() + b"\r\n" + body)
        assert self.reader is not None
        lines = (first + await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in lines[1:] if line)}
        payload = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, payload

    async def _send(self, request: bytes) -> bytes:
        """Send ``request``; the answer's first byte (so a closed connection shows here, before any answer)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        await self.writer.drain()
        return await self.reader.readexactly(1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def client(kind: str, port: int, payloads: list[bytes], first: int, pauses: list[float], start_after: float,
                 samples: list[Sample]) -> None:
    """POST ``payloads`` in turn (from index ``first``) until cancelled; after the i-th answer, sleep
    ``pauses[i % len(pauses)]`` (none when ``pauses`` is empty)."""
    connection = Connection("127.0.0.1", port)
    await asyncio.sleep(start_after)
    try:
        for index in range(first, 1 << 62):
            start = time.perf_counter()
            try:
                status, headers, _ = await connection.request("POST", "/encode", payloads[index % len(payloads)])
            except (OSError, ValueError, KeyError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                status, headers = 0, {}
                connection.close()
            done = time.perf_counter()
            batch = int(headers.get("x-batch-size", "0").split(",")[-1] or 0)
            samples.append(Sample(kind, done, done - start, status, batch))
            if pauses:
                await asyncio.sleep(pauses[(index - first) % len(pauses)])
    finally:
        connection.close()


async def drive(server: Server, port: int, small: list[bytes], large: list[bytes], args: argparse.Namespace
                ) -> dict[str, object]:
    """Run the load for ``args.warm`` + ``args.seconds`` seconds; the figures of the measured window."""
    rng = random.Random(args.seed)  # the same offsets and pauses for every configuration
    samples: list[Sample] = []
    tasks = [asyncio.create_task(client("small", port, small, i, [], 0.0, samples))
             for i in range(args.small_clients)]
    for i in range(args.large_clients):
        pauses = [rng.expovariate(1.0 / args.large_think) for _ in range(1000)] if args.large_think > 0 else []
        offset = rng.uniform(0.0, args.large_think)
        tasks.append(asyncio.create_task(client("large", port, large, i, pauses, offset, samples)))
    probe = Connection("127.0.0.1", port)
    try:
        await asyncio.sleep(args.warm)
        metrics_before = (await probe.request("GET", "/metrics"))[2].decode()
        t0, client_cpu0, server_cpu0 = time.perf_counter(), own_cpu_seconds(), proc_cpu_seconds(server.pid)
        await asyncio.sleep(args.seconds)
        t1, client_cpu1, server_cpu1 = time.perf_counter(), own_cpu_seconds(), proc_cpu_seconds(server.pid)
        peak_mb = server.hwm_mb()
        metrics_after = (await probe.request("GET", "/metrics"))[2].decode()
    finally:
        probe.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = t1 - t0
    window = [s for s in samples if t0 <= s.done <= t1]
    figures: dict[str, object] = {
        "client_cpu": (client_cpu1 - client_cpu0) / wall, "server_cpu": (server_cpu1 - server_cpu0) / wall,
        "peak_mb": peak_mb, "passes": _passes(metrics_before, metrics_after),
        "mean_pass": _mean_between(metrics_before, metrics_after, "encode"),
    }
    for kind in ("small", "large"):
        ok = [s for s in window if s.kind == kind and s.status == 200]
        batches = [s.batch for s in ok if s.batch > 0]
        formed = sum(1.0 / b for b in batches)  # a batch of b answers b requests
        p50, p99 = percentiles_ms([s.seconds for s in ok])
        figures |= {f"{kind}_rate": len(ok) / wall, f"{kind}_done": len(ok), f"{kind}_p50": p50, f"{kind}_p99": p99,
                    f"{kind}_errors": sum(1 for s in window if s.kind == kind and s.status != 200),
                    f"{kind}_mean_batch": len(batches) / formed if formed else None,
                    f"{kind}_max_batch": max(batches, default=None)}
    return figures


def _passes(before: str, after: str) -> int:
    """Encode forward passes between two /metrics texts (every shape together)."""
    def count(text: str) -> float:
        prefix = 'vqtok_batch_size_count{operation="encode"}'
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix)), 0.0)

    return round(count(after) - count(before))


# ------------------------------------------------------------------------------------------------ inputs


def square_png(pixels: np.ndarray, side: int) -> bytes:
    """The centre square of ``pixels``, resized (bicubic) so that it is ``side`` x ``side``, as a PNG."""
    height, width = pixels.shape[:2]
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    image = Image.fromarray(np.ascontiguousarray(pixels[top:top + short, left:left + short]))
    if short != side:
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    return png_bytes(np.asarray(image))


# ------------------------------------------------------------------------------------------------ report

ROWS = (  # (label, key, format, ratio?)
    ("small req/s (1 x 32x32)", "small_rate", "{:.1f}", True),
    ("small p50 ms", "small_p50", "{:.0f}", True),
    ("small p99 ms", "small_p99", "{:.0f}", True),
    ("small batch: mean formed", "small_mean_batch", "{:.1f}", True),
    ("small batch: max", "small_max_batch", "{}", True),
    ("large answered", "large_done", "{}", True),
    ("large p50 ms", "large_p50", "{:.0f}", True),
    ("large p99 ms", "large_p99", "{:.0f}", True),
    ("large batch: mean formed", "large_mean_batch", "{:.2f}", True),
    ("large batch: max", "large_max_batch", "{}", True),
    ("encode passes (/metrics)", "passes", "{}", True),
    ("mean pass size (/metrics)", "mean_pass", "{:.1f}", True),
    ("errors (small + large)", "errors", "{}", False),
    ("server CPU s / wall s", "server_cpu", "{:.2f}", True),
    ("client CPU s / wall s", "client_cpu", "{:.2f}", True),
    ("server RSS when ready MB", "ready_mb", "{:.0f}", True),
    ("server peak RSS (VmHWM) MB", "peak_mb", "{:.0f}", True),
)


def cell(value: object, form: str) -> str:
    return "-" if value is None else form.format(value)


def ratio(a: object, b: object) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return "-"
    return f"{a / b:.2f}x"


def print_table(configs: list[Config], results: list[dict[str, object]]) -> None:
    labels = [c.label for c in configs]
    pairs = [(0, 1)] + ([(0, 2)] if len(configs) > 2 else [])
    names = [f"{labels[a]} / {labels[b]}" for a, b in pairs]
    widths = [max(12, len(label)) for label in labels] + [max(9, len(name)) for name in names]
    print(f"{'':<28}" + "".join(f" {t:>{w}}" for t, w in zip(labels + names, widths, strict=True)))
    for label, key, form, with_ratio in ROWS:
        values = [r.get(key) for r in results]
        ratios = [ratio(values[a], values[b]) if with_ratio else "" for a, b in pairs]
        row = [cell(v, form) for v in values] + ratios
        print(f"{label:<28}" + "".join(f" {t:>{w}}" for t, w in zip(row, widths, strict=True)))


# ------------------------------------------------------------------------------------------------ main


def run_config(config: Config, servers: Servers, small: list[bytes], large: list[bytes], args: argparse.Namespace
               ) -> dict[str, object]:
    flags = ["--max-batch-size", str(config.max_batch_size), "--warmup-size", str(SMALL_SIDE),
             "--max-concurrent-requests", str(2 * (args.small_clients + args.large_clients) + 8)]
    if config.max_batch_pixels is not None:
        flags += ["--max-batch-pixels", str(config.max_batch_pixels)]
    server = servers.start(config.label, flags)
    try:
        limits = httpx.get(f"{server.url}/info", timeout=30).json()["limits"]
        ready_mb = server.rss_mb()
        figures = asyncio.run(drive(server, int(server.url.rsplit(":", 1)[1]), small, large, args))
    finally:
        server.stop()
    figures |= {"ready_mb": ready_mb, "max_batch_pixels": limits["max_batch_pixels"],
                "errors": int(figures["small_errors"]) + int(figures["large_errors"])}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the bundled one)")
    parser.add_argument("--seconds", type=float, default=35.0, help="measured seconds per configuration")
    parser.add_argument("--warm", type=float, default=5.0, help="seconds of load before the measured window")
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run: --seconds 4 --warm 2 --no-16")
    parser.add_argument("--small-clients", type=int, default=64)
    parser.add_argument("--large-clients", type=int, default=3)
    parser.add_argument("--large-side", type=int, default=768, help="side of the large square images")
    parser.add_argument("--large-think", type=float, default=4.0,
                        help="mean pause (s) of a large client after each answer; 0: none")
    parser.add_argument("--max-batch-size", type=int, default=256, help="of the budget and count-only runs")
    parser.add_argument("--no-16", action="store_true", help="skip the third run (max batch size 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warm, args.no_16 = 4.0, 2.0, True
    if args.checkpoint is None:
        from vqtok.model.checkpoint import DEFAULT_CHECKPOINT

        args.checkpoint = DEFAULT_CHECKPOINT
    args.device = "cpu"

    where, photos = load_photos(REPO / "data" / "photos-v1" / "heldout")
    small = [square_png(p, SMALL_SIDE) for p in photos]
    big_enough = [p for p in photos if min(p.shape[:2]) >= args.large_side] or photos
    large = [square_png(p, args.large_side) for p in big_enough]
    configs = [Config("budget", args.max_batch_size, None),
               Config("count-only", args.max_batch_size, UNBOUNDED_PIXELS)]
    if not args.no_16:
        configs.append(Config("budget, 16", 16, None))
    print(f"checkpoint {args.checkpoint}, CPU ({os.cpu_count()} cores), load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"load: {args.small_clients} clients x one {SMALL_SIDE}x{SMALL_SIDE} PNG per request, no pause; "
          f"{args.large_clients} clients x one {args.large_side}x{args.large_side} PNG per request, pause "
          f"~Exp(mean {args.large_think:g} s); {len(small)} small and {len(large)} large images from {where}")
    print(f"per configuration: {args.warm:g} s of load, then {args.seconds:g} s measured; every server: "
          f"--warmup-size {SMALL_SIDE}, --max-concurrent-requests above the client count")

    with tempfile.TemporaryDirectory(prefix="vqtok-mixed-") as logs:
        servers = Servers(args, Path(logs))
        results = []
        for config in configs:
            results.append(run_config(config, servers, small, large, args))
            print(f"  {config.label}: max_batch_size {config.max_batch_size}, max_batch_pixels "
                  f"{results[-1]['max_batch_pixels']:,}"
                  f"{' (the default)' if config.max_batch_pixels is None else ' (never binds: count only)'}",
                  flush=True)
        problems = servers.problems()
    print()
    print_table(configs, results)
    for label, lines in problems.items():
        print(f"server log problems, {label}:", *lines[:5], sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
