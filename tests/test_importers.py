"""``vqtok import`` (model/importers): published checkpoint formats -> served vqtok checkpoints.

The state dicts here are built from the published key names and shapes (written out below from the original
projects' module structure, small sizes), never from the original code: scripts/check_import_equivalence.py
proves equivalence against the original code itself. Also: a pickle that would run code is refused and nothing
runs; mismatched keys are named; the CLI's errors.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import service_settings, wait_until_loaded
from vqtok.model.checkpoint import load_checkpoint, sha256_file
from vqtok.model.importers import (
    CONVERSION_VERSION,
    CheckpointImportError,
    ImportConfig,
    UnsafeCheckpointError,
    import_checkpoint,
    load_untrusted,
)
from vqtok.model.importers.config_file import parse_yaml_subset
from vqtok.model.importers.safe_load import state_dict_from

TensorShapes = dict[str, tuple[int, ...]]


# ------------------------------------------------------------------------------ published key names and shapes


def _resnet(prefix: str, c_in: int, c_out: int) -> TensorShapes:
    shapes = {f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
              f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
              f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
              f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,)}
    if c_in != c_out:
        shapes |= {f"{prefix}.nin_shortcut.weight": (c_out, c_in, 1, 1), f"{prefix}.nin_shortcut.bias": (c_out,)}
    return shapes


def _attn(prefix: str, c: int) -> TensorShapes:
    shapes = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        shapes |= {f"{prefix}.{name}.weight": (c, c, 1, 1), f"{prefix}.{name}.bias": (c,)}
    return shapes


def _conv(prefix: str, c_out: int, c_in: int, k: int) -> TensorShapes:
    return {f"{prefix}.weight": (c_out, c_in, k, k), f"{prefix}.bias": (c_out,)}


def published_shapes(style: str, ch: int, ch_mult: tuple[int, ...], z: int, d: int, k: int,
                     attention: tuple[int, ...], blocks: int = 2) -> TensorShapes:
    """The state dict's names and shapes as taming's (and Chameleon's) ``VQModel`` or LlamaGen's ``VQModel``
    name them (``style`` "taming" or "llamagen"); ``attention``: the levels with attention blocks."""
    levels = len(ch_mult)
    in_mult = (1, *ch_mult)
    llamagen = style == "llamagen"
    mid_names = ("0", "1", "2") if llamagen else ("block_1", "attn_1", "block_2")
    shapes: TensorShapes = _conv("encoder.conv_in", ch, 3, 3)
    block_in = ch
    for i in range(levels):
        level = f"encoder.conv_blocks.{i}" if llamagen else f"encoder.down.{i}"
        block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
        for j in range(blocks):
            shapes |= _resnet(f"{level}.{'res' if llamagen else 'block'}.{j}", block_in, block_out)
            block_in = block_out
            if i in attention:
                shapes |= _attn(f"{level}.attn.{j}", block_in)
        if i != levels - 1:
            shapes |= _conv(f"{level}.downsample.conv", block_in, block_in, 3)
    shapes |= _resnet(f"encoder.mid.{mid_names[0]}", block_in, block_in) | _attn(f"encoder.mid.{mid_names[1]}",
                                                                                  block_in)
    shapes |= _resnet(f"encoder.mid.{mid_names[2]}", block_in, block_in)
    shapes |= {"encoder.norm_out.weight": (block_in,), "encoder.norm_out.bias": (block_in,)}
    shapes |= _conv("encoder.conv_out", z, block_in, 3)
    block_in = ch * ch_mult[-1]
    shapes |= _conv("decoder.conv_in", block_in, z, 3)
    shapes |= _resnet(f"decoder.mid.{mid_names[0]}", block_in, block_in) | _attn(f"decoder.mid.{mid_names[1]}",
                                                                                  block_in)
    shapes |= _resnet(f"decoder.mid.{mid_names[2]}", block_in, block_in)
    for position, i in enumerate(reversed(range(levels))):  # LlamaGen lists levels lowest resolution first
        level = f"decoder.conv_blocks.{position}" if llamagen else f"decoder.up.{i}"
        block_out = ch * ch_mult[i]
        for j in range(blocks + 1):
            shapes |= _resnet(f"{level}.{'res' if llamagen else 'block'}.{j}", block_in, block_out)
            block_in = block_out
            if i in attention:
                shapes |= _attn(f"{level}.attn.{j}", block_in)
        if i != 0:
            shapes |= _conv(f"{level}.upsample.conv", block_in, block_in, 3)
    shapes |= {"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,)}
    shapes |= _conv("decoder.conv_out", 3, block_in, 3)
    shapes |= _conv("quant_conv", d, z, 1) | _conv("post_quant_conv", z, d, 1)
    shapes["quantize.embedding.weight"] = (k, d)
    if llamagen:
        shapes["quantize.codebook_used"] = (65536,)
    return shapes


def random_state(shapes: TensorShapes, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith(".weight") and len(shape) == 1:  # GroupNorm scales
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name == "quantize.embedding.weight":
            state[name] = torch.randn(shape, generator=generator)
        else:
            state[name] = 0.05 * torch.randn(shape, generator=generator)
    return state


# Small sizes: base channels 32 (GroupNorm's 32 groups), f = 8, K = 64.
SMALL = {"ch": 32, "ch_mult": (1, 2, 2, 4), "z": 32, "d": 8, "k": 64}

TAMING_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {d}
    n_embed: {k}
    ddconfig:
      double_z: false
      z_channels: 32
      resolution: 64
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult:
      - 1
      - 2
      - 2
      - 4
      num_res_blocks: 2
      attn_resolutions: [8]  # level 3 at 64 px
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_start: 250001
"""


class FakeCallback:
    """A Lightning callback class: real .ckpt files key callback state by such classes (read as an inert stub)."""


def lightning_file(path: Path, state: dict[str, torch.Tensor]) -> Path:
    training = {"loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}
    torch.save({"epoch": 1, "global_step": 10, "state_dict": {**state, **training},
                "callbacks": {FakeCallback: {"best_model_score": torch.tensor(0.1)}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
                "hyper_parameters": {"argv": argparse.Namespace(base="x")}}, path)
    return path


def _images(batch: int, side: int) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ------------------------------------------------------------------------------------------------ importers


def test_llamagen_round_trips_to_a_served_checkpoint(tmp_path: Path) -> None:
    shapes = published_shapes("llamagen", SMALL["ch"], SMALL["ch_mult"], SMALL["z"], SMALL["d"], SMALL["k"],
                              attention=(3,))
    state = random_state(shapes)
    weights = tmp_path / "vq_ds8_c2i.pt"
    torch.save({"model": state, "steps": 5, "args": argparse.Namespace(vq_model="VQ-8")}, weights)

    path, result = import_checkpoint(ImportConfig(source="llamagen", weights=weights, out=tmp_path / "out"))
    loaded = load_checkpoint(path, torch.device("cpu"))
    network = loaded.network
    assert (network.arch, network.quantizer, network.l2_normalize) == ("vqgan", "plain", True)
    assert (network.downsample, network.num_embeddings, network.embedding_dim) == (8, 64, 8)
    assert network.channel_multipliers == (1, 2, 2, 4) and network.attention_levels == (3,) and network.mid_attention
    assert network.pixel_mean == (0.5,) * 3 and network.pixel_std == (0.5,) * 3
    ours = loaded.model.state_dict()
    # LlamaGen's decoder lists levels lowest resolution first: conv_blocks.0 is level 3; mid.1 is attn_1.
    assert torch.equal(ours["decoder.up.3.block.0.conv1.weight"], state["decoder.conv_blocks.0.res.0.conv1.weight"])
    assert torch.equal(ours["decoder.up.1.upsample.conv.weight"], state["decoder.conv_blocks.2.upsample.conv.weight"])
    assert torch.equal(ours["encoder.mid.attn_1.q.weight"], state["encoder.mid.1.q.weight"])
    assert torch.equal(ours["encoder.down.3.attn.1.v.weight"], state["encoder.conv_blocks.3.attn.1.v.weight"])
    assert torch.equal(ours["quantizer.embedding"], state["quantize.embedding.weight"])
    assert torch.equal(ours["pre_vq_conv.weight"], state["quant_conv.weight"])
    assert result.ignored == ("quantize.codebook_used",)

    record = loaded.record
    assert record.imported_from is not None and record.serving is not None
    assert record.imported_from.source_format == "llamagen"
    assert record.imported_from.weights_file == "vq_ds8_c2i.pt"
    assert record.imported_from.weights_sha256 == sha256_file(weights)
    assert record.imported_from.conversion_version == CONVERSION_VERSION
    assert record.imported_from.state_dict_key == "model"
    assert (record.serving.size, record.serving.fit, record.serving.layout) == (256, "crop", "flat")

    with torch.no_grad():
        indices = loaded.model.encode(_images(2, 32))
        assert indices.shape == (2, 4, 4) and int(indices.max()) < 64
        assert loaded.model.decode(indices).shape == (2, 3, 32, 32)


def test_taming_lightning_checkpoint_with_config(tmp_path: Path) -> None:
    shapes = published_shapes("taming", SMALL["ch"], SMALL["ch_mult"], SMALL["z"], SMALL["d"], SMALL["k"],
                              attention=(3,))
    state = random_state(shapes, seed=2)
    weights = lightning_file(tmp_path / "last.ckpt", state)
    config = tmp_path / "model.yaml"
    config.write_text(TAMING_YAML.format(d=SMALL["d"], k=SMALL["k"]), encoding="utf-8")

    path, result = import_checkpoint(ImportConfig(source="taming", weights=weights, config=config,
                                                  out=tmp_path / "taming", name="taming-test"))
    loaded = load_checkpoint(path, torch.device("cpu"))
    assert loaded.name == "taming-test"
    assert loaded.network.l2_normalize is False and loaded.network.attention_levels == (3,)
    assert result.ignored == ("loss.discriminator.main.0.weight",)
    ours = loaded.model.state_dict()
    assert torch.equal(ours["decoder.up.2.block.2.norm2.bias"], state["decoder.up.2.block.2.norm2.bias"])
    assert torch.equal(ours["post_vq_conv.weight"], state["post_quant_conv.weight"])
    record = loaded.record
    assert record.imported_from is not None and record.serving is not None
    assert record.imported_from.config_file == "model.yaml"
    assert record.imported_from.config_sha256 == sha256_file(config)
    assert record.imported_from.state_dict_key == "state_dict"
    assert (record.serving.size, record.serving.fit, record.serving.layout) == (64, "crop", "flat")  # resolution
    with torch.no_grad():
        indices = loaded.model.encode(_images(1, 64))
        assert indices.shape == (1, 8, 8)
        assert loaded.model.decode(indices).shape == (1, 3, 64, 64)
    # The same file without the config: the architecture read from the shapes, the source's default size.
    again, _ = import_checkpoint(ImportConfig(source="taming", weights=weights, out=tmp_path / "shapes"))
    reloaded = load_checkpoint(again, torch.device("cpu"))
    assert reloaded.network == loaded.network and reloaded.model_id == loaded.model_id
    assert reloaded.record.serving is not None and reloaded.record.serving.size == 256


def test_chameleon_defaults_and_overrides(tmp_path: Path) -> None:
    shapes = published_shapes("taming", SMALL["ch"], (1, 1, 2, 2, 4), SMALL["z"], SMALL["d"], SMALL["k"],
                              attention=())
    weights = lightning_file(tmp_path / "vqgan.ckpt", random_state(shapes, seed=3))
    path, _ = import_checkpoint(ImportConfig(source="chameleon", weights=weights, out=tmp_path / "chameleon"))
    loaded = load_checkpoint(path, torch.device("cpu"))
    assert loaded.network.downsample == 16 and loaded.network.attention_levels == ()
    assert loaded.record.serving is not None
    assert (loaded.record.serving.size, loaded.record.serving.fit, loaded.record.serving.layout) == (
        512, "crop", "chameleon-like")
    with torch.no_grad():
        assert loaded.model.encode(_images(1, 32)).shape == (1, 2, 2)
    path, _ = import_checkpoint(ImportConfig(source="chameleon", weights=weights, out=tmp_path / "lumina",
                                             layout="lumina-like", size=256, fit="resize"))
    serving = load_checkpoint(path, torch.device("cpu")).record.serving
    assert serving is not None and (serving.size, serving.fit, serving.layout) == (256, "resize", "lumina-like")


def test_janus_prefix_selects_the_vq_model(tmp_path: Path) -> None:
    shapes = published_shapes("llamagen", SMALL["ch"], SMALL["ch_mult"], SMALL["z"], SMALL["d"], SMALL["k"],
                              attention=(3,))
    state = {f"gen_vision_model.{k}": v for k, v in random_state(shapes).items()}
    state["language_model.embed.weight"] = torch.zeros(4, 4)
    weights = tmp_path / "janus.pt"
    torch.save(state, weights)
    with pytest.raises(CheckpointImportError, match=r"encoder\.conv_in\.weight"):
        import_checkpoint(ImportConfig(source="llamagen", weights=weights, out=tmp_path / "no-prefix"))
    path, _ = import_checkpoint(ImportConfig(source="llamagen", weights=weights, out=tmp_path / "janus",
                                             prefix="gen_vision_model."))
    record = load_checkpoint(path, torch.device("cpu")).record
    assert record.imported_from is not None and record.imported_from.state_dict_key == "gen_vision_model."


# ------------------------------------------------------------------------------------------- refusals


class RunsCode:
    """Unpickling this would run ``touch <marker>`` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


class EvalsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load's note on the plain pickle
@pytest.mark.parametrize("payload", [RunsCode, EvalsCode])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    state = random_state(published_shapes("llamagen", 32, (1, 2, 2, 4), 32, 8, 64, attention=(3,)))
    weights = tmp_path / "evil.pt"
    torch.save({"model": state, "args": payload(marker)}, weights)  # the code sits outside the state dict
    with pytest.raises(UnsafeCheckpointError, match=r"refused: the file names (posix|os|nt)\.system|builtins\.eval"):
        load_untrusted(weights)
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        import_checkpoint(ImportConfig(source="llamagen", weights=weights, out=tmp_path / "out"))
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "out").exists()

    plain = tmp_path / "evil.pkl"  # a plain pickle (not a torch.save zip archive)
    plain.write_bytes(pickle.dumps({"model": payload(marker)}))
    with pytest.raises(UnsafeCheckpointError, match="not a zip archive"):
        load_untrusted(plain)
    assert not marker.exists(), "the pickle's code ran"


def test_unknown_objects_are_inert_outside_the_state_dict_and_refused_inside(tmp_path: Path) -> None:
    weights = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2), "b": FakeCallback()}, "callbacks": {FakeCallback: 1}}, weights)
    obj = load_untrusted(weights)
    assert torch.equal(obj["state_dict"]["a"], torch.ones(2))
    stub = type(obj["state_dict"]["b"]).__name__
    assert stub.startswith("Stub[") and stub.endswith("test_importers.FakeCallback]")
    with pytest.raises(UnsafeCheckpointError, match=r"non-tensor entries .*: b"):
        state_dict_from(obj, str(weights))


def test_mismatched_state_dicts_name_the_keys_and_write_nothing(tmp_path: Path) -> None:
    state = random_state(published_shapes("taming", 32, (1, 2, 2, 4), 32, 8, 64, attention=(3,)))
    del state["decoder.up.0.block.2.conv2.bias"]
    state["decoder.up.0.block.9.conv2.bias"] = torch.zeros(32)
    state["encoder.mid.block_1.conv1.weight"] = torch.zeros(128, 128, 1, 1)
    weights = lightning_file(tmp_path / "bad.ckpt", state)
    with pytest.raises(CheckpointImportError) as error:
        import_checkpoint(ImportConfig(source="taming", weights=weights, out=tmp_path / "out"))
    message = str(error.value)
    assert "missing keys (1): decoder.up.0.block.2.conv2.bias" in message
    assert "unexpected keys (1): decoder.up.0.block.9.conv2.bias" in message
    assert "mis-shaped keys (1): encoder.mid.block_1.conv1.weight (128, 128, 1, 1) (expected (128, 128, 3, 3))" \
        in message
    assert not (tmp_path / "out").exists()


def test_config_and_weights_that_disagree_are_named(tmp_path: Path) -> None:
    state = random_state(published_shapes("taming", 32, (1, 2, 2, 4), 32, 8, 64, attention=(3,)))
    weights = lightning_file(tmp_path / "last.ckpt", state)
    config = tmp_path / "model.yaml"
    config.write_text(TAMING_YAML.format(d=8, k=1024), encoding="utf-8")
    with pytest.raises(CheckpointImportError, match="num_embeddings: config 1024, weights 64"):
        import_checkpoint(ImportConfig(source="taming", weights=weights, config=config, out=tmp_path / "out"))


def test_gumbel_quantization_is_refused_clearly(tmp_path: Path) -> None:
    state = random_state(published_shapes("taming", 32, (1, 2, 2, 4), 32, 8, 64, attention=(3,)))
    state["quantize.proj.weight"] = state.pop("quantize.embedding.weight")
    weights = lightning_file(tmp_path / "gumbel.ckpt", state)
    with pytest.raises(CheckpointImportError, match=r"Gumbel quantization .* not supported"):
        import_checkpoint(ImportConfig(source="taming", weights=weights, out=tmp_path / "out"))


def test_cli_errors_are_one_line_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vqtok.service.cli import main as vqtok

    missing = tmp_path / "nope.pt"
    assert vqtok(["import", "--from", "llamagen", "--weights", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"vqtok import: error: weights file not found: {missing}"
    with pytest.raises(SystemExit):
        vqtok(["import", "--from", "dall-e", "--weights", str(missing), "--out", str(tmp_path / "o")])
    assert "invalid choice: 'dall-e'" in capsys.readouterr().err


def test_yaml_subset_reads_configs_as_pyyaml_does() -> None:
    yaml = pytest.importorskip("yaml")
    text = TAMING_YAML.format(d=8, k=64) + "extra:\n  - name: a\n    value: 1e-4\n  - 'quoted: #x'\n  - null\n"
    assert parse_yaml_subset(text) == yaml.safe_load(text)
    with pytest.raises(ValueError, match="beyond the supported subset"):
        parse_yaml_subset("a: &anchor 1\n")


# ------------------------------------------------------------------------------------------------ serving


@pytest.mark.asyncio
async def test_encode_without_size_uses_the_native_size_and_fit(tmp_path: Path) -> None:
    import contextlib

    import httpx

    from vqtok.service.app import create_app

    shapes = published_shapes("taming", 32, (1, 2, 2, 4), 32, 8, 64, attention=())
    weights = lightning_file(tmp_path / "vqgan.ckpt", random_state(shapes))
    path, _ = import_checkpoint(ImportConfig(source="chameleon", weights=weights, out=tmp_path / "chameleon",
                                             size=64))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()

    @contextlib.asynccontextmanager
    async def service(**overrides: object):  # type: ignore[no-untyped-def]
        app = create_app(service_settings(path, warmup=False, **overrides))
        async with app.router.lifespan_context(app):
            await wait_until_loaded(app)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://vqtok.test") as client:
                yield client

    async with service() as client:
        body = (await client.post("/encode", content=png, headers={"content-type": "image/png"})).json()
        assert body["size_from"] == "checkpoint" and body["fit"] == "crop"
        assert body["layout"] == "chameleon-like"  # the record's layout is the default
        assert body["images"][0]["encoded_size"] == {"width": 64, "height": 64} and body["images"][0]["grid"] == [8, 8]
        response = await client.post("/encode", params={"fit": "pad"}, content=png,
                                     headers={"content-type": "image/png"})
        body = response.json()
        assert (body["size_from"], body["fit"]) == ("checkpoint", "pad")
        body = (await client.post("/encode", params={"size": "32"}, content=png,
                                  headers={"content-type": "image/png"})).json()
        assert (body["size_from"], body["fit"], body["images"][0]["grid"]) == ("request", "pad", [4, 4])
    async with service(default_size="48x32", layout="flat") as client:  # the service setting beats the record
        body = (await client.post("/encode", content=png, headers={"content-type": "image/png"})).json()
        assert (body["size_from"], body["fit"], body["images"][0]["grid"]) == ("default_size", "pad", [4, 6])
        assert body.get("layout") is None
    info = json.loads((path / "config.json").read_text())
    assert info["serving"] == {"size": 64, "fit": "crop", "layout": "chameleon-like"}
