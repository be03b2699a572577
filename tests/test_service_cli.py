"""Settings, flags and environment variables; the Python client; ``vqtok encode`` / ``vqtok decode``
against a real uvicorn server on a loopback port; ``vqtok serve`` as a real process."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import service_settings
from tests.processes import free_port, wait_until_ready
from vqtok.service.app import warmup_batch_size
from vqtok.service.cli import main as vqtok
from vqtok.service.client import AsyncVQTokClient, ServiceClientError, VQTokClient
from vqtok.service.server import serve_in_thread
from vqtok.service.settings import Settings, add_settings_arguments, settings_from_args

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- settings

def test_env_vars_flags_and_port_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VQTOK_") or name == "PORT":
            monkeypatch.delenv(name)
    assert Settings().port == 8000 and Settings().host == "127.0.0.1" and Settings().device == "auto"
    monkeypatch.setenv("PORT", "9100")
    assert Settings().port == 9100
    monkeypatch.setenv("VQTOK_PORT", "9200")
    monkeypatch.setenv("VQTOK_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("VQTOK_API_KEY", "k")
    monkeypatch.setenv("VQTOK_WARMUP", "false")
    settings = Settings()
    assert (settings.port, settings.max_batch_size, settings.warmup) == (9200, 4, False)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k"

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    flags = {action.dest for action in parser._actions if action.dest != "help"}
    assert flags == set(Settings.model_fields)  # one flag per field, no drift
    from_flags = settings_from_args(parser.parse_args(["--max-batch-size", "2", "--device", "cpu", "--warmup"]))
    assert (from_flags.max_batch_size, from_flags.device, from_flags.warmup, from_flags.port) == (2, "cpu", True, 9200)
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "tpu"])


@pytest.mark.parametrize(("batch", "pixels", "side", "expected"), [
    (16, 1_048_576, 256, 16),    # the defaults: 16 x 256x256 is exactly the budget
    (256, 1_048_576, 256, 16),   # a wide count: the budget binds (was 256 x 256x256, 16.7 M pixels)
    (256, 1_048_576, 32, 256),   # small images: the count binds
    (8, 1_048_576, 2048, 1),     # one image over the budget still runs (alone, as a request's would)
])
def test_warm_up_runs_the_largest_batch_requests_can_form(batch: int, pixels: int, side: int, expected: int) -> None:
    settings = Settings(max_batch_size=batch, max_batch_pixels=pixels, warmup_size=side, max_queue_depth=1024)
    assert warmup_batch_size(settings) == expected


def test_inconsistent_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_images_per_request"):
        Settings(max_queue_depth=2, max_images_per_request=8)
    with pytest.raises(ValueError, match="not 'N' or 'WxH'"):
        Settings(default_size="huge")


def test_serve_refuses_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vqtok(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


def test_serve_refuses_a_bad_checkpoint_in_one_line(tiny_checkpoint: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose config.json was edited after writing: one line on stderr, exit 2, no port bound."""
    import shutil

    def must_not_serve(settings: Settings) -> int:
        raise AssertionError("vqtok serve went on to serve a bad checkpoint")

    monkeypatch.setattr("vqtok.service.server.serve", must_not_serve)

    edited = tmp_path / "edited"
    shutil.copytree(tiny_checkpoint, edited)
    record = json.loads((edited / "config.json").read_text())
    record["network"]["pixel_mean"] = [0.4, 0.4, 0.4]
    (edited / "config.json").write_text(json.dumps(record))
    assert vqtok(["serve", "--checkpoint", str(edited)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqtok serve: ") and err.count("\n") == 1, err
    assert "model_id" in err and "Traceback" not in err


def test_serve_refuses_bad_settings_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert vqtok(["serve", "--max-batch-size", "0", "--max-wait-ms", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("vqtok serve: invalid settings: max_batch_size: Input should be greater than or equal to 1")
    assert "max_wait_ms: Input should be greater than or equal to 0" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_serve_refuses_cuda_without_a_gpu(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vqtok(["serve", "--device", "cuda", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "vqtok serve: device 'cuda' was requested but torch sees no CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real server

@pytest.fixture(scope="module")
def server_url(tiny_checkpoint: Path) -> Iterator[str]:
    settings = service_settings(tiny_checkpoint, port=0, log_level="warning", default_size=None)
    with serve_in_thread(settings) as url:
        yield url


def test_cli_encode_then_decode(server_url: str, astronaut: np.ndarray, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).resize((70, 50)).save(photo)
    assert vqtok(["encode", str(photo), "--url", server_url, "--size", "32", "--fit", "crop"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{photo}: grid 8x8, content 32x32" and len(printed) == 9
    assert all(len(line.split()) == 8 for line in printed[1:])

    tokens_json = tmp_path / "tokens.json"
    two = [str(photo), str(photo)]
    assert vqtok(["encode", *two, "--url", server_url, "--offset", "100", "-o", str(tokens_json)]) == 0
    written = json.loads(tokens_json.read_text())
    assert len(written["images"]) == 2 and written["images"][0]["tokens"][0] >= 100

    out = tmp_path / "out.png"
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"images": written["images"][:1]}))
    assert vqtok(["decode", str(single), "-o", str(out), "--url", server_url]) == 0
    assert Image.open(out).size == (70, 50)  # cropped back to content_size
    assert vqtok(["decode", str(tokens_json), "-o", str(out), "--url", server_url]) == 0
    assert Image.open(tmp_path / "out-0.png").size == (70, 50) and (tmp_path / "out-1.png").exists()

    flat = tmp_path / "flat.json"
    image = written["images"][0]
    flat.write_text(json.dumps({"tokens": image["tokens"], "grid": image["grid"], "offset": 100}))
    jpg = tmp_path / "flat.jpg"
    assert vqtok(["decode", str(flat), "-o", str(jpg), "--url", server_url]) == 0
    assert Image.open(jpg).format == "JPEG" and Image.open(jpg).size == (72, 52)


def test_cli_encode_with_a_local_layout_file(server_url: str, astronaut: np.ndarray, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--layout-file lays the grid out on the client side: the server need not know the layout."""
    from vqtok.model.layouts import get_layout

    photo = tmp_path / "a.png"
    Image.fromarray(astronaut).resize((32, 32)).save(photo)
    spec = tmp_path / "mine.json"
    layout = get_layout("lumina-like", codebook_size=64, offset=100, boi=1, eoi=2, eol=3, size_base=10, size_max=64)
    spec.write_text(layout.model_copy(update={"name": "mine"}).model_dump_json())
    out = tmp_path / "tokens.json"
    assert vqtok(["encode", str(photo), "--url", server_url, "--layout-file", str(spec), "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    image = result["images"][0]
    assert result["layout"] == "mine" and image["tokens"] == layout.to_tokens(np.asarray(image["indices"]))
    assert image["tokens"][:3] == [1, 18, 18]  # boi, then height and width 8 as size_base + 8
    capsys.readouterr()
    assert vqtok(["encode", str(photo), "--url", server_url, "--layout-file", str(spec), "--offset", "5"]) == 1
    assert "--layout-file lays the tokens out here" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(get_layout("flat", codebook_size=512).model_dump_json())
    assert vqtok(["encode", str(photo), "--url", server_url, "--layout-file", str(wrong)]) == 1
    assert "is for 512 codes, the model has 64" in capsys.readouterr().err


def test_cli_prints_server_errors(server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"indices": [[0, 1], [2, 9999]]}))
    assert vqtok(["decode", str(bad), "-o", str(tmp_path / "x.png"), "--url", server_url]) == 1
    assert "indices[1][1] = 9999 is outside [0, 64) (invalid_request, HTTP 422)" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert vqtok(["encode", str(text), "--url", server_url]) == 1
    assert "unsupported_media_type, HTTP 415" in capsys.readouterr().err
    assert vqtok(["encode", str(text), "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the service" in capsys.readouterr().err


def test_the_client_takes_paths_bytes_pil_images_and_arrays(server_url: str, astronaut: np.ndarray,
                                                             tmp_path: Path) -> None:
    pixels = np.ascontiguousarray(astronaut[100:164, 200:264])  # (64, 64, 3) uint8
    path = tmp_path / "crop.png"
    Image.fromarray(pixels).save(path)
    with VQTokClient(server_url) as client:
        grids = client.encode([path, str(path), path.read_bytes(), Image.fromarray(pixels), pixels], as_numpy=True)
        assert isinstance(grids, np.ndarray) and grids.shape == (5, 16, 16)
        assert all(np.array_equal(grids[0], grid) for grid in grids[1:])  # one image, five ways of sending it
        as_array = client.decode(indices=grids[0], output="numpy")  # a NumPy grid goes in as it is
        as_pil = client.decode(indices=grids[0], output="pil")
        several = client.decode(indices=grids[:2], output="numpy")
        with pytest.raises(TypeError, match="cannot send dict as an image"):
            client.encode([{"not": "an image"}])
        with pytest.raises(ValueError, match=r"must be \(H, W\), \(H, W, 3\) or \(H, W, 4\) uint8"):
            client.encode([pixels.astype(np.float32)])
        with pytest.raises(ValueError, match="output must be"):
            client.decode(indices=grids[0], output="tensor")
    assert isinstance(as_array, np.ndarray) and as_array.shape == (64, 64, 3) and as_array.dtype == np.uint8
    assert isinstance(as_pil, Image.Image) and as_pil.size == (64, 64)
    assert np.array_equal(np.asarray(as_pil.convert("RGB")), as_array)
    assert isinstance(several, list) and [a.shape for a in several] == [(64, 64, 3)] * 2


def test_the_client_imports_neither_torch_nor_fastapi() -> None:
    """A client-only user needs httpx and NumPy, not the model or the web stack."""
    code = ("import sys, vqtok; from vqtok import Client; import vqtok.service.client; "
            "heavy = [m for m in ('torch', 'fastapi', 'starlette', 'uvicorn') if m in sys.modules]; "
            "assert not heavy, heavy; print('light')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "light", result.stderr


def test_python_clients(server_url: str, astronaut: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(astronaut).resize((64, 64)).save(buffer, format="PNG")
    png = buffer.getvalue()
    with VQTokClient(server_url) as client:
        result = client.encode([png], tokens=True)
        assert isinstance(result, dict) and result["images"][0]["grid"] == [16, 16]
        array = client.encode([png, png], as_numpy=True)
        assert isinstance(array, np.ndarray) and array.shape == (2, 16, 16)
        image = client.decode(indices=result["images"][0]["indices"])
        assert isinstance(image, bytes) and Image.open(io.BytesIO(image)).size == (64, 64)
        several = client.decode(indices=array.tolist(), format="webp")
        assert isinstance(several, list) and len(several) == 2
        codebook = client.codebook(as_numpy=True)
        assert isinstance(codebook, np.ndarray) and codebook.shape == (64, 16)
        with pytest.raises(ServiceClientError) as caught:
            client.decode(tokens=[1, 2, 3], grid=[2, 2])
        assert caught.value.status == 422 and "grid [2, 2] needs 2 * 2 = 4" in caught.value.message

    async def run_async() -> None:
        async with AsyncVQTokClient(server_url) as client:
            result = await client.encode([png])
            assert isinstance(result, dict)
            decoded = await client.decode(indices=result["images"][0]["indices"])
            assert isinstance(decoded, bytes)
            info = await client.codebook(vectors=True)
            assert isinstance(info, dict) and len(info["vectors"]) == 64

    import asyncio

    asyncio.run(run_async())


def test_vqtok_serve_process(tiny_checkpoint: Path) -> None:
    """``python -m vqtok.service`` configured by environment variables and flags, as a container would run it."""
    port = free_port()
    env = {**os.environ, "VQTOK_CHECKPOINT": str(tiny_checkpoint), "VQTOK_WARMUP_SIZE": "32",
           "VQTOK_MAX_BATCH_SIZE": "2", "PORT": str(port), "VQTOK_LOG_LEVEL": "warning", "PYTHONPATH": str(REPO)}
    env.pop("VQTOK_PORT", None)
    process = subprocess.Popen([sys.executable, "-m", "vqtok.service", "--device", "cpu", "--max-wait-ms", "1"],
                               env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(process, port)
        info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=10).json()
        assert info["limits"]["max_batch_size"] == 2 and info["limits"]["max_wait_ms"] == 1.0
        assert info["model"]["name"] == "test-tiny"
    finally:
        process.terminate()
        process.wait(timeout=30)
