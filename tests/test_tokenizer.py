"""The public Python API: ``vqtok.Tokenizer`` runs what the service runs, in this process."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqtok import Tokenizer
from vqtok.service.errors import InvalidRequest


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_checkpoint(tiny_checkpoint, device="cpu")


def test_every_kind_of_input_gives_the_same_grid(tokenizer: Tokenizer, astronaut: np.ndarray, tmp_path: Path) -> None:
    pixels = np.ascontiguousarray(astronaut[:96, :128])  # (96, 128, 3)
    path = tmp_path / "crop.png"
    Image.fromarray(pixels).save(path)
    grids = tokenizer.encode([path, str(path), path.read_bytes(), Image.fromarray(pixels), pixels])
    assert isinstance(grids, np.ndarray) and grids.shape == (5, 24, 32) and grids.dtype == np.int64
    assert all(np.array_equal(grids[0], grid) for grid in grids[1:])
    assert grids.min() >= 0 and grids.max() < tokenizer.num_embeddings
    single = tokenizer.encode(pixels)  # one image, not in a list: one (h, w) grid
    assert single.shape == (24, 32)


def test_size_and_fit_and_mixed_shapes(tokenizer: Tokenizer, astronaut: np.ndarray, coffee: np.ndarray) -> None:
    same = tokenizer.encode([astronaut, coffee], size="64", fit="crop")
    assert isinstance(same, np.ndarray) and same.shape == (2, 16, 16)
    mixed = tokenizer.encode([astronaut[:32, :32], coffee[:40, :64]])  # own sizes: a list of grids
    assert isinstance(mixed, list) and [g.shape for g in mixed] == [(8, 8), (10, 16)]
    with pytest.raises(InvalidRequest, match="not a multiple of the downsample factor 4"):
        tokenizer.encode([astronaut], size="30")


def test_decode_inverts_encode_closely(tokenizer: Tokenizer, astronaut: np.ndarray) -> None:
    pixels = np.ascontiguousarray(astronaut[200:264, 200:264])
    grid = tokenizer.encode(pixels)
    image = tokenizer.decode(grid)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    mse = float(np.mean((image.astype(np.float64) - pixels) ** 2))
    assert 10 * np.log10(255**2 / mse) > 18  # the tiny test model: a recognisable reconstruction
    as_pil = tokenizer.decode([grid, grid], output="pil")
    assert [im.size for im in as_pil] == [(64, 64)] * 2
    assert np.array_equal(np.asarray(as_pil[0]), image)


def test_bad_grids_and_inputs_are_refused(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"indices\[0\]\[1\]\[0\] = 64 is outside \[0, 64\)"):
        tokenizer.decode(np.array([[1, 2], [64, 3]]))
    with pytest.raises(ValueError, match="expected a non-empty"):
        tokenizer.decode([np.zeros((2, 2, 2), dtype=np.int64)])
    with pytest.raises(TypeError, match="cannot read dict as an image"):
        tokenizer.encode([{"an": "image"}])
    with pytest.raises(ValueError, match="uint8"):
        tokenizer.encode([np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="output must be"):
        tokenizer.decode(np.zeros((2, 2), dtype=np.int64), output="tensor")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_the_tokenizer_and_the_service_agree(tokenizer: Tokenizer, make_service, astronaut: np.ndarray) -> None:
    """Same image, same options, one image per batch: the same grid and the same decoded pixels."""
    pixels = np.ascontiguousarray(astronaut[40:120, 60:140])
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    async with make_service() as (_, client):
        encoded = await client.post("/encode?size=64&fit=crop", content=buffer.getvalue(),
                                    headers={"content-type": "image/png"})
        grid = encoded.json()["images"][0]["indices"]
        decoded = await client.post("/decode", json={"indices": grid})
    local = tokenizer.encode(buffer.getvalue(), size="64", fit="crop")
    assert local.tolist() == grid
    assert np.array_equal(tokenizer.decode(local), np.asarray(Image.open(io.BytesIO(decoded.content))))
    assert encoded.headers["x-vqtok-model-id"] == tokenizer.model_id


def test_tokenize_and_detokenize_in_a_layout(tokenizer: Tokenizer, astronaut: np.ndarray, tmp_path: Path) -> None:
    from vqtok.model.layouts import LayoutError

    pixels = np.ascontiguousarray(astronaut[:32, :48])  # an (8, 12) grid
    grid = tokenizer.encode(pixels)
    ids = tokenizer.tokenize(pixels, layout="lumina-like")
    assert ids == tokenizer.layout("lumina-like").to_tokens(grid)
    image, repairs = tokenizer.detokenize(ids, layout="lumina-like")  # the grid comes from the size prefix
    assert repairs == [] and np.array_equal(image, tokenizer.decode(grid))
    cut = ids[:-5]  # an LLM that stopped early
    with pytest.raises(LayoutError, match="position"):
        tokenizer.detokenize(cut, layout="lumina-like")
    repaired, repairs = tokenizer.detokenize(cut, layout="lumina-like", repair="lenient")
    assert repaired.shape == image.shape and repairs
    spec = tmp_path / "mine.json"
    spec.write_text(tokenizer.layout("flat", offset=1000, bos=1, eos=2).model_dump_json())
    assert tokenizer.tokenize(pixels, layout=spec)[:2] == [1, 1000 + int(grid[0, 0])]
    with pytest.raises(LayoutError, match="is for 8192 codes; this tokenizer has 64"):
        from vqtok.model.layouts import get_layout

        tokenizer.layout(get_layout("flat"))


def test_a_checkpoints_serving_defaults_are_the_tokenizers_defaults(tiny_checkpoint: Path, tmp_path: Path,
                                                                     astronaut: np.ndarray) -> None:
    """An imported model's native size, fit and layout (its record's ``serving``) apply when a call names none,
    as they do on /encode; anything given wins."""
    from vqtok.model.checkpoint import ServingDefaults, load_checkpoint, save_checkpoint

    loaded = load_checkpoint(tiny_checkpoint)
    native = save_checkpoint(tmp_path / "native", loaded.model, loaded.record.provenance,
                             serving=ServingDefaults(size=64, fit="crop", layout="chameleon-like"))
    tokenizer = Tokenizer.from_checkpoint(native)
    image = astronaut[:, :300]  # 512 x 300: crop to a square, then 64 x 64
    assert tokenizer.defaults() == ("64", "crop", "chameleon-like")
    assert tokenizer.encode(image).shape == (16, 16)
    assert np.array_equal(tokenizer.encode(image), tokenizer.encode(image, size="64", fit="crop"))
    assert tokenizer.encode(image, size="32").shape == (8, 8)  # a size given: the default fit, pad
    assert tokenizer.layout().name == "chameleon-like"
    assert Tokenizer.from_checkpoint(tiny_checkpoint).defaults() == (None, "pad", "flat")
