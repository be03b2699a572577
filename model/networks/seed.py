"""Convolutional building blocks of the VQ-VAE: residual blocks, encoder, decoder.

Architecture of the seed (after van den Oord et al. 2017 and Sonnet's ``vqvae.py``):

- Encoder: 4x4 stride-2 conv (C -> h/2), one 4x4 stride-2 conv (-> h) per further factor of 2,
  a 3x3 conv (h -> h), then a residual stack; ReLU between the convs.
- Decoder: 3x3 conv (D -> h), a residual stack, then 4x4 stride-2 transposed convs back to C (the seed's),
  or, with ``upsample="resize"``, nearest-neighbour doubling + 3x3 conv per stage (no checkerboard overlap).
- Residual block: ReLU -> 3x3 conv (h -> r) -> ReLU -> 1x1 conv (r -> h), added to its input.
  A residual stack ends with a ReLU.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.model.config import UpsampleKind


class Residual(nn.Module):
    """One residual block: ``x + conv1x1(relu(conv3x3(relu(x))))``. (B, h, H, W) -> (B, h, H, W)."""

    def __init__(self, num_hiddens: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(num_hiddens, num_residual_hiddens, kernel_size=3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(num_residual_hiddens, num_hiddens, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class ResidualStack(nn.Module):
    """``num_residual_layers`` residual blocks, each with its own weights, then a ReLU."""

    def __init__(self, num_hiddens: int, num_residual_hiddens: int, num_residual_layers: int) -> None:
        super().__init__()
        # A list comprehension builds each block anew: `[Residual(...)] * n` would share one block n times.
        self.layers = nn.ModuleList([Residual(num_hiddens, num_residual_hiddens) for _ in range(num_residual_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return F.relu(x)


class Encoder(nn.Module):
    """Images (B, C, H, W) -> features (B, num_hiddens, H/f, W/f), f = 2**num_downsamples."""

    def __init__(
        self,
        in_channels: int,
        num_hiddens: int,
        num_residual_hiddens: int,
        num_residual_layers: int,
        num_downsamples: int,
    ) -> None:
        super().__init__()
        if num_downsamples < 2:
            raise ValueError(f"the encoder needs at least 2 stride-2 stages, got {num_downsamples}")
        # 4x4 kernels, stride 2, padding 1 halve each side exactly (H even).
        convs = [nn.Conv2d(in_channels, num_hiddens // 2, kernel_size=4, stride=2, padding=1)]
        convs.append(nn.Conv2d(num_hiddens // 2, num_hiddens, kernel_size=4, stride=2, padding=1))
        convs.extend(
            nn.Conv2d(num_hiddens, num_hiddens, kernel_size=4, stride=2, padding=1) for _ in range(num_downsamples - 2)
        )
        self.downsamples = nn.ModuleList(convs)
        self.conv_out = nn.Conv2d(num_hiddens, num_hiddens, kernel_size=3, padding=1)
        self.residual_stack = ResidualStack(num_hiddens, num_residual_hiddens, num_residual_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.downsamples:
            x = F.relu(conv(x))
        return self.residual_stack(self.conv_out(x))


def _upsample_stage(in_channels: int, out_channels: int, upsample: UpsampleKind) -> nn.Module:
    """One stage that doubles each side: (B, in, H, W) -> (B, out, 2H, 2W)."""
    if upsample == "transposed":
        # 4x4 transposed kernels, stride 2, padding 1 double each side exactly.
        return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)
    # Every output pixel sees the same number of input pixels, so no checkerboard from uneven overlap.
    # Bilinear (half-pixel centres) puts each doubled pixel at 1/4 and 3/4 of its source: a linear ramp of
    # step s comes out with step s/2 everywhere, where nearest doubling gives 0 within a pair and s between.
    mode = "nearest" if upsample == "resize" else "bilinear"
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode),
                         nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))


class Decoder(nn.Module):
    """Quantized latents (B, D, h, w) -> images (B, C, h*f, w*f), f = 2**num_upsamples."""

    def __init__(
        self,
        embedding_dim: int,
        out_channels: int,
        num_hiddens: int,
        num_residual_hiddens: int,
        num_residual_layers: int,
        num_upsamples: int,
        upsample: UpsampleKind = "transposed",
    ) -> None:
        super().__init__()
        if num_upsamples < 2:
            raise ValueError(f"the decoder needs at least 2 stride-2 stages, got {num_upsamples}")
        self.conv_in = nn.Conv2d(embedding_dim, num_hiddens, kernel_size=3, padding=1)
        self.residual_stack = ResidualStack(num_hiddens, num_residual_hiddens, num_residual_layers)
        widths = [num_hiddens] * (num_upsamples - 1) + [num_hiddens // 2, out_channels]
        self.upsamples = nn.ModuleList(
            _upsample_stage(c_in, c_out, upsample) for c_in, c_out in itertools.pairwise(widths)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.residual_stack(self.conv_in(x))
        last = len(self.upsamples) - 1
        for i, up in enumerate(self.upsamples):
            x = up(x)
            if i < last:  # no activation on the output: pixels are regressed directly
                x = F.relu(x)
        return x
