"""Memory and time are bounded before the work is done: every limit is checked from the query, the image
headers or the request's declared shapes, before a pixel is decoded or a grid is built, and decoding itself
holds a process-wide pixel budget. Each refusal asserts its status, ``error_type`` and message, and that
the expensive step never ran."""

from __future__ import annotations

import asyncio
import io
import threading
import time
import tracemalloc
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, WebPImagePlugin
from pydantic import ValidationError

from tests.errors import assert_error
from vqtok.service import imaging
from vqtok.service.errors import QueueFull
from vqtok.service.imaging import BudgetBusy, DecodeBudget, Size, fit_image, load_fitted, probe_image

PNG_HEADERS = {"content-type": "image/png"}


@cache
def big_webp() -> bytes:
    """A valid 6000x6000 lossless WebP of 1.4 kB: 36 million pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000), (120, 30, 200)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def tiny_png(width: int = 4, height: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, tuple[int, int]]]:
    """Every pixel decode Pillow starts, as ("load", format, size), and every WebP decoder it creates
    (("webp-open", ...): Pillow's WebP reader allocates its canvas when it opens a file)."""
    calls: list[tuple[str, str | None, tuple[int, int]]] = []

    def spy(cls: type, name: str, label: str) -> None:
        original = cls.__dict__[name]

        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            result = original(self, *args, **kwargs)
            calls.append((label, self.format, self.size))
            return result

        monkeypatch.setattr(cls, name, wrapper)

    spy(ImageFile.ImageFile, "load", "load")
    spy(WebPImagePlugin.WebPImageFile, "load", "load")
    spy(WebPImagePlugin.WebPImageFile, "_open", "webp-open")
    return calls


@pytest.fixture
def resizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The output size of every ``Image.resize`` call."""
    sizes: list[tuple[int, int]] = []
    original = Image.Image.resize

    def resize(self, size, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(tuple(size))
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    return sizes


def never_submitted(app) -> list[str]:  # type: ignore[no-untyped-def]
    """Make the app's batcher record (and refuse) anything submitted; returns the record."""
    submitted: list[str] = []
    batcher = app.state.service.batcher

    async def submit(operation, tensors):  # type: ignore[no-untyped-def]
        submitted.append(operation)
        raise AssertionError(f"{operation} was submitted to the batcher")

    batcher.submit = submit
    return submitted


# ---------------------------------------------------------------------------------------------- 1. target size


@pytest.mark.asyncio
async def test_size_over_the_token_limit_is_refused_from_the_query(make_service, decodes) -> None:
    """A 77-byte 4x4 PNG with size=40000 used to grow the server to 16 GB before a 500."""
    async with make_service() as (_, client):
        response = await client.post("/encode", params={"size": "40000"}, content=tiny_png(), headers=PNG_HEADERS)
    assert_error(response, 422, "invalid_request",
                 "size 40000x40000 encodes to a 10000x10000 = 100000000 token grid, over the limit of 65536 tokens "
                 "per grid; pass a smaller size")
    assert decodes == []


@pytest.mark.asyncio
async def test_size_over_max_pixels_is_refused_from_the_query(make_service, decodes) -> None:
    async with make_service(max_pixels=500_000) as (_, client):
        response = await client.post("/encode", params={"size": "1024"}, content=tiny_png(), headers=PNG_HEADERS)
    assert_error(response, 422, "invalid_request",
                 "size 1024x1024 = 1048576 pixels is over the limit of 500000 pixels per image")
    assert decodes == []


@pytest.mark.asyncio
async def test_extreme_crop_never_materialises_the_long_side_squared(make_service, resizes) -> None:
    """size=4x16384&fit=crop is within the token limit; crop used to scale the 4x4 image to 16384x16384
    (2.5 GB). Now only the kept region is resampled, straight to the target."""
    async with make_service() as (_, client):
        tracemalloc.start()
        try:
            response = await client.post("/encode", params={"size": "4x16384", "fit": "crop"}, content=tiny_png(),
                                         headers=PNG_HEADERS)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert response.status_code == 200, response.text
    image = response.json()["images"][0]
    assert image["grid"] == [4096, 1] and image["encoded_size"] == {"width": 4, "height": 16384}
    assert resizes and max(w * h for w, h in resizes) <= 4 * 16384, resizes
    assert peak < 50e6, f"traced peak {peak / 1e6:.0f} MB"


@pytest.mark.asyncio
@pytest.mark.parametrize("fit", ["pad", "crop", "resize"])
async def test_fit_intermediates_never_exceed_the_target(make_service, astronaut, image_bytes, resizes,
                                                         fit: str) -> None:
    png = image_bytes(astronaut, size=(512, 128))
    resizes.clear()  # making the test image resized too
    async with make_service() as (_, client):
        response = await client.post("/encode", params={"size": "16x1024", "fit": fit}, content=png,
                                     headers=PNG_HEADERS)
    assert response.status_code == 200, response.text
    assert response.json()["images"][0]["encoded_size"] == {"width": 16, "height": 1024}
    assert max(w * h for w, h in resizes) <= 16 * 1024, resizes


@pytest.mark.asyncio
async def test_default_size_over_the_token_limit_names_the_setting(make_service, decodes) -> None:
    async with make_service(default_size="2048") as (_, client):
        response = await client.post("/encode", content=tiny_png(), headers=PNG_HEADERS)
        assert decodes == []
        given = await client.post("/encode", params={"size": "16"}, content=tiny_png(), headers=PNG_HEADERS)
    assert_error(response, 422, "invalid_request",
                 "default_size 2048x2048 encodes to a 512x512 = 262144 token grid, over the limit of 65536 tokens per "
                 "grid; pass a smaller size")
    assert given.status_code == 200 and given.json()["images"][0]["grid"] == [4, 4]


def test_settings_refuse_inconsistent_limits(tiny_checkpoint) -> None:
    from tests.conftest import service_settings

    with pytest.raises(ValidationError, match=r"default_size 10000x10000 = 100000000 pixels is over max_pixels"):
        service_settings(tiny_checkpoint, default_size="10000")
    with pytest.raises(ValidationError, match=r"max_decode_pixels \(1000\) must be at least max_pixels \(2000\)"):
        service_settings(tiny_checkpoint, max_pixels=2000, max_decode_pixels=1000)
    with pytest.raises(ValidationError, match=r"max_tokens_per_request \(100\) must be at least max_tokens_per_grid"):
        service_settings(tiny_checkpoint, max_tokens_per_grid=1024, max_tokens_per_request=100)


@pytest.mark.asyncio
async def test_info_publishes_the_new_limits(make_service) -> None:
    async with make_service() as (_, client):
        limits = (await client.get("/info")).json()["limits"]
    assert limits["max_tokens_per_request"] == 262_144
    assert limits["max_decode_pixels"] == 80_000_000
    assert limits["decode_wait_s"] == 5.0


# ---------------------------------------------------------------------------------------------- 2. from the header


@pytest.mark.asyncio
async def test_big_webp_without_size_is_refused_from_its_header(make_service, decodes) -> None:
    """A 1.4 kB 6000x6000 WebP used to cost 410 MB and a second before its 422."""
    webp = big_webp()
    assert len(webp) < 2000
    async with make_service() as (_, client):
        started = time.perf_counter()
        response = await client.post("/encode", content=webp, headers={"content-type": "image/webp"})
        elapsed = time.perf_counter() - started
    assert_error(response, 422, "invalid_request",
                 "body: a 6000x6000 image encodes (fit=pad) to a 1500x1500 = 2250000 token grid, over the limit of "
                 "65536 tokens per grid; pass a smaller size")
    assert decodes == []  # not decoded, and no WebP decoder (with its canvas) was even created
    assert elapsed < 0.5


@pytest.mark.asyncio
@pytest.mark.parametrize(("fit", "grid"), [("pad", None), ("crop", [31, 32]), ("resize", [32, 32])])
async def test_header_grid_rounds_as_the_fit_does(make_service, astronaut, image_bytes, decodes, fit: str,
                                                  grid: list[int] | None) -> None:
    """130x126 at f=4: pad rounds up (32x33 = 1056 > 1024), crop rounds down (31x32), resize to nearest (32x32)."""
    png = image_bytes(astronaut, size=(130, 126))
    async with make_service(max_tokens_per_grid=1024) as (_, client):
        response = await client.post("/encode", params={"fit": fit}, content=png, headers=PNG_HEADERS)
    if grid is None:
        assert_error(response, 422, "invalid_request",
                     "body: a 130x126 image encodes (fit=pad) to a 32x33 = 1056 token grid, over the limit of 1024")
        assert decodes == []
    else:
        assert response.status_code == 200, response.text
        assert response.json()["images"][0]["grid"] == grid


@pytest.mark.asyncio
async def test_jpeg_with_a_size_decodes_at_a_reduced_scale(make_service, astronaut, decodes) -> None:
    big = np.asarray(Image.fromarray(astronaut).resize((2048, 1536), Image.Resampling.BICUBIC))
    async with make_service() as (_, client):
        response = await client.post("/encode", params={"size": "64", "fit": "crop"}, content=jpeg_bytes(big),
                                     headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    image = response.json()["images"][0]
    assert image["grid"] == [16, 16] and image["original_size"] == {"width": 2048, "height": 1536}
    # 64 px from 1536 needs 1/24 of the pixels; twice that margin leaves the 1/8 DCT scale: 256x192.
    assert {size for label, _, size in decodes if label == "load"} == {(256, 192)}


@pytest.mark.parametrize(("orientation", "target", "fit"), [
    (None, Size(64, 64), "crop"), (6, Size(64, 128), "crop"), (6, Size(96, 64), "pad"), (3, Size(48, 32), "resize"),
])
def test_jpeg_draft_matches_a_full_decode(astronaut, orientation: int | None, target: Size, fit: str) -> None:
    big = np.asarray(Image.fromarray(astronaut).resize((1024, 768), Image.Resampling.BICUBIC))
    data = jpeg_bytes(big, orientation)
    header = probe_image(data, 10**8, "x")
    fitted = load_fitted(data, header, target, fit, 4, DecodeBudget(10**8, 1.0), 10**8, "x")  # type: ignore[arg-type]
    full = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    reference = fit_image(full, target, fit, 4, "x")  # type: ignore[arg-type]
    assert fitted.original == reference.original == (Size(768, 1024) if orientation == 6 else Size(1024, 768))
    assert fitted.content == reference.content and fitted.pixels.shape == reference.pixels.shape
    assert psnr(fitted.pixels, reference.pixels) > 30.0


@pytest.mark.asyncio
async def test_request_token_total_is_checked_from_the_headers(make_service, astronaut, image_bytes, decodes) -> None:
    png = image_bytes(astronaut, size=(128, 128))  # 32x32 = 1024 tokens each
    files = [("image", (f"{i}.png", png, "image/png")) for i in range(3)]
    async with make_service(max_tokens_per_grid=1024, max_tokens_per_request=2048) as (app, client):
        submitted = never_submitted(app)
        response = await client.post("/encode", files=files)
    assert_error(response, 422, "invalid_request",
                 "3 encoded images hold 3072 tokens in all, over the limit of 2048 tokens per request "
                 "(max_tokens_per_request); send fewer images per request or a smaller size")
    assert decodes == [] and submitted == []


@pytest.mark.asyncio
async def test_request_token_total_with_a_size_is_checked_from_the_query(make_service, decodes) -> None:
    files = [("image", (f"{i}.png", tiny_png(), "image/png")) for i in range(5)]
    async with make_service(max_tokens_per_request=65536) as (_, client):
        response = await client.post("/encode", params={"size": "512"}, files=files)
    assert_error(response, 422, "invalid_request",
                 "5 images at size 512x512 hold 81920 tokens in all, over the limit of 65536 tokens per request")
    assert decodes == []


# ---------------------------------------------------------------------------------------------- 2. the decode budget


def test_budget_times_out_with_429_and_serves_in_order() -> None:
    budget = DecodeBudget(100, timeout_s=0.1)
    with budget.reserve(80, "a"):
        assert budget.in_use == 80
        with pytest.raises(QueueFull) as refused, budget.reserve(30, "images[1]"):
            pass
        assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
        assert refused.value.message == (
            "images[1]: busy: images of 80 pixels are being decoded, this one needs 30 and the limit is 100 pixels "
            "at once (max_decode_pixels); waited 0.1 s (decode_wait_s); retry shortly"
        )
        with budget.reserve(20, "fits"):
            assert budget.in_use == 100
    assert budget.in_use == 0

    # First come, first served: a large waiter is not overtaken by a small one that would fit.
    budget = DecodeBudget(100, timeout_s=5.0)
    order: list[str] = []
    held = budget.reserve(60, "held")
    held.__enter__()

    def take(name: str, pixels: int) -> None:
        with budget.reserve(pixels, name):
            order.append(name)

    large = threading.Thread(target=take, args=("large", 100))
    large.start()
    time.sleep(0.1)
    small = threading.Thread(target=take, args=("small", 10))
    small.start()
    time.sleep(0.1)
    assert order == []  # small would fit next to "held", but waits behind "large"
    held.__exit__(None, None, None)
    large.join(5)
    small.join(5)
    assert order == ["large", "small"] and budget.in_use == 0


def test_budget_without_wait_never_blocks_and_never_overtakes_a_waiter() -> None:
    """The event loop's reservation (``wait=False``): granted only when it fits now and nobody waits."""
    budget = DecodeBudget(100, timeout_s=5.0)
    held = budget.reserve(80, "held")
    held.__enter__()
    with pytest.raises(BudgetBusy), budget.reserve(30, "too big", wait=False):
        pass
    assert budget.in_use == 80  # nothing held by the refused reservation
    with budget.reserve(20, "fits", wait=False):
        assert budget.in_use == 100
    waiting = budget.reserve(50, "waiter")  # referenced here: held (not collected) after its thread ends
    waiter = threading.Thread(target=waiting.__enter__)
    waiter.start()
    time.sleep(0.1)
    with pytest.raises(BudgetBusy), budget.reserve(10, "would fit", wait=False):  # but "waiter" is first
        pass
    held.__exit__(None, None, None)
    waiter.join(5)
    assert budget.in_use == 50  # the waiter got its pixels


@pytest.mark.asyncio
async def test_small_requests_are_decoded_on_the_loop_and_large_ones_in_the_threadpool(
        make_service, astronaut, image_bytes, monkeypatch) -> None:
    """A 32x32 PNG is fitted without a threadpool hop; 5 of them (over INLINE_MAX_IMAGES), a 256x256 one
    (over INLINE_MAX_PIXELS) or one whose decode budget is taken are fitted in the threadpool. The grids
    are the same either way."""
    from vqtok.service.routers import encode as encode_route

    hops: list[str] = []
    original = encode_route.run_in_threadpool

    async def counting(function, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(function.__name__)
        return await original(function, *args, **kwargs)

    monkeypatch.setattr(encode_route, "run_in_threadpool", counting)
    small = image_bytes(astronaut, size=(32, 32))
    large = image_bytes(astronaut, size=(256, 256))
    async with make_service(max_pixels=300_000, max_decode_pixels=300_000, decode_wait_s=5.0) as (app, client):
        alone = await client.post("/encode", content=small, headers=PNG_HEADERS)
        assert alone.status_code == 200 and hops == []
        five = await client.post("/encode", files=[("image", ("a.png", small, "image/png"))] * 5)
        assert five.status_code == 200 and hops == ["_fit_images"]
        assert all(image["indices"] == alone.json()["images"][0]["indices"] for image in five.json()["images"])
        hops.clear()
        assert (await client.post("/encode", content=large, headers=PNG_HEADERS)).status_code == 200
        assert hops == ["_fit_images"]
        hops.clear()
        budget = app.state.service.decode_budget
        holder = budget.reserve(300_000 - 100, "another request")  # leaves too little for a 32x32 PNG
        holder.__enter__()
        pending = asyncio.ensure_future(client.post("/encode", content=small, headers=PNG_HEADERS))
        await asyncio.sleep(0.3)
        holder.__exit__(None, None, None)  # the threadpool's reservation, waiting, is granted now
        busy = await pending
        assert busy.status_code == 200 and hops == ["_fit_images"]
        assert busy.json()["images"][0]["indices"] == alone.json()["images"][0]["indices"]


@pytest.mark.asyncio
async def test_full_decode_budget_answers_429_with_retry_after(make_service, astronaut, image_bytes, decodes) -> None:
    png = image_bytes(astronaut, size=(64, 64))
    async with make_service(max_pixels=300_000, max_decode_pixels=300_000, decode_wait_s=0.2) as (app, client):
        budget = app.state.service.decode_budget
        with budget.reserve(300_000, "another request"):
            response = await client.post("/encode", content=png, headers=PNG_HEADERS)
        after = await client.post("/encode", content=png, headers=PNG_HEADERS)
    assert_error(response, 429, "queue_full",
                 "body: busy: images of 300000 pixels are being decoded, this one needs 4096 and the limit is 300000 "
                 "pixels at once (max_decode_pixels); waited 0.2 s (decode_wait_s); retry shortly")
    assert response.headers["retry-after"] == "1"
    assert after.status_code == 200, after.text
    assert {size for _, _, size in decodes} == {(64, 64)} and budget.in_use == 0


@pytest.mark.asyncio
async def test_concurrent_decodes_stay_within_the_budget(make_service, astronaut, image_bytes, monkeypatch) -> None:
    """Eight requests at once, a budget of one image: the decodes run one after the other, and all succeed."""
    png = image_bytes(astronaut, size=(400, 400))  # 160,000 pixels
    running, most = 0, 0
    lock = threading.Lock()
    original: Callable[..., object] = imaging._decode_and_fit

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.05)
            return original(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(imaging, "_decode_and_fit", counting)
    async with make_service(max_pixels=200_000, max_decode_pixels=200_000, decode_wait_s=30.0) as (app, client):
        responses = await asyncio.gather(*[
            client.post("/encode", params={"size": "32", "fit": "crop"}, content=png, headers=PNG_HEADERS)
            for _ in range(8)
        ])
        assert app.state.service.decode_budget.in_use == 0
    assert [r.status_code for r in responses] == [200] * 8
    assert most == 1


# ---------------------------------------------------------------------------------------------- 3. /decode totals


@pytest.mark.asyncio
async def test_decode_request_token_total_is_refused_before_any_work(make_service) -> None:
    """16 grids of 256x256 in one request used to take 44 s and 4.1 GB."""
    request = {"tokens": [[0] * 65536 for _ in range(16)], "grid": [256, 256]}
    async with make_service() as (app, client):
        submitted = never_submitted(app)
        started = time.perf_counter()
        response = await client.post("/decode", json=request)
        elapsed = time.perf_counter() - started
    assert_error(response, 422, "invalid_request",
                 "16 grids hold 1048576 tokens in all, over the limit of 262144 tokens per request "
                 "(max_tokens_per_request); send fewer or smaller grids per request")
    assert submitted == []
    assert elapsed < 10.0


@pytest.mark.asyncio
async def test_decode_request_token_total_counts_before_building_arrays(make_service, monkeypatch) -> None:
    from vqtok.service import parsing

    built: list[str] = []
    monkeypatch.setattr(parsing, "grid_from_rows", lambda *args: built.append(args[-1]))
    grids = [np.zeros((32, 32), dtype=int).tolist()] * 5
    async with make_service(max_tokens_per_grid=1024, max_tokens_per_request=4096) as (app, client):
        submitted = never_submitted(app)
        response = await client.post("/decode", json={"indices": grids})
    assert_error(response, 422, "invalid_request", "5 grids hold 5120 tokens in all, over the limit of 4096 tokens")
    assert built == [] and submitted == []


# ---------------------------------------------------------------------------------------------- 4. output formats


@pytest.mark.asyncio
@pytest.mark.parametrize(("fmt", "grid", "message"), [
    ("webp", [1, 4096], "indices: webp images are at most 16383 pixels on a side; grid 1x4096 decodes to 16384x4"),
    ("jpeg", [16384, 1], "indices: jpeg images are at most 65535 pixels on a side; grid 16384x1 decodes to 4x65536"),
])
async def test_decoded_image_over_the_format_limit_is_422_before_decoding(make_service, fmt: str, grid: list[int],
                                                                          message: str) -> None:
    indices = np.zeros(grid, dtype=int).tolist()
    async with make_service() as (app, client):
        submitted = never_submitted(app)
        response = await client.post("/decode", json={"indices": indices, "format": fmt})
    assert_error(response, 422, "invalid_request", message, "ask for format=png")
    assert submitted == []


@pytest.mark.asyncio
async def test_crop_to_within_the_format_limit_decodes(make_service) -> None:
    indices = np.zeros((1, 4096), dtype=int).tolist()
    async with make_service() as (_, client):
        over = await client.post("/decode", json={"indices": indices, "format": "webp",
                                                  "crop_to": {"width": 16384, "height": 3}})
        response = await client.post("/decode", json={"indices": indices, "format": "webp",
                                                      "crop_to": {"width": 16000, "height": 4}})
    assert_error(over, 422, "invalid_request", "webp images are at most 16383 pixels on a side; grid 1x4096 decodes to "
                 "16384x4, cropped to 16384x3")
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (16000, 4)


@pytest.mark.asyncio
async def test_decoded_image_over_max_pixels_is_422(make_service) -> None:
    async with make_service(max_pixels=500_000) as (app, client):
        submitted = never_submitted(app)
        response = await client.post("/decode", json={"tokens": [0] * 65536, "grid": [256, 256]})
        listed = await client.post("/decode", json={"indices": [[[0]], [[0]]],
                                                    "crop_to": [{"width": 4, "height": 4}, {"width": 5, "height": 4}]})
    assert_error(response, 422, "invalid_request",
                 "tokens: grid 256x256 decodes to a 1024x1024 image = 1048576 pixels, over the limit of 500000 pixels "
                 "per image")
    assert_error(listed, 422, "invalid_request", "crop_to[1]: 5x4 is larger than the decoded image 4x4 of grid 1")
    assert submitted == []


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "La", "PA", "P", "P+transparency", "L", "1", "CMYK", "YCbCr",
                                  "I;16", "I", "F"])
def test_decode_conversion_matches_the_training_conversion(astronaut, mode: str) -> None:
    """The service converts decoded images to RGB in Pillow (fewer full-size copies); it must give exactly
    the pixels of ``to_rgb_array``, the conversion training uses."""
    from vqtok.model.data import to_rgb_array

    rgb = Image.fromarray(astronaut[:96, :128])
    alpha = Image.fromarray(np.tile(np.arange(128, dtype=np.uint8) * 2, (96, 1)))
    if mode in ("RGBA", "LA", "La", "PA"):
        base = rgb.convert("RGBA")
        base.putalpha(alpha)
        image = base.convert("LA").convert("La") if mode == "La" else base.convert(mode)
    elif mode.startswith("P"):
        image = rgb.convert("P")
        if mode == "P+transparency":
            image.info["transparency"] = 0
    elif mode in ("I;16", "I", "F"):
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(grey).convert(mode) if mode != "I;16" else Image.fromarray(grey)
    else:
        image = rgb.convert(mode)
    np.testing.assert_array_equal(np.asarray(imaging._to_rgb_image(image)), to_rgb_array(image))


@pytest.mark.asyncio
async def test_fit_none_mismatch_is_refused_from_the_header(make_service, astronaut, image_bytes, decodes) -> None:
    png = image_bytes(astronaut, size=(512, 384))
    odd = image_bytes(astronaut, size=(510, 384))
    decodes.clear()
    async with make_service() as (_, client):
        other = await client.post("/encode", params={"fit": "none", "size": "256"}, content=png, headers=PNG_HEADERS)
        not_multiple = await client.post("/encode", params={"fit": "none"}, content=odd, headers=PNG_HEADERS)
    assert_error(other, 422, "invalid_request", "body: fit=none keeps the image at 512x384, which differs from size "
                 "256x256")
    assert_error(not_multiple, 422, "invalid_request", "body: 510x384 is not a multiple of the downsample factor 4 "
                 "and fit=none does not resize")
    assert decodes == []


@pytest.mark.parametrize(("mode", "fmt", "cost"), [
    ("RGB", "PNG", 1.0), ("L", "PNG", 1.25), ("RGBA", "PNG", 2.8), ("I;16", "PNG", 6.0), ("RGB", "WEBP", 3.7),
    ("RGB", "JPEG", 1.0),
])
def test_the_decode_budget_counts_what_a_pixel_costs(mode: str, fmt: str, cost: float) -> None:
    """A WebP, alpha or 16-bit pixel takes several times an RGB pixel's memory: it reserves as much."""
    image = Image.new(mode, (40, 25))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = buffer.getvalue()
    budget = DecodeBudget(10**9, timeout_s=1.0)
    reserved: list[int] = []
    real_reserve = budget.reserve

    def spy(pixels: int, where: str, *, wait: bool = True):  # type: ignore[no-untyped-def]
        reserved.append(pixels)
        return real_reserve(pixels, where, wait=wait)

    budget.reserve = spy  # type: ignore[method-assign]
    header = probe_image(data, 10**8, "body")
    fitted = load_fitted(data, header, None, "pad", 4, budget, 10**8, "body")
    assert fitted.pixels.shape == (28, 40, 3)
    assert reserved == [int(np.ceil(40 * 25 * cost))]
