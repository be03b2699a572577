"""Offline training: a short run learns, resumes, writes its outputs; DDP keeps codebooks identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.processes import free_port
from vqtok.model.checkpoint import load_checkpoint
from vqtok.model.evaluate import main as evaluate_main
from vqtok.service.cli import main as vqtok

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = [
    "--num-hiddens", "16", "--num-residual-hiddens", "8", "--embedding-dim", "8", "--num-embeddings", "32",
    "--image-size", "16", "--batch-size", "16", "--heldout-crops", "16", "--data", "photos",
]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    code = vqtok(["train", *TINY_FLAGS, "--steps", "120", "--log-every", "20", "--eval-every", "60",
                  "--checkpoint-every", "60", "--lr", "2e-3", "--dead-code-window", "10", "--out", str(out)])
    assert code == 0
    return out


def test_a_short_run_lowers_the_loss_and_uses_the_codebook(short_run: Path) -> None:
    steps = [m for m in _metrics(short_run) if "recon_mse" in m]
    assert [m["step"] for m in steps] == [20, 40, 60, 80, 100, 120]
    assert steps[-1]["recon_mse"] < 0.5 * steps[0]["recon_mse"]
    assert steps[-1]["codes_used"] > 8  # restarts brought dead codes back
    assert steps[-1]["restarts"] > 0
    assert any("heldout" in m for m in _metrics(short_run))  # the periodic held-out evaluation ran


def test_the_run_writes_a_loadable_checkpoint_and_figures(short_run: Path) -> None:
    checkpoint = load_checkpoint(short_run / "checkpoint")
    record = checkpoint.record
    assert record.provenance.steps == 120
    assert isinstance(record.provenance.data, dict) and record.provenance.data["kind"] == "photos"
    assert record.provenance.training is not None and record.provenance.training["lr"] == 2e-3
    usage, heldout = record.codebook_usage, record.metrics.heldout_crops
    assert usage is not None and usage.counts is not None
    assert len(usage.counts) == 32 and sum(usage.counts) > 0
    assert heldout is not None and {"mse", "psnr", "codes_used"} <= set(heldout)
    # the usage counts are those of the final held-out evaluation: the same codes, the same perplexity
    assert usage.codes_used == heldout["codes_used"] and usage.perplexity == pytest.approx(heldout["perplexity"])
    assert checkpoint.network.num_embeddings == 32
    assert checkpoint.codebook_training.dead_code_window == 10  # --dead-code-window reached the record
    # The three held-out photos (chelsea 451x300, coffee 600x400, grace_hopper 512x600) at their own sizes,
    # each beside its reconstruction under a label.
    from PIL import Image

    width, height = Image.open(short_run / "reconstructions.png").size
    assert width >= 2 * 600 and height >= 300 + 400 + 600
    for figure in ("training.png", "reconstructions.png"):
        assert (short_run / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_from_the_saved_step(short_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "resumed"
    assert vqtok(["train", *TINY_FLAGS, "--steps", "20", "--log-every", "10", "--eval-every", "0",
                  "--out", str(out)]) == 0
    assert vqtok(["train", *TINY_FLAGS, "--steps", "30", "--log-every", "10", "--eval-every", "0",
                  "--out", str(out), "--resume"]) == 0
    steps = [m["step"] for m in _metrics(out) if "recon_mse" in m]
    assert steps == [10, 20, 30]
    checkpoint = load_checkpoint(out / "checkpoint")
    assert checkpoint.record.provenance.resumed_from_step == 20
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the run's last stdout line
    assert summary["model_id"] == checkpoint.model_id


def _train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vqtok.model.train", *TINY_FLAGS, "--steps", "60", "--checkpoint-every", "10",
            "--log-every", "5", "--eval-every", "25", "--dead-code-window", "5", "--device", "cpu",
            "--out", str(out), *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint" / "model.safetensors"))


def test_a_killed_run_resumed_ends_with_the_weights_of_the_uninterrupted_run(tmp_path: Path) -> None:
    """Kill a real training process after its second checkpoint, resume it with the same command:
    the final weights are bit-identical to those of a run that was never interrupted (CPU, one
    process), and metrics.jsonl holds each step once."""
    from vqtok.model.train import load_trainer_state

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in every run
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_train_command(whole), env=env, check=True, capture_output=True, timeout=600)

    process = subprocess.Popen(_train_command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_path = killed / "trainer_state.pt"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if state_path.is_file() and load_trainer_state(state_path)["step"] >= 20:
            break
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=60)
    stopped_at = load_trainer_state(state_path)["step"]
    assert 20 <= stopped_at < 60, stopped_at  # killed between checkpoints, before the end
    subprocess.run(_train_command(killed, "--resume"), env=env, check=True, capture_output=True, timeout=600)

    expected, resumed = _weights(whole), _weights(killed)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
    steps = [m["step"] for m in _metrics(killed) if "recon_mse" in m]
    assert steps == [m["step"] for m in _metrics(whole) if "recon_mse" in m] == list(range(5, 61, 5))
    assert load_checkpoint(killed / "checkpoint").record.provenance.resumed_from_step == stopped_at


def test_trainer_state_loads_with_weights_only(short_run: Path) -> None:
    state = torch.load(short_run / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 120 and isinstance(state["epoch"], int)
    assert state["torch_rng"].dtype == torch.uint8
    assert state["optimizer"]["state"]  # Adam's moments, as tensors


CODE_RAN: list[str] = []


def _record_code_ran(marker: str) -> dict:
    CODE_RAN.append(marker)
    return {}


class _RunsCodeWhenUnpickled:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_record_code_ran, ("unpickled",))


def test_resume_refuses_a_trainer_state_that_would_run_code(short_run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    shutil.copytree(short_run / "checkpoint", out / "checkpoint")
    torch.save({"optimizer": _RunsCodeWhenUnpickled(), "step": 120, "epoch": 3, "torch_rng": torch.get_rng_state()},
               out / "trainer_state.pt")
    assert vqtok(["train", *TINY_FLAGS, "--steps", "130", "--out", str(out), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "trainer_state.pt: unreadable trainer state" in error
    assert CODE_RAN == []  # weights_only=True: the pickled call never ran


def test_train_refuses_bad_flags_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vqtok(["train", "--image-size", "30", "--out", str(tmp_path)]) == 2
    assert "--image-size 30 must be a multiple of --downsample 4" in capsys.readouterr().err
    assert vqtok(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err
    assert vqtok(["train", "--crops-per-image", "0", "--out", str(tmp_path)]) == 2
    assert "--crops-per-image must be >= 1, got 0" in capsys.readouterr().err
    assert vqtok(["train", "--arch", "vqgan", "--downsample", "8", "--channel-multipliers", "1", "2", "4",
                  "--out", str(tmp_path)]) == 2
    assert "channel_multipliers (1, 2, 4) has 3 levels, which downsample by 4, but downsample is 8" in (
        capsys.readouterr().err)


def test_a_folder_too_small_for_one_batch_is_refused_instead_of_spinning(tmp_path: Path) -> None:
    # 5 photos, 1 held out: 4 crops an epoch < a batch of 8. Every epoch used to end before its first batch, so the
    # trainer looped for ever without a step; a subprocess with a timeout keeps such a regression from hanging here.
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        pixels = torch.randint(0, 256, (48, 48, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    command = [sys.executable, "-m", "vqtok.service.cli", "train", "--data", str(folder), "--heldout", "1",
               "--batch-size", "8", "--image-size", "32", "--steps", "2", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert ("one epoch is 4 training crops, fewer than one step's 8 (--batch-size 8 x 1 process(es)); "
            "pass --crops-per-image 2 or more") in result.stderr


def test_environment_variables_set_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from vqtok.model.train import build_parser

    monkeypatch.setenv("VQTOK_TRAIN_STEPS", "77")
    monkeypatch.setenv("VQTOK_MODEL_DOWNSAMPLE", "8")
    monkeypatch.setenv("VQTOK_MODEL_DECAY", "0.9")  # a codebook-training field keeps the VQTOK_MODEL_ prefix
    args = build_parser().parse_args(["--batch-size", "3"])
    assert (args.steps, args.downsample, args.batch_size, args.decay) == (77, 8, 3, 0.9)
    assert build_parser().parse_args(["--steps", "5"]).steps == 5  # a flag beats the environment


def test_the_model_flags_are_those_of_both_configs() -> None:
    """Every field of NetworkConfig (but in_channels) and CodebookTrainingConfig is a flag, split into its part."""
    import dataclasses

    from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
    from vqtok.model.options import dataclass_from_args
    from vqtok.model.train import build_parser

    flags = {option for action in build_parser()._actions for option in action.option_strings}
    for cls in (NetworkConfig, CodebookTrainingConfig):
        for f in dataclasses.fields(cls):
            assert (f"--{f.name.replace('_', '-')}" in flags) == (f.name != "in_channels"), f.name
    args = build_parser().parse_args(["--downsample", "8", "--kmeans-init", "--commitment-cost", "0.5"])
    assert dataclass_from_args(NetworkConfig, args) == NetworkConfig(downsample=8)
    assert dataclass_from_args(CodebookTrainingConfig, args) == CodebookTrainingConfig(kmeans_init=True,
                                                                                       commitment_cost=0.5)


def test_evaluate_json_reports_the_documented_keys(short_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate_main(["--checkpoint", str(short_run / "checkpoint"), "--data", "photos", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"mse", "nmse", "psnr", "perplexity", "codes_used", "num_embeddings", "ssim", "grid",
            "grid_original"} <= set(report)
    assert 0 < report["ssim"] < 1 and report["grid"] >= 1 and 1 <= report["grid_original"] < 1.2
    assert report["num_embeddings"] == 32 and report["images"] == 3  # the three held-out photos, full size
    assert report["model_id"] == load_checkpoint(short_run / "checkpoint").model_id
    assert evaluate_main(["--checkpoint", str(short_run / "checkpoint"), "--crop", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 512


def test_evaluate_names_a_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate_main(["--checkpoint", str(tmp_path / "none")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_codebooks(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "vqtok.model.train", *TINY_FLAGS, "--steps", "30",
        "--log-every", "10", "--eval-every", "0", "--dead-code-window", "5", "--device", "cpu", "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = load_checkpoint(out / "checkpoint").record
    assert record.provenance.hardware is not None and record.provenance.hardware["processes"] == 2
    assert record.metrics.heldout_crops is not None
    assert record.metrics.heldout_crops["ddp_codebook_max_abs_diff"] == 0.0
    assert max(m["restarts"] for m in _metrics(out) if "restarts" in m) > 0  # restarts ran, synchronised
