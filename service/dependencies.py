"""What endpoints depend on: the shared state, a ready model, and the request's headers.

The API key, draining and admission limits are decided earlier, from the headers alone, by
``middleware.AdmissionMiddleware`` (before one byte of the body is read); these dependencies run once
the body is in.

Every dependency is ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency on a
threadpool thread, and for a small request those hops (three per ``/encode``) cost more than the request's
own work on the event loop (``bench/profile_service.py``: 8.7% of the server's busy time in waking them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from vqtok.service.batching import MicroBatcher
from vqtok.service.engine import Engine
from vqtok.service.errors import NotReady, UnsupportedMediaType
from vqtok.service.imaging import DecodeBudget
from vqtok.service.metrics import ServiceMetrics
from vqtok.service.responses import NPY
from vqtok.service.settings import Settings
from vqtok.service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


@dataclass
class Ready:
    """The ready engine and batcher, for endpoints that need the model."""

    settings: Settings
    metrics: ServiceMetrics
    engine: Engine
    batcher: MicroBatcher
    decode_budget: DecodeBudget


async def require_ready(state: State) -> Ready:
    """``NotReady`` (503) until the model is loaded and warm, while draining, or once the batcher stopped."""
    if not state.ready or state.engine is None or state.batcher is None:
        raise NotReady(state.not_ready_reason())
    return Ready(state.settings, state.metrics, state.engine, state.batcher, state.decode_budget)


ReadyModel = Annotated[Ready, Depends(require_ready)]


def content_type(request: Request) -> str:
    """The request's media type, lower case, without parameters ("" when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def require_json(request: Request) -> None:
    """``UnsupportedMediaType`` (415) unless the body is ``application/json`` (``/decode``)."""
    media = content_type(request)
    if media != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type {media or 'none'!r} is not supported by /decode: send application/json"
        )


def accepts(request: Request, media: str) -> bool:
    """Whether the ``Accept`` header names ``media``."""
    return media in request.headers.get("accept", "").lower()


async def accepts_npy(request: Request) -> bool:
    return accepts(request, NPY)


async def accepts_json(request: Request) -> bool:
    return accepts(request, "application/json")


AcceptsNpy = Annotated[bool, Depends(accepts_npy)]
AcceptsJson = Annotated[bool, Depends(accepts_json)]
