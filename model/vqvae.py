"""The VQ-VAE: encoder -> 1x1 pre-VQ conv -> quantizer -> (1x1 post-VQ conv) -> decoder.

Two encoder/decoder families share this wrapper, the config's ``arch`` picks one: the seed's
(``model.networks.seed``) and the VQGAN family (``model.networks.vqgan``, which adds the 1x1 projection
back from the code dimension D to ``z_channels`` before its decoder). The quantizer (``model.quantizers``)
and the ``encode`` / ``decode`` / ``codebook`` contract are the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
from vqtok.model.networks import seed, vqgan
from vqtok.model.quantizers import build_quantizer


@dataclass
class VQVAEOutput:
    """What ``VQVAE.forward`` returns.

    Attributes:
      reconstruction: (B, C, H, W) decoded images, in normalised pixel space.
      vq_loss: scalar quantizer loss (add the reconstruction loss to train); includes ``entropy_loss``.
      perplexity: scalar, exp(entropy) of the batch's code distribution.
      codes_used: scalar long, distinct codes in the batch.
      indices: (B, H/f, W/f) long token grid.
      counts: (K,) float, code counts of the batch (global under DDP in training).
      entropy_loss: scalar, the weighted entropy regulariser (training with ``entropy_weight`` > 0), else None.
    """

    reconstruction: torch.Tensor
    vq_loss: torch.Tensor
    perplexity: torch.Tensor
    codes_used: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    entropy_loss: torch.Tensor | None = None


class VQVAE(nn.Module):
    """Images (B, C, H, W) <-> token grids (B, H/f, W/f) of indices into a (K, D) codebook.

    H and W must be multiples of ``network.downsample`` (f); callers pad or crop first.

    Args:
      network: what the network is (architecture, K, D, f, normalisation); the defaults when None.
      codebook_training: how the codebook learns (losses, EMA, restarts, k-means). Only training reads
        it; serving may leave it None (the defaults), which changes no token.
    """

    def __init__(self, network: NetworkConfig | None = None,
                 codebook_training: CodebookTrainingConfig | None = None) -> None:
        super().__init__()
        self.network = network or NetworkConfig()
        self.codebook_training = codebook_training or CodebookTrainingConfig()
        self.codebook_training.check_network(self.network)
        c = self.network
        self.encoder: nn.Module
        self.decoder: nn.Module
        if c.arch == "vqgan":
            levels = {
                "channels": c.num_hiddens, "channel_multipliers": c.channel_multipliers,
                "num_res_blocks": c.num_res_blocks, "attention_levels": c.attention_levels,
                "mid_attention": c.mid_attention, "z_channels": c.z_channels, "norm_groups": c.norm_groups,
            }
            self.encoder = vqgan.VQGANEncoder(c.in_channels, **levels)
            self.pre_vq_conv = nn.Conv2d(c.z_channels, c.embedding_dim, kernel_size=1)  # z -> D
            self.post_vq_conv: nn.Module = nn.Conv2d(c.embedding_dim, c.z_channels, kernel_size=1)  # D -> z
            self.decoder = vqgan.VQGANDecoder(c.in_channels, **levels)
        else:
            self.encoder = seed.Encoder(
                c.in_channels, c.num_hiddens, c.num_residual_hiddens, c.num_residual_layers, c.num_downsamples
            )
            self.pre_vq_conv = nn.Conv2d(c.num_hiddens, c.embedding_dim, kernel_size=1)
            self.post_vq_conv = nn.Identity()  # the seed's decoder takes D channels directly
            self.decoder = seed.Decoder(
                c.embedding_dim, c.in_channels, c.num_hiddens, c.num_residual_hiddens,
                c.num_residual_layers, c.num_downsamples, c.upsample,
            )
        self.quantizer = build_quantizer(c, self.codebook_training)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) codebook vectors."""
        return self.quantizer.codebook

    @property
    def device(self) -> torch.device:
        return self.pre_vq_conv.weight.device

    def check_images(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, C, H, W) float with H, W multiples of f."""
        f = self.network.downsample
        if x.dim() != 4 or x.shape[1] != self.network.in_channels:
            raise ValueError(f"expected images of shape (B, {self.network.in_channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point images, got {x.dtype}")
        if x.shape[2] % f or x.shape[3] % f or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(
                f"image height and width must be positive multiples of the downsample factor {f}, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )

    def check_indices(self, indices: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``indices`` is a (B, h, w) integer grid with values in [0, K)."""
        if indices.dim() != 3:
            raise ValueError(f"expected indices of shape (B, h, w), got {tuple(indices.shape)}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"expected integer indices, got {indices.dtype}")
        if indices.numel() == 0:
            raise ValueError("expected a non-empty grid of indices")
        k = self.network.num_embeddings
        bad = (indices < 0) | (indices >= k)
        if bool(bad.any()):
            b, i, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"index {int(indices[b, i, j])} at [{b}, {i}, {j}] is outside [0, {k})")

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantization latents: (B, C, H, W) -> (B, D, H/f, W/f)."""
        return self.pre_vq_conv(self.encoder(x))

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Full pass for training: (B, C, H, W) normalised images -> ``VQVAEOutput``."""
        self.check_images(x)
        quantized = self.quantizer(self.latents(x))
        return VQVAEOutput(
            reconstruction=self.decoder(self.post_vq_conv(quantized.quantized)),
            vq_loss=quantized.loss,
            perplexity=quantized.perplexity,
            codes_used=quantized.codes_used,
            indices=quantized.indices,
            counts=quantized.counts,
            entropy_loss=quantized.entropy_loss,
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> token grids (B, H/f, W/f) long. Never updates the codebook."""
        self.check_images(x)
        return self.quantizer.quantize_indices(self.latents(x))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token grids (B, h, w) -> normalised images (B, C, h*f, w*f)."""
        self.check_indices(indices)
        vectors = self.quantizer.lookup(indices.long())  # (B, h, w, D)
        quantized = vectors.permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
        return self.decoder(self.post_vq_conv(quantized.to(self.pre_vq_conv.weight.dtype)))
