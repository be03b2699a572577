"""The wheel installs one import name, ``vqtok``, and works from outside the checkout."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.processes import free_port, wait_until_ready

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from the checkout (no build isolation: setuptools is in the dev extra)."""
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out)]
    subprocess.run([*build, str(REPO)], check=True, capture_output=True)
    (built,) = out.glob("vqtok-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a folder of its own (dependencies come from the test environment)."""
    target = tmp_path_factory.mktemp("site")
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True)
    return target


def test_wheel_has_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["vqtok"]
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"vqtok"}
    # every bundled checkpoint ships, and the page's files
    bundled = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "model" / "weights").iterdir()
                     if (p / "config.json").is_file())
    assert "default" in bundled
    for name in bundled:
        assert f"vqtok/model/weights/{name}/model.safetensors" in names
        assert f"vqtok/model/weights/{name}/config.json" in names
    assert "vqtok/service/web/static/index.html" in names
    assert "vqtok = vqtok.service.cli:main" in entry_points


def _run_outside(installed: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_installed_wheel_is_not_shadowed_and_bare_names_are_gone(installed: Path, tmp_path: Path) -> None:
    """A user's own ``model.py`` in the working directory does not shadow ours; ``import service`` fails."""
    (tmp_path / "model.py").write_text("raise ImportError('the user module was imported')\n")
    code = (
        "import importlib.util, sys\n"
        "import vqtok\n"
        "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules, 'import vqtok is not light'\n"
        "from vqtok.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint\n"
        f"assert str(DEFAULT_CHECKPOINT).startswith({str(installed)!r}), DEFAULT_CHECKPOINT\n"
        "assert load_checkpoint(DEFAULT_CHECKPOINT).name == 'vqtok-default-f4-photos-v1'\n"
        "assert importlib.util.find_spec('service') is None\n"
        "assert vqtok.Client.__module__ == 'vqtok.service.client'\n"
        "import numpy as np\n"
        "tokenizer = vqtok.Tokenizer.from_checkpoint('default', device='cpu')\n"
        "grid = tokenizer.encode(np.full((32, 48, 3), 128, dtype=np.uint8))\n"
        "assert grid.shape == (8, 12) and tokenizer.decode(grid).shape == (32, 48, 3)\n"
        "print('ok')\n"
    )
    result = _run_outside(installed, code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert not (installed / "model").exists() and not (installed / "service").exists()


def test_installed_wheel_serves_the_bundled_model(installed: Path, tmp_path: Path, coffee: np.ndarray) -> None:
    """``vqtok serve`` from the installed wheel answers /encode with the bundled model."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(installed), "VQTOK_LOG_LEVEL": "warning"}
    for name in ("VQTOK_CHECKPOINT", "VQTOK_PORT", "PORT"):
        env.pop(name, None)
    command = [str(installed / "bin" / "vqtok"), "serve", "--device", "cpu", "--port", str(port), "--warmup-size", "32"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(process, port)
        buffer = io.BytesIO()
        Image.fromarray(coffee[:64, :64]).save(buffer, format="PNG")
        response = httpx.post(f"http://127.0.0.1:{port}/encode", content=buffer.getvalue(),
                              headers={"content-type": "image/png"}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"]["name"] == "vqtok-default-f4-photos-v1" and body["images"][0]["grid"] == [16, 16]
    finally:
        process.terminate()
        process.wait(timeout=30)
