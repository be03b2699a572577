"""Pure ASGI middlewares: the request-body limit, and per-request metrics with the total-time header."""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vqtok.service.errors import PayloadTooLarge, error_body
from vqtok.service.metrics import ServiceMetrics


async def send_error(send: Send, exc: PayloadTooLarge) -> None:
    """Answer with the service's error shape straight from a middleware (no app involved)."""
    body = json.dumps(error_body(exc.message, exc.error_type)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reads the whole request body, counting bytes as they arrive, and refuses it past ``max_body_bytes``.

    Content-Length is only trusted to refuse early: a body that claims to be small but keeps coming
    is cut off at the limit all the same. The app then receives the buffered body as one message.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self, size: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body {size} is over the limit of {self.max_body_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                await send_error(send, self._too_large(f"of {int(value)} bytes (Content-Length)"))
                return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await send_error(send, self._too_large(f"of more than {self.max_body_bytes} bytes (read so far)"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)



def route_label(scope: Scope) -> str:
    """The matched route's path template (``/encode``), or ``unmatched``: bounded metric cardinality."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    endpoint = scope.get("endpoint")
    return scope.get("path", "unmatched") if endpoint is not None else "unmatched"


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
        status = 500

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
        finally:
            self.metrics.observe_request(route_label(scope), scope["method"], status, time.perf_counter() - start)
