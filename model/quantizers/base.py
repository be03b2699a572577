"""What every quantizer returns and the interface the VQ-VAE, the trainer and the service rely on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vqtok.model.quantizers.reducer import SINGLE_PROCESS, Reducer
from vqtok.model.quantizers.search import perplexity_of


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    Attributes:
      quantized: (B, D, H, W) quantized vectors as the decoder receives them; gradients pass straight
        through to the input.
      loss: scalar, the quantizer's loss term (codebook + commitment, commitment alone for EMA, 0 for FSQ; plus
        the entropy regulariser when it is on).
      perplexity: scalar, exp(entropy) of the code distribution in the batch: K when all codes are
        used equally, 1 when one code takes everything.
      codes_used: scalar long, the number of distinct codes in the batch.
      indices: (B, H, W) long, the code index of every latent position.
      counts: (K,) float, how many latents chose each code (summed over ranks under DDP).
      entropy_loss: scalar, the weighted entropy regulariser that ``loss`` includes (codebook quantizers in
        training with ``entropy_weight`` > 0); None when it is off.
    """

    quantized: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    codes_used: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    entropy_loss: torch.Tensor | None = None


class Quantizer(nn.Module):
    """The contract of every quantizer: (B, D, H, W) latents <-> (B, H, W) indices into K codes.

    Subclasses provide ``codebook`` ((K, search_dim) float32, the vectors the search compares against),
    ``lookup`` (indices -> the (..., D) vectors the decoder receives), ``quantize_indices`` (eval path,
    never changes state) and ``forward`` (-> ``QuantizerOutput``), all in float32 even under autocast.

    Attributes:
      num_embeddings: K. embedding_dim: D, the channels received and returned.
      reducer: how statistics are combined across processes; the trainer injects one under DDP.
      restarts_total: codes re-seeded so far in this process (for logging; always 0 without restarts).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.reducer: Reducer = SINGLE_PROCESS  # the trainer injects a torch.distributed one under DDP
        self.restarts_total = 0

    @property
    def codebook(self) -> torch.Tensor:
        """(K, search_dim) float32: the vectors the search compares against."""
        raise NotImplementedError

    @property
    def needs_initialisation(self) -> bool:
        """Whether the trainer should call ``initialise_codebook`` before the first step."""
        return False

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) long -> (..., D) float32: the vectors the decoder receives."""
        raise NotImplementedError

    def quantize_indices(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W) long. Never changes any state."""
        raise NotImplementedError

    def _check_channels(self, inputs: torch.Tensor) -> None:
        if inputs.dim() != 4 or inputs.shape[1] != self.embedding_dim:
            raise ValueError(f"quantizer expects (B, {self.embedding_dim}, H, W) latents, got {tuple(inputs.shape)}")

    def _statistics(self, indices: torch.Tensor) -> torch.Tensor:
        """(N,) long indices -> (K,) float counts, summed over ranks in training."""
        counts = torch.bincount(indices, minlength=self.num_embeddings).float()
        if self.training:
            self.reducer.all_reduce_sum(counts)  # the codebook statistics are global under DDP
        return counts

    @staticmethod
    def _output(quantized: torch.Tensor, loss: torch.Tensor, indices: torch.Tensor,
                counts: torch.Tensor, entropy_loss: torch.Tensor | None = None) -> QuantizerOutput:
        """Assemble the output: quantized (B, D, H, W), indices (B, H, W), counts (K,), scalars."""
        return QuantizerOutput(
            quantized=quantized.contiguous(),
            loss=loss,
            perplexity=perplexity_of(counts),
            codes_used=(counts > 0).sum(),
            indices=indices,
            counts=counts,
            entropy_loss=entropy_loss,
        )
