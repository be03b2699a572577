"""``ServiceState``: what the app's parts share, one instance per app (``app.state.service``).

The lifespan fills in the engine and the batcher once the model is loaded and warm; the middleware
counts admitted requests in it; the endpoints reach it through ``dependencies.get_state``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from vqtok.service.batching import MicroBatcher
from vqtok.service.engine import Engine
from vqtok.service.imaging import DecodeBudget
from vqtok.service.layouts import LayoutRegistry
from vqtok.service.metrics import ServiceMetrics
from vqtok.service.settings import Settings


@dataclass
class ServiceState:
    """What the endpoints share: settings, metrics, and (once ready) the engine and the batcher."""

    settings: Settings
    metrics: ServiceMetrics
    engine: Engine | None = None
    batcher: MicroBatcher | None = None
    loaded: bool = False  # the model is loaded and warmed up
    draining: bool = False  # shutting down: no new work, queued work finishing
    failure: str | None = None  # why loading failed, if it did
    in_flight: int = 0  # admitted /encode and /decode requests in progress (AdmissionMiddleware)
    loading: asyncio.Task[None] | None = None  # the background load and warm-up
    layouts: LayoutRegistry | None = None  # the token layouts (presets for the model's K + layout_files)
    # Pixels of uploaded images being decoded at once, across all requests (max_decode_pixels).
    decode_budget: DecodeBudget = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.decode_budget = DecodeBudget(self.settings.max_decode_pixels, self.settings.decode_wait_s)

    @property
    def ready(self) -> bool:
        """Loaded, warm, not draining, and the batcher's dispatcher is running."""
        return self.loaded and not self.draining and self.batcher is not None and self.batcher.alive

    def not_ready_reason(self) -> str:
        if self.failure:
            return f"the model failed to load: {self.failure}"
        if self.draining:
            return "the service is shutting down"
        if self.batcher is not None and self.batcher.failure:
            return f"{self.batcher.failure}; the service is not ready"
        return "the model is not loaded and warmed up yet; poll /ready"
