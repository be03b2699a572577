"""The micro-batcher through HTTP: concurrent requests share forward passes and get the answers a
lone request gets (under the batch-composition rule of tests/equivalence.py); a full queue fails
fast with 429."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from tests.equivalence import assert_images_close, assert_tokens_agree
from vqtok.service.app import create_app

pytestmark = pytest.mark.asyncio


def crops(photo: np.ndarray, count: int, side: int) -> list[np.ndarray]:
    """``count`` different (side, side, 3) crops of a photo."""
    step = (photo.shape[0] - side) // max(1, count - 1)
    return [np.ascontiguousarray(photo[i * step : i * step + side, i * step : i * step + side]) for i in range(count)]


async def test_concurrent_requests_batch_and_match_single_requests(make_service, astronaut, image_bytes) -> None:
    images = [image_bytes(c) for c in crops(astronaut, 12, 64)]
    headers = {"content-type": "image/png"}
    async with make_service(max_batch_size=8, max_wait_ms=50.0) as (app, client):
        alone = []
        for png in images:  # one at a time: every batch holds one image
            response = await client.post("/encode", content=png, headers=headers)
            assert response.headers["x-batch-size"] == "1"
            alone.append(response.json()["images"][0]["indices"])
        again = await client.post("/encode", content=images[0], headers=headers)
        engine = app.state.service.engine
        pixels = torch.stack([torch.from_numpy(c).permute(2, 0, 1) for c in crops(astronaut, 12, 64)])
        with torch.inference_mode():  # (12, h, w, D): the latent each token was chosen for
            latents = engine.model.latents(engine.config.normalize(pixels.float() / 255.0)).permute(0, 2, 3, 1)
        together = await asyncio.gather(*(client.post("/encode", content=png, headers=headers) for png in images))
        decoded_alone = [(await client.post("/decode", json={"indices": grid})).content for grid in alone[:6]]
        decoded_together = await asyncio.gather(
            *(client.post("/decode", json={"indices": grid}) for grid in alone[:6])
        )
        metrics = (await client.get("/metrics")).text
    # Same input, same batch composition: identical. Alone vs batched: the batch-composition rule.
    assert again.json()["images"][0]["indices"] == alone[0]
    together_indices = [r.json()["images"][0]["indices"] for r in together]
    assert_tokens_agree(together_indices, alone, latents=latents, codebook=engine.codebook_vectors())
    batch_sizes = [int(r.headers["x-batch-size"]) for r in together]
    assert max(batch_sizes) > 1, batch_sizes
    for batched, single in zip(decoded_together, decoded_alone, strict=True):
        assert_images_close(batched.content, single)
    assert max(int(r.headers["x-batch-size"]) for r in decoded_together) > 1
    # 12 alone, 1 again, 12 together; batches of more than one image show up in the histogram as
    # fewer observations than images.
    count = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith('vqtok_batch_size_count{operation="encode"}')))
    total = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith('vqtok_batch_size_sum{operation="encode"}')))
    assert total == 25.0 and count < 25.0, (count, total)


async def test_queue_full_fails_fast_with_429(make_service, astronaut, image_bytes) -> None:
    png = image_bytes(crops(astronaut, 1, 32)[0])
    headers = {"content-type": "image/png"}
    async with make_service(max_queue_depth=1, max_images_per_request=1, max_batch_size=1, max_wait_ms=0.0) as (
        app, client
    ):
        batcher = app.state.service.batcher
        original = batcher.operations["encode"]
        running, release = threading.Event(), threading.Event()

        def blocked_encode(batch):  # type: ignore[no-untyped-def]
            running.set()
            release.wait(timeout=30)
            return original(batch)

        batcher.operations["encode"] = blocked_encode
        first = asyncio.create_task(client.post("/encode", content=png, headers=headers))
        await asyncio.to_thread(running.wait, 10)  # the first request holds the inference thread
        second = asyncio.create_task(client.post("/encode", content=png, headers=headers))
        while batcher.depth < 1:  # the second waits in the queue
            await asyncio.sleep(0.005)
        # Refused from the headers alone: the body (not even an image) is never read or parsed.
        third = await client.post("/encode", content=b"not an image", headers=headers)
        assert third.status_code == 429
        assert third.json() == {
            "error": "queue full: 1 items waiting, the limit is 1; retry shortly",
            "error_type": "queue_full",
        }
        assert third.headers["retry-after"] == "1"
        release.set()
        assert (await first).status_code == 200
        assert (await second).status_code == 200


async def test_shutdown_fails_waiting_requests_with_503(tiny_checkpoint) -> None:
    """Stopping the batcher answers what still waits instead of leaving it hanging."""
    from tests.conftest import service_settings, wait_until_loaded

    app = create_app(service_settings(tiny_checkpoint, max_wait_ms=0.0, max_batch_size=1))
    async with app.router.lifespan_context(app):
        await wait_until_loaded(app)
        batcher = app.state.service.batcher
        release = threading.Event()
        original = batcher.operations["decode"]
        batcher.operations["decode"] = lambda batch: (release.wait(10), original(batch))[1]
        grid = torch.zeros((2, 2), dtype=torch.int64)
        waiting = [asyncio.create_task(batcher.submit("decode", [grid])) for _ in range(3)]
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.05)
        release.set()
        await stopping
        results = await asyncio.gather(*waiting, return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors and all(type(e).__name__ == "NotReady" for e in errors)


def _recording_batcher(max_wait_ms: float = 0.0, max_batch_cost: int | None = None):  # type: ignore[no-untyped-def]
    """A MicroBatcher over a stand-in operation that records each batch's size (and can be held)."""
    from vqtok.service.app import pixel_costs
    from vqtok.service.batching import MicroBatcher

    sizes: list[int] = []
    gate = threading.Event()
    gate.set()

    def operation(batch: torch.Tensor) -> torch.Tensor:
        gate.wait(10)
        sizes.append(batch.shape[0])
        return batch.sum(dim=(1, 2, 3))

    batcher = MicroBatcher({"encode": operation}, max_batch_size=16, max_wait_ms=max_wait_ms, max_queue_depth=64,
                           item_cost=pixel_costs(4), max_batch_cost=max_batch_cost)
    return batcher, sizes, gate


async def test_an_idle_batcher_runs_a_lone_item_at_once() -> None:
    """Continuous batching: with the model free, a lone item does not wait for company (max_wait 0)."""
    batcher, sizes, _ = _recording_batcher(max_wait_ms=0.0)
    batcher.start()
    try:
        result = await asyncio.wait_for(batcher.submit("encode", [torch.ones(3, 8, 8)]), timeout=5)
    finally:
        await batcher.stop()
    assert sizes == [1] and result.batch_sizes == [1]
    waiting, waiting_sizes, _ = _recording_batcher(max_wait_ms=10_000.0)  # asked to wait for company: it waits
    waiting.start()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiting.submit("encode", [torch.ones(3, 8, 8)])), timeout=0.3)
        assert waiting_sizes == []
    finally:
        await waiting.stop()


async def test_batches_are_bounded_by_pixels_as_well_as_count() -> None:
    """Items queued while a batch runs form the next batches, at most max_batch_pixels each."""
    batcher, sizes, gate = _recording_batcher(max_batch_cost=3 * 32 * 32)
    batcher.start()
    try:
        gate.clear()
        first = asyncio.create_task(batcher.submit("encode", [torch.ones(3, 32, 32)]))
        while not batcher.busy:
            await asyncio.sleep(0.005)
        small = [asyncio.create_task(batcher.submit("encode", [torch.ones(3, 32, 32)])) for _ in range(8)]
        large = [asyncio.create_task(batcher.submit("encode", [torch.ones(3, 64, 64)])) for _ in range(2)]
        while batcher.depth < 10:
            await asyncio.sleep(0.005)
        gate.set()
        await asyncio.gather(first, *small, *large)
    finally:
        await batcher.stop()
    # 1 (held), then the 32x32 items three at a time (3 x 1,024 pixels), each 64x64 (4,096 > budget) alone.
    assert sizes == [1, 3, 3, 2, 1, 1], sizes
