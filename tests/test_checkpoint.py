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
    CodebookUsage,
    Metrics,
    Provenance,
    compute_model_id,
    load_checkpoint,
    read_checkpoint_record,
    save_checkpoint,
    sha256_file,
    verify_checkpoint,
)
from vqtok.model.config import MAX_PARAMETERS, CodebookTrainingConfig, NetworkConfig
from vqtok.model.evaluate import main as evaluate_main
from vqtok.model.record import FORMAT_VERSION, CheckpointRecord
from vqtok.model.vqvae import VQVAE

TINY = NetworkConfig(num_hiddens=16, num_residual_hiddens=8, embedding_dim=8, num_embeddings=32, downsample=8)
NETWORK_FIELDS = {f.name for f in dataclasses.fields(NetworkConfig)}
# The bundled default's identity, and the previous default's (model/weights/default-v1, the checkpoint whose
# record tests/fixtures/bundled-config-v1.json holds in the version-1 layout).
BUNDLED_MODEL_ID = "5874ffb39ce1111b8c2afb31bfddd5733d443b01531f789f6e5aeafbe2f5cd57"
PREVIOUS_DEFAULT = DEFAULT_CHECKPOINT.parent / "default-v1"
PREVIOUS_DEFAULT_MODEL_ID = "aafe8667c7495436a368ee62696220b30e700f62074df0aab930780084bdced5"
# The bundled f=8 model's identity, and the previous f8s' (bundled as f8-v2 and f8-v1 since 2026-12-01).
F8_MODEL_ID = "bcda907ed315c28dc21e1e7276b78dc1f172d7f249b14b5102526b60a86b27d5"
PREVIOUS_F8_MODEL_IDS = {"f8-v2": "1625e9b4e8a9d4d051ca02361d3273e56cb8d9e7f992e19f8c7e2ad570473c19",
                         "f8-v1": "32df55c53b85022d9e05f0a3c698e8fdd881a0252115cd0e653996da2c8ca5d1"}
# The bundled f=8 model with 4,096 codes (96% of them used on the held-out photographs, and a grid measure
# within 0.03 of the originals'), and the one before it (bundled as f8-k4096-v1 since 2026-12-02).
F8_K4096_MODEL_ID = "3f4699d79124814b2053ee37b8b9b2a390c22624aa9dd73d31101a17b51ee297"
PREVIOUS_F8_K4096_MODEL_ID = "72d29dc6c9466ad8b45eb10999afddcc1bfe0d0b8be2dc39d0e3c39e28234e81"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, VQVAE]:
    torch.manual_seed(0)
    model = VQVAE(TINY)
    path = save_checkpoint(tmp_path / "ckpt", model, Provenance(name="tiny", steps=7))
    return path, model


def _edit_config(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    record = json.loads((path / "config.json").read_text())
    edit(record)
    (path / "config.json").write_text(json.dumps(record))


def _edit_fields(path: Path, change: dict) -> None:
    """Overwrite config fields in a version-2 record, each in its section (network or codebook_training)."""
    def edit(record: dict) -> None:
        for name, value in change.items():
            record["network" if name in NETWORK_FIELDS else "codebook_training"][name] = value

    _edit_config(path, edit)


def test_round_trip_restores_every_tensor_and_the_record(saved: tuple[Path, VQVAE]) -> None:
    path, model = saved
    loaded = load_checkpoint(path, "cpu")
    assert loaded.network == TINY and loaded.codebook_training == CodebookTrainingConfig()
    assert loaded.name == "tiny" and loaded.record.provenance.steps == 7
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
    save_checkpoint(path, model, Provenance(name="second"))
    assert load_checkpoint(path).name == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_a_failed_write_keeps_the_previous_checkpoint(saved: tuple[Path, VQVAE], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path, model = saved

    def dies(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoint_module, "_write_json", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, Provenance(name="never"))
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


def test_unknown_config_key(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    _edit_config(path, lambda r: r["network"].update(colour_space="lab"))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid config: unknown config key\(s\): colour_space"):
        load_checkpoint(path)


def test_shape_mismatch_names_the_tensor(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    _edit_fields(path, {"num_embeddings": 64})
    expected = r"tensor 'quantizer\.steps_since_used' has shape \(32,\), .* needs \(64,\)"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


def test_missing_tensors_are_named(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    _edit_fields(path, {"num_residual_layers": 3})
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
    return save_checkpoint(tmp_path / "trained", loaded.model, Provenance(name=loaded.name))


def _record(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _rewrite_weights(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Change the tensors and re-record sha256 and model_id: a consistent checkpoint with bad weights."""
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights))
    config = NetworkConfig.from_dict(_record(path)["network"])
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
    assert record["model_id"] == loaded.model_id == compute_model_id(loaded.network, record["weights_sha256"])
    assert loaded.model_id != loaded.weights_sha256
    verify_checkpoint(trained)  # a good checkpoint passes


def test_model_id_covers_every_network_field_and_no_training_only_field(trained: Path) -> None:
    network = {f.name for f in dataclasses.fields(NetworkConfig)}
    training = {f.name for f in dataclasses.fields(CodebookTrainingConfig)}
    # the split kept every field of the one config it replaced, each in exactly one part
    assert network | training == {
        "in_channels", "num_hiddens", "num_residual_hiddens", "num_residual_layers", "embedding_dim",
        "num_embeddings", "quantizer", "downsample", "pixel_mean", "pixel_std",
        "commitment_cost", "decay", "epsilon", "dead_code_window", "dead_code_threshold", "kmeans_init", "kmeans_iters",
        # added with the VQGAN family and the new quantizers (hashed only when set, so old ids hold)
        "arch", "channel_multipliers", "num_res_blocks", "attention_levels", "mid_attention", "z_channels",
        "norm_groups", "code_dim", "l2_normalize", "fsq_levels", "kmeans_vectors_per_code",
        # the seed decoder's upsampling (hashed only when set)
        "upsample",
        # the codebook-usage (entropy) regulariser: training-only
        "entropy_weight", "entropy_temperature", "entropy_batch_weight", "entropy_sample",
    }
    assert not network & training
    base = compute_model_id(TINY, "0" * 64)
    assert compute_model_id(TINY, "1" * 64) != base
    token_changes = {
        "in_channels": {"in_channels": 1, "pixel_mean": [0.5], "pixel_std": [1.0]}, "num_hiddens": {"num_hiddens": 32},
        "num_residual_hiddens": {"num_residual_hiddens": 4}, "num_residual_layers": {"num_residual_layers": 1},
        "embedding_dim": {"embedding_dim": 4}, "num_embeddings": {"num_embeddings": 16},
        "quantizer": {"quantizer": "plain"}, "downsample": {"downsample": 4},
        "pixel_mean": {"pixel_mean": [0.4, 0.5, 0.5]}, "pixel_std": {"pixel_std": [1.0, 1.0, 0.5]},
    }
    # the later fields, each against a base where it matters: a VQGAN network, an FSQ quantizer
    vqgan = dataclasses.replace(TINY, arch="vqgan", num_hiddens=16, norm_groups=8, z_channels=16)
    fsq = dataclasses.replace(TINY, quantizer="fsq", fsq_levels=(4, 8), num_embeddings=32)
    later_changes = {
        "arch": (TINY, {"arch": "vqgan", "norm_groups": 8}), "code_dim": (TINY, {"code_dim": 4}),
        "l2_normalize": (TINY, {"l2_normalize": True}), "upsample": (TINY, {"upsample": "resize"}),
        "channel_multipliers": (vqgan, {"channel_multipliers": (1, 1, 2, 2)}),
        "num_res_blocks": (vqgan, {"num_res_blocks": 1}), "attention_levels": (vqgan, {"attention_levels": (3,)}),
        "mid_attention": (vqgan, {"mid_attention": False}), "z_channels": (vqgan, {"z_channels": 8}),
        "norm_groups": (vqgan, {"norm_groups": 4}), "fsq_levels": (fsq, {"fsq_levels": (8, 4)}),
    }
    assert set(token_changes) | set(later_changes) == network
    for name, change in token_changes.items():
        assert compute_model_id(dataclasses.replace(TINY, **change), "0" * 64) != base, name
    for name, (later_base, change) in later_changes.items():
        before_change = compute_model_id(later_base, "0" * 64)
        assert compute_model_id(dataclasses.replace(later_base, **change), "0" * 64) != before_change, name
    # lists and tuples, 1 and 1.0: the same config, the same id
    assert compute_model_id(NetworkConfig.from_dict({**TINY.to_dict(), "pixel_std": [1, 1, 1]}), "0" * 64) == base
    # every training-only field edited in a written checkpoint: the same id, and it still loads
    training_changes = {"commitment_cost": 0.5, "decay": 0.9, "epsilon": 1e-3, "dead_code_window": 5,
                        "dead_code_threshold": 0.5, "kmeans_init": True, "kmeans_iters": 3,
                        "kmeans_vectors_per_code": 20, "entropy_weight": 1e-3, "entropy_temperature": 0.5,
                        "entropy_batch_weight": 1.0, "entropy_sample": 64}
    assert set(training_changes) == training
    before = load_checkpoint(trained).model_id
    _edit_fields(trained, training_changes)
    after = load_checkpoint(trained)
    assert after.model_id == before and after.codebook_training == CodebookTrainingConfig(**training_changes)


def test_an_edited_pixel_mean_is_refused_as_a_changed_config(trained: Path) -> None:
    before = load_checkpoint(trained)
    _edit_fields(trained, {"pixel_mean": [0.4, 0.5, 0.5]})
    error = _refused(trained, r"config\.json: changed after the checkpoint was written: its model_id '[0-9a-f]{64}' "
                              r"no longer matches '[0-9a-f]{64}'")
    assert before.model_id in str(error)


def test_an_edited_training_only_field_keeps_the_model_id(trained: Path) -> None:
    before = load_checkpoint(trained).model_id
    _edit_fields(trained, {"decay": 0.9, "dead_code_window": 7})
    after = load_checkpoint(trained)
    assert after.model_id == before and after.codebook_training.decay == 0.9


def test_an_older_record_without_model_id_loads_and_computes_it(trained: Path) -> None:
    recorded = _record(trained)["model_id"]
    _edit_config(trained, lambda r: r.pop("model_id"))
    verify_checkpoint(trained)
    assert load_checkpoint(trained).model_id == recorded


def test_the_identity_is_computed_on_save_never_given(tmp_path: Path) -> None:
    model = VQVAE(TINY)
    first = save_checkpoint(tmp_path / "a", model, Provenance(name="a"))
    second = save_checkpoint(tmp_path / "b", model, Provenance(name="b", steps=3), Metrics({"psnr": 1.0}))
    record = _record(first)
    assert record["weights_sha256"] == sha256_file(first / "model.safetensors")
    assert record["model_id"] == load_checkpoint(first).model_id == _record(second)["model_id"]


@pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(), reason="no bundled checkpoint")
def test_the_bundled_checkpoint_records_its_model_id() -> None:
    verify_checkpoint(DEFAULT_CHECKPOINT)
    assert _record(DEFAULT_CHECKPOINT)["model_id"] == load_checkpoint(DEFAULT_CHECKPOINT).model_id == BUNDLED_MODEL_ID
    assert _record(DEFAULT_CHECKPOINT)["format_version"] == FORMAT_VERSION == 2


# ------------------------------------------------------------------------------------------------
# The record: version 2 written and read in one place (model.record), version-1 files still load.
# ------------------------------------------------------------------------------------------------


def test_a_record_round_trips_through_json(saved: tuple[Path, VQVAE]) -> None:
    path, model = saved
    usage = CodebookUsage.from_counts([3, 0, 1] + [0] * 29)
    heldout = {"mse": 0.01, "psnr": 20.0, "perplexity": 2.5, "codes_used": 2}
    save_checkpoint(path, model, Provenance(name="tiny", steps=7, data={"kind": "photos"}), Metrics(heldout), usage)
    record = read_checkpoint_record(path)
    assert CheckpointRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.codebook_usage == usage and usage.codes_used == 2 and 1.0 < (usage.perplexity or 0) < 2.0
    assert record.metrics.heldout_perplexity == 2.5 and record.provenance.data == {"kind": "photos"}
    assert set(_record(path)) == set(CheckpointRecord.KEYS)  # nothing merged into the top level


@pytest.mark.skipif(not (PREVIOUS_DEFAULT / "model.safetensors").is_file(), reason="no bundled default-v1")
def test_a_version_1_record_loads_with_the_same_identity_and_fields(tmp_path: Path) -> None:
    """tests/fixtures/bundled-config-v1.json is default-v1's config.json (the default until 2026-12) as written
    in the version-1 layout (flat: one config object, the trainer's metadata in the top level, usage as a bare
    list)."""
    old = tmp_path / "v1"
    old.mkdir()
    shutil.copy(PREVIOUS_DEFAULT / "model.safetensors", old / "model.safetensors")
    shutil.copy(FIXTURES / "bundled-config-v1.json", old / "config.json")
    verify_checkpoint(old)
    loaded, bundled = load_checkpoint(old), load_checkpoint(PREVIOUS_DEFAULT)
    assert loaded.record.format_version == 1 and loaded.model_id == PREVIOUS_DEFAULT_MODEL_ID
    assert dataclasses.replace(loaded.record, format_version=2) == bundled.record  # the same record, read from v1
    assert loaded.name == "vqtok-default-f4" and loaded.record.provenance.steps == 8000
    assert loaded.record.codebook_usage is not None and loaded.record.codebook_usage.codes_used == 502
    # saving it again writes version 2, with the same model_id
    again = save_checkpoint(tmp_path / "again", loaded.model, loaded.record.provenance, loaded.record.metrics,
                            loaded.record.codebook_usage)
    assert _record(again)["format_version"] == 2 and load_checkpoint(again).model_id == PREVIOUS_DEFAULT_MODEL_ID


def test_version_1_keeps_its_errors_and_drops_unknown_metadata(saved: tuple[Path, VQVAE]) -> None:
    path, _ = saved
    record = _record(path)
    flat = {"format": "vqtok-checkpoint", "format_version": 1,
            "config": {**record["network"], **record["codebook_training"]}, "weights_file": record["weights_file"],
            "weights_sha256": record["weights_sha256"], "model_id": record["model_id"], "name": "old", "steps": 5,
            "metrics": {}, "codebook_usage": None, "notes": "never read"}
    (path / "config.json").write_text(json.dumps(flat))
    loaded = load_checkpoint(path)
    assert loaded.name == "old" and loaded.record.metrics == Metrics() and loaded.record.codebook_usage is None
    _edit_config(path, lambda r: r["config"].update(colour_space="lab", decay="0.99"))
    _refused(path, r"config\.json: invalid config: unknown config key\(s\): colour_space")
    _edit_config(path, lambda r: r["config"].pop("colour_space"))
    _refused(path, r"config\.json: invalid config: decay must be a number, got '0\.99' \(str\)")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r.update(format_version=3), "format_version 3 is not supported (this vqtok reads 1 and 2)"),
    (lambda r: r.update(format_version=True), "format_version True is not supported"),
    (lambda r: r.update(config={}), "unknown key(s) in the record: config"),
    (lambda r: r["provenance"].update(steps="7"), "'provenance.steps' must be an integer >= 0 or null, got '7'"),
    (lambda r: r["provenance"].update(colour="red"), "unknown key(s) in 'provenance': colour"),
    (lambda r: r.update(codebook_usage={"counts": [1, 2]}),
     "'codebook_usage.counts' has 2 entries, the network has 32 codes"),
    (lambda r: r.update(codebook_usage={"counts": [-1] * 32}), "'codebook_usage.counts' must be a list of integers"),
    (lambda r: r.update(metrics={"heldout_crops": {"psnr": "high"}}),
     "'metrics.heldout_crops.psnr' must be a number, got 'high'"),
    (lambda r: r.update(weights_sha256=None), "'weights_sha256' must be a string"),
    (lambda r: r.pop("network"), "'network' must be an object, got None"),
    (lambda r: r["codebook_training"].update(dead_code_threshold=1.0) or r["network"].update(quantizer="plain"),
     "invalid config: dead_code_threshold needs the 'ema' quantizer"),
])
def test_a_malformed_record_is_refused_naming_the_key(saved: tuple[Path, VQVAE], edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved
    _edit_config(path, edit)
    _refused(path, r"config\.json: " + re.escape(message))


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
    assert load_checkpoint(trained).network.num_embeddings == 64


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
    _edit_fields(trained, change)
    built: list[tuple] = []
    monkeypatch.setattr(checkpoint_module, "VQVAE", lambda *configs: built.append(configs))  # must never run
    _refused(trained, r"config\.json: invalid config: " + re.escape(message))
    assert built == []


@pytest.mark.parametrize("config", [
    TINY, NetworkConfig(), NetworkConfig(downsample=16, quantizer="plain", num_residual_layers=0),
    NetworkConfig(in_channels=1, num_hiddens=33, pixel_mean=(0.5,), pixel_std=(1.0,), downsample=8),
])
def test_parameter_count_matches_the_built_model(config: NetworkConfig) -> None:
    with torch.device("meta"):
        state = VQVAE(config).state_dict()
    assert config.parameter_count() == sum(t.numel() for t in state.values())


def test_the_limits_refuse_a_huge_config_from_the_command_line_too() -> None:
    with pytest.raises(ValueError, match=r"num_hiddens must be <= 4096, got 20000"):
        NetworkConfig(num_hiddens=20000)
    with pytest.raises(ValueError, match=r"kmeans_iters must be <= 1000, got 5000"):
        CodebookTrainingConfig(kmeans_iters=5000)
    assert NetworkConfig(num_hiddens=4096, downsample=16).parameter_count() <= MAX_PARAMETERS  # the maxima fit


def test_a_tensor_of_the_wrong_kind_is_refused(trained: Path) -> None:
    def to_float(state: dict[str, torch.Tensor]) -> None:
        state["quantizer.steps_since_used"] = state["quantizer.steps_since_used"].float()

    _rewrite_weights(trained, to_float)
    _refused(trained, r"model\.safetensors: tensor 'quantizer\.steps_since_used' has dtype F32, the model needs "
                      r"torch\.int64")


def test_verify_checkpoint_checks_without_building_the_model(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = checkpoint_module.VQVAE
    devices: list[str] = []

    def spy(*configs: NetworkConfig | CodebookTrainingConfig) -> VQVAE:
        devices.append(torch.get_default_device().type)
        return real(*configs)

    monkeypatch.setattr(checkpoint_module, "VQVAE", spy)
    verify_checkpoint(trained)
    assert devices == ["meta"]  # shapes from a meta model: no parameter memory


@pytest.mark.parametrize(("damage", "pattern"), [
    (lambda p: (p / "config.json").write_text("{"), r"config\.json: not valid JSON"),
    (lambda p: (p / "model.safetensors").write_bytes(b"x" * 64), r"model\.safetensors: sha256 .* does not match"),
    (lambda p: _edit_fields(p, {"embedding_dim": 8}),
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


def test_bundled_checkpoints_load_by_name_and_an_existing_directory_wins(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from vqtok.model.weights import bundled_checkpoints, resolve_checkpoint

    assert bundled_checkpoints()["default"] == DEFAULT_CHECKPOINT
    assert resolve_checkpoint("default") == DEFAULT_CHECKPOINT
    assert load_checkpoint("default").model_id == BUNDLED_MODEL_ID
    # the previous default stays bundled (its token sets decode with it); a former name still resolves
    assert load_checkpoint("default-v1").model_id == PREVIOUS_DEFAULT_MODEL_ID
    assert resolve_checkpoint("f4-photos-v1") == DEFAULT_CHECKPOINT
    f8 = load_checkpoint("f8")
    assert f8.model_id == F8_MODEL_ID
    for name, model_id in PREVIOUS_F8_MODEL_IDS.items():
        previous_f8 = load_checkpoint(name)
        assert previous_f8.model_id == model_id
        assert f8.network == previous_f8.network  # the same network and K: only the weights differ
    assert (f8.network.downsample, f8.network.num_embeddings) == (8, 8192)
    f8_k4096 = load_checkpoint("f8-k4096")
    assert f8_k4096.model_id == F8_K4096_MODEL_ID
    assert (f8_k4096.network.downsample, f8_k4096.network.num_embeddings) == (8, 4096)
    previous_f8_k4096 = load_checkpoint("f8-k4096-v1")
    assert previous_f8_k4096.model_id == PREVIOUS_F8_K4096_MODEL_ID
    assert previous_f8_k4096.network == f8_k4096.network
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    assert resolve_checkpoint("default") == Path("default")  # a folder of that name in the way is used as given
    with pytest.raises(CheckpointError, match=r"default/config\.json: missing"):
        load_checkpoint("default")
    with pytest.raises(CheckpointError, match="checkpoint directory not found: no-such-model"):
        load_checkpoint("no-such-model")
