"""Encode and decode speed of the published VQGAN-size tokenizers ``vqtok import`` serves, at their native sizes.

The networks are the ones the importers build (LlamaGen VQ-16: 256 px, K=16,384, D=8, l2-normalised codes,
attention at the lowest level; Chameleon: 512 px, K=8,192, D=256, middle attention only), with random weights
(speed does not depend on the values). Each is timed in this process, float32, ``torch.inference_mode``, on the
model's ``encode`` (images -> indices) and ``decode`` (indices -> images) at ``--batch-sizes``; the best of
``--repeats`` rounds is reported as images/s. No HTTP: the service adds its parsing and image coding on top.

    python bench/imported_models.py                          # both models, batch 1 and 8, on the CPU
    python bench/imported_models.py --models llamagen-vq16 --batch-sizes 1 4 --device cuda

A shared machine's figures are noisy: the threads in use are printed with them.
"""

from __future__ import annotations

import argparse
import time

import torch

from vqtok.model.config import NetworkConfig
from vqtok.model.vqvae import VQVAE

_COMMON = {"arch": "vqgan", "num_hiddens": 128, "channel_multipliers": (1, 1, 2, 2, 4), "num_res_blocks": 2,
           "mid_attention": True, "z_channels": 256, "norm_groups": 32, "quantizer": "plain", "downsample": 16,
           "pixel_mean": (0.5, 0.5, 0.5), "pixel_std": (0.5, 0.5, 0.5)}
#: name -> (network as the importer builds it, native side)
MODELS: dict[str, tuple[NetworkConfig, int]] = {
    "llamagen-vq16": (NetworkConfig(**_COMMON, attention_levels=(4,), embedding_dim=8, num_embeddings=16384,
                                    l2_normalize=True), 256),
    "chameleon": (NetworkConfig(**_COMMON, attention_levels=(), embedding_dim=256, num_embeddings=8192), 512),
}


def _best_seconds(run: object, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()  # type: ignore[operator]
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def measure(name: str, batch_sizes: list[int], repeats: int, device: torch.device) -> None:
    network, side = MODELS[name]
    model = VQVAE(network).to(device).eval()
    parameters = sum(p.numel() for p in model.parameters())
    grid = side // network.downsample
    print(f"{name}: {parameters / 1e6:.1f} M parameters, {side}x{side} -> {grid}x{grid} tokens, {device}, "
          f"{torch.get_num_threads()} threads")
    with torch.inference_mode():
        for batch in batch_sizes:
            images = torch.rand(batch, 3, side, side, device=device) * 2 - 1
            indices = model.encode(images)  # warm-up (and the indices to decode)
            model.decode(indices)
            encode_s = _best_seconds(lambda images=images: model.encode(images), repeats, device)
            decode_s = _best_seconds(lambda indices=indices: model.decode(indices), repeats, device)
            print(f"  batch {batch:>3}: encode {batch / encode_s:7.2f} images/s ({encode_s / batch * 1e3:7.1f} "
                  f"ms/image), decode {batch / decode_s:7.2f} images/s ({decode_s / batch * 1e3:7.1f} ms/image)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS, reverse=True))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for name in args.models:
        measure(name, args.batch_sizes, args.repeats, torch.device(args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
