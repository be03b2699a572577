"""``GET /info``: the model's identity and config, the device, every limit, the version."""

from __future__ import annotations

from fastapi import APIRouter

from vqtok.service import __version__
from vqtok.service.dependencies import ReadyModel, State
from vqtok.service.responses import ERROR_RESPONSES
from vqtok.service.schemas import InfoResponse

router = APIRouter(tags=["info"])


@router.get("/info", response_model=InfoResponse, responses=ERROR_RESPONSES, summary="Model, device and limits")
async def info(ready: ReadyModel, state: State) -> InfoResponse:
    engine, settings = ready.engine, ready.settings
    assert state.layouts is not None  # built with the engine
    return InfoResponse(
        model=engine.identity(), config=engine.config.to_dict(), checkpoint=engine.checkpoint_info(),
        device=str(engine.device), dtype=engine.dtype, limits=settings.limits(),
        layout=state.layouts.default, layouts=sorted(state.layouts.layouts), auth=settings.api_key is not None,
        version=__version__, ready=True,
    )
