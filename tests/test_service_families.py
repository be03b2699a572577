"""Every network family and quantizer is served alike: checkpoints of the VQGAN family with l2-normalised,
factorised and FSQ codes load in the real app and go image -> indices -> image -> indices over HTTP."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import service_settings, wait_until_loaded
from vqtok.model.checkpoint import Provenance, load_checkpoint, save_checkpoint
from vqtok.model.config import NetworkConfig
from vqtok.model.vqvae import VQVAE

pytestmark = pytest.mark.asyncio

VQGAN = {"arch": "vqgan", "downsample": 8, "num_hiddens": 8, "channel_multipliers": (1, 1, 2, 2),
         "num_res_blocks": 1, "norm_groups": 4, "z_channels": 8, "pixel_std": (0.5, 0.5, 0.5)}
FAMILIES = {
    "vqgan-ema-l2": NetworkConfig(**VQGAN, quantizer="ema", embedding_dim=4, num_embeddings=64, l2_normalize=True),
    "vqgan-plain-factorised": NetworkConfig(**VQGAN, quantizer="plain", embedding_dim=16, code_dim=4,
                                            num_embeddings=64),
    "vqgan-fsq": NetworkConfig(**VQGAN, quantizer="fsq", embedding_dim=3, fsq_levels=(4, 4, 4), num_embeddings=64),
    "vqgan-fsq-projected": NetworkConfig(**VQGAN, quantizer="fsq", embedding_dim=8, fsq_levels=(4, 4, 4),
                                         num_embeddings=64),
    "seed-f8-l2": NetworkConfig(downsample=8, num_hiddens=16, num_residual_hiddens=4, embedding_dim=8,
                                num_embeddings=64, l2_normalize=True),
}


def _checkpoint(directory: Path, network: NetworkConfig) -> Path:
    torch.manual_seed(0)
    model = VQVAE(network).eval()
    return save_checkpoint(directory, model, Provenance(name=f"test-{directory.name}"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_each_family_is_served_and_round_trips(family: str, tmp_path: Path, astronaut: np.ndarray,
                                                     image_bytes) -> None:
    import httpx

    from vqtok.service.app import create_app

    network = FAMILIES[family]
    directory = _checkpoint(tmp_path / family, network)
    model = load_checkpoint(directory).model
    png = image_bytes(astronaut, size=(96, 64))
    app = create_app(service_settings(directory))
    async with app.router.lifespan_context(app):
        await wait_until_loaded(app)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            encoded = await client.post("/encode", content=png, headers={"content-type": "image/png"})
            assert encoded.status_code == 200, encoded.text
            indices = np.array(encoded.json()["images"][0]["indices"])
            assert indices.shape == (8, 12) and indices.min() >= 0 and indices.max() < 64
            decoded = await client.post("/decode", json={"indices": indices.tolist()})
            assert decoded.status_code == 200, decoded.text
            image = Image.open(io.BytesIO(decoded.content))
            assert image.size == (96, 64)
            again = await client.post("/encode", content=decoded.content, headers={"content-type": "image/png"})
            assert np.array(again.json()["images"][0]["indices"]).shape == (8, 12)
            codebook = (await client.get("/codebook", params={"include": "vectors"})).json()
    # the service's tokens are the model's own
    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).copy())
    direct = model.encode(network.normalize(pixels.permute(2, 0, 1)[None].float() / 255.0))
    agreement = float((direct[0].numpy() == indices).mean())
    assert agreement >= 0.99, agreement
    # /codebook: K vectors of the search space's width, unit vectors when l2-normalised
    vectors = np.array(codebook["vectors"])
    assert vectors.shape == (64, network.code_vector_dim) == (64, codebook["code_dim"])
    assert codebook["quantizer"] == network.quantizer and codebook["l2_normalized"] == network.l2_normalize
    if network.l2_normalize:
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # indices -> decoder input -> the same indices: a code's own vector is nearest to itself (codebook
    # quantizers with no learned projection between the two spaces; FSQ's index <-> code round trip, over
    # every index, is in tests/test_quantizers.py)
    grid = torch.arange(64).view(1, 8, 8)
    if network.quantizer != "fsq" and network.code_vector_dim == network.embedding_dim:
        looked_up = model.quantizer.lookup(grid).permute(0, 3, 1, 2)  # (1, D, 8, 8)
        assert torch.equal(model.quantizer.quantize_indices(looked_up), grid)
