"""Quantizers: continuous latents (B, D, H, W) <-> token grids (B, H, W) of indices into K codes.

- ``codebook``: learned codebooks, ``VectorQuantizerEMA`` ("ema") and ``VectorQuantizer`` ("plain"), each
  with optional factorised low-dimensional codes (``code_dim``) and l2-normalised codes, dead-code
  restarts and k-means initialisation.
- ``fsq``: ``FiniteScalarQuantizer`` ("fsq"), per-channel rounding with an implicit grid codebook.
- ``search``: nearest-code search (float32, chunked, never one-hot), perplexity, k-means.
- ``entropy``: the codebook-usage (entropy) regulariser of the codebook quantizers' training loss.
- ``reducer``: how statistics are combined across processes (injected by the trainer under DDP).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqtok.model.quantizers.base import Quantizer, QuantizerOutput
from vqtok.model.quantizers.codebook import CodebookQuantizer, VectorQuantizer, VectorQuantizerEMA
from vqtok.model.quantizers.fsq import FiniteScalarQuantizer
from vqtok.model.quantizers.reducer import SINGLE_PROCESS, Reducer
from vqtok.model.quantizers.search import kmeans, kmeans_plus_plus, nearest_code, perplexity_of

if TYPE_CHECKING:
    from vqtok.model.config import CodebookTrainingConfig, NetworkConfig

__all__ = [
    "SINGLE_PROCESS",
    "CodebookQuantizer",
    "FiniteScalarQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "Reducer",
    "VectorQuantizer",
    "VectorQuantizerEMA",
    "build_quantizer",
    "kmeans",
    "kmeans_plus_plus",
    "nearest_code",
    "perplexity_of",
]


def build_quantizer(network: NetworkConfig, training: CodebookTrainingConfig) -> Quantizer:
    """The quantizer ``network.quantizer`` names, shaped as the network says, learning as ``training`` says.

    "fsq" reads only ``fsq_levels`` and ``embedding_dim`` (the config refuses codebook-health settings with it);
    "ema" and "plain" read K, D, ``code_dim``, ``l2_normalize`` and the codebook training config (the entropy
    regulariser included).
    """
    if network.quantizer == "fsq":
        return FiniteScalarQuantizer(tuple(network.fsq_levels), network.embedding_dim)
    options = {
        "code_dim": network.code_dim,
        "l2_normalize": network.l2_normalize,
        "dead_code_window": training.dead_code_window,
        "kmeans_init": training.kmeans_init,
        "kmeans_iters": training.kmeans_iters,
        "entropy_weight": training.entropy_weight,
        "entropy_temperature": training.entropy_temperature,
        "entropy_batch_weight": training.entropy_batch_weight,
        "entropy_sample": training.entropy_sample,
    }
    if network.quantizer == "ema":
        return VectorQuantizerEMA(
            network.num_embeddings, network.embedding_dim, training.commitment_cost,
            decay=training.decay, epsilon=training.epsilon, dead_code_threshold=training.dead_code_threshold,
            **options,
        )
    return VectorQuantizer(network.num_embeddings, network.embedding_dim, training.commitment_cost, **options)
