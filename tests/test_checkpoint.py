"""Checkpoints: save/load round trip, atomic writes, model_id, and a clear error for every kind of damage."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqtok.model import checkpoint as checkpoint_module
from vqtok.model.checkpoint import (
    DEFAULT_CHECKPOINT,
    CheckpointError,
    compute_model_id,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
    verify_checkpoint,
)
from vqtok.model.config import MAX_PARAMETERS, TOKEN_FIELDS, TRAINING_ONLY_FIELDS, VQVAEConfig
from vqtok.model.evaluate import main as evaluate_main
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


# ------------------------------------------------------------------------------------------------
# Hardening: model_id, non-finite weights, weights_file, config types and bounds, verify_checkpoint.
# Each bad case is a real trained checkpoint (tests/conftest.py's tiny_checkpoint) copied and damaged.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def trained(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny trained checkpoint, saved again so its config.json records a model_id."""
    loaded = load_checkpoint(tiny_checkpoint)
    return save_checkpoint(tmp_path / "trained", loaded.model, {"name": loaded.name})


def _record(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _rewrite_weights(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Change the tensors and re-record sha256 and model_id: a consistent checkpoint with bad weights."""
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights))
    config = VQVAEConfig.from_dict(_record(path)["config"])
    sha = sha256_file(weights)
    _edit_config(path, lambda r: r.update(weights_sha256=sha, model_id=compute_model_id(config, sha)))


def _refused(path: Path, pattern: str) -> CheckpointError:
    """Both load_checkpoint and verify_checkpoint raise the same one-line CheckpointError matching ``pattern``."""
    with pytest.raises(CheckpointError, match=pattern) as loading:
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=pattern) as verifying:
        verify_checkpoint(path)
    assert str(loading.value) == str(verifying.value)
    assert "\n" not in str(loading.value)  # `vqtok serve` prints it as its one line on stderr
    return loading.value


def test_model_id_is_recorded_on_save_and_recomputed_on_load(trained: Path) -> None:
    loaded = load_checkpoint(trained)
    record = _record(trained)
    assert re.fullmatch(r"[0-9a-f]{64}", loaded.model_id)
    assert record["model_id"] == loaded.model_id == compute_model_id(loaded.config, record["weights_sha256"])
    assert loaded.model_id != loaded.weights_sha256
    verify_checkpoint(trained)  # a good checkpoint passes


def test_model_id_covers_every_token_field_and_no_training_only_field() -> None:
    fields = {f.name for f in dataclasses.fields(VQVAEConfig)}
    # every field is classified, so a new field forces a decision about model_id
    assert set(TOKEN_FIELDS) | set(TRAINING_ONLY_FIELDS) == fields
    assert not set(TOKEN_FIELDS) & set(TRAINING_ONLY_FIELDS)
    base = compute_model_id(TINY, "0" * 64)
    assert compute_model_id(TINY, "1" * 64) != base
    token_changes = {
        "in_channels": {"in_channels": 1, "pixel_mean": [0.5], "pixel_std": [1.0]}, "num_hiddens": {"num_hiddens": 32},
        "num_residual_hiddens": {"num_residual_hiddens": 4}, "num_residual_layers": {"num_residual_layers": 1},
        "embedding_dim": {"embedding_dim": 4}, "num_embeddings": {"num_embeddings": 16},
        "quantizer": {"quantizer": "plain"}, "downsample": {"downsample": 4},
        "pixel_mean": {"pixel_mean": [0.4, 0.5, 0.5]}, "pixel_std": {"pixel_std": [1.0, 1.0, 0.5]},
    }
    assert set(token_changes) == set(TOKEN_FIELDS)
    for name, change in token_changes.items():
        assert compute_model_id(dataclasses.replace(TINY, **change), "0" * 64) != base, name
    training_changes = {"commitment_cost": 0.5, "decay": 0.9, "epsilon": 1e-3, "dead_code_window": 5,
                        "dead_code_threshold": 0.5, "kmeans_init": True, "kmeans_iters": 3}
    assert set(training_changes) == set(TRAINING_ONLY_FIELDS)
    for name, value in training_changes.items():
        assert compute_model_id(dataclasses.replace(TINY, **{name: value}), "0" * 64) == base, name
    # lists and tuples, 1 and 1.0: the same config, the same id
    assert compute_model_id(VQVAEConfig.from_dict({**TINY.to_dict(), "pixel_std": [1, 1, 1]}), "0" * 64) == base


def test_an_edited_pixel_mean_is_refused_as_a_changed_config(trained: Path) -> None:
    before = load_checkpoint(trained)
    _edit_config(trained, lambda r: r["config"].update(pixel_mean=[0.4, 0.5, 0.5]))
    error = _refused(trained, r"config\.json: changed after the checkpoint was written: its model_id '[0-9a-f]{64}' "
                              r"no longer matches '[0-9a-f]{64}'")
    assert before.model_id in str(error)


def test_an_edited_training_only_field_keeps_the_model_id(trained: Path) -> None:
    before = load_checkpoint(trained).model_id
    _edit_config(trained, lambda r: r["config"].update(decay=0.9, dead_code_window=7))
    after = load_checkpoint(trained)
    assert after.model_id == before and after.config.decay == 0.9


def test_an_older_record_without_model_id_loads_and_computes_it(trained: Path) -> None:
    recorded = _record(trained)["model_id"]
    _edit_config(trained, lambda r: r.pop("model_id"))
    verify_checkpoint(trained)
    assert load_checkpoint(trained).model_id == recorded


def test_metadata_cannot_override_the_identity(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt", VQVAE(TINY), {"name": "x", "model_id": "forged", "weights_sha256": "f"})
    record = _record(path)
    assert record["weights_sha256"] == sha256_file(path / "model.safetensors")
    assert record["model_id"] == load_checkpoint(path).model_id != "forged"


@pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(), reason="no bundled checkpoint")
def test_the_bundled_checkpoint_records_its_model_id() -> None:
    verify_checkpoint(DEFAULT_CHECKPOINT)
    assert _record(DEFAULT_CHECKPOINT)["model_id"] == load_checkpoint(DEFAULT_CHECKPOINT).model_id


@pytest.mark.asyncio
async def test_the_service_reports_the_model_id(make_service, tiny_checkpoint: Path) -> None:
    expected = load_checkpoint(tiny_checkpoint).model_id
    async with make_service() as (_, client):
        info = await client.get("/info")
        vectors = await client.get("/codebook", headers={"accept": "application/x-npy"})
    assert info.status_code == 200 and vectors.status_code == 200
    assert info.json()["model"]["model_id"] == expected
    assert vectors.headers["x-vqtok-model-id"] == expected
    assert "model_id" not in info.json()["checkpoint"]  # reported once, in the identity


def test_evaluate_json_names_the_model_id(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate_main(["--checkpoint", str(tiny_checkpoint), "--crop", "16", "--batch-size", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"] == load_checkpoint(tiny_checkpoint).model_id


@pytest.mark.parametrize(("key", "value", "count"), [
    ("quantizer.embedding", float("nan"), 1),
    ("encoder.downsamples.0.weight", float("inf"), 1),
    ("decoder.upsamples.1.bias", float("-inf"), 3),
])
def test_non_finite_weights_are_refused_naming_the_tensor(trained: Path, key: str, value: float, count: int) -> None:
    def poison(state: dict[str, torch.Tensor]) -> None:
        state[key].view(-1)[:count] = value

    _rewrite_weights(trained, poison)
    _refused(trained, rf"model\.safetensors: tensor '{re.escape(key)}' holds {count} non-finite value\(s\) "
                      r"\(NaN or Inf\)")


@pytest.mark.parametrize("name", [
    "../model.safetensors", "/abs/model.safetensors", "sub/model.safetensors", "..", ".", "", "a\\b", 7, None,
])
def test_weights_file_must_be_a_plain_name_inside_the_directory(trained: Path, name: object) -> None:
    # a valid copy outside the checkpoint directory: reachable by '../', and the hash would match
    shutil.copy(trained / "model.safetensors", trained.parent / "model.safetensors")
    (trained / "sub").mkdir()
    shutil.copy(trained / "model.safetensors", trained / "sub" / "model.safetensors")
    if name == "/abs/model.safetensors":
        name = str((trained.parent / "model.safetensors").resolve())
    _edit_config(trained, lambda r: r.update(weights_file=name))
    _refused(trained, rf"config\.json: weights_file {re.escape(repr(name))} is not a plain file name; it must name "
                      r"a file inside the checkpoint directory")


def test_a_plain_weights_file_name_other_than_the_default_loads(trained: Path) -> None:
    (trained / "model.safetensors").rename(trained / "weights.safetensors")
    _edit_config(trained, lambda r: r.update(weights_file="weights.safetensors"))
    verify_checkpoint(trained)
    assert load_checkpoint(trained).config.num_embeddings == 64


@pytest.mark.parametrize(("change", "message"), [
    ({"num_hiddens": "128"}, "num_hiddens must be an integer, got '128' (str)"),
    ({"num_hiddens": True}, "num_hiddens must be an integer, got True (bool)"),
    ({"num_embeddings": 64.0}, "num_embeddings must be an integer, got 64.0 (float)"),
    ({"kmeans_init": 1}, "kmeans_init must be true or false, got 1 (int)"),
    ({"decay": "0.99"}, "decay must be a number, got '0.99' (str)"),
    ({"quantizer": ["ema"]}, "quantizer must be a string, got ['ema'] (list)"),
    ({"pixel_mean": ["0.5", 0.5, 0.5]}, "pixel_mean must be a list of numbers, got ['0.5', 0.5, 0.5]"),
    ({"pixel_std": 1.0}, "pixel_std must be a list of numbers, got 1.0"),
    ({"pixel_mean": [float("nan")] * 3}, "pixel_mean must be finite, got (nan, nan, nan)"),
    ({"epsilon": float("inf")}, "epsilon must be finite, got inf"),
    ({"num_hiddens": 20000}, "num_hiddens must be <= 4096, got 20000"),
    ({"num_residual_layers": 1000}, "num_residual_layers must be <= 64, got 1000"),
    ({"num_embeddings": 1 << 30}, f"num_embeddings must be <= {1 << 20}, got {1 << 30}"),
    ({"num_embeddings": 1 << 20, "embedding_dim": 4096},
     "the model would hold 8,593,384,068 numbers (parameters and buffers), more than the limit of 2,000,000,000"),
])
def test_config_types_and_sizes_are_refused_before_allocating(trained: Path, monkeypatch: pytest.MonkeyPatch,
                                                              change: dict, message: str) -> None:
    _edit_config(trained, lambda r: r["config"].update(change))
    built: list[VQVAEConfig] = []
    monkeypatch.setattr(checkpoint_module, "VQVAE", lambda config: built.append(config))  # must never run
    _refused(trained, r"config\.json: invalid config: " + re.escape(message))
    assert built == []


@pytest.mark.parametrize("config", [
    TINY, VQVAEConfig(), VQVAEConfig(downsample=16, quantizer="plain", num_residual_layers=0),
    VQVAEConfig(in_channels=1, num_hiddens=33, pixel_mean=(0.5,), pixel_std=(1.0,), downsample=8),
])
def test_parameter_count_matches_the_built_model(config: VQVAEConfig) -> None:
    with torch.device("meta"):
        state = VQVAE(config).state_dict()
    assert config.parameter_count() == sum(t.numel() for t in state.values())


def test_the_limits_refuse_a_huge_config_from_the_command_line_too() -> None:
    with pytest.raises(ValueError, match=r"num_hiddens must be <= 4096, got 20000"):
        VQVAEConfig(num_hiddens=20000)
    assert VQVAEConfig(num_hiddens=4096, downsample=16).parameter_count() <= MAX_PARAMETERS  # the maxima fit


def test_a_tensor_of_the_wrong_kind_is_refused(trained: Path) -> None:
    def to_float(state: dict[str, torch.Tensor]) -> None:
        state["quantizer.steps_since_used"] = state["quantizer.steps_since_used"].float()

    _rewrite_weights(trained, to_float)
    _refused(trained, r"model\.safetensors: tensor 'quantizer\.steps_since_used' has dtype F32, the model needs "
                      r"torch\.int64")


def test_verify_checkpoint_checks_without_building_the_model(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = checkpoint_module.VQVAE
    devices: list[str] = []

    def spy(config: VQVAEConfig) -> VQVAE:
        devices.append(torch.get_default_device().type)
        return real(config)

    monkeypatch.setattr(checkpoint_module, "VQVAE", spy)
    verify_checkpoint(trained)
    assert devices == ["meta"]  # shapes from a meta model: no parameter memory


@pytest.mark.parametrize(("damage", "pattern"), [
    (lambda p: (p / "config.json").write_text("{"), r"config\.json: not valid JSON"),
    (lambda p: (p / "model.safetensors").write_bytes(b"x" * 64), r"model\.safetensors: sha256 .* does not match"),
    (lambda p: _edit_config(p, lambda r: r["config"].update(embedding_dim=8)),
     r"model\.safetensors: tensor 'pre_vq_conv\.weight' has shape \(16, 32, 1, 1\), .* needs \(8, 32, 1, 1\)"),
    (lambda p: (p / "model.safetensors").unlink(), r"model\.safetensors: missing"),
])
def test_verify_checkpoint_finds_what_load_checkpoint_finds(trained: Path, damage, pattern: str) -> None:  # type: ignore[no-untyped-def]
    damage(trained)
    _refused(trained, pattern)


def test_truncated_weights_are_unreadable_for_verify_too(trained: Path) -> None:
    weights = trained / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _edit_config(trained, lambda r: r.update(weights_sha256=sha256_file(weights)))
    _refused(trained, r"model\.safetensors: unreadable safetensors file")
