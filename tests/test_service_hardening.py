"""The service never hangs and never lies about its health: the batcher survives any batch, a dead
dispatcher turns readiness to 503, every request has a deadline, refusals that need no body come
before the body, abandoned requests leave the queue, and metric labels come from closed sets."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from tests.conftest import service_settings
from tests.errors import assert_error
from vqtok.service import batching
from vqtok.service.server import serve_in_thread
from vqtok.service.settings import Settings


@pytest.mark.asyncio
async def test_batcher_survives_a_failing_stack_and_answers_503(make_service, monkeypatch) -> None:
    """A failure outside the model call (torch.stack, seen under memory pressure) fails that batch only."""
    real_stack = torch.stack
    failures = iter([MemoryError("simulated: cannot allocate the batch")])

    def flaky_stack(tensors, *args, **kwargs):  # type: ignore[no-untyped-def]
        error = next(failures, None)
        if error is not None:
            raise error
        return real_stack(tensors, *args, **kwargs)

    async with make_service() as (app, client):
        monkeypatch.setattr(batching.torch, "stack", flaky_stack)
        failed = await client.post("/decode", json={"indices": [[1, 2], [3, 4]]})
        assert_error(failed, 503, "inference_failed", "decode failed on a batch of 1", "MemoryError", "retry")
        assert failed.headers["retry-after"] == "1"
        assert (await client.post("/decode", json={"indices": [[1, 2], [3, 4]]})).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        assert app.state.service.batcher.alive


@pytest.mark.asyncio
async def test_a_dead_dispatcher_turns_ready_to_503_and_answers_waiting_requests(make_service) -> None:
    async with make_service(max_wait_ms=0.0) as (app, client):
        batcher = app.state.service.batcher
        release = threading.Event()
        original = batcher.operations["decode"]
        batcher.operations["decode"] = lambda batch: (release.wait(10), original(batch))[1]
        first = asyncio.create_task(client.post("/decode", json={"indices": [[1]]}))
        while not batcher.busy:
            await asyncio.sleep(0.005)
        waiting = asyncio.create_task(client.post("/decode", json={"indices": [[2]]}))
        while batcher.depth < 1:
            await asyncio.sleep(0.005)

        async def broken_wait() -> None:
            raise RuntimeError("simulated dispatcher bug")

        batcher._wait_for_batch = broken_wait  # the loop itself fails once the running batch is done
        release.set()
        assert (await first).status_code == 200
        assert_error(await waiting, 503, "not_ready", "the batcher stopped", "simulated dispatcher bug")
        assert_error(await client.get("/ready"), 503, "not_ready", "the batcher stopped")
        assert_error(await client.post("/decode", json={"indices": [[3]]}), 503, "not_ready", "the batcher stopped")
        assert "vqtok_ready 0.0" in (await client.get("/metrics")).text
        assert (await client.get("/health")).status_code == 200


@pytest.mark.asyncio
async def test_every_request_has_a_deadline(make_service) -> None:
    async with make_service(request_timeout_s=0.3, max_wait_ms=0.0) as (app, client):
        batcher = app.state.service.batcher
        release = threading.Event()
        original = batcher.operations["decode"]
        batcher.operations["decode"] = lambda batch: (release.wait(10), original(batch))[1]
        started = time.monotonic()
        stuck = await client.post("/decode", json={"indices": [[1]]})
        assert time.monotonic() - started < 5
        assert_error(stuck, 504, "deadline_exceeded", "not answered within the request deadline of 0.3 s")
        release.set()
        batcher.operations["decode"] = original
        assert (await client.post("/decode", json={"indices": [[1]]})).status_code == 200


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/encode", "/decode"])
async def test_deeply_nested_json_is_400(make_service, path: str) -> None:
    body = '{"images": ' + "[" * 10_000 + "]" * 10_000 + "}"
    async with make_service() as (_, client):
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
        shallow = await client.post("/decode", content='{"indices": [[[[1]]]]}',
                                    headers={"content-type": "application/json"})
    assert_error(response, 400, "bad_request", "JSON nested more than 32 levels deep")
    assert shallow.status_code == 422  # four levels are fine to parse; the shape is then refused


@pytest.mark.asyncio
async def test_metric_labels_come_from_closed_sets(make_service) -> None:
    async with make_service() as (_, client):
        for i in range(20):
            await client.request(f"BREW{i}", "/encode")
            await client.get(f"/random-{i}")
        text = (await client.get("/metrics")).text
    series = [line for line in text.splitlines() if line.startswith("vqtok_requests_total{")]
    assert not any("BREW" in line or "random" in line for line in series), series
    assert any('method="other"' in line for line in series)
    assert len(series) <= 6, series


def test_an_empty_api_key_is_a_startup_error() -> None:
    with pytest.raises(ValueError, match="api_key is set but empty"):
        Settings(api_key="  ")


# ------------------------------------------------------------------------------------------------
# Over real sockets: what a slow, lying or impatient client does to a real uvicorn server.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def live_server(tiny_checkpoint) -> Iterator[tuple[str, object]]:  # type: ignore[no-untyped-def]
    """A real server on a loopback port; yields (base URL, its ServiceState)."""
    captured: dict[str, object] = {}
    import vqtok.service.server as server_module

    real_build = server_module.build_server

    def build(settings):  # type: ignore[no-untyped-def]
        server = real_build(settings)
        captured["state"] = server.state
        return server

    server_module.build_server = build
    try:
        settings = service_settings(tiny_checkpoint, port=0, api_key="k3y", body_timeout_s=1.0, max_wait_ms=0.0,
                                    max_concurrent_requests=64)
        with serve_in_thread(settings) as url:
            yield url, captured["state"]
    finally:
        server_module.build_server = real_build


def _raw_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
    return sock


def _read_response(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_auth_is_checked_before_the_body(live_server) -> None:  # type: ignore[no-untyped-def]
    """A 31 MB body announced without a key gets its 401 at once; the body is never waited for or read."""
    url, _ = live_server
    sock = _raw_request(url, "POST /decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             "Content-Length: 31000000\r\n")
    started = time.monotonic()
    reply = _read_response(sock)
    sock.close()
    assert time.monotonic() - started < 0.9  # well before the 1 s body timeout
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b'"error_type": "unauthorized"' in reply


def test_a_body_that_never_arrives_times_out_with_408(live_server) -> None:  # type: ignore[no-untyped-def]
    url, _ = live_server
    sock = _raw_request(url, "POST /decode HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\n"
                             "Content-Type: application/json\r\nContent-Length: 100\r\n", b'{"indices": ')
    started = time.monotonic()
    reply = _read_response(sock)  # the server closes the connection after its answer
    sock.close()
    assert time.monotonic() - started < 5
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request body not received within 1 s (12 bytes arrived of the 100 announced)" in reply
    assert b"connection: close" in reply.lower()


def test_abandoned_requests_leave_the_queue(live_server) -> None:  # type: ignore[no-untyped-def]
    """Clients that hang up while queued are not computed: their items leave the batcher."""
    url, state = live_server
    batcher = state.batcher  # type: ignore[attr-defined]
    release = threading.Event()
    computed: list[int] = []
    original = batcher.operations["decode"]

    def counting(batch):  # type: ignore[no-untyped-def]
        release.wait(10)
        computed.append(batch.shape[0])
        return original(batch)

    batcher.operations["decode"] = counting
    body = b'{"indices": [[1, 2], [3, 4]]}'
    head = ("POST /decode HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n")
    holder = _raw_request(url, head, body)  # its batch holds the inference thread
    deadline = time.monotonic() + 10
    while not batcher.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    leavers = [_raw_request(url, head, body) for _ in range(6)]
    while batcher.depth < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.depth == 6
    for sock in leavers:
        sock.close()
    while batcher.depth and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.depth == 0, "the hung-up requests still hold queue capacity"
    release.set()
    assert _read_response(holder).startswith(b"HTTP/1.1 200")
    holder.close()
    time.sleep(0.2)
    assert sum(computed) == 1, computed  # only the request that stayed was computed
    batcher.operations["decode"] = original
