"""Run the app under uvicorn: in the foreground (``vqtok serve``) or on a background thread (tests, benchmarks).

Always one process and one event loop: the model lives once, in that process. The port is bound
before the model loads (``/health`` answers at once). On SIGTERM or Ctrl+C the server stops
accepting, drains queued work (``drain_timeout_s``), answers what is left with a JSON 503, and the
process exits 0; a model that fails to load ends it with exit status 3 and one line on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
import time
from collections.abc import Generator, Iterator

import uvicorn

from vqtok.service.app import create_app, drain
from vqtok.service.settings import Settings
from vqtok.service.state import ServiceState

EXIT_LOAD_FAILED = 3


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its own shutdown, and no re-raised signal after it."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0

    def fail(self, message: str) -> None:
        """The model failed to load: stop serving, exit non-zero."""
        self.exit_code = EXIT_LOAD_FAILED
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting new connections first
            server.close()
        await drain(self.state)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises SIGINT/SIGTERM after a graceful shutdown, which turns Ctrl+C into a
        # KeyboardInterrupt traceback and SIGTERM into exit status 143. A drained stop is a clean exit.
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def build_server(settings: Settings, *, freeze_gc: bool = False) -> DrainingServer:
    """uvicorn serving the app; ``freeze_gc`` for a process of its own (see ``create_app``)."""
    app = create_app(settings, on_fatal=lambda message: server.fail(message),  # `server` is bound below
                     freeze_gc=freeze_gc)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, workers=1,
        # the app drains first (drain_timeout_s); uvicorn's own wait only covers writing the answers
        timeout_graceful_shutdown=5, access_log=settings.log_level == "debug",
    )
    server = DrainingServer(config, app.state.service)
    return server


_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas before the server starts its threads; True where it applied.

    glibc gives each thread an arena of its own and keeps what is freed there for reuse, so large
    image buffers decoded one after another on different threadpool threads pile up in the resident
    set. Measured with eight 6000x6000 WebP uploads decoded in turn (bench/reliability.py, peak-rss
    case e): +1.56 GB peak with the default arenas, +0.66 GB with two. Same as MALLOC_ARENA_MAX=2.
    """
    if "MALLOC_ARENA_MAX" in os.environ:  # the operator chose
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False


def serve(settings: Settings) -> int:
    """Serve in the foreground until SIGINT/SIGTERM; the process exit status."""
    limit_malloc_arenas()
    server = build_server(settings, freeze_gc=True)
    server.run()
    return server.exit_code


@contextlib.contextmanager
def serve_in_thread(settings: Settings, startup_timeout: float = 120.0) -> Iterator[str]:
    """Serve on a free loopback port on a background thread; yields the base URL once the app is ready."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    port = sock.getsockname()[1]
    server = build_server(settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vqtok-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not (server.started and server.state.ready):
        if not thread.is_alive() or server.state.failure or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=30)
            sock.close()
            raise RuntimeError(f"the vqtok server did not start: {server.state.failure or 'see the log above'}")
        time.sleep(0.02)
    try:
        yield f"http://{settings.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
