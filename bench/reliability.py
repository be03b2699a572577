"""Reliability benchmark of the HTTP service: overload, soak, peak memory per request, and drain on SIGTERM.

Every scenario starts ``python -m vqtok.service`` as a real process on a free loopback port (a fresh one
where the scenario says so), drives it with ``httpx`` and stops it. Bounded: fixed request counts,
per-request timeouts and wall-clock caps. Nothing leaves the loopback interface.

- ``burst``: ``--requests`` /encode calls of a 64x64 photo crop at ``--concurrency`` against a server with
  a small queue; counts 200s and 429s, their latencies, and anything else (5xx, transport errors).
- ``soak``: ``--soak-concurrency`` clients for ``--soak-seconds``, mixed /encode (64x64 and 128x128 crops)
  and /decode (grids from earlier encodes); errors, throughput and the server's RSS every minute.
- ``peak-rss``: the worst requests of the hardening issue, each against a fresh server; the growth of
  the server's peak RSS (VmHWM) over the request, the status and the error message.
- ``drain``: 24 concurrent 512x512 /encode calls, SIGTERM 0.5 s later; what each request got, the exit
  status and the time to exit. Once with the default drain timeout, once with ``--drain-timeout-s 0.2``.

    python bench/reliability.py --scenario burst --requests 200          # a quick check
    python bench/reliability.py --scenario all --json /tmp/reliability.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024

# ----------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status_kb(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` and friends from ``/proc/PID/status``, in kB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key.startswith("Vm") and rest.strip().endswith("kB"):
                values[key] = int(rest.split()[0])
    return values


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Server:
    """A ``python -m vqtok.service`` child process on a loopback port, its log in a file."""

    label: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    flags: list[str]
    env_extra: dict[str, str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        return proc_status_kb(self.pid)["VmRSS"] / 1024.0

    def hwm_mb(self) -> float:
        return proc_status_kb(self.pid)["VmHWM"] / 1024.0

    def reset_hwm(self) -> bool:
        """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``, Linux >= 4.0); False if refused."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode

    def log_problems(self) -> list[str]:
        """Lines of the server's log that report an error or a traceback (warnings are not counted)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]


class Servers:
    """Starts servers with the common flags and remembers them, so every log can be checked at the end."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.log_dir = log_dir
        self.started: list[Server] = []

    def start(self, label: str, flags: list[str] | None = None, env_extra: dict[str, str] | None = None,
              wait: bool = True) -> Server:
        flags = list(flags or [])
        env_extra = dict(env_extra or {})
        port = free_port()
        # The server's own settings come from the flags and env_extra only, never from this shell's VQTOK_*.
        env = {k: v for k, v in os.environ.items() if not k.startswith("VQTOK_")}
        env.update({"VQTOK_LOG_LEVEL": "warning", **env_extra})
        command = [sys.executable, "-m", "vqtok.service", "--checkpoint", str(self.args.checkpoint),
                   "--port", str(port), "--device", self.args.device, *flags]
        log_path = self.log_dir / f"{len(self.started):02d}-{label}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        server = Server(label, process, f"http://127.0.0.1:{port}", log_path, flags, env_extra)
        self.started.append(server)
        if wait:
            try:
                wait_ready(server, self.args.startup_timeout)
            except Exception:
                server.stop()
                raise
        return server

    def problems(self) -> dict[str, list[str]]:
        return {f"{s.label} ({s.log_path.name})": p for s in self.started if (p := s.log_problems())}


def wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server {server.label} exited with {server.process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server {server.label} not ready within {timeout} s")


# ----------------------------------------------------------------------------------------------- inputs


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.coffee(), data.chelsea(), data.astronaut(), data.rocket()]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def photo_crops(side: int, count: int, seed: int) -> list[bytes]:
    """``count`` PNGs of ``side`` x ``side`` crops at random places of the photos in scikit-image."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crops.append(png_bytes(np.ascontiguousarray(photo[top:top + side, left:left + side])))
    return crops


def astronaut_png() -> bytes:
    from skimage import data

    return png_bytes(data.astronaut())  # 512x512 RGB


def percentiles_ms(seconds: list[float], qs: tuple[float, ...] = (50, 99)) -> list[float | None]:
    if not seconds:
        return [None] * len(qs)
    return [round(float(v) * 1000.0, 1) for v in np.percentile(seconds, qs)]


def fmt(value: Any, width: int = 9, digits: int = 1) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float):
        return f"{value:>{width}.{digits}f}"
    return f"{value!s:>{width}}"


def error_message(response: httpx.Response) -> tuple[str, str]:
    """(error_type, error) of the service's JSON error shape; ("", first bytes) for anything else."""
    try:
        body = response.json()
        return str(body.get("error_type", "")), str(body.get("error", ""))
    except (ValueError, AttributeError):
        return "", response.content[:100].decode("latin-1")


# ----------------------------------------------------------------------------------------------- burst


async def _burst(url: str, payloads: list[bytes], requests: int, concurrency: int, timeout: float,
                 deadline: float) -> tuple[list[dict[str, Any]], float]:
    outcomes: list[dict[str, Any]] = []
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def worker() -> None:
            nonlocal remaining
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                payload = payloads[remaining % len(payloads)]
                start = time.perf_counter()
                try:
                    response = await client.post("/encode", content=payload, headers={"content-type": "image/png"})
                except httpx.HTTPError as exc:
                    outcomes.append({"status": None, "seconds": time.perf_counter() - start,
                                     "error": f"{type(exc).__name__}: {exc}"})
                    continue
                outcome: dict[str, Any] = {"status": response.status_code, "seconds": time.perf_counter() - start}
                server_ms = response.headers.get("x-total-time-ms")
                if server_ms is not None:  # the server's own time, from the ASGI call to the answer
                    outcome["server_seconds"] = float(server_ms) / 1000.0
                if response.status_code != 200:
                    outcome["error_type"], outcome["error"] = error_message(response)
                    outcome["retry_after"] = response.headers.get("retry-after")
                outcomes.append(outcome)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcomes, time.perf_counter() - started


def scenario_burst(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    flags = ["--max-queue-depth", str(args.burst_queue_depth), "--max-batch-size", str(args.burst_batch_size),
             "--max-concurrent-requests", str(args.burst_max_concurrent),
             "--max-images-per-request", str(min(64, args.burst_queue_depth))]
    payloads = photo_crops(64, 16, args.seed)
    server = servers.start("burst", flags)
    try:
        rss_before, hwm_before = server.rss_mb(), server.hwm_mb()
        cpu_before = (proc_cpu_seconds(server.pid), own_cpu_seconds())
        deadline = time.monotonic() + args.burst_max_seconds
        outcomes, seconds = asyncio.run(
            _burst(server.url, payloads, args.requests, args.concurrency, args.request_timeout, deadline))
        cpu = [round(proc_cpu_seconds(server.pid) - cpu_before[0], 1), round(own_cpu_seconds() - cpu_before[1], 1)]
        rss_after, hwm_after = server.rss_mb(), server.hwm_mb()
        alive = server.process.poll() is None
        ready_after = httpx.get(f"{server.url}/ready", timeout=5).status_code if alive else None
    finally:
        exit_code = server.stop()
    ok = [o["seconds"] for o in outcomes if o["status"] == 200]
    refused = [o for o in outcomes if o["status"] == 429]
    other = [o for o in outcomes if o["status"] not in (200, 429)]
    kinds = Counter(o.get("error", "").split(":")[0] for o in refused)
    result = {
        "server_flags": flags,
        "payload": "64x64 PNG crops of scikit-image photos (16 distinct)",
        "requests": len(outcomes), "concurrency": args.concurrency, "seconds": round(seconds, 2),
        "ok_200": len(ok), "refused_429": len(refused),
        "refused_429_kinds": dict(kinds),
        "refused_429_without_retry_after": sum(1 for o in refused if o.get("retry_after") is None),
        "other_errors": len(other),
        "other_error_kinds": dict(Counter(str(o["status"] or o["error"].split(":")[0]) for o in other)),
        "other_error_examples": [o.get("error", "")[:200] for o in other[:5]],
        "latency_429_ms_p50_p99": percentiles_ms([o["seconds"] for o in refused]),
        "latency_200_ms_p50_p99": percentiles_ms(ok),
        "server_time_429_ms_p50_p99": percentiles_ms([o["server_seconds"] for o in refused if "server_seconds" in o]),
        "server_time_200_ms_p50_p99": percentiles_ms(
            [o["server_seconds"] for o in outcomes if o["status"] == 200 and "server_seconds" in o]),
        "ok_per_second": round(len(ok) / seconds, 1) if seconds else None,
        "server_rss_mb_before_after": [round(rss_before, 1), round(rss_after, 1)],
        "server_hwm_mb_before_after": [round(hwm_before, 1), round(hwm_after, 1)],
        "server_ready_after": ready_after, "server_exit_code": exit_code,
        "cpu_seconds_server_client": cpu,
    }
    p429, p200 = result["latency_429_ms_p50_p99"], result["latency_200_ms_p50_p99"]
    print(f"\n== burst: {args.requests} x /encode 64x64 PNG, concurrency {args.concurrency}, server {' '.join(flags)}")
    print(f"{'requests':>8} {'200':>6} {'429':>6} {'other':>6} {'429 p50':>9} {'429 p99':>9} {'200 p50':>9} "
          f"{'200 p99':>9} {'200/s':>7} {'seconds':>8}")
    print(f"{len(outcomes):>8} {len(ok):>6} {len(refused):>6} {len(other):>6} {fmt(p429[0])} {fmt(p429[1])} "
          f"{fmt(p200[0])} {fmt(p200[1])} {fmt(result['ok_per_second'], 7)} {seconds:>8.1f}")
    s429, s200 = result["server_time_429_ms_p50_p99"], result["server_time_200_ms_p50_p99"]
    print(f"{'server x-total-time-ms':>29} {fmt(s429[0])} {fmt(s429[1])} {fmt(s200[0])} {fmt(s200[1])}")
    print(f"429 kinds: {dict(kinds)}; without Retry-After: {result['refused_429_without_retry_after']}; "
          f"other errors: {result['other_error_kinds'] or 'none'}")
    print(f"server RSS {rss_before:.0f} -> {rss_after:.0f} MB, peak {hwm_after:.0f} MB; /ready after: {ready_after}; "
          f"exit {exit_code}; CPU seconds: server {cpu[0]}, this client {cpu[1]} (in {seconds:.1f} s on "
          f"{os.cpu_count()} CPUs)")
    return result


# ----------------------------------------------------------------------------------------------- soak


@dataclass
class SoakStats:
    started: float
    window: float
    outcomes: list[tuple[float, str, int | None, float]] = field(default_factory=list)  # (t, kind, status, s)
    errors: list[str] = field(default_factory=list)


async def _soak(server: Server, args: argparse.Namespace, crops: dict[int, list[bytes]], seconds: float,
                stats: SoakStats | None, grids: deque[list[list[int]]], rss_samples: list[tuple[float, float]] | None,
                request_cap: int) -> None:
    """Mixed load for ``seconds``; with ``stats`` None it is the unmeasured warm-up."""
    concurrency = args.soak_concurrency
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    deadline = time.monotonic() + seconds
    issued = 0

    async with httpx.AsyncClient(base_url=server.url, timeout=args.request_timeout, limits=limits) as client:
        async def one(rng: random.Random) -> None:
            roll = rng.random()
            if roll < args.soak_decode_share and grids:
                kind = "decode"
                grid = grids[rng.randrange(len(grids))]
                request = client.post("/decode", json={"indices": grid})
            else:
                side = 64 if rng.random() < 0.5 else 128
                kind = f"encode{side}"
                payload = crops[side][rng.randrange(len(crops[side]))]
                request = client.post("/encode", content=payload, headers={"content-type": "image/png"})
            start = time.perf_counter()
            status: int | None = None
            problem = ""
            try:
                response = await request
                status = response.status_code
                if status == 200 and kind.startswith("encode"):
                    image = response.json()["images"][0]
                    side = int(kind[6:])
                    if image["grid"] != [side // 4, side // 4]:
                        problem = f"{kind}: unexpected grid {image['grid']}"
                    grids.append(image["indices"])
                elif status == 200 and not response.content.startswith(b"\x89PNG"):
                    problem = f"{kind}: 200 without a PNG body"
                elif status not in (200, 429):
                    problem = f"{kind}: {status} {error_message(response)[1][:200]}"
            except httpx.HTTPError as exc:
                problem = f"{kind}: {type(exc).__name__}: {exc}"
            if stats is not None:
                stats.outcomes.append((time.monotonic() - stats.started, kind, status, time.perf_counter() - start))
                if problem:
                    stats.errors.append(problem)

        async def worker(index: int) -> None:
            nonlocal issued
            rng = random.Random(args.seed * 1000 + index)
            while time.monotonic() < deadline and issued < request_cap:
                issued += 1
                await one(rng)

        async def sampler() -> None:
            assert stats is not None and rss_samples is not None
            next_at = stats.started + args.rss_interval
            while True:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                rss_samples.append((round(time.monotonic() - stats.started, 1), server.rss_mb()))
                next_at += args.rss_interval

        sampling = asyncio.create_task(sampler()) if stats is not None else None
        try:
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        finally:
            if sampling is not None:
                sampling.cancel()


def scenario_soak(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    crops = {64: photo_crops(64, 32, args.seed), 128: photo_crops(128, 32, args.seed + 1)}
    server = servers.start("soak")
    grids: deque[list[list[int]]] = deque(maxlen=256)
    try:
        asyncio.run(_soak(server, args, crops, args.soak_warmup_seconds, None, grids, None, 10**9))
        rss_start, hwm_start = server.rss_mb(), server.hwm_mb()
        cpu_before = (proc_cpu_seconds(server.pid), own_cpu_seconds())
        stats = SoakStats(started=time.monotonic(), window=args.rss_interval)
        samples: list[tuple[float, float]] = [(0.0, rss_start)]
        asyncio.run(_soak(server, args, crops, args.soak_seconds, stats, grids, samples, args.soak_max_requests))
        elapsed = time.monotonic() - stats.started
        rss_end, hwm_end = server.rss_mb(), server.hwm_mb()
        cpu = [round(proc_cpu_seconds(server.pid) - cpu_before[0], 1), round(own_cpu_seconds() - cpu_before[1], 1)]
        samples.append((round(elapsed, 1), rss_end))
        time.sleep(args.soak_idle_seconds)
        rss_idle = server.rss_mb()
    finally:
        exit_code = server.stop()

    outcomes = stats.outcomes
    statuses = Counter(str(status) for _, _, status, _ in outcomes)
    ok = [s for _, _, status, s in outcomes if status == 200]
    windows = []
    count = max(1, round(elapsed / args.rss_interval))  # the last window takes the tail of in-flight answers
    for w in range(count):
        lo = w * args.rss_interval
        hi = elapsed + 1.0 if w == count - 1 else (w + 1) * args.rss_interval
        part = [o for o in outcomes if lo <= o[0] < hi]
        span = min(hi, elapsed) - lo
        rss = [mb for t, mb in samples if lo < t <= hi + 1.0]
        windows.append({
            "window_s": [round(lo), round(min(hi, elapsed))], "requests": len(part),
            "errors": sum(1 for o in part if o[2] not in (200, 429)),
            "refused_429": sum(1 for o in part if o[2] == 429),
            "per_second": round(len(part) / span, 1) if span > 0 else None,
            "latency_ms_p50_p99": percentiles_ms([o[3] for o in part if o[2] == 200]),
            "rss_mb_at_end": round(rss[-1], 1) if rss else None,
        })
    result = {
        "concurrency": args.soak_concurrency, "seconds": round(elapsed, 1),
        "warmup_seconds": args.soak_warmup_seconds,
        "mix": f"/decode {args.soak_decode_share:.0%} of requests (one grid from an earlier encode, PNG out), "
               "/encode the rest, half 64x64 and half 128x128 PNG crops of scikit-image photos",
        "requests": len(outcomes), "ok_200": len(ok), "refused_429": statuses.get("429", 0),
        "errors": len(stats.errors),
        "errors_non_2xx_or_transport": sum(1 for o in outcomes if o[2] not in (200, 429)),
        "error_examples": stats.errors[:10],
        "statuses": dict(statuses),
        "by_kind": {k: v for k, v in Counter(kind for _, kind, _, _ in outcomes).items()},
        "per_second": round(len(outcomes) / elapsed, 1), "ok_per_second": round(len(ok) / elapsed, 1),
        "latency_ms_p50_p99": percentiles_ms(ok),
        "rss_mb_start": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
        "rss_mb_after_idle": round(rss_idle, 1), "idle_seconds": args.soak_idle_seconds,
        "hwm_mb_start_end": [round(hwm_start, 1), round(hwm_end, 1)],
        "rss_samples": [{"t_s": t, "rss_mb": round(mb, 1)} for t, mb in samples],
        "windows": windows, "server_exit_code": exit_code, "cpu_seconds_server_client": cpu,
    }
    print(f"\n== soak: {args.soak_concurrency} clients for {args.soak_seconds:g} s "
          f"(after {args.soak_warmup_seconds:g} s warm-up), default server settings; {result['mix']}")
    print(f"{'window s':>11} {'requests':>8} {'errors':>6} {'429':>5} {'req/s':>7} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'RSS MB':>8}")
    print(f"{'start':>11} {'':>8} {'':>6} {'':>5} {'':>7} {'':>9} {'':>9} {rss_start:>8.1f}")
    for w in windows:
        lat = w["latency_ms_p50_p99"]
        span = f"{w['window_s'][0]}-{w['window_s'][1]}"
        print(f"{span:>11} {w['requests']:>8} {w['errors']:>6} {w['refused_429']:>5} {fmt(w['per_second'], 7)} "
              f"{fmt(lat[0])} {fmt(lat[1])} {fmt(w['rss_mb_at_end'], 8)}")
    lat = result["latency_ms_p50_p99"]
    print(f"{'total':>11} {len(outcomes):>8} {result['errors']:>6} {result['refused_429']:>5} "
          f"{fmt(result['per_second'], 7)} {fmt(lat[0])} {fmt(lat[1])} {rss_end:>8.1f}")
    print(f"RSS start {rss_start:.1f} MB, end {rss_end:.1f} MB ({rss_end - rss_start:+.1f}), after "
          f"{args.soak_idle_seconds:g} s idle {rss_idle:.1f} MB; peak {hwm_start:.0f} -> {hwm_end:.0f} MB; "
          f"statuses {dict(statuses)}; exit {exit_code}; CPU seconds: server {cpu[0]}, this client {cpu[1]}")
    for line in stats.errors[:10]:
        print(f"  error: {line}")
    return result


# ----------------------------------------------------------------------------------------------- peak RSS


def _tiny_png() -> bytes:
    return png_bytes(np.full((4, 4, 3), (10, 20, 30), dtype=np.uint8))  # 77 bytes with Pillow's PNG writer


def _flat_webp(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 80, 200)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def _huge_json_body(megabytes: float) -> bytes:
    """A syntactically valid /decode JSON body of about ``megabytes`` MB (one long row of zeros)."""
    count = int(megabytes * MB) // 2
    return b'{"indices": [[' + b"0," * count + b"0]]}"


@dataclass
class PeakCase:
    key: str
    what: str
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    copies: int = 1
    env_extra: dict[str, str] = field(default_factory=dict)


def peak_cases(args: argparse.Namespace) -> list[PeakCase]:
    tiny, webp = _tiny_png(), _flat_webp(args.webp_side)
    png, webp_type = {"content-type": "image/png"}, {"content-type": "image/webp"}
    js = {"content-type": "application/json"}
    big_json = _huge_json_body(args.big_body_mb)
    return [
        PeakCase("a", f"{len(tiny)}-byte 4x4 PNG, /encode?size=40000", "POST", "/encode?size=40000", tiny, png),
        PeakCase("b", f"{len(tiny)}-byte 4x4 PNG, /encode?size=4x16384&fit=crop", "POST",
                 "/encode?size=4x16384&fit=crop", tiny, png),
        PeakCase("c", f"{args.webp_side}x{args.webp_side} flat lossless WebP ({len(webp)} B), /encode, no size",
                 "POST", "/encode", webp, webp_type),
        PeakCase("d", "the same WebP, /encode?size=256&fit=crop", "POST", "/encode?size=256&fit=crop", webp, webp_type),
        PeakCase("e", "eight of (d) at once", "POST", "/encode?size=256&fit=crop", webp, webp_type, copies=8),
        PeakCase("f", "/decode of 16 grids of 256x256 in one JSON request", "POST", "/decode", b"", js),
        PeakCase("g", f"VQTOK_API_KEY set, /decode of a {len(big_json) / MB:.0f} MB JSON body, no Authorization",
                 "POST", "/decode", big_json, js, env_extra={"VQTOK_API_KEY": "reliability-bench-key"}),
        PeakCase("h", "reference: a 512x512 PNG photo (astronaut), /encode", "POST", "/encode", astronaut_png(), png),
    ]


async def _send_copies(url: str, case: PeakCase, timeout: float) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=case.copies, max_keepalive_connections=case.copies)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one() -> dict[str, Any]:
            start = time.perf_counter()
            try:
                response = await client.request(case.method, case.path, content=case.body, headers=case.headers)
            except httpx.HTTPError as exc:
                return {"status": None, "seconds": time.perf_counter() - start,
                        "error": f"transport error {type(exc).__name__}: {exc}"}
            out: dict[str, Any] = {"status": response.status_code, "seconds": time.perf_counter() - start,
                                   "bytes": len(response.content)}
            if response.status_code != 200:
                out["error_type"], out["error"] = error_message(response)
            elif response.headers.get("content-type", "").startswith("application/json"):
                body = response.json()
                if "images" in body and body["images"] and "grid" in body["images"][0]:
                    out["grid"] = body["images"][0]["grid"]
            return out

        return list(await asyncio.gather(*(one() for _ in range(case.copies))))


def scenario_peak_rss(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    cases = peak_cases(args)
    if args.peak_cases:
        cases = [c for c in cases if c.key in args.peak_cases]
    rows = []
    for case in cases:
        server = servers.start(f"peak-{case.key}", env_extra=case.env_extra)
        try:
            if case.key == "f":
                info = httpx.get(f"{server.url}/info", timeout=30).json()
                k = int(info["model"]["num_embeddings"])
                rng = np.random.default_rng(args.seed)
                grids = [rng.integers(0, k, size=(256, 256)).tolist() for _ in range(16)]
                case.body = json.dumps({"indices": grids}).encode()
                case.what += f" ({len(case.body) / MB:.1f} MB, indices in [0, {k}))"
            time.sleep(args.settle_seconds)  # let the warm-up's freed memory settle before the baseline
            reset = server.reset_hwm() if args.reset_hwm else False
            before = proc_status_kb(server.pid)
            outcomes = asyncio.run(_send_copies(server.url, case, args.request_timeout))
            after = proc_status_kb(server.pid)
            alive = server.process.poll() is None
        finally:
            exit_code = server.stop()
        statuses = Counter(str(o["status"]) for o in outcomes)
        messages = [o.get("error", "") for o in outcomes if o.get("error")]
        row = {
            "case": case.key, "what": case.what, "requests": case.copies, "body_bytes": len(case.body),
            "statuses": dict(statuses),
            "hwm_reset_to_rss": reset,
            "rss_mb_before": round(before["VmRSS"] / 1024, 1), "hwm_mb_before": round(before["VmHWM"] / 1024, 1),
            "hwm_mb_after": round(after["VmHWM"] / 1024, 1), "rss_mb_after": round(after["VmRSS"] / 1024, 1),
            "hwm_growth_mb": round((after["VmHWM"] - before["VmHWM"]) / 1024, 1),
            "peak_over_rss_mb": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1),
            "seconds_max": round(max(o["seconds"] for o in outcomes), 2),
            "error_types": dict(Counter(o.get("error_type", "") for o in outcomes if o.get("error"))),
            "message": messages[0][:100] if messages else "",
            "grids": sorted({tuple(o["grid"]) for o in outcomes if "grid" in o}),
            "server_alive_after": alive, "server_exit_code": exit_code,
        }
        rows.append(row)
        print(f"  peak-rss ({case.key}) {statuses} +{row['hwm_growth_mb']} MB peak in {row['seconds_max']} s",
              flush=True)

    print("\n== peak-rss: each case against a fresh server (default settings), "
          f"VmHWM {'reset to VmRSS' if args.reset_hwm else 'not reset'} before the request")
    print(f"{'case':<4} {'status':<14} {'RSS before':>10} {'HWM growth':>10} {'seconds':>8}  message")
    for row in rows:
        status = ",".join(f"{k}x{v}" if v > 1 else k for k, v in row["statuses"].items())
        print(f"{row['case']:<4} {status:<14} {row['rss_mb_before']:>10.1f} {row['hwm_growth_mb']:>10.1f} "
              f"{row['seconds_max']:>8.2f}  {row['message'] or ('grid ' + str(row['grids']) if row['grids'] else '')}")
    for row in rows:
        print(f"  ({row['case']}) {row['what']}")
    return {"cases": rows, "reset_hwm": args.reset_hwm, "settle_seconds": args.settle_seconds}


# ----------------------------------------------------------------------------------------------- drain


async def _drain_run(server: Server, payload: bytes, count: int, sigterm_after: float, timeout: float
                     ) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
        done_at: list[float] = []

        async def one() -> dict[str, Any]:
            start = time.monotonic()
            try:
                response = await client.post("/encode", content=payload, headers={"content-type": "image/png"})
            except httpx.HTTPError as exc:
                done_at.append(time.monotonic())
                return {"status": None, "error": f"{type(exc).__name__}: {exc}", "start": start,
                        "end": done_at[-1]}
            done_at.append(time.monotonic())
            out: dict[str, Any] = {"status": response.status_code, "start": start, "end": done_at[-1],
                                   "json": response.headers.get("content-type", "").startswith("application/json")}
            if response.status_code != 200:
                out["error_type"], out["error"] = error_message(response)
            return out

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        await asyncio.sleep(sigterm_after)
        answered_before = len(done_at)
        server.process.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        exit_code = await loop.run_in_executor(None, server.process.wait)
        exited_at = time.monotonic()
        outcomes = await asyncio.gather(*tasks)
    return {"outcomes": outcomes, "answered_before_sigterm": answered_before, "sigterm_at": sigterm_at,
            "exited_at": exited_at, "exit_code": exit_code}


def scenario_drain(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    payload = astronaut_png()
    runs = []
    for setting in args.drain_timeouts:
        flags = ["--max-batch-size", "2", "--max-wait-ms", "0"]
        if setting != "default":
            flags += ["--drain-timeout-s", setting]
        server = servers.start(f"drain-{setting}", flags)
        try:
            run = asyncio.run(_drain_run(server, payload, args.drain_requests, args.sigterm_after,
                                         args.request_timeout))
        finally:
            server.stop()
        outcomes = run["outcomes"]
        after = [o for o in outcomes if o["end"] >= run["sigterm_at"]]
        ok_200 = sum(1 for o in outcomes if o["status"] == 200)
        json_503 = [o for o in outcomes if o["status"] == 503 and o.get("json") and o.get("error_type")]
        other = [o for o in outcomes if o["status"] != 200 and o not in json_503]
        row = {
            "drain_timeout": setting, "server_flags": flags, "requests": len(outcomes),
            "in_flight_at_sigterm": len(outcomes) - run["answered_before_sigterm"],
            "ok_200": ok_200, "ok_200_after_sigterm": sum(1 for o in after if o["status"] == 200),
            "json_503": len(json_503), "json_503_types": dict(Counter(o["error_type"] for o in json_503)),
            "json_503_message": json_503[0]["error"][:100] if json_503 else "",
            "other": len(other),
            "other_kinds": dict(Counter(str(o["status"] or o["error"].split(":")[0]) for o in other)),
            "other_examples": [str(o.get("error", o["status"]))[:200] for o in other[:5]],
            "exit_code": run["exit_code"],
            "sigterm_to_exit_s": round(run["exited_at"] - run["sigterm_at"], 2),
            "last_answer_after_sigterm_s": round(max(o["end"] for o in outcomes) - run["sigterm_at"], 2),
        }
        runs.append(row)
    print(f"\n== drain: {args.drain_requests} concurrent /encode of a 512x512 PNG, --max-batch-size 2 --max-wait-ms 0, "
          f"SIGTERM after {args.sigterm_after:g} s")
    print(f"{'drain timeout':<14} {'in flight':>9} {'200':>5} {'503 JSON':>8} {'other':>6} {'exit':>5} "
          f"{'SIGTERM->exit s':>15}")
    from vqtok.service.settings import Settings

    default_drain = Settings.model_fields["drain_timeout_s"].default
    for row in runs:
        label = f"default ({default_drain:g} s)" if row["drain_timeout"] == "default" else f"{row['drain_timeout']} s"
        print(f"{label:<14} {row['in_flight_at_sigterm']:>9} {row['ok_200']:>5} {row['json_503']:>8} "
              f"{row['other']:>6} {fmt(row['exit_code'], 5)} {row['sigterm_to_exit_s']:>15.2f}")
    for row in runs:
        if row["json_503"]:
            print(f"  {row['drain_timeout']}: 503 {row['json_503_types']}: {row['json_503_message']}")
        if row["other"]:
            print(f"  {row['drain_timeout']}: OTHER OUTCOMES {row['other_kinds']}: {row['other_examples']}")
    return {"runs": runs, "payload": "512x512 PNG (scikit-image astronaut)", "sigterm_after_s": args.sigterm_after}


# ----------------------------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info: dict[str, Any] = {"cpu": model, "cpus": os.cpu_count(), "arch": platform.machine(),
                            "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    return info


def code_provenance() -> dict[str, Any]:
    """Where the served code comes from: the vqtok package the servers import, and this checkout's state."""
    import vqtok

    def git(*command: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *command], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"vqtok_imported_from": str(Path(vqtok.__file__).resolve().parent),
            "checkout_head": git("rev-parse", "HEAD"),
            "checkout_changes": git("status", "--short", "--", "service", "model", "src").splitlines()}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


SCENARIOS = {"burst": scenario_burst, "soak": scenario_soak, "peak-rss": scenario_peak_rss, "drain": scenario_drain}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the figures to this JSON file")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the bundled one)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds for a server to be ready")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="client timeout per request (s)")
    parser.add_argument("--log-dir", type=Path, help="keep the servers' logs here (default: a temporary folder)")
    burst = parser.add_argument_group("burst")
    burst.add_argument("--requests", type=int, default=2000, help="requests of the burst")
    burst.add_argument("--concurrency", type=int, default=128, help="concurrent clients of the burst")
    burst.add_argument("--burst-queue-depth", type=int, default=32, help="server --max-queue-depth")
    burst.add_argument("--burst-batch-size", type=int, default=8, help="server --max-batch-size")
    burst.add_argument("--burst-max-concurrent", type=int, default=64, help="server --max-concurrent-requests")
    burst.add_argument("--burst-max-seconds", type=float, default=300.0, help="wall-clock cap of the burst")
    soak = parser.add_argument_group("soak")
    soak.add_argument("--soak-seconds", type=float, default=600.0)
    soak.add_argument("--soak-concurrency", type=int, default=32)
    soak.add_argument("--soak-warmup-seconds", type=float, default=20.0, help="unmeasured load before the start RSS")
    soak.add_argument("--soak-decode-share", type=float, default=0.3, help="share of /decode requests")
    soak.add_argument("--soak-max-requests", type=int, default=1_000_000, help="cap on measured requests")
    soak.add_argument("--soak-idle-seconds", type=float, default=5.0, help="idle wait before a last RSS reading")
    soak.add_argument("--rss-interval", type=float, default=60.0, help="seconds between RSS readings")
    peak = parser.add_argument_group("peak-rss")
    peak.add_argument("--peak-cases", default="", help="subset of the cases a-h, e.g. 'acf' (default: all)")
    peak.add_argument("--webp-side", type=int, default=6000)
    peak.add_argument("--big-body-mb", type=float, default=31.0)
    peak.add_argument("--settle-seconds", type=float, default=1.0, help="idle wait after /ready before the baseline")
    peak.add_argument("--no-reset-hwm", dest="reset_hwm", action="store_false",
                      help="do not reset VmHWM to VmRSS (/proc/PID/clear_refs) before each case")
    drain = parser.add_argument_group("drain")
    drain.add_argument("--drain-requests", type=int, default=24)
    drain.add_argument("--sigterm-after", type=float, default=0.5)
    drain.add_argument("--drain-timeouts", type=lambda s: s.split(","), default=["default", "0.2"],
                       help="comma-separated drain timeouts, 'default' for the server's default")
    args = parser.parse_args(argv)

    if args.checkpoint is None:
        from vqtok.model.checkpoint import DEFAULT_CHECKPOINT

        args.checkpoint = DEFAULT_CHECKPOINT
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    report: dict[str, Any] = {
        "command": " ".join(["python", "bench/reliability.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint": str(args.checkpoint), "device": args.device, "machine": machine(),
        "code_at_start": code_provenance(), "scenarios": {},
    }
    print(f"checkpoint {args.checkpoint}, device {args.device}, {report['machine']}\n{report['code_at_start']}")
    with tempfile.TemporaryDirectory(prefix="vqtok-reliability-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        servers = Servers(args, log_dir)
        try:
            for name in names:
                started, load_before = time.monotonic(), loadavg()
                report["scenarios"][name] = SCENARIOS[name](args, servers)
                report["scenarios"][name]["wall_seconds"] = round(time.monotonic() - started, 1)
                # the machine is shared: the load average says whether something else ran alongside
                report["scenarios"][name]["loadavg_before_after"] = [load_before, loadavg()]
                print(f"({name}: {time.monotonic() - started:.0f} s; load average before {load_before}, "
                      f"after {loadavg()})", flush=True)
        finally:
            for server in servers.started:
                server.stop()
            problems = servers.problems()
            report["server_log_problems"] = problems
            report["code_at_end"] = code_provenance()
            if problems:
                print("\nserver logs with errors or tracebacks:")
                for label, lines in problems.items():
                    print(f"  {label}: {len(lines)} lines, first: {lines[0][:200]}")
            else:
                print(f"\nserver logs: no ERROR or Traceback lines in {len(servers.started)} server logs")
            if args.json:
                args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
                print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
