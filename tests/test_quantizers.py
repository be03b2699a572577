"""The quantizers package: FSQ, l2-normalised and low-dimensional codes, k-means from many batches, the factory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
from vqtok.model.quantizers import (
    FiniteScalarQuantizer,
    VectorQuantizer,
    VectorQuantizerEMA,
    build_quantizer,
    kmeans_plus_plus,
    nearest_code,
)
from vqtok.model.vqvae import VQVAE

TINY = {"num_hiddens": 16, "num_residual_hiddens": 8, "embedding_dim": 8, "num_embeddings": 32}


def _as_latents(flat: torch.Tensor) -> torch.Tensor:
    """(N, D) rows -> (1, D, 1, N) latents, so that position n holds row n."""
    return flat.t().reshape(1, flat.shape[1], 1, flat.shape[0])


# --- FSQ ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (8, 8, 8, 6, 5), (2, 3), (7,)])
def test_fsq_maps_every_index_to_a_code_and_back(levels: tuple[int, ...]) -> None:
    fsq = FiniteScalarQuantizer(levels, embedding_dim=len(levels))
    k = math.prod(levels)
    indices = torch.arange(k)
    codes = fsq.indices_to_codes(indices)  # (K, C)
    assert codes.shape == (k, len(levels)) and codes.dtype == torch.float32
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    assert torch.equal(fsq.codebook, codes)
    assert float(codes.abs().max()) <= 1.0
    assert torch.unique(codes, dim=0).shape[0] == k  # K distinct grid points
    for channel, level in enumerate(levels):  # exactly L_i values per channel
        assert torch.unique(codes[:, channel]).numel() == level


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (8, 8, 8, 6, 5)])
def test_fsq_codebook_row_i_quantizes_to_index_i(levels: tuple[int, ...]) -> None:
    fsq = FiniteScalarQuantizer(levels, embedding_dim=len(levels)).eval()
    codebook = fsq.codebook  # (K, C)
    # Invert the bounding: the latent whose bounded value is exactly the code's integer level.
    integers = codebook * fsq._half_width  # (K, C)
    latents = torch.atanh((integers + fsq._offset) / fsq._half) - fsq._shift
    inputs = _as_latents(latents)
    assert torch.equal(fsq.quantize_indices(inputs).flatten(), torch.arange(codebook.shape[0]))
    out = fsq(inputs)
    assert torch.equal(out.indices.flatten(), torch.arange(codebook.shape[0]))
    assert torch.allclose(out.quantized[0, :, 0, :].t(), codebook)
    assert torch.equal(fsq.lookup(out.indices), out.quantized.permute(0, 2, 3, 1))
    assert int(out.codes_used) == codebook.shape[0] and math.isclose(float(out.perplexity), codebook.shape[0],
                                                                       rel_tol=1e-4)


def test_fsq_rounds_any_input_onto_the_grid_with_straight_through_gradients() -> None:
    torch.manual_seed(0)
    fsq = FiniteScalarQuantizer((8, 5, 5, 5), embedding_dim=16).train()  # D != C: projections
    assert fsq.project_in is not None and fsq.project_out is not None
    inputs = (torch.randn(2, 16, 4, 5) * 5).requires_grad_()
    out = fsq(inputs)
    assert out.quantized.shape == (2, 16, 4, 5) and out.indices.shape == (2, 4, 5)
    assert float(out.loss) == 0.0 and out.loss.dim() == 0
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 1000
    assert torch.allclose(fsq.lookup(out.indices).permute(0, 3, 1, 2), out.quantized, atol=1e-6)
    assert torch.equal(fsq.quantize_indices(inputs), out.indices)
    out.quantized.square().sum().backward()
    assert inputs.grad is not None and float(inputs.grad.abs().sum()) > 0
    assert fsq.project_in.weight.grad is not None and float(fsq.project_in.weight.grad.abs().sum()) > 0
    assert float(out.counts.sum()) == 40 and int(out.codes_used) == int((out.counts > 0).sum())
    assert set(fsq.state_dict()) == {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"}
    assert FiniteScalarQuantizer((8, 5, 5, 5), embedding_dim=4).state_dict() == {}


# --- l2-normalised and low-dimensional codes -------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 64])
def test_l2_search_equals_brute_force_cosine_argmax(dim: int) -> None:
    torch.manual_seed(dim)
    flat, raw_codes = torch.randn(5000, dim), torch.randn(8192, dim)
    codes = F.normalize(raw_codes, dim=1)
    expected = (F.normalize(flat, dim=1) @ codes.t()).argmax(dim=1)
    assert torch.equal(nearest_code(flat, codes, cosine=True), expected)
    # Through the quantizer: its codebook is normalised, its search is by cosine.
    quantizer = VectorQuantizerEMA(8192, dim, 0.25, l2_normalize=True).eval()
    quantizer.embedding.copy_(codes)
    assert torch.allclose(quantizer.codebook.norm(dim=1), torch.ones(8192), atol=1e-6)
    assert torch.equal(quantizer.quantize_indices(_as_latents(flat)).flatten(), expected)
    plain = VectorQuantizer(8192, dim, 0.25, l2_normalize=True).eval()
    plain.embedding.data.copy_(raw_codes * 3.0)  # any norm: the search normalises the parameter
    assert torch.equal(plain.quantize_indices(_as_latents(flat)).flatten(), expected)


@pytest.mark.parametrize("code_dim", [0, 4])
def test_ema_codes_stay_unit_norm_with_l2(code_dim: int) -> None:
    torch.manual_seed(1)
    quantizer = VectorQuantizerEMA(64, 16, 0.25, decay=0.9, code_dim=code_dim, l2_normalize=True,
                                   dead_code_window=1).train()
    for _ in range(5):
        out = quantizer(torch.randn(4, 16, 6, 6) * 3 + 1)
        norms = quantizer.codebook.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert quantizer.restarts_total > 0  # restarts wrote codes too, normalised
    assert quantizer.codebook.shape == (64, code_dim or 16)
    # The quantized vectors are the normalised codes (no projection) and the loss compares unit vectors.
    if code_dim == 0:
        flat = out.quantized.permute(0, 2, 3, 1).reshape(-1, 16)
        assert torch.allclose(flat.norm(dim=1), torch.ones(flat.shape[0]), atol=1e-5)
        assert float(out.loss) <= 0.25 * 4.0 / 16 + 1e-6  # ||a - b||^2 <= 4 for unit vectors, mean over D


@pytest.mark.parametrize("kind", [VectorQuantizerEMA, VectorQuantizer])
@pytest.mark.parametrize("l2", [False, True])
def test_code_dim_projections_shape_and_gradients(kind: type, l2: bool) -> None:
    torch.manual_seed(2)
    quantizer = kind(32, 24, 0.25, code_dim=8, l2_normalize=l2).train()
    assert quantizer.codebook.shape == (32, 8) and quantizer.codebook.dtype == torch.float32
    inputs = torch.randn(2, 24, 3, 5, requires_grad=True)
    out = quantizer(inputs)
    assert out.quantized.shape == (2, 24, 3, 5) and out.indices.shape == (2, 3, 5)
    assert quantizer.lookup(out.indices).shape == (2, 3, 5, 24)
    (out.quantized.square().mean() + out.loss).backward()
    for tensor in (inputs, quantizer.project_in.weight, quantizer.project_out.weight):
        assert tensor.grad is not None and float(tensor.grad.abs().sum()) > 0
    if kind is VectorQuantizer:
        assert float(quantizer.embedding.grad.abs().sum()) > 0  # the codebook loss reaches the codes
    evaluated = quantizer.eval()(inputs)  # eval: no EMA update between the search and the lookup below
    assert torch.equal(quantizer.quantize_indices(inputs), evaluated.indices)
    assert torch.allclose(quantizer.lookup(evaluated.indices).permute(0, 3, 1, 2), evaluated.quantized, atol=1e-6)


def test_projections_and_fsq_stay_float32_under_bf16_autocast() -> None:
    for quantizer in (VectorQuantizerEMA(32, 24, 0.25, code_dim=8, l2_normalize=True),
                      FiniteScalarQuantizer((8, 5, 5, 5), embedding_dim=24)):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = quantizer.train()(torch.randn(2, 24, 3, 3).bfloat16())
            looked_up = quantizer.lookup(out.indices)
        assert out.quantized.dtype == torch.float32 and looked_up.dtype == torch.float32


# --- k-means initialisation from many batches --------------------------------------------------------------


def test_initialise_codebook_at_8192_codes_from_81920_vectors() -> None:
    torch.manual_seed(3)
    k = 8192
    quantizer = VectorQuantizerEMA(k, 16, 0.25, code_dim=8, kmeans_init=True, kmeans_iters=1, dead_code_window=10)
    assert quantizer.needs_initialisation and not bool(quantizer.initialized)
    vectors = torch.randn(10 * k, 16)
    quantizer.initialise_codebook(vectors)
    assert not quantizer.needs_initialisation and bool(quantizer.initialized)
    codes = quantizer.codebook
    assert codes.shape == (k, 8)
    assert torch.unique(codes, dim=0).shape[0] >= 0.99 * k  # distinct codes
    projected = quantizer.project_in(vectors).detach()
    used = torch.unique(nearest_code(projected, codes)).numel()
    assert used >= 0.9 * k, used
    # EMA statistics consistent with the codes: sum / size is the code.
    means = quantizer.ema_embedding_sum / quantizer.ema_cluster_size[:, None]
    assert torch.allclose(means, codes, atol=1e-5)


def test_initialise_codebook_with_l2_gives_unit_codes_and_a_forward_skips_kmeans() -> None:
    torch.manual_seed(4)
    quantizer = VectorQuantizer(64, 8, 0.25, l2_normalize=True, kmeans_init=True, kmeans_iters=3).train()
    quantizer.initialise_codebook(torch.randn(640, 8))
    assert torch.allclose(quantizer.codebook.norm(dim=1), torch.ones(64), atol=1e-5)
    before = quantizer.embedding.detach().clone()
    quantizer(torch.randn(1, 8, 4, 4))  # already initialised: the first batch does not re-run k-means
    assert torch.equal(quantizer.embedding.detach(), before)
    with pytest.raises(ValueError, match=r"expects \(N, 8\) vectors"):
        quantizer.initialise_codebook(torch.randn(10, 4))


def test_kmeans_plus_plus_with_fewer_distinct_rows_than_clusters() -> None:
    rows = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]).repeat(4, 1)  # 3 distinct rows
    centres = kmeans_plus_plus(rows, 6)
    assert centres.shape == (6, 2)
    assert torch.unique(centres, dim=0).shape[0] == 3  # every distinct row taken before any repeat


# --- the seed configuration and the factory ---------------------------------------------------------------


def test_seed_configuration_state_dict_keys_are_unchanged() -> None:
    ema = VQVAE(NetworkConfig(**TINY)).quantizer.state_dict()
    assert set(ema) == {"embedding", "ema_cluster_size", "ema_embedding_sum", "steps_since_used", "initialized"}
    assert ema["embedding"].shape == (32, 8) and ema["ema_embedding_sum"].shape == (32, 8)
    plain = VQVAE(NetworkConfig(quantizer="plain", **TINY)).quantizer.state_dict()
    assert set(plain) == {"embedding", "steps_since_used", "initialized"}


@pytest.mark.parametrize(
    ("network", "kind"),
    [
        ({"quantizer": "ema"}, VectorQuantizerEMA),
        ({"quantizer": "plain"}, VectorQuantizer),
        ({"quantizer": "ema", "code_dim": 4, "l2_normalize": True}, VectorQuantizerEMA),
        ({"quantizer": "fsq", "num_embeddings": 1000, "fsq_levels": (8, 5, 5, 5)}, FiniteScalarQuantizer),
    ],
)
def test_build_quantizer_picks_the_kind_and_the_vqvae_runs_with_it(network: dict, kind: type) -> None:
    config = NetworkConfig(**{**TINY, **network})
    quantizer = build_quantizer(config, CodebookTrainingConfig())
    assert type(quantizer) is kind
    assert quantizer.codebook.shape == (config.num_embeddings, config.code_dim or len(config.fsq_levels) or 8)
    model = VQVAE(config).train()
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert out.reconstruction.shape == x.shape and out.indices.shape == (2, 4, 4)
    assert model.decode(model.encode(x)).shape == x.shape
    assert config.parameter_count() == sum(t.numel() for t in model.state_dict().values())
