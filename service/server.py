"""Run the app under uvicorn: in the foreground (``vqtok serve``) or on a background thread (tests, benchmarks).

Always one process and one event loop: the model lives once, in that process.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from vqtok.service.app import create_app
from vqtok.service.settings import Settings


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level, workers=1,
        timeout_graceful_shutdown=10, access_log=settings.log_level == "debug",
    )


def serve(settings: Settings) -> None:
    """Serve in the foreground until SIGINT/SIGTERM."""
    uvicorn.Server(uvicorn_config(settings)).run()


@contextlib.contextmanager
def serve_in_thread(settings: Settings, startup_timeout: float = 120.0) -> Iterator[str]:
    """Serve on a free loopback port on a background thread; yields the base URL once the app is ready."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vqtok-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the vqtok server did not start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://{settings.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
