"""The bundled default checkpoint, served: encode -> decode of a real photo it never trained on."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vqtok.model.checkpoint import DEFAULT_CHECKPOINT

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(),
                       reason="the bundled default checkpoint is not there yet (model/weights/default)"),
]

# PSNR bar for the bundled K=512, f=4 checkpoint on skimage's coffee photo at 256x256. A flat
# mean-colour guess scores ~12 dB and a blurred 4x down/up-sample ~24 dB; VQ-VAEs of this size
# (the seed's table) reach the mid 20s on natural photos. 20 dB catches a broken decoder, a wrong
# normalisation or a scrambled codebook while leaving room for an interim checkpoint.
MIN_PSNR_DB = 20.0


async def test_bundled_default_round_trip_psnr(make_service, coffee: np.ndarray, image_bytes) -> None:
    original = np.asarray(Image.fromarray(coffee).resize((256, 256), Image.Resampling.BICUBIC))
    async with make_service(checkpoint=DEFAULT_CHECKPOINT, max_batch_size=2) as (_, client):
        encoded = await client.post("/encode", content=image_bytes(original), headers={"content-type": "image/png"})
        assert encoded.status_code == 200, encoded.text
        body = encoded.json()
        image = body["images"][0]
        assert image["grid"] == [256 // body["model"]["downsample"]] * 2
        decoded = await client.post("/decode", json={"indices": image["indices"]})
    assert decoded.status_code == 200
    reconstruction = np.asarray(Image.open(io.BytesIO(decoded.content)).convert("RGB"))
    mse = float(np.mean((reconstruction.astype(np.float64) - original.astype(np.float64)) ** 2))
    psnr = 10.0 * np.log10(255.0**2 / mse)
    print(f"bundled checkpoint {body['model']['name']}: {psnr:.2f} dB on coffee 256x256")
    assert psnr >= MIN_PSNR_DB
