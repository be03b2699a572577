"""How a quantizer combines its statistics across processes (injected, never discovered)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class Reducer:
    """How a quantizer combines its statistics across processes (injected, as vector-quantize-pytorch's
    ``all_reduce_fn``): single-process code and tests never touch distributed state.

    Attributes:
      all_reduce_sum: sums a tensor over ranks in place and returns it.
      broadcast_from_rank0: overwrites a tensor with rank 0's copy in place and returns it.
    """

    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _unchanged
    broadcast_from_rank0: Callable[[torch.Tensor], torch.Tensor] = _unchanged


SINGLE_PROCESS = Reducer()  # one process: nothing to combine
