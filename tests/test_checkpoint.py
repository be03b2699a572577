"""Checkpoints: save/load round trip, atomic writes, and a clear error for every kind of damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vqtok.model import checkpoint as checkpoint_module
from vqtok.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from vqtok.model.config import VQVAEConfig
from vqtok.model.vqvae import VQVAE

TINY = VQVAEConfig(num_hiddens=16, num_residual_hiddens=8, embedding_dim=8, num_embeddings=32, downsample=8)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, VQVAE]:
    torch.manual_seed(0)
    model = VQVAE(TINY)
    path = save_checkpoint(tmp_path / "ckpt", model, {"name": "tiny", "steps": 7})
    return path, model


def _edit_config(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    record = json.loads((path / "config.json").read_text())
    edit(record)
    (path / "config.json").write_text(json.dumps(record))


def test_round_trip_restores_every_tensor_and_the_record(saved: tuple[Path, VQVAE]) -> None:
    path, model = saved
    loaded = load_checkpoint(path, "cpu")
    assert loaded.config == TINY
    assert loaded.name == "tiny" and loaded.metadata["steps"] == 7
    assert loaded.weights_sha256 == sha256_file(path / "model.safetensors")
    assert not loaded.model.training
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model.encode(x), model.encode(x))


def test_saved_files_are_readable_by_others(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    for item in (path, path / "model.safetensors", path / "config.json"):
        assert item.stat().st_mode & 0o044 == 0o044, item  # group and others may read (umask 022)


def test_save_replaces_atomically_and_leaves_no_temporaries(saved: tuple[Path, VQVAE]) -> None:
    path, model = saved
    save_checkpoint(path, model, {"name": "second"})
    assert load_checkpoint(path).name == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_a_failed_write_keeps_the_previous_checkpoint(saved: tuple[Path, VQVAE], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path, model = saved

    def dies(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoint_module, "_write_json", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, {"name": "never"})
    assert load_checkpoint(path).name == "tiny"
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint directory not found: .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_config_file(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(path)


def test_missing_weights_file(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(path)


def test_corrupt_weights_fail_the_hash_check(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* does not match"):
        load_checkpoint(path)


def test_truncated_weights_with_matching_hash_are_unreadable(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _edit_config(path, lambda r: r.update(weights_sha256=sha256_file(weights)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file"):
        load_checkpoint(path)


def test_unknown_config_key(saved: tuple[Path, VQVAEConfig]) -> None:
    path, _ = saved
    _edit_config(path, lambda r: r["config"].update(colour_space="lab"))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid config: unknown config key\(s\): colour_space"):
        load_checkpoint(path)


def test_shape_mismatch_names_the_tensor(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    _edit_config(path, lambda r: r["config"].update(num_embeddings=64))
    expected = r"tensor 'quantizer\.steps_since_used' has shape \(32,\), .* needs \(64,\)"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


def test_missing_tensors_are_named(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    _edit_config(path, lambda r: r["config"].update(num_residual_layers=3))
    with pytest.raises(CheckpointError, match=r"missing \['decoder\.residual_stack\.layers\.2\.conv1\.weight'"):
        load_checkpoint(path)


def test_invalid_json_and_foreign_format(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    original = (path / "config.json").read_text()
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(path)
    (path / "config.json").write_text(original)
    _edit_config(path, lambda r: r.update(format="something-else"))
    with pytest.raises(CheckpointError, match="'format' is 'something-else', expected 'vqtok-checkpoint'"):
        load_checkpoint(path)
