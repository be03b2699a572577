"""``vqtok serve`` / ``python -m vqtok.service``: run the service under uvicorn, one process owning the model."""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

from pydantic import ValidationError

from vqtok.model.checkpoint import pick_device, read_checkpoint_record, verify_checkpoint
from vqtok.service.layouts import build_registry, one_line
from vqtok.service.settings import Settings, add_settings_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqtok serve",
        description="Serve a VQ-VAE tokenizer over HTTP. Every flag is also a VQTOK_* environment variable.",
    )
    add_settings_arguments(parser)
    return parser


def check_before_serving(settings: Settings) -> None:
    """Every check that needs no model, so that a bad device, checkpoint or layout fails with one line before
    a port is bound: the device, the checkpoint (record, config, hash, tensors) and the token layouts (the
    presets for the checkpoint's K plus ``layout_files``). Raises ``ValueError`` (``CheckpointError`` and
    ``LayoutError`` are ones)."""
    pick_device(settings.device)
    verify_checkpoint(settings.checkpoint)
    record = read_checkpoint_record(settings.checkpoint)
    build_registry(settings, record.network.num_embeddings,
                   record.serving.layout if record.serving is not None else None)


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
        # On a thread of its own, which ends here: the weights' NaN check is parallel tensor work, and PyTorch
        # keeps an OpenMP thread team for every thread that starts some. A team left on the main thread would
        # outlive the check and slow every batch of the inference thread (see service.batching).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqtok-preflight") as preflight:
            preflight.submit(check_before_serving, settings).result()
    except ValueError as exc:  # CheckpointError is a ValueError
        print(f"vqtok serve: {one_line(str(exc))}", file=sys.stderr)
        return 2

    from vqtok.service.server import serve

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)  # one process, one model: no workers, no reload


if __name__ == "__main__":
    raise SystemExit(main())
