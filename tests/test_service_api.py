"""The service's contract over HTTP: every input form of /encode, every output form of /decode,
/codebook, round trips, the LLM token conventions, the binary NumPy answers and the operational endpoints."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.asyncio

NPY = "application/x-npy"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of the same shape."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * np.log10(255.0**2 / max(mse, 1e-12))


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


async def test_encode_multipart_json_and_raw_body_agree(make_service, astronaut, image_bytes) -> None:
    png = image_bytes(astronaut, size=(128, 96))
    jpeg = image_bytes(astronaut, "JPEG", size=(64, 64))
    async with make_service() as (_, client):
        multi = await client.post("/encode", files=[("image", ("a.png", png, "image/png")),
                                                    ("image", ("b.jpg", jpeg, "image/jpeg"))])
        raw = await client.post("/encode", content=png, headers={"content-type": "image/png"})
        data_url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        as_json = await client.post("/encode", json={"images": [base64.b64encode(png).decode(), data_url]})
        webp = await client.post("/encode", content=image_bytes(astronaut, "WEBP", size=(64, 64)),
                                 headers={"content-type": "image/webp"})
    for response in (multi, raw, as_json, webp):
        assert response.status_code == 200, response.text
    body = multi.json()
    assert body["model"]["name"] == "test-tiny"
    assert len(body["model"]["weights_sha256"]) == 64
    assert body["model"]["num_embeddings"] == 64 and body["model"]["downsample"] == 4
    first, second = body["images"]
    assert first["grid"] == [24, 32] and np.array(first["indices"]).shape == (24, 32)
    assert first["original_size"] == {"width": 128, "height": 96} == first["encoded_size"] == first["content_size"]
    assert second["grid"] == [16, 16]
    assert first["tokens"] is None  # not asked for
    assert raw.json()["images"][0]["indices"] == first["indices"]
    assert as_json.json()["images"][0]["indices"] == first["indices"]
    assert as_json.json()["images"][1]["indices"] == second["indices"]
    assert webp.json()["images"][0]["grid"] == [16, 16]
    flat = np.array(first["indices"]).ravel()
    assert flat.min() >= 0 and flat.max() < 64 and len(np.unique(flat)) > 8  # a trained, used codebook
    for header in ("x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms"):
        assert float(multi.headers[header]) >= 0.0


async def test_encode_options_in_form_fields_and_json_body(make_service, astronaut, image_bytes) -> None:
    png = image_bytes(astronaut, size=(100, 60))
    async with make_service() as (_, client):
        form = await client.post("/encode", files=[("image", ("a.png", png, "image/png"))],
                                 data={"size": "64", "fit": "crop", "offset": "10"})
        body = await client.post("/encode", params={"size": "32"},  # the JSON body overrides the query
                                 json={"images": [base64.b64encode(png).decode()], "size": "64", "fit": "crop"})
    assert form.status_code == 200 and body.status_code == 200
    assert form.json()["images"][0]["grid"] == [16, 16] == body.json()["images"][0]["grid"]
    assert form.json()["images"][0]["tokens"][0] == form.json()["images"][0]["indices"][0][0] + 10


@pytest.mark.parametrize(
    ("fit", "size", "grid", "content"),
    [
        ("pad", None, [25, 38], {"width": 150, "height": 100}),  # padded up to 152x100, content reported
        ("pad", "64", [16, 16], {"width": 64, "height": 43}),  # letterboxed into 64x64
        ("crop", "64x32", [8, 16], {"width": 64, "height": 32}),
        ("resize", "32", [8, 8], {"width": 32, "height": 32}),
    ],
)
async def test_fit_modes(make_service, astronaut, image_bytes, fit, size, grid, content) -> None:
    png = image_bytes(astronaut, size=(150, 100))
    params = {"fit": fit, **({"size": size} if size else {})}
    async with make_service() as (_, client):
        response = await client.post("/encode", params=params, content=png, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    image = response.json()["images"][0]
    assert image["grid"] == grid
    assert image["content_size"] == content
    assert image["original_size"] == {"width": 150, "height": 100}
    assert image["encoded_size"] == {"width": grid[1] * 4, "height": grid[0] * 4}


async def test_fit_none_accepts_multiples(make_service, astronaut, image_bytes) -> None:
    async with make_service() as (_, client):
        response = await client.post("/encode", params={"fit": "none"}, content=image_bytes(astronaut, size=(64, 48)),
                                     headers={"content-type": "image/png"})
    assert response.status_code == 200
    assert response.json()["images"][0]["grid"] == [12, 16]


async def test_round_trip_keeps_grid_and_reconstructs(make_service, astronaut, image_bytes) -> None:
    """encode -> decode -> encode: same grid shape, the image close to the input, most codes stable."""
    original = np.asarray(Image.fromarray(astronaut).resize((128, 128), Image.Resampling.BICUBIC))
    async with make_service() as (_, client):
        first = (await client.post("/encode", content=image_bytes(original),
                                   headers={"content-type": "image/png"})).json()["images"][0]
        decoded = await client.post("/decode", json={"indices": first["indices"]})
        assert decoded.status_code == 200 and decoded.headers["content-type"] == "image/png"
        assert decoded.headers["x-grid"] == "32,32"
        again = (await client.post("/encode", content=decoded.content,
                                   headers={"content-type": "image/png"})).json()["images"][0]
        redecoded = await client.post("/decode", json={"indices": again["indices"]})
    reconstruction = png_pixels(decoded.content)
    assert reconstruction.shape == original.shape
    # The tiny test model (K=64, 300 steps on this photo) reconstructs it at about 22-23 dB; a flat
    # mean-colour image scores about 12 dB. 18 dB proves the decoded picture follows the input.
    assert psnr(reconstruction, original) >= 18.0
    assert again["grid"] == first["grid"]
    # Re-encoding a reconstruction is not exactly idempotent (neighbouring codes decode alike), but its
    # decode must stay close to the first decode.
    print("round trip", psnr(reconstruction, original), psnr(png_pixels(redecoded.content), reconstruction))
    assert psnr(png_pixels(redecoded.content), reconstruction) >= 20.0


async def test_pad_then_crop_to_returns_original_size(make_service, astronaut, image_bytes) -> None:
    async with make_service() as (_, client):
        encoded = (await client.post("/encode", content=image_bytes(astronaut, size=(70, 45)),
                                     headers={"content-type": "image/png"})).json()["images"][0]
        assert encoded["encoded_size"] == {"width": 72, "height": 48}
        decoded = await client.post("/decode", json={"indices": encoded["indices"], "crop_to": encoded["content_size"]})
    assert decoded.status_code == 200
    assert Image.open(io.BytesIO(decoded.content)).size == (70, 45)


async def test_offset_bos_eos_round_trip(make_service, astronaut, image_bytes) -> None:
    offset, bos, eos = 50_000, 1, 2
    async with make_service() as (_, client):
        encoded = (await client.post("/encode", params={"size": "32", "offset": offset, "bos": bos, "eos": eos},
                                     content=image_bytes(astronaut), headers={"content-type": "image/png"})).json()
        image = encoded["images"][0]
        grid = np.array(image["indices"])
        assert (encoded["offset"], encoded["bos"], encoded["eos"]) == (offset, bos, eos)
        assert image["tokens"] == [bos, *(grid.ravel() + offset).tolist(), eos]
        assert grid.max() < 64  # indices stay raw codes
        raw = await client.post("/decode", json={"indices": image["indices"]})
        with_specials = await client.post("/decode", json={"tokens": image["tokens"], "grid": image["grid"],
                                                           "offset": offset, "bos": bos, "eos": eos})
        without_specials = await client.post("/decode", json={"tokens": image["tokens"][1:-1], "grid": image["grid"],
                                                              "offset": offset, "bos": bos, "eos": eos})
        offset_grid = await client.post("/decode", json={"indices": (grid + offset).tolist(), "offset": offset})
    assert {r.status_code for r in (raw, with_specials, without_specials, offset_grid)} == {200}
    assert raw.content == with_specials.content == without_specials.content == offset_grid.content


async def test_decode_output_forms(make_service) -> None:
    rng = np.random.default_rng(0)
    grids = [rng.integers(0, 64, (8, 8)).tolist(), rng.integers(0, 64, (4, 6)).tolist()]
    async with make_service() as (_, client):
        jpeg = await client.post("/decode", json={"indices": grids[0], "format": "jpeg"})
        webp = await client.post("/decode", json={"indices": grids[0], "format": "webp"})
        crops = [{"width": 30, "height": 20}, {"width": 24, "height": 16}]
        several = await client.post("/decode", json={"indices": grids, "crop_to": crops})
        json_one = await client.post("/decode", json={"indices": grids[0]}, headers={"accept": "application/json"})
        flat = np.ravel(grids[0]).tolist()
        token_lists = await client.post("/decode", json={"tokens": [flat, flat],
                                                         "grid": [8, 8]})
    assert jpeg.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    assert webp.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(webp.content)).format == "WEBP"
    assert several.status_code == 200 and several.headers["content-type"] == "application/json"
    items = several.json()["images"]
    assert [(i["width"], i["height"]) for i in items] == [(30, 20), (24, 16)]
    assert [i["grid"] for i in items] == [[8, 8], [4, 6]]
    assert Image.open(io.BytesIO(base64.b64decode(items[1]["image"]))).size == (24, 16)
    assert several.json()["model"]["name"] == "test-tiny"
    assert json_one.json()["images"][0]["width"] == 32
    assert [i["grid"] for i in token_lists.json()["images"]] == [[8, 8], [8, 8]]


async def test_encode_npy(make_service, astronaut, coffee, image_bytes) -> None:
    async with make_service() as (_, client):
        files = [("image", (f"{i}.png", image_bytes(p), "image/png")) for i, p in enumerate((astronaut, coffee))]
        response = await client.post("/encode", params={"size": "48x32", "fit": "crop"}, files=files,
                                     headers={"accept": NPY})
        as_json = await client.post("/encode", params={"size": "48x32", "fit": "crop"}, files=files)
    assert response.status_code == 200 and response.headers["content-type"] == NPY
    array = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert array.shape == (2, 8, 12) and array.dtype == np.int64
    assert array.tolist() == [image["indices"] for image in as_json.json()["images"]]
    assert response.headers["x-vqtok-content-sizes"] == "48x32,48x32"


async def test_codebook_json_vectors_and_npy(make_service, tiny_checkpoint) -> None:
    import json

    usage = json.loads((tiny_checkpoint / "config.json").read_text())["codebook_usage"]["counts"]
    async with make_service() as (_, client):
        summary = (await client.get("/codebook")).json()
        with_vectors = (await client.get("/codebook", params={"include": "vectors"})).json()
        binary = await client.get("/codebook", headers={"accept": NPY})
    assert (summary["num_embeddings"], summary["embedding_dim"], summary["downsample"]) == (64, 16, 4)
    assert summary["usage"] == usage and summary["vectors"] is None
    assert summary["codes_used"] == sum(1 for c in usage if c > 0)
    assert 1.0 <= summary["perplexity"] <= 64.0
    vectors = np.load(io.BytesIO(binary.content), allow_pickle=False)
    assert vectors.shape == (64, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.array(with_vectors["vectors"], dtype=np.float32), vectors)


async def test_codebook_without_usage_counts_reports_the_recorded_heldout_figures(make_service, tiny_checkpoint,
                                                                                  tmp_path) -> None:
    """A record with held-out metrics but no usage counts: /codebook reports the trainer's held-out
    perplexity and codes used (metrics.heldout_crops), not nothing."""
    import json
    import shutil

    checkpoint = tmp_path / "no-counts"
    shutil.copytree(tiny_checkpoint, checkpoint)
    record = json.loads((checkpoint / "config.json").read_text())
    record["codebook_usage"] = None
    record["metrics"] = {"heldout_crops": {"mse": 0.01, "perplexity": 41.5, "codes_used": 57, "num_embeddings": 64}}
    (checkpoint / "config.json").write_text(json.dumps(record))
    async with make_service(checkpoint=checkpoint) as (_, client):
        summary = (await client.get("/codebook")).json()
    assert (summary["usage"], summary["perplexity"], summary["codes_used"]) == (None, 41.5, 57)


async def test_health_ready_info_docs(make_service) -> None:
    async with make_service(max_pixels=1_000_000) as (_, client):
        health, ready, info = [await client.get(p) for p in ("/health", "/ready", "/info")]
        docs = await client.get("/docs")
        openapi = (await client.get("/openapi.json")).json()
    assert health.json() == {"status": "ok"} and ready.json()["ready"] is True
    body = info.json()
    assert body["model"]["name"] == "test-tiny" and body["config"]["num_embeddings"] == 64
    assert body["device"] == "cpu" and body["dtype"] == "float32" and body["auth"] is False
    assert body["limits"]["max_pixels"] == 1_000_000 and body["limits"]["max_batch_size"] == 8
    assert body["checkpoint"]["provenance"]["steps"] > 0 and "version" in body
    assert body["checkpoint"]["format_version"] == 2 and "network" not in body["checkpoint"]
    assert "decay" not in body["config"] and "decay" in body["checkpoint"]["codebook_training"]
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert {"/encode", "/decode", "/codebook", "/info", "/health", "/ready"} <= set(openapi["paths"])
    encode_body = openapi["paths"]["/encode"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/png"} <= set(encode_body)


async def test_ready_is_503_until_loaded_and_warmed_up(tiny_checkpoint) -> None:
    import asyncio
    import threading

    import httpx

    from tests.conftest import service_settings, wait_until_loaded
    from vqtok.service.app import create_app
    from vqtok.service.engine import Engine

    release = threading.Event()

    def slow_loader(settings) -> Engine:  # type: ignore[no-untyped-def]
        release.wait(timeout=30)
        return Engine.load(settings.checkpoint, "cpu")

    app = create_app(service_settings(tiny_checkpoint), loader=slow_loader)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vqtok.test") as client:
        entered = asyncio.Event()
        stop = asyncio.Event()

        async def run_lifespan() -> None:
            async with app.router.lifespan_context(app):
                entered.set()
                await stop.wait()

        task = asyncio.create_task(run_lifespan())
        await asyncio.sleep(0.05)
        not_ready = await client.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json()["error_type"] == "not_ready"
        assert (await client.get("/health")).status_code == 200  # liveness needs no model
        refused = await client.post("/decode", json={"indices": [[1]]})
        assert refused.status_code == 503 and "not loaded" in refused.json()["error"]
        await asyncio.wait_for(entered.wait(), timeout=30)  # the lifespan does not wait for the model
        assert (await client.get("/ready")).status_code == 503
        release.set()
        await wait_until_loaded(app)
        assert (await client.get("/ready")).status_code == 200
        stop.set()
        await task


async def test_metrics_after_traffic(make_service, astronaut, image_bytes) -> None:
    async with make_service() as (_, client):
        png = image_bytes(astronaut, size=(32, 32))
        await client.post("/encode", content=png, headers={"content-type": "image/png"})
        await client.post("/decode", json={"indices": [[1, 2], [3, 4]]})
        await client.get("/nowhere")
        text = (await client.get("/metrics")).text
    for name in ("vqtok_requests_total", "vqtok_request_duration_seconds_bucket", "vqtok_queue_wait_seconds_bucket",
                 "vqtok_inference_seconds_bucket", "vqtok_batch_size_bucket", "vqtok_images_total",
                 "vqtok_tokens_total", "vqtok_queue_depth", "vqtok_ready"):
        assert name in text, name
    assert 'vqtok_requests_total{method="POST",route="/encode",status="200"} 1.0' in text
    assert 'vqtok_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'vqtok_tokens_total{operation="encode"} 64.0' in text
    assert 'vqtok_images_total{operation="decode"} 1.0' in text


@pytest.mark.parametrize("api_key", [None, "s3cret-key"])
async def test_api_key(make_service, api_key: str | None, image_bytes: Callable[..., bytes], astronaut) -> None:
    async with make_service(api_key=api_key) as (_, client):
        open_routes = [await client.get(p) for p in ("/health", "/ready", "/metrics")]
        anonymous = await client.get("/info")
        wrong = await client.get("/codebook", headers={"authorization": "Bearer nope"})
        right = await client.post("/encode", content=image_bytes(astronaut, size=(16, 16)),
                                  headers={"content-type": "image/png", "authorization": f"Bearer {api_key}"})
    assert all(r.status_code == 200 for r in open_routes)
    assert right.status_code == 200
    if api_key is None:
        assert anonymous.status_code == 200 and wrong.status_code == 200
    else:
        assert anonymous.status_code == 401 and anonymous.json() == {
            "error": "missing API key: send 'Authorization: Bearer <key>'", "error_type": "unauthorized"}
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert wrong.status_code == 401 and wrong.json()["error"] == "wrong API key"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
async def test_cuda_serving_matches_cpu(make_service, astronaut, image_bytes) -> None:
    """On CUDA (channels_last, bf16 convolutions, float32 nearest-code search) the tokens match the CPU's
    almost everywhere and the reconstruction is as good."""
    png = image_bytes(astronaut, size=(128, 128))
    grids, images = {}, {}
    for device in ("cpu", "cuda"):
        async with make_service(device=device) as (_, client):
            info = (await client.get("/info")).json()
            assert info["device"].startswith(device)
            grid = (await client.post("/encode", content=png, headers={"content-type": "image/png"})).json()
            grids[device] = np.array(grid["images"][0]["indices"])
            decoded = await client.post("/decode", json={"indices": grid["images"][0]["indices"]})
            images[device] = png_pixels(decoded.content)
    assert info["dtype"] == "bfloat16"
    assert np.mean(grids["cpu"] == grids["cuda"]) >= 0.9
    original = png_pixels(png)
    assert psnr(images["cuda"], original) >= psnr(images["cpu"], original) - 1.0


async def test_sixteen_bit_and_transparent_uploads_encode_like_their_8_bit_rgb(make_service, astronaut) -> None:
    grey8 = astronaut[:64, :64].mean(axis=2).round().astype(np.uint8)  # (64, 64)
    sixteen = io.BytesIO()
    Image.fromarray(grey8.astype(np.uint16) * 257).save(sixteen, "PNG")  # I;16: 0..65535
    eight = io.BytesIO()
    Image.fromarray(np.repeat(grey8[:, :, None], 3, axis=2)).save(eight, "PNG")
    rgba = np.concatenate([astronaut[:64, :64], np.full((64, 64, 1), 255, np.uint8)], axis=2)
    opaque = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(opaque, "PNG")
    plain = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(astronaut[:64, :64])).save(plain, "PNG")
    async with make_service() as (_, client):
        answers = [await client.post("/encode", content=b.getvalue(), headers={"content-type": "image/png"})
                   for b in (sixteen, eight, opaque, plain)]
    assert [a.status_code for a in answers] == [200, 200, 200, 200]
    grids = [a.json()["images"][0]["indices"] for a in answers]
    assert grids[0] == grids[1]  # 16-bit rescaled to 8 bits, not clipped to white
    assert grids[2] == grids[3]  # an opaque alpha channel changes nothing
