"""Shared pytest fixtures. Each group is owned by one part of the project; add new groups below."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from vqtok.service.settings import Settings

# ------------------------------------------------------------------------------------------------
# Service fixtures (tests/test_service_*.py): a tiny real checkpoint and real photos.
# ------------------------------------------------------------------------------------------------


def _train_tiny_checkpoint(directory: Path, steps: int = 300) -> Path:
    """A small VQ-VAE trained for ``steps`` quick steps on random crops of a real photo, saved as a checkpoint.

    A trained codebook matters: an untrained one maps most patches to a handful of codes, so round
    trips and PSNR checks would test nothing.
    """
    import torch
    from skimage import data

    from vqtok.model.checkpoint import CodebookUsage, Provenance, save_checkpoint
    from vqtok.model.config import NetworkConfig
    from vqtok.model.vqvae import VQVAE

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    config = NetworkConfig(num_hiddens=32, num_residual_hiddens=8, embedding_dim=16, num_embeddings=64)
    model = VQVAE(config)
    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float().div(255.0)  # (3, 512, 512)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    crop, batch = 32, 16
    counts = torch.zeros(config.num_embeddings)
    model.train()
    for _ in range(steps):
        ys = torch.randint(0, photo.shape[1] - crop, (batch,), generator=generator)
        xs = torch.randint(0, photo.shape[2] - crop, (batch,), generator=generator)
        corners = zip(ys.tolist(), xs.tolist(), strict=True)
        pixels = torch.stack([photo[:, y : y + crop, x : x + crop] for y, x in corners])
        x = config.normalize(pixels)
        out = model(x)
        loss = torch.nn.functional.mse_loss(out.reconstruction, x) + out.vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        counts += out.counts.detach()
    model.eval()
    return save_checkpoint(
        directory, model,
        Provenance(name="test-tiny", steps=steps, data="skimage.data.astronaut random 32x32 crops"),
        codebook_usage=CodebookUsage.from_counts([int(c) for c in counts.tolist()]),
    )


# Bump when _train_tiny_checkpoint changes: the trained checkpoint is cached under .pytest_cache by this key.
_TINY_RECIPE = "test-tiny-v3-300-steps"  # v2: records carry model_id; v3: format_version 2 records


@pytest.fixture(scope="session")
def tiny_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny trained checkpoint (K=64, D=16, f=4).

    Training takes ~15 s on an idle 2-core machine (far more on a busy one), so the result is kept in
    pytest's cache, keyed by the recipe and the torch version, and reloaded when it verifies.
    """
    import torch

    from vqtok.model.checkpoint import CheckpointError, load_checkpoint

    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    key = f"vqtok-{_TINY_RECIPE}-torch{torch.__version__}"
    cache_dir = cache.mkdir(key) if cache is not None else tmp_path_factory.mktemp(key)
    directory = cache_dir / "test-tiny"
    try:
        load_checkpoint(directory)
    except CheckpointError:
        _train_tiny_checkpoint(directory)
    return directory


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """(512, 512, 3) uint8 RGB photo."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    """(400, 600, 3) uint8 RGB photo."""
    from skimage import data

    return np.ascontiguousarray(data.coffee())


def _image_bytes(pixels: np.ndarray, fmt: str = "PNG", size: tuple[int, int] | None = None) -> bytes:
    image = Image.fromarray(pixels)
    if size is not None:
        image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def image_bytes() -> Callable[..., bytes]:
    """``image_bytes(pixels, fmt="PNG", size=(W, H))`` -> image file bytes."""
    return _image_bytes


def service_settings(checkpoint: Path, **overrides: object) -> Settings:
    """``Settings`` for a test app: CPU, small warm-up and batches; ``overrides`` win over the environment."""
    from vqtok.service.settings import Settings

    values: dict[str, object] = {
        "checkpoint": checkpoint, "device": "cpu", "warmup_size": 32, "max_batch_size": 8, "max_wait_ms": 2.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]  # values are checked by Settings itself


async def wait_until_loaded(app: object, timeout: float = 120.0) -> None:
    """Wait for an app's background load and warm-up (entered lifespan); fail with its error."""
    import asyncio

    state = app.state.service  # type: ignore[attr-defined]
    assert state.loading is not None, "the app's lifespan was not entered"
    await asyncio.wait_for(asyncio.shield(state.loading), timeout)
    assert state.ready, state.not_ready_reason()


@pytest.fixture
def make_service(tiny_checkpoint: Path) -> Callable[..., object]:
    """``async with make_service(**settings) as (app, client):`` a started app (lifespan entered: loaded,
    warmed up, ready) and an ``httpx.AsyncClient`` talking real HTTP semantics to it through ASGITransport."""
    import contextlib

    import httpx

    from vqtok.service.app import create_app

    @contextlib.asynccontextmanager
    async def factory(**overrides: object):  # type: ignore[no-untyped-def]
        checkpoint = overrides.pop("checkpoint", tiny_checkpoint)
        app = create_app(service_settings(checkpoint, **overrides))
        async with app.router.lifespan_context(app):
            await wait_until_loaded(app)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://vqtok.test", timeout=60.0) as client:
                yield app, client

    return factory
