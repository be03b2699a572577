"""The VQGAN-family encoder and decoder: shapes, distinct blocks, no transposed convs, gradients, key names, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from vqtok.model.networks.vqgan import AttnBlock, ResnetBlock, VQGANDecoder, VQGANEncoder

# Small widths so the tests stay fast; norm_groups=8 divides every width below.
F8 = {"channels": 16, "channel_multipliers": (1, 2, 2, 4), "num_res_blocks": 1, "z_channels": 8, "norm_groups": 8}
F16 = {"channels": 16, "channel_multipliers": (1, 1, 2, 2, 4), "num_res_blocks": 2, "z_channels": 8, "norm_groups": 8}


def build_pair(
    arguments: dict[str, Any], attention_levels: tuple[int, ...], mid_attention: bool
) -> tuple[VQGANEncoder, VQGANDecoder]:
    common = {**arguments, "attention_levels": attention_levels, "mid_attention": mid_attention}
    return VQGANEncoder(in_channels=3, **common), VQGANDecoder(out_channels=3, **common)


@pytest.mark.parametrize(
    ("arguments", "factor", "height", "width"),
    [(F8, 8, 48, 80), (F8, 8, 32, 32), (F16, 16, 48, 80), (F16, 16, 16, 32)],
    ids=["f8-48x80", "f8-32x32", "f16-48x80", "f16-16x32"],
)
@pytest.mark.parametrize(
    ("attention_levels", "mid_attention"),
    # Levels as offsets from the last level (0 = last, as published), resolved per network depth below.
    [((), False), ((), True), ((0,), True), ((0, 1), False)],
    ids=["no-attention", "mid-only", "last-and-mid", "last-two"],
)
def test_output_shapes(
    arguments: dict[str, Any],
    factor: int,
    height: int,
    width: int,
    attention_levels: tuple[int, ...],
    mid_attention: bool,
) -> None:
    last = len(arguments["channel_multipliers"]) - 1
    levels = tuple(last - offset for offset in attention_levels)
    encoder, decoder = build_pair(arguments, levels, mid_attention)
    assert encoder.downsample_factor == decoder.upsample_factor == factor
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        latents = encoder(images)
        assert latents.shape == (2, arguments["z_channels"], height // factor, width // factor)
        assert decoder(latents).shape == (2, 3, height, width)


def test_attention_blocks_sit_where_asked() -> None:
    encoder, decoder = build_pair(F8, attention_levels=(1, 3), mid_attention=False)
    for network, blocks_per_level in ((encoder, 1), (decoder, 2)):
        levels = network.down if network is encoder else network.up
        assert [len(level.attn) for level in levels] == [0, blocks_per_level, 0, blocks_per_level]
        assert [len(level.block) for level in levels] == [blocks_per_level] * 4
        assert isinstance(network.mid.attn_1, nn.Identity)
    _, with_mid = build_pair(F8, attention_levels=(), mid_attention=True)
    assert isinstance(with_mid.mid.attn_1, AttnBlock)


def test_every_block_has_its_own_parameters() -> None:
    encoder, decoder = build_pair(F16, attention_levels=(4,), mid_attention=True)
    for network in (encoder, decoder):
        blocks = [module for module in network.modules() if isinstance(module, (ResnetBlock, AttnBlock))]
        assert len({id(block) for block in blocks}) == len(blocks)
        parameter_ids = [id(parameter) for block in blocks for parameter in block.parameters()]
        assert len(set(parameter_ids)) == len(parameter_ids)


def test_no_transposed_convolutions() -> None:
    encoder, decoder = build_pair(F16, attention_levels=(4,), mid_attention=True)
    for network in (encoder, decoder):
        assert not any(isinstance(module, nn.ConvTranspose2d) for module in network.modules())


def test_gradients_reach_the_encoder_input_convolution_through_the_decoder() -> None:
    encoder, decoder = build_pair(F8, attention_levels=(3,), mid_attention=True)
    images = torch.randn(2, 3, 32, 32)
    loss = (decoder(encoder(images)) - images).pow(2).mean()
    loss.backward()
    assert encoder.conv_in.weight.grad is not None
    assert encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(parameter.grad is not None for parameter in [*encoder.parameters(), *decoder.parameters()])


def test_state_dict_keys_follow_the_published_names() -> None:
    encoder, decoder = build_pair(F8, attention_levels=(3,), mid_attention=True)
    encoder_keys, decoder_keys = set(encoder.state_dict()), set(decoder.state_dict())
    for key in (
        "conv_in.weight",
        "down.0.block.0.norm1.weight",
        "down.0.block.0.conv1.weight",
        "down.0.block.0.norm2.bias",
        "down.0.block.0.conv2.weight",
        "down.1.block.0.nin_shortcut.weight",  # 16 -> 32 channels
        "down.0.downsample.conv.weight",
        "down.3.attn.0.q.weight",
        "down.3.attn.0.proj_out.weight",
        "mid.block_1.norm1.weight",
        "mid.attn_1.q.weight",
        "mid.attn_1.k.weight",
        "mid.attn_1.v.weight",
        "mid.attn_1.norm.weight",
        "mid.block_2.conv2.weight",
        "norm_out.weight",
        "conv_out.weight",
    ):
        assert key in encoder_keys, key
    for key in (
        "conv_in.weight",
        "mid.attn_1.q.weight",
        "up.3.upsample.conv.weight",
        "up.1.upsample.conv.weight",
        "up.3.block.1.conv1.weight",  # num_res_blocks + 1 = 2 blocks per decoder level
        "up.3.attn.1.v.weight",
        "up.2.block.0.nin_shortcut.weight",  # 64 -> 32 channels
        "norm_out.bias",
        "conv_out.weight",
    ):
        assert key in decoder_keys, key
    # No resampler at the encoder's last level or at the decoder's level 0; no shortcut where widths agree.
    assert not any(key.startswith(("down.3.downsample", "up.0.upsample")) for key in encoder_keys | decoder_keys)
    assert not any("down.0.block.0.nin_shortcut" in key for key in encoder_keys)
    # The decoder's up[i] is level i: up.0 works at the widest resolution with `channels` features.
    assert decoder.state_dict()["up.0.block.0.conv2.weight"].shape[0] == F8["channels"]
    assert decoder.state_dict()["up.3.block.0.conv1.weight"].shape[:2] == (64, 64)


def test_mid_attention_off_leaves_no_mid_attention_keys() -> None:
    encoder, decoder = build_pair(F8, attention_levels=(), mid_attention=False)
    assert not any(key.startswith("mid.attn_1") for key in [*encoder.state_dict(), *decoder.state_dict()])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"channels": 20}, "channels=20 is not divisible by norm_groups=8"),
        ({"norm_groups": 32}, "channels=16 is not divisible by norm_groups=32"),
        ({"channel_multipliers": ()}, "channel_multipliers must name at least one level"),
        ({"channel_multipliers": (1, 0)}, "every channel multiplier must be at least 1"),
        ({"attention_levels": (4,)}, "attention level 4 is out of range"),
        ({"attention_levels": (-1,)}, "attention level -1 is out of range"),
        ({"attention_levels": (1, 1)}, "more than once"),
        ({"num_res_blocks": 0}, "num_res_blocks must be at least 1"),
        ({"z_channels": 0}, "z_channels must be at least 1"),
        ({"norm_groups": 0}, "norm_groups must be at least 1"),
    ],
)
@pytest.mark.parametrize("network", [VQGANEncoder, VQGANDecoder])
def test_constructor_errors_are_clear(network: type[nn.Module], overrides: dict[str, Any], message: str) -> None:
    arguments = {**F8, "attention_levels": (), "mid_attention": False, **overrides}
    with pytest.raises(ValueError, match=message):
        network(3, **arguments)


def test_encoder_rejects_sizes_that_are_not_multiples_of_the_factor() -> None:
    encoder, _ = build_pair(F8, attention_levels=(), mid_attention=False)
    with pytest.raises(ValueError, match="not a multiple of the downsampling factor 8"):
        encoder(torch.randn(1, 3, 36, 32))
