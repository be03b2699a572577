"""Prove ``vqtok import`` equivalent to the original code, on the architecture, with random weights.

    python scripts/check_import_equivalence.py --source llamagen --original /path/to/LlamaGen
    python scripts/check_import_equivalence.py --source taming --original /path/to/taming-transformers
    python scripts/check_import_equivalence.py --source chameleon --original /path/to/chameleon

For each model size (a small one and the published one), the script:

1. builds the ORIGINAL network from the local checkout (its own modules, imported from their files; nothing is
   fetched): LlamaGen's ``VQModel`` (``tokenizer/tokenizer_image/vq_model.py``); taming's ``Encoder``,
   ``Decoder`` and ``VectorQuantizer2`` assembled under ``VQModel``'s attribute names (``VQModel`` itself
   imports Lightning and the training entry point; ``quantize.py`` needs ``einops``); Chameleon's ``VQModel``
   (``chameleon/inference/vqgan.py``);
2. gives it random weights: PyTorch's default init for convolutions, GroupNorm scales and shifts drawn around
   1 and 0 (so a swapped norm would show), and a normal-init codebook (the published +-1/K init makes
   near-ties) spread like the network's own pre-quantization latents (per-channel mean and standard deviation on
   two calibration images), so that many codes are chosen;
3. saves it in the original format: LlamaGen ``{"model": state_dict, "args": argparse.Namespace}``, taming and
   Chameleon a Lightning-style ``{"state_dict": ..., "callbacks": {class: ...}, "optimizer_states": ...}`` with
   the training loss's keys and a YAML config, so the import also goes through the restricted unpickler;
4. imports it with ``vqtok import`` (the command's ``main``) and loads the result with ``load_checkpoint``;
5. compares, in float32 on the CPU, on the same random images in [-1, 1]: the encode indices (share of equal
   positions, needed >= 99.9%) and the decoded images from the same indices (max abs difference, needed
   <= 1e-4).

Prints one line per size and exits 1 if any size fails. The original code stays outside the repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from vqtok.model.checkpoint import load_checkpoint
from vqtok.model.importers.command import main as import_main

INDEX_AGREEMENT = 0.999
DECODE_TOLERANCE = 1e-4


Original = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], list[str]]
"""What building an original returns: its encode (images -> indices), its decode (indices -> images), and the
``vqtok import`` arguments naming the files it saved."""


class FakeModelCheckpoint:
    """Stands for a Lightning callback class: real ``.ckpt`` files key callback state by such classes."""


@dataclass(frozen=True)
class Case:
    """One model size: its name, the image side to test at, and the original's constructor arguments."""

    name: str
    image_size: int
    options: dict[str, Any]


def load_module(path: Path, name: str) -> ModuleType:
    """Import one file of the original checkout by path (its package ``__init__`` and siblings stay unimported)."""
    if not path.is_file():
        raise SystemExit(f"not found in the checkout: {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def randomize(model: nn.Module, codebook: torch.Tensor, generator: torch.Generator,
              latents: Callable[[torch.Tensor], torch.Tensor], side: int) -> None:
    """GroupNorm affine around (1, 0); the convolutions keep PyTorch's default init; then a normal-init codebook
    (K, D) with the per-channel mean and standard deviation of ``latents`` (images -> (B, D, h, w) pre-quantization
    latents) on two random calibration images of ``side`` pixels."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        calibration = torch.rand(2, 3, side, side, generator=generator) * 2 - 1
        flat = latents(calibration).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])  # (N, D)
        noise = torch.randn(codebook.shape, generator=generator)
        codebook.copy_(flat.mean(0) + flat.std(0) * noise)


# ------------------------------------------------------------------------------------------------ LlamaGen


def llamagen_cases() -> list[Case]:
    return [
        Case("small VQ-8 (K=1024, D=8, z=64)", 64,
             {"encoder_ch_mult": [1, 2, 2, 4], "decoder_ch_mult": [1, 2, 2, 4], "codebook_size": 1024,
              "codebook_embed_dim": 8, "z_channels": 64}),
        Case("published VQ-16 (K=16384, D=8, z=256)", 256, {"encoder_ch_mult": [1, 1, 2, 2, 4],
                                                            "decoder_ch_mult": [1, 1, 2, 2, 4]}),
        Case("published VQ-8 (K=16384, D=8, z=256)", 256, {"encoder_ch_mult": [1, 2, 2, 4],
                                                           "decoder_ch_mult": [1, 2, 2, 4]}),
    ]


def llamagen_original(checkout: Path, case: Case, directory: Path, generator: torch.Generator
                      ) -> Original:
    vq = load_module(checkout / "tokenizer" / "tokenizer_image" / "vq_model.py", "llamagen_vq_model")
    model = vq.VQModel(vq.ModelArgs(**case.options)).eval()
    randomize(model, model.quantize.embedding.weight, generator, lambda x: model.quant_conv(model.encoder(x)),
              case.image_size)
    weights = directory / "vq.pt"
    torch.save({"model": model.state_dict(), "steps": 1, "args": argparse.Namespace(vq_model="VQ-16")}, weights)

    factor = 2 ** (len(case.options["encoder_ch_mult"]) - 1)

    def encode(x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        _, _, (_, _, indices) = model.encode(x)
        return indices.view(b, height // factor, width // factor)

    def decode(indices: torch.Tensor) -> torch.Tensor:
        b, h, w = indices.shape
        return model.decode_code(indices.reshape(-1), shape=(b, model.config.codebook_embed_dim, h, w))

    return encode, decode, ["--from", "llamagen", "--weights", str(weights)]


# ------------------------------------------------------------------------------------------ taming / Chameleon


def taming_cases(published_resolution: int, published_codes: tuple[int, ...], attn: list[int]) -> list[Case]:
    small = {"ch": 32, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [8], "resolution": 64,
             "z_channels": 32, "n_embed": 512, "embed_dim": 16}
    cases = [Case("small f8 (ch 32, K=512, D=16, attention at 8 px)", 64, small)]
    for codes in published_codes:
        cases.append(Case(
            f"published f16 (ch 128, K={codes}, D=256, attention {attn or 'mid only'})", published_resolution,
            {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": attn,
             "resolution": published_resolution, "z_channels": 256, "n_embed": codes, "embed_dim": 256},
        ))
    return cases


def _yaml(options: dict[str, Any]) -> str:
    dd = {k: options[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels")}
    lines = ["model:", "  base_learning_rate: 4.5e-06", "  target: taming.models.vqgan.VQModel", "  params:",
             f"    embed_dim: {options['embed_dim']}", f"    n_embed: {options['n_embed']}", "    ddconfig:",
             "      double_z: false", "      in_channels: 3", "      out_ch: 3", "      dropout: 0.0"]
    for key, value in dd.items():
        if isinstance(value, list):
            lines.append(f"      {key}:" + (" []" if not value else ""))
            lines += [f"      - {v}" for v in value]
        else:
            lines.append(f"      {key}: {value}")
    lines += ["    lossconfig:", "      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
              "      params:", "        disc_start: 250001  # a comment", "        codebook_weight: 1.0"]
    return "\n".join(lines) + "\n"


def _ddconfig(options: dict[str, Any]) -> dict[str, Any]:
    return {"double_z": False, "in_channels": 3, "out_ch": 3, "dropout": 0.0,
            **{k: options[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
                                       "z_channels")}}


def _save_lightning(model: nn.Module, directory: Path, options: dict[str, Any]) -> list[str]:
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)  # what a training checkpoint also holds
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    weights, config = directory / "last.ckpt", directory / "model.yaml"
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": state,
                "callbacks": {FakeModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
                "lr_schedulers": [], "hyper_parameters": {"n_embed": options["n_embed"]}}, weights)
    config.write_text(_yaml(options), encoding="utf-8")
    return ["--weights", str(weights), "--config", str(config)]


def taming_original(checkout: Path, case: Case, directory: Path, generator: torch.Generator
                    ) -> Original:
    modules = load_module(checkout / "taming" / "modules" / "diffusionmodules" / "model.py", "taming_model")
    quantize = load_module(checkout / "taming" / "modules" / "vqvae" / "quantize.py", "taming_quantize")
    options, dd = case.options, _ddconfig(case.options)

    class AssembledVQModel(nn.Module):
        """taming's ``VQModel`` without Lightning: the same attributes, so the same state-dict keys."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = modules.Encoder(**dd)
            self.decoder = modules.Decoder(**dd)
            self.quantize = quantize.VectorQuantizer2(options["n_embed"], options["embed_dim"], beta=0.25)
            self.quant_conv = nn.Conv2d(dd["z_channels"], options["embed_dim"], 1)
            self.post_quant_conv = nn.Conv2d(options["embed_dim"], dd["z_channels"], 1)

    model = AssembledVQModel().eval()
    randomize(model, model.quantize.embedding.weight, generator, lambda x: model.quant_conv(model.encoder(x)),
              case.image_size)

    def encode(x: torch.Tensor) -> torch.Tensor:
        h = model.quant_conv(model.encoder(x))
        _, _, (_, _, indices) = model.quantize(h)
        return indices.view(h.shape[0], h.shape[2], h.shape[3])

    def decode(indices: torch.Tensor) -> torch.Tensor:
        b, h, w = indices.shape
        quant = model.quantize.get_codebook_entry(indices.reshape(-1), shape=(b, h, w, options["embed_dim"]))
        return model.decoder(model.post_quant_conv(quant))

    return encode, decode, ["--from", "taming", *_save_lightning(model, directory, options)]


def chameleon_original(checkout: Path, case: Case, directory: Path, generator: torch.Generator
                       ) -> Original:
    vqgan = load_module(checkout / "chameleon" / "inference" / "vqgan.py", "chameleon_vqgan")
    options = case.options
    model = vqgan.VQModel(ddconfig=_ddconfig(options), n_embed=options["n_embed"], embed_dim=options["embed_dim"])
    model = model.eval()
    randomize(model, model.quantize.embedding.weight, generator, lambda x: model.quant_conv(model.encoder(x)),
              case.image_size)

    def encode(x: torch.Tensor) -> torch.Tensor:
        quant, _, (_, _, indices) = model.encode(x)
        return indices.view(quant.shape[0], quant.shape[2], quant.shape[3])

    def decode(indices: torch.Tensor) -> torch.Tensor:
        b, h, w = indices.shape
        quant = model.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, options["embed_dim"]))
        return model.decode(quant)

    return encode, decode, ["--from", "chameleon", *_save_lightning(model, directory, options)]


SOURCES: dict[str, tuple[Callable[[], list[Case]], Callable[..., Any]]] = {
    "llamagen": (llamagen_cases, llamagen_original),
    "taming": (lambda: taming_cases(256, (1024, 16384), [16]), taming_original),
    "chameleon": (lambda: taming_cases(512, (8192,), []), chameleon_original),
}


def check_case(source: str, checkout: Path, case: Case, images: int, seed: int) -> bool:
    torch.manual_seed(seed)  # the original modules' default initialisation draws from the global generator
    generator = torch.Generator().manual_seed(seed)
    build = SOURCES[source][1]
    with tempfile.TemporaryDirectory(prefix="vqtok-equivalence-") as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        encode, decode, import_args = build(checkout, case, directory, generator)
        out = directory / "imported"
        if import_main([*import_args, "--out", str(out)]) != 0:
            print(f"FAIL {source} {case.name}: vqtok import failed")
            return False
        ours = load_checkpoint(out, torch.device("cpu")).model
        x = torch.rand(images, 3, case.image_size, case.image_size, generator=generator) * 2 - 1  # [-1, 1]
        with torch.no_grad():
            original_indices = encode(x).long()
            our_indices = ours.encode(x)
            agreement = float((original_indices == our_indices).float().mean())
            original_images = decode(original_indices)
            our_images = ours.decode(original_indices)
            max_abs = float((original_images - our_images).abs().max())
        codes = int(original_indices.unique().numel())
        ok = agreement >= INDEX_AGREEMENT and max_abs <= DECODE_TOLERANCE
        print(f"{'PASS' if ok else 'FAIL'} {source} {case.name}: {images} images {case.image_size}px, grid "
              f"{tuple(original_indices.shape[1:])}, indices agree {agreement:.4%} ({codes} distinct codes), "
              f"decode max abs diff {max_abs:.2e} (output range {float(original_images.abs().max()):.2f}), "
              f"{time.perf_counter() - started:.0f} s")
        return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=sorted(SOURCES), required=True)
    parser.add_argument("--original", type=Path, required=True, help="local checkout of the original project")
    parser.add_argument("--images", type=int, default=4, help="random images per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("small", "published"), help="run only the small or the published sizes")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    cases = [c for c in SOURCES[args.source][0]() if args.only is None or c.name.startswith(args.only)]
    results = [check_case(args.source, args.original, case, args.images, args.seed) for case in cases]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
