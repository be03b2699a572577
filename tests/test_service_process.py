"""``vqtok serve`` as a real process: it binds before loading (liveness is real), refuses a taken port
at once, and on SIGTERM or Ctrl+C drains queued work, answers what is left with JSON, and exits 0."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.processes import free_port, wait_until_ready

pytestmark = pytest.mark.slow


def start_server(checkpoint: Path, port: int, *flags: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VQTOK_LOG_LEVEL": "info"}
    for name in ("VQTOK_CHECKPOINT", "VQTOK_PORT", "PORT", "VQTOK_API_KEY"):
        env.pop(name, None)
    command = [sys.executable, "-m", "vqtok.service", "--checkpoint", str(checkpoint), "--device", "cpu",
               "--port", str(port), *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output.decode(errors="replace")


def test_health_answers_while_the_model_warms_up(tiny_checkpoint: Path) -> None:
    port = free_port()
    process = start_server(tiny_checkpoint, port, "--warmup-size", "2048", "--max-batch-size", "8")
    seen_live_not_ready = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
            except httpx.TransportError:
                assert process.poll() is None, finish(process)[1]
                time.sleep(0.05)
                continue
            assert health.status_code == 200
            if ready.status_code == 503:
                assert ready.json()["error_type"] == "not_ready"
                seen_live_not_ready = True
            elif ready.status_code == 200:
                break
            time.sleep(0.05)
        assert seen_live_not_ready, "never saw /health 200 while /ready was 503"
        assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process)
    assert code == 0, output
    # 8 images of 2048x2048 would be 32 M pixels: the default budget of 1 M pixels a pass admits one (it runs alone)
    assert "warm-up done: batch 1 at 2048x2048" in output, output


def test_a_taken_port_is_refused_before_loading(tiny_checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        # a warm-up that would take long: the refusal must not wait for it
        process = start_server(tiny_checkpoint, port, "--warmup-size", "4096", "--max-batch-size", "16")
        code, output = finish(process)
    assert code != 0
    assert "address already in use" in output.lower(), output
    assert "warm-up done" not in output
    assert time.monotonic() - started < 60


def _png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _post_all(port: int, bodies: list[bytes]) -> list[httpx.Response | Exception]:
    def post(body: bytes) -> httpx.Response | Exception:
        try:
            return httpx.post(f"http://127.0.0.1:{port}/encode", content=body,
                              headers={"content-type": "image/png"}, timeout=120)
        except httpx.HTTPError as exc:
            return exc

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_requests_and_exits_0(tiny_checkpoint: Path, signal_number: int) -> None:
    port = free_port()
    process = start_server(tiny_checkpoint, port, "--max-batch-size", "2", "--max-wait-ms", "0",
                           "--warmup-size", "32")
    try:
        wait_until_ready(process, port)
        bodies = [_png(512, seed) for seed in range(12)]
        with ThreadPoolExecutor(1) as runner:
            results = runner.submit(_post_all, port, bodies)
            time.sleep(0.5)  # the requests are queued or running
            process.send_signal(signal_number)
            answers = results.result(timeout=120)
    finally:
        code, output = finish(process)
    assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers), answers
    assert code == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output


def test_work_left_after_the_drain_timeout_gets_json_503(tiny_checkpoint: Path) -> None:
    port = free_port()
    process = start_server(tiny_checkpoint, port, "--max-batch-size", "1", "--max-wait-ms", "0",
                           "--warmup-size", "32", "--drain-timeout-s", "0.2")
    try:
        wait_until_ready(process, port)
        bodies = [_png(1024, seed) for seed in range(16)]
        with ThreadPoolExecutor(1) as runner:
            results = runner.submit(_post_all, port, bodies)
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            answers = results.result(timeout=120)
    finally:
        code, output = finish(process)
    statuses = [a.status_code if isinstance(a, httpx.Response) else type(a).__name__ for a in answers]
    refused = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 503]
    assert refused, statuses
    assert set(statuses) <= {200, 503}, statuses
    assert all(a.json()["error_type"] == "not_ready" for a in refused)
    assert code == 0, output
    assert "Traceback" not in output, output
