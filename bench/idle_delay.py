"""Idle delay and small requests: continuous batching against waiting for company, side by side.

For each mode (``--max-wait-ms 5``, the old default that makes a lone request wait, and ``0``,
continuous batching) a real ``python -m vqtok.service`` process serves the bundled model, and this
script measures, one after another:

- concurrency 1: ``/health`` p50, ``/encode`` p50 of one 32x32 PNG and its ``x-queue-time-ms``; the
  overhead is ``/encode`` p50 minus (``/health`` p50 + the in-process batch-1 encode time, measured here);
- concurrency 32: ``/encode`` images/s and p99 of one 32x32 PNG per request, as a share of the
  in-process batch-16 encode throughput measured in the same run.

    python bench/idle_delay.py                 # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import REPO, _coffee_png, fire, free_port, start_server, wait_ready


def in_process(checkpoint: Path, side: int, repeats: int) -> tuple[float, float]:
    """(batch-1 encode seconds p50, batch-16 images/s) of the engine the service uses, on the CPU."""
    from vqtok.service.engine import Engine

    engine = Engine.load(checkpoint, "cpu")
    pixels = torch.randint(0, 256, (16, 3, side, side), dtype=torch.uint8)
    engine.encode_batch(pixels)  # warm up
    singles = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.encode_batch(pixels[:1])
        singles.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(repeats // 4):
        engine.encode_batch(pixels)
    return float(np.median(singles)), 16 * (repeats // 4) / (time.perf_counter() - start)


async def sequential(url: str, path: str, png: bytes | None, count: int) -> tuple[float, float]:
    """(p50 seconds, p50 x-queue-time-ms) of ``count`` requests one at a time."""
    latencies, queue = [], []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(count):
            start = time.perf_counter()
            if png is None:
                response = await client.get(path)
            else:
                response = await client.post(path, content=png, headers={"content-type": "image/png"})
            latencies.append(time.perf_counter() - start)
            queue.append(float(response.headers.get("x-queue-time-ms", "nan")))
    return float(np.median(latencies)), float(np.nanmedian(queue)) if png is not None else float("nan")


def measure(checkpoint: Path, max_wait_ms: float, png: bytes, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(checkpoint, port, 16, max_wait_ms, 32)
    try:
        wait_ready(url, process, timeout=180)
        asyncio.run(sequential(url, "/encode", png, 20))  # connections and caches warm
        health, _ = asyncio.run(sequential(url, "/health", None, args.requests))
        encode, queue = asyncio.run(sequential(url, "/encode", png, args.requests))
        asyncio.run(fire(url, "encode", png, 64, 32, time.monotonic() + 60))
        latencies, errors, seconds = asyncio.run(
            fire(url, "encode", png, args.concurrent_requests, 32, time.monotonic() + 120))
        return {"health_p50": health, "encode_p50": encode, "queue_p50_ms": queue,
                "c32_rate": len(latencies) / seconds, "c32_p99": float(np.percentile(latencies, 99)),
                "errors": errors}
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "model" / "weights" / "default")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per figure")
    parser.add_argument("--concurrent-requests", type=int, default=1000, help="requests at concurrency 32")
    args = parser.parse_args()
    photo = Image.open(io.BytesIO(_coffee_png())).resize((32, 32), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    png = buffer.getvalue()
    single, batch16_rate = in_process(args.checkpoint, 32, 200)
    print(f"in process (bundled model, CPU, {torch.get_num_threads()} threads): batch-1 encode p50 "
          f"{single * 1000:.2f} ms, batch-16 {batch16_rate:.0f} images/s")
    print(f"{'mode':<22} {'health p50':>10} {'encode p50':>10} {'queue p50':>9} {'overhead':>9} "
          f"{'c32 img/s':>9} {'of in-proc':>10} {'c32 p99':>8} {'errors':>6}")
    for label, wait in (("wait 5 ms (old)", 5.0), ("continuous (wait 0)", 0.0)):
        r = measure(args.checkpoint, wait, png, args)
        overhead = (r["encode_p50"] - r["health_p50"] - single) * 1000
        print(f"{label:<22} {r['health_p50'] * 1000:>8.2f}ms {r['encode_p50'] * 1000:>8.2f}ms "
              f"{r['queue_p50_ms']:>7.2f}ms {overhead:>7.2f}ms {r['c32_rate']:>9.0f} "
              f"{r['c32_rate'] / batch16_rate:>9.1%} {r['c32_p99'] * 1000:>6.0f}ms {int(r['errors']):>6}")


if __name__ == "__main__":
    main()
