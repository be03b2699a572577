"""The optional training objectives: the codebook-usage (entropy) regulariser and the gradient-matching term.

Both are off by default, and then nothing is computed and a training step is bit for bit the step of the plain
loss; on, they are recorded in the checkpoint (entropy: ``codebook_training``; gradient: the provenance's
training flags), reach the trainer from flags and environment variables, and do what they are for.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.test_quantizers import _as_latents
from vqtok.model.checkpoint import Provenance, load_checkpoint, save_checkpoint
from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
from vqtok.model.losses import gradient_loss
from vqtok.model.options import dataclass_from_args
from vqtok.model.quantizers import VectorQuantizer, VectorQuantizerEMA, codebook, nearest_code
from vqtok.model.quantizers.entropy import entropy_terms
from vqtok.model.train import TrainConfig, Trainer, build_parser
from vqtok.model.train import main as train_main
from vqtok.model.vqvae import VQVAE

TINY = {"num_hiddens": 16, "num_residual_hiddens": 8, "embedding_dim": 8, "num_embeddings": 32}
ENTROPY = {"entropy_weight": 1e-3, "entropy_temperature": 0.2, "entropy_batch_weight": 2.0}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is the fastest (two fight over the cores of a busy machine: 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _direct_entropies(flat: torch.Tensor, codes: torch.Tensor, temperature: float,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, written out in float64: (mean_i H(p_i), H(mean_i p_i)), p_i = softmax(-d_i / (T s))."""
    distances = torch.cdist(flat.double(), codes.double()).pow(2)  # (N, K)
    p = torch.softmax(-distances / (temperature * scale), dim=1)
    per_sample = -(p * p.log()).sum(dim=1).mean()
    mean_p = p.mean(dim=0)
    return per_sample, -(mean_p * mean_p.log()).sum()


def _refuse(*args: object, **kwargs: object) -> None:
    """Stands in for a term's computation that must not run."""
    raise AssertionError("computed while off")


# --- the entropy regulariser ---------------------------------------------------------------------------------


def test_the_entropies_equal_a_direct_computation_in_one_block_and_in_many() -> None:
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(7, 3, generator=generator)
    codes = torch.randn(5, 3, generator=generator)
    expected = _direct_entropies(flat, codes, 0.5, 1.3)
    whole = entropy_terms(flat, codes, 0.5, torch.tensor(1.3))
    blocks = entropy_terms(flat, codes, 0.5, torch.tensor(1.3), chunk_elements=10)  # 2 rows a block: 4 blocks
    for terms in (whole, blocks):
        assert float(terms.per_sample) == pytest.approx(float(expected[0]), rel=1e-5)
        assert float(terms.batch) == pytest.approx(float(expected[1]), rel=1e-5)
    assert float(whole.loss(5, 2.0)) == pytest.approx(float(expected[0] + 2.0 * (math.log(5) - expected[1])), rel=1e-5)


def test_block_recomputation_gives_the_same_gradients() -> None:
    generator = torch.Generator().manual_seed(1)
    flat = torch.randn(9, 4, generator=generator)
    codes = torch.randn(6, 4, generator=generator)
    gradients = []
    for chunk in (1 << 24, 12):  # one block; then 2 rows a block, recomputed in the backward pass
        z, e = flat.clone().requires_grad_(True), codes.clone().requires_grad_(True)
        entropy_terms(z, e, 0.3, torch.tensor(2.0), chunk_elements=chunk).loss(6, 4.0).backward()
        gradients.append((z.grad, e.grad))
    assert torch.allclose(gradients[0][0], gradients[1][0], atol=1e-6)
    assert torch.allclose(gradients[0][1], gradients[1][1], atol=1e-6)


def test_the_batch_term_falls_as_assignments_spread_over_more_codes() -> None:
    codes = torch.eye(4) * 4.0  # four well-separated codes
    noise = 0.05 * torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    batch_terms = []
    for used in (1, 2, 4):  # 8 latents near the first `used` codes, evenly
        flat = codes[torch.arange(8) % used] + noise
        terms = entropy_terms(flat, codes, 0.1, torch.tensor(1.0))
        batch_terms.append(math.log(4) - float(terms.batch))  # the loss's batch part
        assert float(terms.batch) == pytest.approx(math.log(used), abs=0.01)  # confident: hard usage
        assert float(terms.per_sample) < 0.01
    assert batch_terms[0] > batch_terms[1] > batch_terms[2] > -1e-6


@pytest.mark.parametrize("options", [{}, {"l2_normalize": True}, {"code_dim": 3}])
@pytest.mark.parametrize("kind", [VectorQuantizerEMA, VectorQuantizer])
def test_the_quantizer_adds_the_weighted_term_with_gradients_to_the_latents(kind: type, options: dict) -> None:
    torch.manual_seed(3)
    quantizer = kind(16, 6, 0.25, dead_code_window=0, **options, **ENTROPY).train()
    flat = torch.randn(40, 6)
    latents = _as_latents(flat).requires_grad_(True)
    before = quantizer.codebook.detach().clone()  # the EMA update changes it during the forward pass
    out = quantizer(latents)
    # the same term, written out: search-space vectors, their nearest codes, the temperature's unit s
    search = quantizer._flat_search_vectors(flat)
    nearest = before[nearest_code(search, before, cosine=quantizer.l2_normalize)]
    scale = float((search - nearest).pow(2).sum(dim=1).mean())
    per_sample, batch = _direct_entropies(search, before, 0.2, scale)
    expected = 1e-3 * (per_sample + 2.0 * (math.log(16) - batch))
    assert out.entropy_loss is not None
    assert out.entropy_loss.item() == pytest.approx(float(expected), rel=1e-4)
    (latent_gradient,) = torch.autograd.grad(out.entropy_loss, latents, retain_graph=True)
    assert latent_gradient.abs().sum() > 0
    if kind is VectorQuantizer:  # a gradient-trained codebook learns from the term too; the EMA one has no grad
        (code_gradient,) = torch.autograd.grad(out.entropy_loss, quantizer.embedding, retain_graph=True)
        assert code_gradient.abs().sum() > 0
    if quantizer.project_in is not None:
        (projection_gradient,) = torch.autograd.grad(out.entropy_loss, quantizer.project_in.weight)
        assert projection_gradient.abs().sum() > 0


def test_a_sampled_term_is_the_term_of_the_rows_drawn() -> None:
    """``entropy_sample``: the term over a random subset of the batch's vectors (the global generator's draw)."""
    torch.manual_seed(3)
    quantizer = VectorQuantizerEMA(16, 6, 0.25, dead_code_window=0, entropy_sample=10, **ENTROPY).train()
    flat = torch.randn(40, 6)
    before = quantizer.codebook.detach().clone()
    torch.manual_seed(11)
    out = quantizer(_as_latents(flat))
    torch.manual_seed(11)
    rows = torch.randperm(40)[:10]  # the forward pass draws nothing else before the term
    search = flat[rows]
    nearest = before[nearest_code(search, before)]
    scale = float((search - nearest).pow(2).sum(dim=1).mean())
    per_sample, batch = _direct_entropies(search, before, 0.2, scale)
    expected = 1e-3 * (per_sample + 2.0 * (math.log(16) - batch))
    assert out.entropy_loss is not None and out.entropy_loss.item() == pytest.approx(float(expected), rel=1e-4)
    every = VectorQuantizerEMA(16, 6, 0.25, dead_code_window=0, **ENTROPY).train()
    every.load_state_dict(quantizer.state_dict())
    whole = VectorQuantizerEMA(16, 6, 0.25, dead_code_window=0, entropy_sample=40, **ENTROPY).train()
    whole.load_state_dict(quantizer.state_dict())  # a sample as large as the batch is the whole batch
    assert whole(_as_latents(flat)).entropy_loss.item() == pytest.approx(every(_as_latents(flat)).entropy_loss.item())


def test_the_term_is_computed_only_in_training() -> None:
    torch.manual_seed(4)
    model = VQVAE(NetworkConfig(**TINY), CodebookTrainingConfig(**ENTROPY))
    x = torch.rand(2, 3, 16, 16) - 0.5
    assert model.train()(x).entropy_loss is not None
    assert model.eval()(x).entropy_loss is None
    served = VQVAE(NetworkConfig(**TINY))  # the same weights without the term: the same tokens
    served.load_state_dict(model.state_dict())
    assert torch.equal(served.eval().encode(x), model.encode(x))


def test_weight_zero_is_off_and_computes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CodebookTrainingConfig().entropy_weight == 0.0 and TrainConfig().gradient_loss_weight == 0.0

    monkeypatch.setattr(codebook, "entropy_terms", _refuse)
    torch.manual_seed(5)
    quantizer = VectorQuantizerEMA(16, 4, 0.25, dead_code_window=0).train()
    latents = torch.randn(2, 4, 3, 3, requires_grad=True)
    before = quantizer.codebook.clone()  # the EMA update changes it during the forward pass
    out = quantizer(latents)
    codes = F.embedding(out.indices, before).permute(0, 3, 1, 2)  # (B, D, H, W) the chosen codes
    assert out.entropy_loss is None
    assert torch.equal(out.loss, 0.25 * F.mse_loss(latents, codes))  # the commitment loss, alone, as before


# --- the gradient-matching term ------------------------------------------------------------------------------


def test_the_gradient_term_equals_a_hand_computation_and_is_zero_for_identical_images() -> None:
    target = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])  # (1, 1, 2, 3)
    reconstruction = torch.tensor([[[[0.0, 2.0, 2.0], [2.0, 2.0, 4.0]]]])
    # horizontal differences: target (1, 2 | 0, 0), reconstruction (2, 0 | 0, 2): |.| = 1, 2, 0, 2 -> mean 5/4
    # vertical differences: target (2, 1, -1), reconstruction (2, 0, 2): |.| = 0, 1, 3 -> mean 4/3
    expected = 0.5 * (5 / 4 + 4 / 3)
    assert float(gradient_loss(reconstruction, target)) == pytest.approx(expected)
    assert float(gradient_loss(target, target)) == 0.0
    assert float(gradient_loss(target + 0.25, target)) == 0.0  # a constant offset has the target's gradients
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    assert float(gradient_loss(images, images.clone())) == 0.0
    assert float(gradient_loss(images, images.flip(-1))) > 0.0


# --- configuration: validation, FSQ, the record, flags and environment variables -----------------------------


@pytest.mark.parametrize(("fields", "message"), [
    ({"entropy_weight": -1.0}, "entropy_weight must be >= 0, got -1.0"),
    ({"entropy_batch_weight": -0.5}, "entropy_batch_weight must be >= 0, got -0.5"),
    ({"entropy_temperature": 0.0}, "entropy_temperature must be > 0, got 0.0"),
    ({"entropy_sample": -1}, "entropy_sample must be >= 0 \\(0: every vector\\), got -1"),
    ({"entropy_weight": "0.1"}, "entropy_weight must be a number"),
])
def test_bad_entropy_settings_are_refused_with_their_name(fields: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        CodebookTrainingConfig(**fields)


def test_fsq_with_an_entropy_weight_is_refused_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    fsq = NetworkConfig(**{**TINY, "quantizer": "fsq", "fsq_levels": (4, 8)})
    with pytest.raises(ValueError, match=r"entropy_weight needs a learned codebook \('ema' or 'plain'\); the 'fsq'"):
        VQVAE(fsq, CodebookTrainingConfig(entropy_weight=0.1))
    VQVAE(fsq, CodebookTrainingConfig(entropy_temperature=0.5))  # the other settings are inert while it is off
    code = train_main(["--quantizer", "fsq", "--fsq-levels", "4", "8", "--num-embeddings", "32",
                       "--entropy-weight", "0.1"])
    assert code == 2 and "entropy_weight needs a learned codebook" in capsys.readouterr().err


def test_the_settings_round_trip_through_a_checkpoint_and_stay_out_of_the_model_id(tmp_path: Path) -> None:
    torch.manual_seed(7)
    model = VQVAE(NetworkConfig(**TINY), CodebookTrainingConfig(**ENTROPY))
    loaded = load_checkpoint(save_checkpoint(tmp_path / "on", model, Provenance(name="on")))
    assert loaded.codebook_training == CodebookTrainingConfig(**ENTROPY)
    assert loaded.model.quantizer.entropy_weight == 1e-3  # the rebuilt quantizer has it
    plain = VQVAE(NetworkConfig(**TINY))
    plain.load_state_dict(model.state_dict())
    assert load_checkpoint(save_checkpoint(tmp_path / "off", plain, Provenance(name="off"))).model_id == loaded.model_id


def test_flags_and_environment_variables_reach_the_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VQTOK_MODEL_ENTROPY_WEIGHT", "VQTOK_MODEL_ENTROPY_TEMPERATURE", "VQTOK_MODEL_ENTROPY_BATCH_WEIGHT",
                 "VQTOK_MODEL_ENTROPY_SAMPLE", "VQTOK_TRAIN_GRADIENT_LOSS_WEIGHT"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["--entropy-weight", "0.002", "--entropy-temperature", "0.3",
                                      "--entropy-batch-weight", "3", "--entropy-sample", "512",
                                      "--gradient-loss-weight", "0.1"])
    assert dataclass_from_args(CodebookTrainingConfig, args) == CodebookTrainingConfig(
        entropy_weight=0.002, entropy_temperature=0.3, entropy_batch_weight=3.0, entropy_sample=512)
    assert dataclass_from_args(TrainConfig, args).gradient_loss_weight == 0.1
    monkeypatch.setenv("VQTOK_MODEL_ENTROPY_WEIGHT", "0.004")
    monkeypatch.setenv("VQTOK_TRAIN_GRADIENT_LOSS_WEIGHT", "0.5")
    from_env = build_parser().parse_args([])
    assert dataclass_from_args(CodebookTrainingConfig, from_env).entropy_weight == 0.004
    assert dataclass_from_args(TrainConfig, from_env).gradient_loss_weight == 0.5
    flag_wins = build_parser().parse_args(["--entropy-weight", "0"])
    assert dataclass_from_args(CodebookTrainingConfig, flag_wins).entropy_weight == 0.0
    with pytest.raises(ValueError, match="--gradient-loss-weight must be >= 0"):
        TrainConfig(gradient_loss_weight=-1.0).validate(NetworkConfig(**TINY))


# --- training -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve smooth 32x32 images (random colours, bilinearly upsampled): a folder the trainer reads quickly."""
    folder = tmp_path_factory.mktemp("images")
    pixels = F.interpolate(torch.rand(12, 3, 4, 4, generator=torch.Generator().manual_seed(8)), size=32,
                           mode="bilinear", align_corners=False)
    for i, image in enumerate(pixels):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _trainer(folder: Path, out: Path, codebook_training: CodebookTrainingConfig, **training: object) -> Trainer:
    config = TrainConfig(data=str(folder), batch_size=8, image_size=16, crops_per_image=4, heldout="2",
                         heldout_crops=8, device="cpu", out=str(out), steps=4, **training)  # type: ignore[arg-type]
    return Trainer(config, NetworkConfig(**TINY), codebook_training)


def test_with_both_off_a_training_step_is_the_plain_loss_step_bit_for_bit(image_folder: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codebook, "entropy_terms", _refuse)
    monkeypatch.setattr("vqtok.model.train.gradient_loss", _refuse)
    trainer = _trainer(image_folder, tmp_path / "run", CodebookTrainingConfig(dead_code_window=1))
    # The reference: a copy of the model and optimiser stepped with the loss as it was before these terms.
    model = copy.deepcopy(trainer.model)
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.load_state_dict(trainer.optimizer.state_dict())
    batches = trainer.batches()
    for _ in range(2):
        batch = next(batches)
        for group, trainer_group in zip(optimizer.param_groups, trainer.optimizer.param_groups, strict=True):
            group["lr"] = trainer_group["lr"]  # the trainer's schedule sets this step's learning rate
        rng = torch.get_rng_state()  # dead-code restarts draw from it: both steps draw the same numbers
        figures = trainer.train_step(batch)
        torch.set_rng_state(rng)
        x = trainer.network.normalize(batch)
        output = model(x)
        loss = F.mse_loss(output.reconstruction.float(), x) + output.vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert "gradient_loss" not in figures and figures["output"].entropy_loss is None
    record = trainer._record(figures, 1.0)
    assert "entropy_loss" not in record and "gradient_loss" not in record
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trainer.model.state_dict()[name]), name


def test_the_terms_are_logged_and_recorded_in_the_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    trainer = _trainer(image_folder, tmp_path / "run", CodebookTrainingConfig(**ENTROPY), gradient_loss_weight=0.1)
    batches = trainer.batches()
    figures = [trainer.train_step(next(batches)) for _ in range(2)]
    record = trainer._record(figures[-1], 1.0)
    assert record["entropy_loss"] > 0 and record["gradient_loss"] > 0
    assert record["vq_loss"] >= record["entropy_loss"]  # the quantizer's loss includes the term
    trainer.save({}, None)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert checkpoint.codebook_training == CodebookTrainingConfig(**ENTROPY)
    assert checkpoint.record.provenance.training is not None
    assert checkpoint.record.provenance.training["gradient_loss_weight"] == 0.1


def _codes_used_after_training(quantizer: str, entropy_weight: float) -> tuple[int, float]:
    """Train a tiny VQ-VAE for 40 steps on smooth synthetic images (K = 256, k-means start, no restarts); the
    distinct codes and the perplexity of the hard assignments of 256 images (4,096 tokens) afterwards."""
    torch.manual_seed(0)
    network = NetworkConfig(num_hiddens=16, num_residual_hiddens=8, embedding_dim=8, num_embeddings=256,
                            quantizer=quantizer)
    codebook_training = CodebookTrainingConfig(kmeans_init=True, dead_code_window=0, entropy_weight=entropy_weight,
                                               entropy_temperature=0.1, entropy_batch_weight=4.0)
    model = VQVAE(network, codebook_training).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)
    images = F.interpolate(torch.rand(256, 3, 4, 4, generator=generator), size=16, mode="bilinear",
                           align_corners=False) - 0.5  # (256, 3, 16, 16), normalised as the seed's pixels
    for _ in range(40):
        x = images[torch.randint(0, 256, (16,), generator=generator)]
        output = model(x)
        loss = F.mse_loss(output.reconstruction, x) + output.vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    counts = torch.bincount(model.eval().encode(images).flatten(), minlength=256).float()
    p = counts / counts.sum()
    return int((counts > 0).sum()), float(torch.exp(-torch.special.xlogy(p, p).sum()))


@pytest.mark.parametrize("quantizer", ["ema", "plain"])
def test_a_short_run_uses_more_codes_with_the_entropy_term(quantizer: str) -> None:
    used_off, perplexity_off = _codes_used_after_training(quantizer, 0.0)
    used_on, perplexity_on = _codes_used_after_training(quantizer, 1e-3)
    # Observed: about 250 codes (perplexity ~200) on, 50 (perplexity ~10) off; the bounds leave wide margins.
    assert used_on >= 0.8 * 256 and used_on > 1.5 * used_off
    assert perplexity_on > 4 * perplexity_off
