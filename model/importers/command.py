"""``vqtok import``: a published tokenizer checkpoint -> a vqtok checkpoint directory.

    vqtok import --from llamagen --weights vq_ds16_c2i.pt --out checkpoints/llamagen-vq16
    vqtok import --from taming --weights last.ckpt --config model.yaml --out checkpoints/taming-f16-16384
    vqtok import --from chameleon --weights vqgan.ckpt --config vqgan.yaml --out checkpoints/chameleon

The directory holds ``model.safetensors`` and ``config.json`` like every vqtok checkpoint; its record adds
``imported_from`` (source format, the source file's name and sha256, the conversion version) and ``serving``
(native size, fit, default layout). Errors (a missing file, a file that would run code, weights that do not
match) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vqtok.model.checkpoint import read_checkpoint_record, save_checkpoint, sha256_file
from vqtok.model.importers import chameleon, llamagen, taming
from vqtok.model.importers.common import CONVERSION_VERSION, CheckpointImportError, ImportResult
from vqtok.model.importers.config_file import ConfigFileError, read_config
from vqtok.model.importers.safe_load import UnsafeCheckpointError, load_untrusted
from vqtok.model.options import add_config_arguments, config_from_args
from vqtok.model.record import ImportedFrom, Provenance, ServingDefaults

__all__ = ["ENV_PREFIX", "SOURCES", "ImportConfig", "import_checkpoint", "main"]

SourceName = Literal["llamagen", "taming", "chameleon"]
ENV_PREFIX = "VQTOK_IMPORT_"
#: source name -> its importer: (loaded file object, file name for messages, config or None, prefix) -> result.
SOURCES: dict[str, Callable[..., ImportResult]] = {
    "llamagen": llamagen.import_weights,
    "taming": taming.import_weights,
    "chameleon": chameleon.import_weights,
}


@dataclass
class ImportConfig:
    """What ``vqtok import`` converts, and the serving defaults it records.

    Attributes:
      source: the published format: llamagen (LlamaGen VQ-8 / VQ-16, Janus), taming (taming-transformers and
        latent-diffusion VQ models) or chameleon (Chameleon / Anole / Lumina-mGPT's VQGAN).
      weights: the published checkpoint file (.pt, .ckpt, .pth or .safetensors); read without running any code.
      out: the checkpoint directory to write (replaced atomically if it exists).
      config: the model config published with the weights (taming / latent-diffusion / Chameleon YAML, or JSON);
        without it the architecture is read from the weights' shapes.
      name: the model's name in the record (default: the output folder's name).
      size: the native image side the service fits images to when a request names no size (default: the
        config's resolution, else LlamaGen 256, taming 256, Chameleon 512).
      fit: how /encode fits images to the native size when a request names no fit (default: crop, as the three
        projects preprocess: resize the short side, centre-crop).
      layout: the default token layout, a preset of vqtok.model.layouts (default: flat for llamagen and taming,
        chameleon-like for chameleon; lumina-like for Lumina-mGPT).
      prefix: keep only the state-dict keys that start with this and strip it (Janus: gen_vision_model.).
      l2_normalize: llamagen only: the codebook is searched by cosine (every published LlamaGen model; turn off
        only for a model trained with codebook_l2_norm=False).
    """

    source: SourceName
    weights: Path
    out: Path
    config: Path | None = None
    name: str | None = None
    size: int | None = None
    fit: Literal["pad", "crop", "resize", "none"] | None = None
    layout: str | None = None
    prefix: str = ""
    l2_normalize: bool = True


def _check_layout(name: str, num_embeddings: int) -> None:
    from vqtok.model.layouts import PRESETS, LayoutError, get_layout

    if name not in PRESETS:
        raise CheckpointImportError(f"layout {name!r} is not a preset; presets: {', '.join(PRESETS)}")
    try:
        get_layout(name, codebook_size=num_embeddings)
    except (LayoutError, ValueError) as exc:
        raise CheckpointImportError(f"layout {name!r} does not fit K = {num_embeddings} codes: {exc}") from None


def import_checkpoint(config: ImportConfig) -> tuple[Path, ImportResult]:
    """Convert ``config.weights`` and write the checkpoint to ``config.out``; returns (path, result).

    Raises ``FileNotFoundError`` (a missing file), ``UnsafeCheckpointError`` (a file that would run code or is
    not a checkpoint), ``ConfigFileError`` (an unreadable config) or ``CheckpointImportError`` (weights or config
    that do not match the source's network: the message names the keys or fields). Nothing is written then.
    """
    if config.source not in SOURCES:
        raise CheckpointImportError(f"unknown source {config.source!r}; sources: {', '.join(SOURCES)}")
    weights = Path(config.weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    if config.size is not None and config.size < 1:
        raise CheckpointImportError(f"size must be >= 1, got {config.size}")
    source_config = read_config(config.config) if config.config is not None else None
    obj = load_untrusted(weights)
    options: dict[str, Any] = {"config": source_config, "prefix": config.prefix}
    if config.source == "llamagen":
        options["l2_normalize"] = config.l2_normalize
    result = SOURCES[config.source](obj, str(weights), **options)
    network = result.model.network
    size = config.size or result.native_size
    if size is not None and size % network.downsample:
        raise CheckpointImportError(f"size {size} is not a multiple of the downsample factor {network.downsample}")
    layout = config.layout or result.layout
    _check_layout(layout, network.num_embeddings)
    imported = ImportedFrom(
        source_format=config.source, weights_file=weights.name, weights_sha256=sha256_file(weights),
        conversion_version=CONVERSION_VERSION, config_file=Path(config.config).name if config.config else None,
        config_sha256=sha256_file(Path(config.config)) if config.config else None,
        state_dict_key=result.state_dict_key,
    )
    provenance = Provenance(
        name=config.name or Path(config.out).name,
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        data=f"imported from {config.source} checkpoint {weights.name} (vqtok import, conversion "
             f"{CONVERSION_VERSION}); not trained by vqtok",
    )
    serving = ServingDefaults(size=size, fit=config.fit or result.fit, layout=layout)
    path = save_checkpoint(config.out, result.model, provenance=provenance, imported_from=imported, serving=serving)
    return path, result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqtok import", description="Convert a published LlamaGen, taming-transformers or Chameleon tokenizer "
        "checkpoint into a vqtok checkpoint directory, without running any code from the file."
    )
    add_config_arguments(parser, ImportConfig, ENV_PREFIX, title="import (env VQTOK_IMPORT_*)",
                         short={"source": "--from"})
    return parser


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(ImportConfig, build_parser().parse_args(argv))
    try:
        path, result = import_checkpoint(config)
    except (FileNotFoundError, UnsafeCheckpointError, ConfigFileError, CheckpointImportError) as exc:
        print(f"vqtok import: error: {exc}", file=sys.stderr)
        return 2
    n = result.model.network
    serving = read_checkpoint_record(path).serving
    print(f"wrote {path}: {config.source} VQGAN, f={n.downsample}, K={n.num_embeddings}, D={n.embedding_dim}, "
          f"channel multipliers {list(n.channel_multipliers)}, attention levels {list(n.attention_levels)}, "
          f"l2-normalised codes: {n.l2_normalize}")
    if serving is not None:
        print(f"serving defaults: size {serving.size}, fit {serving.fit}, layout {serving.layout} "
              "(a request's size/fit/layout and the service's default_size/layout settings come first)")
    if result.ignored:
        print(f"left out {len(result.ignored)} training-only keys (e.g. {result.ignored[0]})")
    return 0
