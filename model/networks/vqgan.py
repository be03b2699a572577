"""The VQGAN-family encoder and decoder (Esser et al. 2021, "Taming Transformers"; also Chameleon, LlamaGen).

Shape of the family:

- Encoder: 3x3 ``conv_in`` (C -> channels), then one level per channel multiplier. Level ``i`` has
  ``num_res_blocks`` residual blocks (-> ``channels * channel_multipliers[i]``), an attention block after each
  residual block when ``i`` is in ``attention_levels``, and a stride-2 downsample at every level but the last.
  Then the middle (``block_1``, optional ``attn_1``, ``block_2``), GroupNorm, SiLU and a 3x3 ``conv_out`` to
  ``z_channels``. Downsampling factor ``f = 2 ** (len(channel_multipliers) - 1)``.
- Decoder: the mirror image: 3x3 ``conv_in`` (z_channels -> ``channels * channel_multipliers[-1]``), the middle,
  then the levels from the last to level 0, each with ``num_res_blocks + 1`` residual blocks, attention at the
  same levels, and a 2x upsample at every level but level 0; GroupNorm, SiLU, 3x3 ``conv_out``.
- Residual block: GroupNorm -> SiLU -> 3x3 conv -> GroupNorm -> SiLU -> 3x3 conv, plus the input (through a 1x1
  ``nin_shortcut`` when the channel count changes). No dropout.
- Attention block: single-head softmax attention over all H*W positions, 1x1 q/k/v/out projections, residual add.

Module and attribute names (``conv_in``, ``down.{i}.block.{j}.norm1``, ``down.{i}.downsample.conv``,
``mid.attn_1.q``, ``up.{i}.upsample.conv``, ``norm_out``, ``conv_out`` ...) follow taming-transformers, so the
state-dict keys of published taming/Chameleon checkpoints match ours one to one. LlamaGen uses the same design
under other names (``conv_blocks``, ``res``, ``mid`` as a list), which an importer renames.

Published defaults (taming VQGAN, LlamaGen VQ-16): ``channels=128``, ``channel_multipliers=(1, 1, 2, 2, 4)``
(5 levels, f=16), ``num_res_blocks=2``, attention at the lowest resolution only (taming's
``attn_resolutions=[16]`` at 256 px, i.e. the last level, ``attention_levels=(4,)``) and in the middle block
(``mid_attention=True``), ``z_channels=256``, ``norm_groups=32``. The f=8 variants drop one level, e.g.
``channel_multipliers=(1, 2, 2, 4)`` with ``attention_levels=()`` or the last level.

When ``mid_attention`` is False, ``mid.attn_1`` is an ``nn.Identity`` (no parameters, so no state-dict keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_EPS = 1e-6


def group_norm(num_channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm as the VQGAN family uses it: ``eps=1e-6``, learned affine."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=num_channels, eps=GROUP_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``. (B, in, H, W) -> (B, out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # A 1x1 projection only where the residual path changes the channel count (taming's default shortcut).
        self.nin_shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, added to its input. (B, c, H, W) -> (B, c, H, W)."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def as_sequence(t: torch.Tensor) -> torch.Tensor:
            # (B, c, H, W) -> (B, 1, H*W, c): one head whose tokens are the pixel positions.
            return t.reshape(batch, 1, channels, height * width).transpose(2, 3)

        # SDPA's default scale is 1/sqrt(last dim) = 1/sqrt(c), the published softmax(q k^T / sqrt(c)) v.
        attended = F.scaled_dot_product_attention(
            as_sequence(self.q(h)), as_sequence(self.k(h)), as_sequence(self.v(h))
        )
        attended = attended.transpose(2, 3).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Halve H and W: zero pad right/bottom by one, then a 3x3 stride-2 conv. (B, c, H, W) -> (B, c, H/2, W/2).

    The asymmetric pad (left 0, right 1, top 0, bottom 1) is the published layout; with padding 0 in the conv it
    maps even sizes exactly to half, and keeps the weights of imported checkpoints aligned with the same pixels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour resize, then a 3x3 conv. (B, c, H, W) -> (B, c, 2H, 2W).

    Resize-then-convolve instead of a transposed convolution: every output pixel sees the same number of kernel
    taps, which avoids the checkerboard artifacts of strided transposed convs.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MiddleBlock(nn.Module):
    """``block_2(attn_1(block_1(x)))`` at the lowest resolution; ``attn_1`` is Identity without mid attention."""

    def __init__(self, channels: int, mid_attention: bool, norm_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups)
        self.attn_1: nn.Module = AttnBlock(channels, norm_groups) if mid_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: residual ``block``s and their ``attn`` blocks (one after each block, or none)."""

    def __init__(self, blocks: list[ResnetBlock], attentions: list[AttnBlock]) -> None:
        super().__init__()
        if attentions and len(attentions) != len(blocks):
            raise ValueError(f"a level needs one attention block per residual block, got {len(attentions)}")
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attentions)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Each residual block, followed by its attention block where the level has attention."""
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[index](x)
        return x


class EncoderLevel(Level):
    """An encoder level: ``run_blocks``, then ``downsample`` (None at the last level).

    (B, in, H, W) -> (B, out, H/2, W/2), or (B, out, H, W) at the last level.
    """

    def __init__(self, blocks: list[ResnetBlock], attentions: list[AttnBlock], downsample: Downsample | None) -> None:
        super().__init__(blocks, attentions)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(Level):
    """A decoder level: ``run_blocks``, then ``upsample`` (None at level 0).

    (B, in, H, W) -> (B, out, 2H, 2W), or (B, out, H, W) at level 0.
    """

    def __init__(self, blocks: list[ResnetBlock], attentions: list[AttnBlock], upsample: Upsample | None) -> None:
        super().__init__(blocks, attentions)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_blocks(x)
        return x if self.upsample is None else self.upsample(x)


def validate_arguments(
    image_channels: int,
    channels: int,
    channel_multipliers: tuple[int, ...],
    num_res_blocks: int,
    attention_levels: tuple[int, ...],
    z_channels: int,
    norm_groups: int,
) -> None:
    """Raise ValueError with a readable message for any argument the VQGAN encoder/decoder cannot build from."""
    for name, value in (
        ("image channels", image_channels),
        ("channels", channels),
        ("num_res_blocks", num_res_blocks),
        ("z_channels", z_channels),
        ("norm_groups", norm_groups),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if len(channel_multipliers) == 0:
        raise ValueError("channel_multipliers must name at least one level, got an empty tuple")
    if any(multiplier < 1 for multiplier in channel_multipliers):
        raise ValueError(f"every channel multiplier must be at least 1, got {tuple(channel_multipliers)}")
    # GroupNorm runs on every level's width, channels * multiplier: all divisible once `channels` is.
    if channels % norm_groups != 0:
        raise ValueError(
            f"channels={channels} is not divisible by norm_groups={norm_groups}: every GroupNorm width "
            f"(channels x multipliers {tuple(channel_multipliers)}) must split into norm_groups groups"
        )
    num_levels = len(channel_multipliers)
    for level in attention_levels:
        if not 0 <= level < num_levels:
            raise ValueError(
                f"attention level {level} is out of range: there are {num_levels} levels, 0..{num_levels - 1}"
            )
    if len(set(attention_levels)) != len(attention_levels):
        raise ValueError(f"attention_levels lists a level more than once: {tuple(attention_levels)}")


def downsampling_factor(channel_multipliers: tuple[int, ...]) -> int:
    """f = 2 ** (number of levels - 1): every level but the last halves the resolution."""
    return 2 ** (len(channel_multipliers) - 1)


class VQGANEncoder(nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, z_channels, H/f, W/f), f = 2 ** (len(channel_multipliers) - 1).

    H and W must be multiples of f.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        channel_multipliers: tuple[int, ...],
        num_res_blocks: int,
        attention_levels: tuple[int, ...],
        mid_attention: bool,
        z_channels: int,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        channel_multipliers = tuple(channel_multipliers)
        attention_levels = tuple(attention_levels)
        validate_arguments(
            in_channels, channels, channel_multipliers, num_res_blocks, attention_levels, z_channels, norm_groups
        )
        self.downsample_factor = downsampling_factor(channel_multipliers)
        num_levels = len(channel_multipliers)

        self.conv_in = nn.Conv2d(in_channels, channels, kernel_size=3, stride=1, padding=1)
        # Level i takes the width of level i-1 (level 0 takes `channels`) and widens in its first block.
        self.down = nn.ModuleList()
        width = channels
        for level_index in range(num_levels):
            level_width = channels * channel_multipliers[level_index]
            blocks: list[ResnetBlock] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width, level_width, norm_groups))
                width = level_width
            attentions = (
                [AttnBlock(width, norm_groups) for _ in range(num_res_blocks)]
                if level_index in attention_levels
                else []
            )
            downsample = Downsample(width) if level_index != num_levels - 1 else None
            self.down.append(EncoderLevel(blocks, attentions, downsample))

        self.mid = MiddleBlock(width, mid_attention, norm_groups)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        factor = self.downsample_factor
        if height % factor != 0 or width % factor != 0:
            raise ValueError(f"image size {height}x{width} is not a multiple of the downsampling factor {factor}")
        h = self.conv_in(images)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    """Latents (B, z_channels, h, w) -> images (B, out_channels, h*f, w*f), f = 2 ** (len(channel_multipliers) - 1).

    ``up[i]`` holds level i (the published indexing), but the levels run from the last (lowest resolution) to 0.
    Upsampling is nearest-neighbour resize then a 3x3 conv (no transposed convs, so no checkerboard artifacts).
    """

    def __init__(
        self,
        out_channels: int,
        channels: int,
        channel_multipliers: tuple[int, ...],
        num_res_blocks: int,
        attention_levels: tuple[int, ...],
        mid_attention: bool,
        z_channels: int,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        channel_multipliers = tuple(channel_multipliers)
        attention_levels = tuple(attention_levels)
        validate_arguments(
            out_channels, channels, channel_multipliers, num_res_blocks, attention_levels, z_channels, norm_groups
        )
        self.upsample_factor = downsampling_factor(channel_multipliers)
        num_levels = len(channel_multipliers)

        width = channels * channel_multipliers[-1]
        self.conv_in = nn.Conv2d(z_channels, width, kernel_size=3, stride=1, padding=1)
        self.mid = MiddleBlock(width, mid_attention, norm_groups)

        levels_low_to_high: list[DecoderLevel] = []
        for level_index in reversed(range(num_levels)):
            level_width = channels * channel_multipliers[level_index]
            blocks: list[ResnetBlock] = []
            # One block more than the encoder, as published.
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(width, level_width, norm_groups))
                width = level_width
            attentions = (
                [AttnBlock(width, norm_groups) for _ in range(num_res_blocks + 1)]
                if level_index in attention_levels
                else []
            )
            upsample = Upsample(width) if level_index != 0 else None
            levels_low_to_high.append(DecoderLevel(blocks, attentions, upsample))
        # Store so that up[i] is level i (state-dict keys `up.{i}...` match the published checkpoints).
        self.up = nn.ModuleList(reversed(levels_low_to_high))

        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(latents))
        # Lowest resolution first: up[-1] ... up[0].
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
