"""``GET /health`` (liveness: never needs the model), ``GET /ready`` (503 until the model is warm) and
``GET /metrics`` (Prometheus). No API key on any of them (``middleware.PUBLIC_PATHS``)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from vqtok.service.dependencies import State
from vqtok.service.errors import NotReady
from vqtok.service.schemas import ErrorResponse, HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, summary="Liveness (never needs the model)")
async def health() -> HealthResponse:
    return HealthResponse()


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}}, summary="Readiness")
async def ready_endpoint(state: State) -> ReadyResponse:
    if not state.ready:
        raise NotReady(state.not_ready_reason())
    return ReadyResponse(ready=True, status="ready")


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text exposition format: requests by route and status, latency, "
                     "queue wait, batch sizes, images and tokens, readiness",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def metrics(state: State) -> Response:
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    state.metrics.ready.set(1 if state.ready else 0)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
