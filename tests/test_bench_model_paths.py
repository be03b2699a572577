"""bench/model_paths.py runs: a quick smoke run of two paths on the bundled default model, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_model_paths_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "paths.json"
    command = [sys.executable, str(REPO / "bench" / "model_paths.py"), "--quick", "--models", "default",
               "--paths", "eager", "channels_last", "--shapes", "32:2", "--repeats", "1", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("eager fp32 ") for line in lines), result.stdout
    assert any(line.startswith("channels_last ") for line in lines), result.stdout
    assert any(line.startswith("recommend for default:") for line in lines), result.stdout
    rows = json.loads(out.read_text())["models"]["default"]["rows"]
    eager = rows["eager fp32"]["cells"]["32x32 b2"]
    assert eager["agree"] == 1.0 and eager["decode_max_diff"] == 0 and eager["encode_rate"] > 0
    assert rows["channels_last"]["failed"] == ""
    assert 0.0 <= rows["channels_last"]["cells"]["32x32 b2"]["agree"] <= 1.0
