"""``GET /layouts`` (the loaded token layouts) and ``POST /layouts/{name}/allowed`` (constrained generation)."""

from __future__ import annotations

from fastapi import APIRouter, Path
from starlette.concurrency import run_in_threadpool

from vqtok.model.layouts import LayoutError
from vqtok.service.dependencies import ReadyModel, State
from vqtok.service.errors import InvalidRequest, NotFound
from vqtok.service.layouts import LayoutRegistry, one_line
from vqtok.service.responses import ERROR_RESPONSES
from vqtok.service.schemas import AllowedRequest, AllowedResponse, ErrorResponse, LayoutsResponse

router = APIRouter(tags=["layouts"])

_WITH_404 = {**ERROR_RESPONSES, 404: {"model": ErrorResponse, "description": "no layout of that name is loaded"}}


def _registry(state: State) -> LayoutRegistry:
    assert state.layouts is not None  # built with the engine (ReadyModel comes first)
    return state.layouts


@router.get("/layouts", response_model=LayoutsResponse, responses=ERROR_RESPONSES, summary="The token layouts")
async def list_layouts(ready: ReadyModel, state: State) -> LayoutsResponse:
    """Every loaded layout (the presets for this model's K, then the layout files) as its JSON spec."""
    registry = _registry(state)
    return LayoutsResponse(
        default=registry.default,
        layouts={name: layout.model_dump(mode="json", exclude_none=True) for name, layout in registry.layouts.items()},
    )


def _allowed(registry: LayoutRegistry, name: str, body: AllowedRequest, max_tokens: int) -> list[int]:
    try:
        layout = registry.layouts[name]
    except KeyError:
        raise NotFound(f"layout {name!r} is not loaded; loaded: {', '.join(sorted(registry.layouts))}") from None
    if body.grid is not None and body.grid[0] * body.grid[1] > max_tokens:
        h, w = body.grid
        raise InvalidRequest(f"grid {h}x{w} = {h * w} tokens is over the limit of {max_tokens} tokens per grid")
    try:
        return [int(i) for i in layout.allowed_next(body.prefix, body.grid)]
    except LayoutError as exc:
        raise InvalidRequest(f"prefix: layout {name!r}: {one_line(str(exc))}") from None


@router.post("/layouts/{name}/allowed", response_model=AllowedResponse, responses=_WITH_404,
             summary="The ids a layout allows next")
async def allowed(body: AllowedRequest, ready: ReadyModel, state: State,
                  name: str = Path(description="a loaded layout's name (GET /layouts)")) -> AllowedResponse:
    """For constrained generation: the ids that may follow ``prefix`` (the layout's sequence so far) for the
    target ``grid``; empty once the image is complete. A prefix that already left the layout is a 422 naming
    the position."""
    ids = await run_in_threadpool(_allowed, _registry(state), name, body, ready.settings.max_tokens_per_grid)
    return AllowedResponse(allowed=ids)
