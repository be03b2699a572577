"""Every tensor operation of the service runs on its one inference thread (see service.batching): the engine is
loaded there, batches are stacked and run there, and ``vqtok serve``'s checkpoint check runs on a thread that
ends before the server starts, never on the main thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import service_settings, wait_until_loaded
from vqtok.service import batching
from vqtok.service.app import create_app
from vqtok.service.batching import MicroBatcher
from vqtok.service.engine import Engine


def _thread() -> str:
    """The current thread's name and identity (executors of different apps reuse names)."""
    return f"{threading.current_thread().name}#{threading.get_ident()}"


asyncio_test = pytest.mark.asyncio


@asyncio_test
async def test_the_engine_loads_and_runs_every_batch_on_the_inference_thread(tiny_checkpoint: Path,
                                                                            image_bytes, astronaut) -> None:
    threads: dict[str, set[str]] = {"load": set(), "encode": set(), "decode": set()}

    class RecordingEngine(Engine):
        def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
            threads["encode"].add(_thread())
            return super().encode_batch(pixels)

        def decode_batch(self, indices: torch.Tensor) -> torch.Tensor:
            threads["decode"].add(_thread())
            return super().decode_batch(indices)

    def loader(settings) -> Engine:  # type: ignore[no-untyped-def]
        threads["load"].add(_thread())
        loaded = Engine.load(settings.checkpoint, "cpu")
        return RecordingEngine(loaded.checkpoint, loaded.device)

    app = create_app(service_settings(tiny_checkpoint), loader=loader)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://vqtok.test") as client:
        await wait_until_loaded(app)
        png = image_bytes(astronaut, size=(32, 32))
        encoded = await client.post("/encode", content=png, headers={"content-type": "image/png"})
        decoded = await client.post("/decode", json={"indices": encoded.json()["images"][0]["indices"]})
    assert encoded.status_code == 200 and decoded.status_code == 200
    (load_thread,) = threads["load"]
    assert load_thread.startswith("vqtok-inference")
    assert threads["encode"] == threads["decode"] == {load_thread}  # the warm-up and both requests


@asyncio_test
async def test_the_batcher_stacks_each_batch_on_its_inference_thread(monkeypatch) -> None:
    stacked_on: list[str] = []
    real_stack = torch.stack

    def recording_stack(tensors, *args, **kwargs):  # type: ignore[no-untyped-def]
        stacked_on.append(_thread())
        return real_stack(tensors, *args, **kwargs)

    monkeypatch.setattr(batching.torch, "stack", recording_stack)
    ran_on: list[str] = []

    def double(batch: torch.Tensor) -> torch.Tensor:
        ran_on.append(_thread())
        return batch * 2

    executor = batching.inference_executor()
    batcher = MicroBatcher({"double": double}, max_batch_size=4, max_wait_ms=0, max_queue_depth=64,
                           executor=executor)
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit("double", [torch.full((2,), float(i))]) for i in range(6)))
    finally:
        await batcher.stop()
    assert [float(r.outputs[0][0]) for r in results] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert stacked_on and set(stacked_on) == set(ran_on) and ran_on[0].startswith("vqtok-inference")
    assert executor._shutdown  # the batcher owns the thread it was given


def test_serve_checks_the_checkpoint_on_a_thread_that_ends_before_serving(tiny_checkpoint: Path,
                                                                         monkeypatch) -> None:
    import vqtok.service.__main__ as entry
    import vqtok.service.server as server

    checked_on: list[str] = []
    real_verify = entry.verify_checkpoint

    def recording_verify(path) -> None:  # type: ignore[no-untyped-def]
        checked_on.append(_thread())
        real_verify(path)

    seen_at_serve: list[list[str]] = []
    monkeypatch.setattr(entry, "verify_checkpoint", recording_verify)
    monkeypatch.setattr(server, "serve", lambda settings: seen_at_serve.append(
        [t.name for t in threading.enumerate()]) or 0)
    assert entry.main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu"]) == 0
    assert checked_on and checked_on[0].startswith("vqtok-preflight")
    assert not any(name.startswith("vqtok-preflight") for name in seen_at_serve[0])  # gone before serving


@asyncio_test
async def test_the_server_process_freezes_what_startup_left_and_tests_do_not(tiny_checkpoint: Path) -> None:
    import gc

    assert gc.get_freeze_count() == 0
    for freeze in (False, True):
        app = create_app(service_settings(tiny_checkpoint), freeze_gc=freeze)
        async with app.router.lifespan_context(app):
            await wait_until_loaded(app)
            frozen = gc.get_freeze_count()
        gc.unfreeze()  # this test's process is not a server's: give the objects back to the collector
        assert (frozen > 10_000) if freeze else frozen == 0  # the modules, the model, the schemas


def test_no_route_depends_on_a_plain_function(tiny_checkpoint: Path) -> None:
    """FastAPI runs a plain ``def`` dependency on a threadpool thread: every dependency is ``async def`` so a
    request makes no hop it does not need (see service.dependencies)."""
    import inspect

    from fastapi.routing import APIRoute

    def calls(dependant) -> list:  # type: ignore[no-untyped-def]
        return [c for d in dependant.dependencies for c in (d.call, *calls(d))]

    def api_routes(routes) -> list[APIRoute]:  # type: ignore[no-untyped-def]
        # included routers may be kept as a wrapper of the router they include (FastAPI >= 0.16x)
        return [found for r in routes for found in ([r] if isinstance(r, APIRoute) else
                                                    api_routes(getattr(getattr(r, "original_router", None),
                                                                       "routes", [])))]

    routes = api_routes(create_app(service_settings(tiny_checkpoint)).routes)
    found = {f"{r.path}: {c.__name__}": inspect.iscoroutinefunction(c) for r in routes for c in calls(r.dependant)}
    assert {"/encode: require_ready", "/encode: accepts_npy", "/decode: require_json"} <= set(found)
    assert [name for name, is_async in found.items() if not is_async] == []
