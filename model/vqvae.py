"""The VQ-VAE: encoder -> 1x1 pre-VQ conv -> vector quantizer -> decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vqtok.model.blocks import Decoder, Encoder
from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
from vqtok.model.quantizer import VectorQuantizer, VectorQuantizerEMA


@dataclass
class VQVAEOutput:
    """What ``VQVAE.forward`` returns.

    Attributes:
      reconstruction: (B, C, H, W) decoded images, in normalised pixel space.
      vq_loss: scalar quantizer loss (add the reconstruction loss to train).
      perplexity: scalar, exp(entropy) of the batch's code distribution.
      codes_used: scalar long, distinct codes in the batch.
      indices: (B, H/f, W/f) long token grid.
      counts: (K,) float, code counts of the batch (global under DDP in training).
    """

    reconstruction: torch.Tensor
    vq_loss: torch.Tensor
    perplexity: torch.Tensor
    codes_used: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor


def build_quantizer(network: NetworkConfig, training: CodebookTrainingConfig) -> VectorQuantizer | VectorQuantizerEMA:
    """The quantizer ``network.quantizer`` names, (K, D) as the network says, learning as ``training`` says."""
    health = {
        "dead_code_window": training.dead_code_window,
        "kmeans_init": training.kmeans_init,
        "kmeans_iters": training.kmeans_iters,
    }
    if network.quantizer == "ema":
        return VectorQuantizerEMA(
            network.num_embeddings, network.embedding_dim, training.commitment_cost,
            decay=training.decay, epsilon=training.epsilon, dead_code_threshold=training.dead_code_threshold,
            **health,
        )
    return VectorQuantizer(network.num_embeddings, network.embedding_dim, training.commitment_cost, **health)


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
        self.encoder = Encoder(
            c.in_channels, c.num_hiddens, c.num_residual_hiddens, c.num_residual_layers, c.num_downsamples
        )
        self.pre_vq_conv = nn.Conv2d(c.num_hiddens, c.embedding_dim, kernel_size=1)
        self.quantizer = build_quantizer(c, self.codebook_training)
        self.decoder = Decoder(
            c.embedding_dim, c.in_channels, c.num_hiddens, c.num_residual_hiddens,
            c.num_residual_layers, c.num_downsamples,
        )

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
            reconstruction=self.decoder(quantized.quantized),
            vq_loss=quantized.loss,
            perplexity=quantized.perplexity,
            codes_used=quantized.codes_used,
            indices=quantized.indices,
            counts=quantized.counts,
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
        return self.decoder(quantized.to(self.pre_vq_conv.weight.dtype))
