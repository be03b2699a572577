"""``vqtok serve`` / ``python -m vqtok.service``: run the service under uvicorn, one process owning the model."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from vqtok.model.checkpoint import pick_device, read_checkpoint_record, verify_checkpoint
from vqtok.service.layouts import build_registry, one_line
from vqtok.service.settings import add_settings_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqtok serve",
        description="Serve a VQ-VAE tokenizer over HTTP. Every flag is also a VQTOK_* environment variable.",
    )
    add_settings_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:  # one line: each bad setting and why
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"vqtok serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"vqtok serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    try:  # fail before binding a port, with a message naming the problem
        pick_device(settings.device)
        verify_checkpoint(settings.checkpoint)  # every check that needs no model: record, config, hash, tensors
        # The token layouts: presets for the checkpoint's K plus layout_files (LayoutError is a ValueError).
        record = read_checkpoint_record(settings.checkpoint)
        build_registry(settings, record.network.num_embeddings,
                       record.serving.layout if record.serving is not None else None)
    except ValueError as exc:  # CheckpointError is a ValueError
        print(f"vqtok serve: {one_line(str(exc))}", file=sys.stderr)
        return 2

    from vqtok.service.server import serve

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)  # one process, one model: no workers, no reload


if __name__ == "__main__":
    raise SystemExit(main())
