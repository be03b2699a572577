"""bench/gpu_figures.py runs end to end on the CPU in its quick mode: every section answers, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_figures.py"
SECTIONS = {"inprocess", "agreement", "decode", "http", "memory", "compile"}


def test_gpu_figures_quick_run_on_the_cpu_fills_every_section(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["meta"]["torch"] and figures["meta"]["cpu_count"] >= 1 and figures["meta"]["commit"]
    sections = figures["sections"]
    assert set(sections) == SECTIONS
    for name, section in sections.items():
        assert "elapsed_s" in section, name
        assert section.get("skipped") or len(section) > 1, (name, section)
    # on the CPU only these two have nothing to measure, and they say why
    assert "no CUDA device" in sections["memory"]["skipped"]
    assert "--quick" in sections["compile"]["skipped"]
    for name in ("inprocess", "agreement", "decode", "http"):
        assert "skipped" not in sections[name], (name, sections[name]["skipped"], result.stdout[-3000:])

    rates = sections["inprocess"]["rows"]
    assert {(r["op"], r["variant"]) for r in rates} == {(op, v) for op in ("encode", "decode")
                                                         for v in ("float32", "bf16")}
    assert all(r["images_per_s"] > 0 for r in rates)
    assert all(r["ratio_to_first"] == 1.0 for r in rates if r["variant"] == "float32")

    agreement = sections["agreement"]["rows"]
    assert {r["images"] for r in agreement} == {"full size", "256x256 crops"}
    for row in agreement:
        assert 0.0 <= row["bf16_agreement"] <= 1.0 and row["tokens"] > 0
        assert row["meets_target"] == (row["bf16_agreement"] >= 0.995)

    decode = sections["decode"]
    assert {(r["side"], r["workers"]) for r in decode["rows"]} == {(32, 1), (32, 2), (256, 1), (256, 2)}
    assert all(r["images_per_s"] > 0 for r in decode["rows"])
    assert {k["side"] for k in decode["keep_up"]} == {32, 256}  # from the inprocess section's encode rates

    http = sections["http"]
    cases = {c["case"]: c for c in http["cases"]}
    assert set(cases) == {"small", "large"}
    assert cases["small"]["requests"] > 0 and cases["small"]["errors"] == 0  # a real server answered
    assert cases["small"]["req_per_s"] > 0 and cases["small"]["p99_ms"] >= cases["small"]["p50_ms"] > 0
    assert cases["small"]["in_process_b16_images_per_s"] > 0 and cases["small"]["share_of_in_process"] > 0
    assert "== http ==" in result.stdout and "all sections:" in result.stdout


def test_gpu_figures_refuses_an_unknown_section() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--sections", "inprocess", "bogus"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert "invalid choice: 'bogus'" in result.stderr
