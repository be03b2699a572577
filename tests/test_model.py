"""The VQ-VAE and its quantizers: shapes, the EMA rule by hand, restarts, search, round trips."""

from __future__ import annotations

import math

import pytest
import torch

from vqtok.model.config import CodebookTrainingConfig, NetworkConfig
from vqtok.model.quantizers import VectorQuantizer, VectorQuantizerEMA, kmeans, nearest_code, perplexity_of
from vqtok.model.quantizers import search as quantizer_module
from vqtok.model.vqvae import VQVAE

TINY = {"num_hiddens": 16, "num_residual_hiddens": 8, "embedding_dim": 8, "num_embeddings": 32}


@pytest.mark.parametrize("upsample", ["transposed", "resize", "bilinear"])
@pytest.mark.parametrize("downsample", [4, 8, 16])
@pytest.mark.parametrize(("height", "width"), [(48, 80), (16 * 3, 16 * 7), (32, 32)])
def test_shapes_for_every_downsample_factor(downsample: int, height: int, width: int, upsample: str) -> None:
    model = VQVAE(NetworkConfig(downsample=downsample, upsample=upsample, **TINY))
    x = torch.randn(2, 3, height, width)
    out = model(x)
    assert out.reconstruction.shape == (2, 3, height, width)
    assert out.indices.shape == (2, height // downsample, width // downsample)
    assert out.indices.dtype == torch.long
    assert model.encode(x).shape == (2, height // downsample, width // downsample)
    assert model.codebook.shape == (32, 8)
    assert out.vq_loss.dim() == 0 and 1.0 <= float(out.perplexity) <= 32.0


def test_resize_upsampling_has_no_checkerboard_where_transposed_convolutions_print_one() -> None:
    """A constant latent decodes to a constant image through nearest or bilinear doubling + 3x3 convs (away
    from the zero-padded border), whatever the weights; each 2x2 output phase of a 4x4 stride-2 transposed
    kernel sums its own taps, which print a pattern at the stage period (Odena et al. 2016). The seed's keys
    and shapes are kept for "transposed"."""
    torch.manual_seed(0)
    constant = torch.ones(1, 8, 24, 24)  # (B, D, h, w): decodes to 96x96
    patterns = {}
    for upsample in ("transposed", "resize", "bilinear"):
        model = VQVAE(NetworkConfig(downsample=4, upsample=upsample, **TINY)).eval()
        with torch.no_grad():
            image = model.decoder(model.post_vq_conv(constant))[0, :, 32:-32, 32:-32]  # (3, 32, 32), inner
        patterns[upsample] = float(image.std(dim=(1, 2)).max())
    assert max(patterns["resize"], patterns["bilinear"]) < 1e-5 < patterns["transposed"]
    assert [k for k in VQVAE(NetworkConfig(**TINY)).state_dict() if k.startswith("decoder.upsamples.0")] == [
        "decoder.upsamples.0.weight", "decoder.upsamples.0.bias"]


def test_bilinear_doubling_gives_a_ramp_one_step_where_nearest_doubling_alternates() -> None:
    """The doubling inside the decoder stages (before their 3x3 conv): a linear ramp of step 1 comes out of
    the bilinear stage with step 1/2 between every pair of neighbours (away from the border), and out of the
    nearest stage with steps 0 and 1 in turn, the 2-px pattern the model card measures."""
    ramp = torch.arange(16.0).repeat(1, 1, 4, 1)  # (1, 1, 4, 16): x steps by 1
    steps = {}
    for upsample in ("resize", "bilinear"):
        decoder = VQVAE(NetworkConfig(downsample=4, upsample=upsample, **TINY)).decoder
        doubling = decoder.upsamples[0][0]  # the stage's resize, ahead of its convolution
        steps[upsample] = doubling(ramp)[0, 0, 0].diff()[2:-2]  # (28,): interior horizontal steps
    assert torch.allclose(steps["bilinear"], torch.full_like(steps["bilinear"], 0.5))
    assert steps["resize"][0::2].abs().max() == 0 and torch.all(steps["resize"][1::2] == 1)


@pytest.mark.parametrize(("downsample", "height", "width"), [(4, 30, 32), (8, 36, 40), (16, 32, 40)])
def test_sizes_that_are_not_multiples_are_refused(downsample: int, height: int, width: int) -> None:
    model = VQVAE(NetworkConfig(downsample=downsample, **TINY))
    with pytest.raises(ValueError, match=f"multiples of the downsample factor {downsample}, got {height}x{width}"):
        model.encode(torch.randn(1, 3, height, width))


def test_bad_config_values_name_the_field() -> None:
    with pytest.raises(ValueError, match="downsample must be 4, 8 or 16, got 2"):
        NetworkConfig(downsample=2)
    with pytest.raises(ValueError, match="num_embeddings must be >= 1"):
        NetworkConfig(num_embeddings=0)
    with pytest.raises(ValueError, match="upsample must be 'transposed', 'resize' or 'bilinear', got 'bicubic'"):
        NetworkConfig(upsample="bicubic")
    with pytest.raises(ValueError, match="unknown config key\\(s\\): colour"):
        NetworkConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="unknown config key\\(s\\): decay"):  # a training-only field
        NetworkConfig.from_dict({"decay": 0.9})
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1\.5"):
        CodebookTrainingConfig(decay=1.5)
    config = NetworkConfig(downsample=8, pixel_mean=(0.1, 0.2, 0.3))
    assert NetworkConfig.from_dict(config.to_dict()) == config
    training = CodebookTrainingConfig(decay=0.9, kmeans_init=True)
    assert CodebookTrainingConfig.from_dict(training.to_dict()) == training


def test_every_residual_block_has_its_own_weights() -> None:
    model = VQVAE(NetworkConfig(num_residual_layers=3, **TINY))
    for stack in (model.encoder.residual_stack, model.decoder.residual_stack):
        ids = {id(layer.conv3.weight) for layer in stack.layers}
        assert len(ids) == 3


def test_decode_of_encode_equals_forward_reconstruction_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = VQVAE(NetworkConfig(**TINY)).eval()
    x = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        forward = model(x)
        indices = model.encode(x)
        decoded = model.decode(indices)
    assert torch.equal(indices, forward.indices)
    assert torch.equal(decoded, forward.reconstruction)


def test_indices_image_indices_round_trip_keeps_the_grid() -> None:
    torch.manual_seed(1)
    model = VQVAE(NetworkConfig(**TINY)).eval()
    grid = torch.randint(0, 32, (2, 5, 7))
    with torch.no_grad():
        image = model.decode(grid)
        again = model.encode(image)
    assert image.shape == (2, 3, 20, 28)
    assert again.shape == grid.shape


def test_decode_names_the_first_bad_index() -> None:
    model = VQVAE(NetworkConfig(**TINY))
    grid = torch.zeros(1, 2, 3, dtype=torch.long)
    grid[0, 1, 2] = 32
    with pytest.raises(ValueError, match=r"index 32 at \[0, 1, 2\] is outside \[0, 32\)"):
        model.decode(grid)
    with pytest.raises(ValueError, match="expected integer indices"):
        model.decode(grid.float())
    with pytest.raises(ValueError, match=r"expected indices of shape \(B, h, w\)"):
        model.decode(grid[0])


def test_nearest_code_matches_brute_force_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    flat, codebook = torch.randn(1000, 16), torch.randn(100, 16)
    expected = torch.cdist(flat, codebook).argmin(dim=1)
    assert torch.equal(nearest_code(flat, codebook), expected)
    monkeypatch.setattr(quantizer_module, "_DISTANCE_CHUNK_ELEMENTS", 100 * 7)  # 7 rows per chunk
    assert torch.equal(nearest_code(flat, codebook), expected)


def test_perplexity_is_k_for_uniform_use_and_1_for_one_code() -> None:
    assert math.isclose(float(perplexity_of(torch.ones(64))), 64.0, rel_tol=1e-5)
    assert math.isclose(float(perplexity_of(torch.tensor([0.0, 5.0, 0.0]))), 1.0, rel_tol=1e-6)


def _ema_quantizer(
    codebook: torch.Tensor, cluster_size: torch.Tensor, decay: float, window: int = 0
) -> VectorQuantizerEMA:
    quantizer = VectorQuantizerEMA(codebook.shape[0], codebook.shape[1], commitment_cost=0.25,
                                   decay=decay, epsilon=1e-5, dead_code_window=window)
    quantizer.embedding.copy_(codebook)
    quantizer.ema_embedding_sum.copy_(codebook * cluster_size[:, None])
    quantizer.ema_cluster_size.copy_(cluster_size)
    return quantizer


def test_ema_update_against_a_hand_computed_case() -> None:
    quantizer = _ema_quantizer(torch.tensor([[0.0, 0.0], [10.0, 10.0]]), torch.tensor([1.0, 1.0]), decay=0.5)
    # Three latents (B=1, D=2, H=1, W=3): [1,1] and [3,3] pick code 0, [9,9] picks code 1.
    inputs = torch.tensor([[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]]).t().reshape(1, 2, 1, 3)
    out = quantizer.train()(inputs)

    assert out.indices.tolist() == [[[0, 0, 1]]]
    # The output uses the codebook from before this step's update.
    assert torch.equal(out.quantized, torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]).t().reshape(1, 2, 1, 3))
    # Commitment loss only: 0.25 * mean((z - e)^2) = 0.25 * (1+1+9+9+1+1)/6.
    assert math.isclose(float(out.loss), 0.25 * 22 / 6, rel_tol=1e-6)
    # N = 0.5*[1, 1] + 0.5*[2, 1] = [1.5, 1.0];  m = 0.5*[[0,0],[10,10]] + 0.5*[[4,4],[9,9]] = [[2,2],[9.5,9.5]]
    assert torch.allclose(quantizer.ema_cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(quantizer.ema_embedding_sum, torch.tensor([[2.0, 2.0], [9.5, 9.5]]))
    eps, total = 1e-5, 2.5
    smoothed = (torch.tensor([1.5, 1.0]) + eps) / (total + 2 * eps) * total
    expected = torch.tensor([[2.0, 2.0], [9.5, 9.5]]) / smoothed[:, None]
    assert torch.allclose(quantizer.embedding, expected, atol=1e-6)
    assert math.isclose(float(quantizer.embedding[0, 0]), 2.0 / 1.5, rel_tol=1e-4)

    before = quantizer.embedding.clone()
    quantizer.eval()(inputs)  # eval mode never touches the codebook
    assert torch.equal(quantizer.embedding, before)


def test_restarts_reseed_only_dead_codes_from_the_batch() -> None:
    quantizer = VectorQuantizer(4, 2, commitment_cost=0.25, dead_code_window=2).train()
    codebook = torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [5.0, 5.0]])
    quantizer.embedding.data.copy_(codebook)
    inputs = torch.tensor([[0.1, 0.2], [4.9, 5.1], [0.3, 0.0], [5.2, 4.8]]).t().reshape(1, 2, 2, 2)
    batch_rows = {tuple(row) for row in inputs.permute(0, 2, 3, 1).reshape(-1, 2).tolist()}

    quantizer(inputs)  # step 1: codes 1 and 2 unused for one step, not yet dead
    assert torch.equal(quantizer.embedding.data, codebook)
    quantizer(inputs)  # step 2: unused for two steps -> re-seeded
    after = quantizer.embedding.data
    assert torch.equal(after[0], codebook[0]) and torch.equal(after[3], codebook[3])
    assert tuple(after[1].tolist()) in batch_rows and tuple(after[2].tolist()) in batch_rows
    assert quantizer.steps_since_used.tolist() == [0, 0, 0, 0]
    assert quantizer.restarts_total == 2

    quantizer.eval()(inputs * 50)  # eval mode: no restarts, whatever happens
    assert quantizer.restarts_total == 2


def test_ema_restart_keeps_the_reseeded_vector_until_used() -> None:
    quantizer = _ema_quantizer(torch.tensor([[0.0, 0.0], [50.0, 50.0]]), torch.tensor([1.0, 1.0]),
                               decay=0.9, window=1)
    inputs = torch.tensor([[1.0, 1.0], [1.0, 1.5]]).t().reshape(1, 2, 1, 2)
    quantizer.train()(inputs)
    assert quantizer.restarts_total == 1
    reseeded = quantizer.embedding[1].clone()
    assert tuple(reseeded.tolist()) in {(1.0, 1.0), (1.0, 1.5)}
    assert torch.allclose(quantizer.ema_embedding_sum[1] / quantizer.ema_cluster_size[1], reseeded)


def test_kmeans_init_places_codes_on_the_data() -> None:
    torch.manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    data = torch.cat([c + 0.1 * torch.randn(200, 2) for c in centres])
    found = kmeans(data, 3, iters=20)
    distances = torch.cdist(centres, found).min(dim=1).values
    assert float(distances.max()) < 0.5

    quantizer = VectorQuantizerEMA(3, 2, commitment_cost=0.25, kmeans_init=True, kmeans_iters=20)
    assert not bool(quantizer.initialized)
    quantizer.train()(data.t().reshape(1, 2, 1, -1))
    assert bool(quantizer.initialized)
    assert float(torch.cdist(centres, quantizer.embedding).min(dim=1).values.max()) < 0.5


def test_quantizer_stays_float32_under_bf16_autocast() -> None:
    model = VQVAE(NetworkConfig(**TINY)).train()
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(x)
        latents = model.latents(x)
        quantized = model.quantizer(latents)
    assert latents.dtype == torch.bfloat16  # the convolutions ran in bf16
    assert quantized.quantized.dtype == torch.float32
    assert model.quantizer.embedding.dtype == torch.float32
    assert out.vq_loss.dtype == torch.float32


def test_nearest_code_under_autocast_matches_float32() -> None:
    torch.manual_seed(0)
    flat, codebook = torch.randn(4096, 64), torch.randn(512, 64)
    expected = nearest_code(flat, codebook)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # bf16 distances would flip ~1% of codes
        assert torch.equal(nearest_code(flat, codebook), expected)


def test_straight_through_passes_gradients_to_the_encoder() -> None:
    model = VQVAE(NetworkConfig(quantizer="plain", **TINY)).train()
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    (out.reconstruction.pow(2).mean() + out.vq_loss).backward()
    assert model.encoder.downsamples[0].weight.grad is not None
    assert float(model.encoder.downsamples[0].weight.grad.abs().sum()) > 0
    assert float(model.quantizer.embedding.grad.abs().sum()) > 0  # codebook loss reaches the codes


def test_threshold_reseeds_rarely_used_ema_codes_with_grace() -> None:
    quantizer = _ema_quantizer(torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0]]), torch.tensor([8.0, 0.2, 8.0]),
                               decay=0.9, window=10)
    quantizer.dead_code_threshold = 0.5
    quantizer.reseed_cluster_size = max(1.0, 0.5 / 0.9**10)
    inputs = torch.tensor([[0.1, 0.0], [5.1, 5.0], [8.9, 9.0], [0.0, 0.2]]).t().reshape(1, 2, 2, 2)
    quantizer.train()(inputs)
    # Code 1 was used this step, but its EMA size 0.9*0.2 + 0.1*1 = 0.28 is under 0.5: re-seeded.
    assert quantizer.restarts_total == 1
    assert math.isclose(float(quantizer.ema_cluster_size[1]), 0.5 / 0.9**10, rel_tol=1e-5)
    quantizer(inputs)  # a fresh code is not re-seeded again at once
    assert quantizer.restarts_total == 1


def test_threshold_needs_the_ema_quantizer() -> None:
    with pytest.raises(ValueError, match="dead_code_threshold needs the 'ema' quantizer"):
        VQVAE(NetworkConfig(quantizer="plain", **TINY), CodebookTrainingConfig(dead_code_threshold=1.0))


def test_the_network_alone_builds_a_servable_model() -> None:
    """Serving needs only the network: the training config defaults and changes no token."""
    torch.manual_seed(0)
    trained = VQVAE(NetworkConfig(**TINY), CodebookTrainingConfig(commitment_cost=1.0, decay=0.5, kmeans_init=True))
    served = VQVAE(NetworkConfig(**TINY))
    assert served.codebook_training == CodebookTrainingConfig()
    served.load_state_dict(trained.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(served.eval().encode(x), trained.eval().encode(x))


def test_the_quantizer_combines_statistics_through_its_injected_reducer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Single-process code never touches torch.distributed; an injected reducer sees every statistic."""
    import torch.distributed as dist

    from vqtok.model.quantizers import Reducer, VectorQuantizerEMA

    def no_distributed(*args: object, **kwargs: object) -> bool:
        raise AssertionError("the quantizer looked at torch.distributed")

    monkeypatch.setattr(dist, "is_initialized", no_distributed)
    monkeypatch.setattr(dist, "all_reduce", no_distributed)
    torch.manual_seed(0)
    quantizer = VectorQuantizerEMA(8, 4, 0.25, decay=0.9, epsilon=1e-5, dead_code_window=1).train()
    inputs = torch.randn(2, 4, 3, 3)
    quantizer(inputs)  # the default reducer: one process, nothing to combine
    seen: list[str] = []

    def summed(tensor: torch.Tensor) -> torch.Tensor:
        seen.append("sum")
        return tensor.mul_(2)  # as if a second, identical rank had the same statistics

    def from_rank0(tensor: torch.Tensor) -> torch.Tensor:
        seen.append("broadcast")
        return tensor

    quantizer.reducer = Reducer(summed, from_rank0)
    out = quantizer(inputs)
    assert "sum" in seen and "broadcast" in seen  # counts, EMA sums and the restarts went through it
    assert float(out.counts.sum()) == 2 * inputs.shape[0] * 3 * 3  # the counts came back summed


@pytest.mark.parametrize(("fields", "message"), [
    ({"arch": "vqgan", "downsample": 16, "channel_multipliers": (1, 2, 4)},
     r"channel_multipliers \(1, 2, 4\) has 3 levels, which downsample by 4, but downsample is 16"),
    ({"arch": "vqgan", "downsample": 8, "attention_levels": (4,)}, r"attention_levels must be in \[0, 3\], got \(4,\)"),
    ({"arch": "vqgan", "downsample": 8, "num_hiddens": 48}, "every level's channels must divide by norm_groups 32"),
    ({"arch": "vqgan", "downsample": 8, "channel_multipliers": (1, 2, 2, 65)},
     r"channel_multipliers must be in \[1, 64\]"),
    ({"channel_multipliers": (1, 2, 4)}, "channel_multipliers is a vqgan setting; arch 'seed' takes none"),
    ({"quantizer": "fsq", "fsq_levels": (8, 5, 5, 5), "num_embeddings": 512},
     r"num_embeddings must be the product of fsq_levels \(8, 5, 5, 5\) \(1000\), got 512"),
    ({"quantizer": "fsq", "fsq_levels": (8, 1), "num_embeddings": 8},
     r"fsq_levels needs 1 to 16 levels, each in \[2, 256\]"),
    ({"quantizer": "fsq", "fsq_levels": (8, 8), "num_embeddings": 64, "l2_normalize": True},
     "the 'fsq' quantizer takes neither"),
    ({"fsq_levels": (8, 8)}, "fsq_levels is an 'fsq' setting; quantizer 'ema' takes none"),
    ({"code_dim": -1}, "code_dim must be >= 0, got -1"),
])
def test_the_new_network_fields_are_refused_out_of_range_with_their_name(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NetworkConfig(**fields)


def test_kmeans_init_is_refused_for_fsq_and_its_gathering_is_bounded() -> None:
    fsq = NetworkConfig(quantizer="fsq", fsq_levels=(8, 8), num_embeddings=64)
    with pytest.raises(ValueError, match="kmeans_init needs a codebook; the 'fsq' quantizer has none"):
        CodebookTrainingConfig(kmeans_init=True).check_network(fsq)
    with pytest.raises(ValueError, match=r"kmeans_vectors_per_code must be in \[1, 1000\], got 0"):
        CodebookTrainingConfig(kmeans_vectors_per_code=0)
    with pytest.raises(TypeError, match="channel_multipliers must be a list of integers"):
        NetworkConfig(arch="vqgan", downsample=8, channel_multipliers=(1.0, 2, 2, 4))
