"""scripts/model_card.py: the grid measure taken apart by pixel phase, on a bundled model and real photos."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqtok.model.checkpoint import load_checkpoint
from vqtok.model.evaluate import evaluate_spec
from vqtok.model.weights import resolve_checkpoint

_SPEC = importlib.util.spec_from_file_location("model_card", Path(__file__).parents[1] / "scripts" / "model_card.py")
assert _SPEC is not None and _SPEC.loader is not None
model_card = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(model_card)


def test_phase_spread_separates_the_stage_pattern_from_the_code_lattice() -> None:
    stage = torch.tensor([1.1, 1.0]).repeat(8, 4)  # (8, 8): every even column 10% steeper, a 2-px pattern
    assert model_card.phase_spread(stage) == pytest.approx({"all": 1.1, "stage": 1.1, "code": 1.0})
    lattice = torch.ones(8, 8)
    lattice[:, 7] = 1.2  # the column at each patch's right edge: an 8-px lattice
    spread = model_card.phase_spread(lattice)
    assert spread["all"] == pytest.approx(1.2) and spread["code"] > 1.1
    assert spread["stage"] == pytest.approx(1.05)  # a quarter of the odd columns is that edge


def test_phase_report_on_the_bundled_model_matches_vqtok_evaluate(
    tmp_path: Path, astronaut: np.ndarray, coffee: np.ndarray, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "heldout").mkdir()
    (tmp_path / "train").mkdir()
    for name, pixels in (("astronaut", astronaut), ("coffee", coffee)):
        Image.fromarray(pixels).resize((96, 64), Image.Resampling.LANCZOS).save(tmp_path / "heldout" / f"{name}.png")
    Image.fromarray(coffee).resize((64, 64)).save(tmp_path / "train" / "coffee.png")
    assert model_card.main(["default", "--data", str(tmp_path), "--phases"]) == 0
    assert torch.is_grad_enabled()  # the report leaves autograd as it found it for the rest of the process
    output = capsys.readouterr().out
    grids = re.findall(r"max/min: all 4x4 phases ([0-9.]+), 2x2 stage phases ([0-9.]+), 4x4 without", output)
    assert len(grids) == 2, output  # reconstructions, then originals
    metrics, _ = evaluate_spec(load_checkpoint(resolve_checkpoint("default"), "cpu").model, str(tmp_path), "heldout")
    assert float(grids[0][0]) == pytest.approx(metrics["grid"], abs=6e-4)
    assert float(grids[1][0]) == pytest.approx(metrics["grid_original"], abs=6e-4)
    assert f"| grid (originals) | {metrics['grid']:.3f} ({metrics['grid_original']:.3f}) |" in output
