"""``create_app(settings)``: the FastAPI app, its lifespan (load, warm up, batch) and its middleware.

One process owns the model: the lifespan loads the checkpoint once, warms it up at the largest
batch size, starts the micro-batcher and only then reports ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from PIL import Image

from vqtok.service import __version__
from vqtok.service.batching import MicroBatcher
from vqtok.service.engine import Engine
from vqtok.service.errors import install_error_handlers
from vqtok.service.metrics import ServiceMetrics
from vqtok.service.middleware import BodyLimitMiddleware, MetricsMiddleware
from vqtok.service.routes import ServiceState, protected, public
from vqtok.service.settings import Settings

logger = logging.getLogger("vqtok.service.app")

EngineLoader = Callable[[Settings], Engine]

DESCRIPTION = """\
VQ-VAE image tokenizer. `POST /encode` turns images into `h x w` grids of codebook indices,
`POST /decode` turns grids (or an LLM's flat token sequence) back into images.

- `indices` are always raw codes in `[0, K)`; `tokens` = `[bos] + (row-major indices + offset) + [eos]`.
- Errors: `{"error": "...", "error_type": "..."}` with 400/401/404/405/406/413/415/422/429/503.
- Timing headers: `x-queue-time-ms`, `x-inference-time-ms`, `x-total-time-ms`, `x-batch-size`.
"""


def default_loader(settings: Settings) -> Engine:
    return Engine.load(settings.checkpoint, settings.device)


def create_app(settings: Settings | None = None, loader: EngineLoader = default_loader) -> FastAPI:
    """The service app for ``settings`` (default: from the environment). ``loader`` builds the engine."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    state = ServiceState(settings=settings, metrics=metrics)
    # Pillow's own bomb guard follows the service limit (our check from the header comes first anyway).
    Image.MAX_IMAGE_PIXELS = max(settings.max_pixels, Image.MAX_IMAGE_PIXELS or 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = await asyncio.to_thread(loader, settings)
        batcher = MicroBatcher(
            {"encode": engine.encode_batch, "decode": engine.decode_batch},
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_depth=settings.max_queue_depth,
            observe_batch=metrics.observe_batch,
        )
        state.engine, state.batcher = engine, batcher
        if settings.warmup:
            await batcher.run_in_inference_thread(lambda: engine.warm_up(settings.max_batch_size, settings.warmup_size))
            logger.info("warm-up done: batch %d at %dx%d", settings.max_batch_size, settings.warmup_size,
                        settings.warmup_size)
        batcher.start()
        state.ready = True
        metrics.ready.set(1)
        logger.info("ready: %s on %s", engine.checkpoint.name, engine.device)
        try:
            yield
        finally:
            state.ready = False
            metrics.ready.set(0)
            await batcher.stop()

    app = FastAPI(
        title="vqtok",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(protected)
    # add_middleware wraps outside-in in reverse order: metrics sees every answer, the 413s included.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
