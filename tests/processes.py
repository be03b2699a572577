"""Real processes for tests: a free loopback port, and waiting for a served process to be ready."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_ready(process: subprocess.Popen[bytes], port: int, timeout: float = 120.0) -> None:
    """Poll ``/ready`` on ``port`` until it answers 200; fail with the process's output if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else "the process exited"
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)
