"""Pure ASGI middlewares, outermost first:

1. ``MetricsMiddleware``: counts and times every answer (labels from closed sets), adds ``x-total-time-ms``.
2. ``AdmissionMiddleware``: everything decided from the request line and headers alone, before a body
   byte is read: the API key (401), draining (503), the concurrent-request cap and a full queue (429).
3. ``RequestBodyMiddleware``: reads the body under a size limit (413) and a time limit (408), refuses
   JSON nested too deep (400), then runs the app and cancels it if the client hangs up, so queued
   work of an abandoned request leaves the batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vqtok.service.errors import (
    BadRequest,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    error_body,
)
from vqtok.service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from vqtok.service.state import ServiceState

# Paths anyone may open: liveness, readiness, metrics, the token explorer page, the API contract and its docs pages (a
# browser cannot send a bearer key when it opens a page, and the contract is not a secret).
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/"})
# ...and everything under these: the token explorer's assets and the docs' vendored scripts (service.web).
PUBLIC_PREFIXES = ("/web/",)
# Paths whose requests carry bodies and queue model work: admission control applies to them.
WORK_PATHS = frozenset({"/encode", "/decode"})
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_JSON_DEPTH = 32


async def send_error(send: Send, exc: ServiceError, close: bool = False) -> None:
    """Answer with the service's error shape straight from a middleware (no app involved)."""
    body = json.dumps(error_body(exc.message, exc.error_type)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in exc.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.error_type.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


def check_api_key(expected: str, authorization: str) -> None:
    """``Unauthorized`` unless ``authorization`` is ``Bearer <expected>`` (constant-time compare)."""
    scheme, _, given = authorization.partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if not authorization:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", headers=challenge)
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Unauthorized("wrong API key", headers=challenge)


class AdmissionMiddleware:
    """Refuses what can be refused from the headers alone, before any body is read.

    ``state`` is the app's ``ServiceState``: its settings (key, limits), its batcher (queue depth),
    whether it is draining, and the count of admitted requests in progress.
    """

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        settings = state.settings
        path = scope["path"]
        try:
            if settings.api_key is not None and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
                check_api_key(settings.api_key.get_secret_value(), _header(scope, b"authorization"))
            if path not in WORK_PATHS:
                await self.app(scope, receive, send)
                return
            if state.draining:
                raise NotReady("the service is shutting down; retry on another replica", headers={"Retry-After": "1"})
            if state.in_flight >= settings.max_concurrent_requests:
                raise QueueFull(
                    f"too many concurrent requests: {state.in_flight} in progress, the limit is "
                    f"{settings.max_concurrent_requests}; retry shortly", headers={"Retry-After": "1"},
                )
            batcher = state.batcher
            if batcher is not None and batcher.depth >= settings.max_queue_depth:
                raise QueueFull(
                    f"queue full: {batcher.depth} items waiting, the limit is {settings.max_queue_depth}; "
                    "retry shortly", headers={"Retry-After": "1"},
                )
        except ServiceError as exc:
            await send_error(send, exc)
            return
        state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_too_deep(body: bytes, limit: int) -> bool:
    """Whether ``body`` nests ``[``/``{`` deeper than ``limit``, strings ignored.

    Runs at C speed in bounded memory: strings and every non-bracket byte are dropped, then the
    nesting is a running sum over 1 MiB pieces of the brackets that remain.
    """
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = 0
    for start in range(0, len(brackets), 1 << 20):
        piece = np.frombuffer(brackets, dtype=np.uint8, count=min(1 << 20, len(brackets) - start), offset=start)
        steps = np.where((piece == ord("[")) | (piece == ord("{")), 1, -1).astype(np.int32)
        running = depth + np.cumsum(steps)  # nesting after each bracket
        if int(running.max()) > limit:
            return True
        depth = int(running[-1])
    return False


class RequestBodyMiddleware:
    """Reads the whole body within ``max_body_bytes`` and ``body_timeout_s``, then runs the app.

    Content-Length is only trusted to refuse early: a body that claims to be small but keeps coming
    is cut off at the limit all the same, and one that claims more than it sends times out (408).
    The app receives the buffered body as one message. While it runs, the client's connection is
    watched: if it hangs up, the app is cancelled (its queued items leave the batcher).
    """

    def __init__(self, app: ASGIApp, settings: Callable[[], tuple[int, float]]) -> None:
        self.app = app
        self.limits = settings  # () -> (max_body_bytes, body_timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, timeout = self.limits()
        try:
            body = await self._read_body(scope, receive, max_bytes, timeout)
        except ServiceError as exc:
            await send_error(send, exc, close=True)
            return
        if body is None:
            return  # the client hung up while sending
        await self._run_watched(scope, receive, send, body)

    async def _read_body(self, scope: Scope, receive: Receive, max_bytes: int, timeout: float) -> bytes | None:
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > max_bytes:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes (Content-Length) is over the limit of "
                                  f"{max_bytes} bytes")
        chunks: list[bytes] = []
        received = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    received += len(chunk)
                    if received > max_bytes:
                        raise PayloadTooLarge(
                            f"request body of more than {max_bytes} bytes (read so far) is over the limit of "
                            f"{max_bytes} bytes"
                        )
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise RequestTimeout(
                f"request body not received within {timeout:g} s ({received} bytes arrived"
                + (f" of the {declared} announced)" if declared.isdigit() else ")")
            ) from None
        body = b"".join(chunks)
        is_json = _header(scope, b"content-type").split(";")[0].strip().lower() == "application/json"
        if is_json and json_too_deep(body, MAX_JSON_DEPTH):
            raise BadRequest(f"request body is JSON nested more than {MAX_JSON_DEPTH} levels deep; "
                                 f"the limit is {MAX_JSON_DEPTH}")
        return body

    async def _run_watched(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        disconnected = asyncio.Event()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        app_task = asyncio.ensure_future(self.app(scope, replay, send))
        watch_task = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({app_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not app_task.done():
                app_task.cancel()  # the client left (or we are cancelled): drop its work
            watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch_task
        with contextlib.suppress(asyncio.CancelledError):
            await app_task
        if not app_task.cancelled() and app_task.exception() is not None:
            raise app_task.exception()  # type: ignore[misc]


def route_label(scope: Scope) -> str:
    """The matched route's path template (``/encode``), or ``unmatched``: bounded metric cardinality."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    # Refused by a middleware before routing: a known path is still a closed set of labels.
    return scope["path"] if scope["path"] in PUBLIC_PATHS | WORK_PATHS else "unmatched"


def method_label(method: str) -> str:
    """A standard HTTP method, or ``other``: a client cannot invent label values."""
    return method if method in KNOWN_METHODS else "other"


class MetricsMiddleware:
    """Counts requests by route/method/status, times them, and adds ``x-total-time-ms`` to every answer."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 499  # nginx's "client closed request": the client hung up before an answer

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                elapsed_ms = (time.perf_counter() - start) * 1000.0
                headers = [*message.get("headers", []), (b"x-total-time-ms", f"{elapsed_ms:.2f}".encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            self.metrics.observe_request(
                route_label(scope), method_label(scope["method"]), status, time.perf_counter() - start
            )
