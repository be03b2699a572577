"""bench/service_ab.py's baseline: a commit extracted as an importable ``vqtok`` package, with modules hidden."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from service_ab import extract, hide_modules  # noqa: E402


def test_a_baseline_commit_imports_from_its_own_folder_with_hidden_modules(tmp_path: Path) -> None:
    root = extract("HEAD", tmp_path / "baseline")
    hide_modules(root, ["xmlrpc"])  # an installed module neither vqtok nor torch imports
    probe = ("import vqtok.service.batching as b, vqtok.model.vqvae as v; print(b.__file__); print(v.__file__)\n"
             "try:\n    import xmlrpc\nexcept ImportError as exc:\n    print('hidden:', exc)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    batching, vqvae, hidden = result.stdout.splitlines()
    assert batching == str(root / "vqtok" / "service" / "batching.py")
    assert vqvae == str(root / "vqtok" / "model" / "vqvae.py")
    assert hidden == "hidden: xmlrpc is hidden for this baseline"
