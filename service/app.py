"""``create_app(settings)``: assembles the FastAPI app: its routers, middleware, error handlers and lifespan
(bind, then load and warm up). The endpoints live in ``routers``, what they share in ``state`` and
``dependencies``.

One process owns the model. The lifespan returns at once so the server binds its port and answers
``/health`` immediately; the checkpoint loads and warms up in the background, and ``/ready`` is 503
until then. A load failure is logged in one line and handed to ``on_fatal`` (the server exits).
``drain`` finishes queued work on shutdown within ``drain_timeout_s`` and answers the rest with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from PIL import Image

from vqtok.model.layouts import LayoutError
from vqtok.service import __version__
from vqtok.service.batching import MicroBatcher, inference_executor
from vqtok.service.engine import Engine
from vqtok.service.handlers import install_error_handlers
from vqtok.service.layouts import build_registry, one_line
from vqtok.service.metrics import ServiceMetrics
from vqtok.service.middleware import AdmissionMiddleware, MetricsMiddleware, RequestBodyMiddleware
from vqtok.service.routers import OPENAPI_TAGS, codebook, decode, encode, health, info, layouts
from vqtok.service.settings import Settings
from vqtok.service.state import ServiceState
from vqtok.service.web import install as install_web

logger = logging.getLogger("vqtok.service.app")

EngineLoader = Callable[[Settings], Engine]

DESCRIPTION = """\
VQ-VAE image tokenizer. `POST /encode` turns images into `h x w` grids of codebook indices,
`POST /decode` turns grids (or an LLM's flat token sequence) back into images.

- `indices` are always raw codes in `[0, K)`; `tokens` = `[bos] + (row-major indices + offset) + [eos]`
  (the `flat` layout), or the sequence of another token layout (`layout=NAME`; `GET /layouts` lists them).
- Errors: `{"error": "...", "error_type": "..."}` with 400/401/404/405/406/408/413/415/422/429/503/504.
- Timing headers: `x-queue-time-ms`, `x-inference-time-ms`, `x-total-time-ms`, `x-batch-size`.
- The token explorer at `/` is a page built on this API alone; these docs are served without internet.
"""


def default_loader(settings: Settings) -> Engine:
    return Engine.load(settings.checkpoint, settings.device)


def pixel_costs(downsample: int) -> dict[str, Callable[[torch.Tensor], int]]:
    """What an item costs a forward pass, in pixels: an encode reads its (3, H, W) image, a decode writes
    an (h*f, w*f) one for its (h, w) grid."""
    return {
        "encode": lambda pixels: pixels.shape[-2] * pixels.shape[-1],
        "decode": lambda grid: grid.shape[-2] * grid.shape[-1] * downsample * downsample,
    }


def warmup_batch_size(settings: Settings) -> int:
    """The largest batch requests can form at ``warmup_size``: ``max_batch_size`` images unless
    ``max_batch_pixels`` admits fewer (at least one: a larger item runs alone)."""
    return max(1, min(settings.max_batch_size, settings.max_batch_pixels // settings.warmup_size**2))


def create_app(
    settings: Settings | None = None,
    loader: EngineLoader = default_loader,
    on_fatal: Callable[[str], None] | None = None,
    freeze_gc: bool = False,
) -> FastAPI:
    """The service app for ``settings`` (default: from the environment). ``loader`` builds the engine;
    ``on_fatal(message)`` is called if loading fails (the server passes its own exit).

    ``freeze_gc`` (the server process, never a test's): once the model is loaded and warmed up, collect, then
    ``gc.freeze()`` every object alive. Those (the modules, the model, the schemas: hundreds of thousands of
    objects) are never garbage, and a full collection no longer scans them on the event loop: at concurrency
    32 with one 32x32 image per request, p99 205 -> 103 ms (bench/service_ab.py, BENCHMARKS.md)."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    state = ServiceState(settings=settings, metrics=metrics)
    # Pillow's own bomb guard follows the service limit (our check from the header comes first anyway).
    Image.MAX_IMAGE_PIXELS = max(settings.max_pixels, Image.MAX_IMAGE_PIXELS or 0)

    async def load_engine(executor: ThreadPoolExecutor) -> tuple[Engine, MicroBatcher]:
        """The engine, loaded on ``executor``'s inference thread, and the batcher that runs every batch there
        (see service.batching); the layouts registry is built on the way."""
        engine = await asyncio.get_running_loop().run_in_executor(executor, loader, settings)
        try:
            serving = engine.checkpoint.record.serving
            state.layouts = build_registry(settings, engine.config.num_embeddings,
                                           serving.layout if serving is not None else None)
        except LayoutError as exc:
            raise RuntimeError(one_line(str(exc))) from None
        return engine, MicroBatcher(
            {"encode": engine.encode_batch, "decode": engine.decode_batch},
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_depth=settings.max_queue_depth,
            observe_batch=metrics.observe_batch,
            deadline_seconds=settings.request_timeout_s,
            item_cost=pixel_costs(engine.config.downsample),
            max_batch_cost=settings.max_batch_pixels,
            executor=executor,
        )

    async def load_and_warm_up() -> None:
        try:
            executor = inference_executor()
            try:
                engine, batcher = await load_engine(executor)
            except BaseException:  # the batcher never took the thread over: release it here
                executor.shutdown(wait=False)
                raise
            state.engine, state.batcher = engine, batcher
            if settings.warmup:
                warmup_batch = warmup_batch_size(settings)
                await batcher.run_in_inference_thread(lambda: engine.warm_up(warmup_batch, settings.warmup_size))
                logger.info("warm-up done: batch %d at %dx%d", warmup_batch, settings.warmup_size,
                            settings.warmup_size)
            batcher.start()
            if freeze_gc:
                gc.collect()
                gc.freeze()
        except Exception as exc:  # any failure to load is reported, then ends the server
            state.failure = str(exc) or type(exc).__name__
            logger.error("vqtok: the model failed to load: %s", state.failure)
            if on_fatal is not None:
                on_fatal(state.failure)
            return
        state.loaded = True
        metrics.ready.set(1)
        logger.info("ready: %s on %s", engine.checkpoint.name, engine.device)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.get_running_loop().create_task(load_and_warm_up(), name="vqtok-load")
        state.loading = loading
        try:
            yield
        finally:
            state.draining = True
            metrics.ready.set(0)
            if not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            if state.batcher is not None:
                await state.batcher.stop()

    app = FastAPI(
        title="vqtok",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=OPENAPI_TAGS,
        docs_url=None,  # the offline docs (service.web) replace FastAPI's CDN pages
        redoc_url=None,
    )
    app.state.service = state
    install_error_handlers(app)
    for router in (health.router, encode.router, decode.router, codebook.router, info.router, layouts.router):
        app.include_router(router)
    install_web(app)  # the token explorer at /, its assets, and /docs + /redoc from local files
    # add_middleware wraps outside-in in reverse order: metrics sees every answer (401, 413, 429 included),
    # admission decides from headers before the body middleware reads a byte.
    app.add_middleware(RequestBodyMiddleware, settings=lambda: (settings.max_body_bytes, settings.body_timeout_s))
    app.add_middleware(AdmissionMiddleware, state=state)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


async def drain(state: ServiceState) -> bool:
    """Graceful shutdown: refuse new work, let queued and running work finish within ``drain_timeout_s``,
    then stop the batcher (what is left gets 503). True when everything finished in time."""
    state.draining = True
    state.metrics.ready.set(0)
    timeout = state.settings.drain_timeout_s
    finished = True
    try:
        async with asyncio.timeout(timeout):
            while state.in_flight or (state.batcher is not None and (state.batcher.depth or state.batcher.busy)):
                await asyncio.sleep(0.02)
    except TimeoutError:
        finished = False
        logger.warning("drain: %d requests still in progress after %g s; answering them with 503",
                       state.in_flight, timeout)
    if state.batcher is not None:
        await state.batcher.stop()
    # Let the handlers that just got their 503 write it before the server closes connections.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.0):
            while state.in_flight:
                await asyncio.sleep(0.01)
    return finished
