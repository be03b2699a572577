"""Load benchmark of the HTTP service: throughput and latency with and without micro-batching.

Starts ``python -m vqtok.service`` as a real process on a free loopback port (once with batching, once with
``--max-batch-size 1``), fires ``--concurrency`` clients at ``POST /encode`` (or ``/decode``) until
``--requests`` requests are done, and prints images/s, p50/p95/p99 latency and the mean batch size
from /metrics. Bounded: a fixed request count, per-request timeouts, and a wall-clock deadline.

    python bench/service_load.py --tiny                      # a tiny untrained model: the serving overhead
    python bench/service_load.py --checkpoint model/weights/default --size 128 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


@dataclass
class RunResult:
    label: str
    max_batch_size: int
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    mean_batch: float

    def row(self) -> str:
        q = np.percentile(self.latencies, [50, 95, 99]) * 1000.0 if self.latencies else [float("nan")] * 3
        rate = (self.requests - self.errors) / self.seconds
        return (f"{self.label:<12} {self.max_batch_size:>5} {self.requests:>8} {self.errors:>6} {rate:>10.1f} "
                f"{q[0]:>9.1f} {q[1]:>9.1f} {q[2]:>9.1f} {self.mean_batch:>10.2f}")


HEADER = (f"{'mode':<12} {'batch':>5} {'requests':>8} {'errors':>6} {'images/s':>10} "
          f"{'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'mean batch':>10}")


def tiny_checkpoint(directory: Path) -> Path:
    """An untrained tiny checkpoint (the serving path costs the same as with a trained one)."""
    import torch

    from vqtok.model.checkpoint import Provenance, save_checkpoint
    from vqtok.model.config import NetworkConfig
    from vqtok.model.vqvae import VQVAE

    torch.manual_seed(0)
    model = VQVAE(NetworkConfig(num_hiddens=32, num_residual_hiddens=8, embedding_dim=16, num_embeddings=64))
    return save_checkpoint(directory / "bench-tiny", model.eval(), Provenance(name="bench-tiny"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(checkpoint: Path, port: int, max_batch_size: int, max_wait_ms: float, warmup_size: int
                 ) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VQTOK_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "vqtok.service", "--checkpoint", str(checkpoint), "--port", str(port),
               "--device", "cpu", "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
               "--warmup-size", str(warmup_size), "--max-queue-depth", "4096"]
    return subprocess.Popen(command, env=env, cwd=REPO)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


async def fire(url: str, operation: str, payload: bytes | dict, requests: int, concurrency: int,
               deadline: float) -> tuple[list[float], int, float]:
    """``requests`` calls from ``concurrency`` workers; returns latencies (s), error count, wall seconds."""
    latencies: list[float] = []
    errors = 0
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                start = time.perf_counter()
                try:
                    if operation == "encode":
                        response = await client.post("/encode", content=payload,
                                                     headers={"content-type": "image/png"})
                    else:
                        response = await client.post("/decode", json=payload)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - started


def run_one(label: str, checkpoint: Path, args: argparse.Namespace, max_batch_size: int) -> RunResult:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(checkpoint, port, max_batch_size, args.max_wait_ms, args.size)
    try:
        wait_ready(url, process, timeout=args.startup_timeout)
        photo = Image.open(io.BytesIO(_coffee_png())).resize((args.size, args.size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG")
        png = buffer.getvalue()
        grid = httpx.post(f"{url}/encode", content=png, headers={"content-type": "image/png"}, timeout=60).json()
        payload: bytes | dict = png if args.operation == "encode" else {"indices": grid["images"][0]["indices"]}
        # A short unmeasured burst so the first measured requests do not pay connection setup.
        asyncio.run(fire(url, args.operation, payload, args.concurrency, args.concurrency, time.monotonic() + 60))
        before = httpx.get(f"{url}/metrics", timeout=10).text
        deadline = time.monotonic() + args.max_seconds
        latencies, errors, seconds = asyncio.run(
            fire(url, args.operation, payload, args.requests, args.concurrency, deadline))
        after = httpx.get(f"{url}/metrics", timeout=10).text
        mean = _mean_between(before, after, args.operation)
        return RunResult(label, max_batch_size, len(latencies) + errors, errors, seconds, latencies, mean)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _mean_between(before: str, after: str, operation: str) -> float:
    """Mean batch size of the measured window only (metrics after minus before)."""
    def totals(text: str) -> tuple[float, float]:
        values = {"sum": 0.0, "count": 0.0}
        for line in text.splitlines():
            for kind in values:
                if line.startswith(f'vqtok_batch_size_{kind}{{operation="{operation}"}}'):
                    values[kind] = float(line.split()[-1])
        return values["sum"], values["count"]

    (s0, c0), (s1, c1) = totals(before), totals(after)
    return (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan")


def _coffee_png() -> bytes:
    try:
        from skimage import data

        pixels = data.coffee()
    except ImportError:  # no scikit-image: a smooth synthetic picture
        y, x = np.mgrid[0:256, 0:256]
        pixels = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the bundled one)")
    source.add_argument("--tiny", action="store_true", help="use a tiny untrained model")
    parser.add_argument("--operation", choices=["encode", "decode"], default="encode")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--requests", type=int, default=200, help="measured requests per mode")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--batch-size", type=int, default=16, help="max_batch_size of the batching run")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="wall-clock cap per mode")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            checkpoint = tiny_checkpoint(Path(tmp))
        else:
            from vqtok.model.checkpoint import DEFAULT_CHECKPOINT

            checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
        print(f"checkpoint {checkpoint}, {args.operation} {args.size}x{args.size}, {args.concurrency} clients, "
              f"{args.requests} requests per mode, cpu threads {os.cpu_count()}")
        results = [run_one("batching", checkpoint, args, args.batch_size),
                   run_one("no batching", checkpoint, args, 1)]
    print(HEADER)
    for result in results:
        print(result.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
