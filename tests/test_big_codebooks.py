"""Big codebooks stay alive: a short real training run at K = 8,192 uses at least 90% of its codes.

The recipe of the bundled LLM-grade model in small (VQGAN family, l2-normalised 8-dimensional codes, EMA,
k-means from 10 x K encoder outputs, dead-code restarts), on the bundled photos, with a fixed seed. A code is
alive when the training batches choose it: the trainer counts distinct codes over its last batches holding
5 x K tokens (`codes_used_window`); fewer tokens than that cannot show whether 8,192 codes are in use.
(Held-out usage of trained models is in the model card: this network trains for seconds.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vqtok.model.checkpoint import load_checkpoint
from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
from vqtok.model.train import TrainConfig, Trainer

K = 8192
NETWORK = NetworkConfig(
    arch="vqgan", downsample=8, num_hiddens=16, channel_multipliers=(1, 1, 2, 2), num_res_blocks=1,
    mid_attention=False, norm_groups=8, z_channels=16, embedding_dim=8, l2_normalize=True, num_embeddings=K,
)
CODEBOOK = CodebookTrainingConfig(kmeans_init=True, kmeans_iters=1, dead_code_window=10)


@pytest.fixture(scope="module")
def big_codebook_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("k8192")
    config = TrainConfig(data="photos", steps=30, batch_size=32, image_size=64, lr=1e-3, warmup_steps=5,
                         eval_every=0, checkpoint_every=0, heldout_crops=16, out=str(out), seed=3, log_every=5)
    Trainer(config, NETWORK, CODEBOOK).run()
    return out


def test_a_short_run_at_8192_codes_keeps_90_percent_of_them_in_use(big_codebook_run: Path) -> None:
    last = [json.loads(line) for line in (big_codebook_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["window_tokens"] >= 5 * K
    assert last["codes_used_window"] >= 0.9 * K, last
    model = load_checkpoint(big_codebook_run / "checkpoint").model
    # every code is a unit vector, and nearly all are distinct (two restarts may draw the same batch vector)
    codebook = model.codebook.float()
    assert torch.allclose(codebook.norm(dim=1), torch.ones(K), atol=1e-4)
    assert torch.unique(codebook, dim=0).shape[0] >= 0.95 * K


def test_the_big_codebook_checkpoint_round_trips_indices_through_images(big_codebook_run: Path) -> None:
    model = load_checkpoint(big_codebook_run / "checkpoint").model
    indices = model.encode(torch.rand(2, 3, 64, 96) - 0.5)
    assert indices.shape == (2, 8, 12) and int(indices.max()) < K
    images = model.decode(indices)
    assert images.shape == (2, 3, 64, 96)
