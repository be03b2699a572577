"""The batch-composition rule itself (tests/equivalence.py) passes what it promises and fails the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.equivalence import assert_images_close, assert_tokens_agree


def test_images_within_one_grey_level_pass_and_two_fail() -> None:
    a = np.full((4, 4, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0] = 101
    assert_images_close(a, b)
    b[0, 0, 0] = 102
    with pytest.raises(AssertionError, match="differ by 2 grey levels"):
        assert_images_close(a, b)
    with pytest.raises(AssertionError):
        assert_images_close(a, a[:2])


def test_tokens_differ_only_at_near_ties() -> None:
    codebook = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    latents = torch.zeros(40, 40, 2)
    latents[0, 0] = torch.tensor([1.0, 0.0])  # exactly between codes 0 and 1: a tie
    a = np.zeros((40, 40), dtype=np.int64)
    b = a.copy()
    b[0, 0] = 1
    assert_tokens_agree(a, b, latents=latents, codebook=codebook)
    b[0, 0] = 2  # code 2 is far away from the latent: a real disagreement
    with pytest.raises(AssertionError, match="not near-ties"):
        assert_tokens_agree(a, b, latents=latents, codebook=codebook)


def test_too_many_disagreements_fail_even_at_ties() -> None:
    a = np.zeros((10, 10), dtype=np.int64)
    b = a.copy()
    b[0, 0] = 1  # 1 of 100 positions: 99% < 99.9%
    with pytest.raises(AssertionError, match=r"agree on 99\.0000% of positions"):
        assert_tokens_agree(a, b)
