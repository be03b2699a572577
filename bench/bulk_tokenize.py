"""``vqtok tokenize`` end to end against the in-process ceiling, in one run, as a ratio.

The images: ``--images`` JPEGs (quality 90) cut from skimage's natural photos at a few sizes around
384 x 320, written to a temporary folder. Then, in this process and one after another (``--repeats``
rounds, interleaved so that a busy neighbour hurts every measurement alike; the best round of each is
reported):

- the ceiling: ``Tokenizer``'s engine encoding the same images, pre-decoded and fitted (``--size``,
  ``fit=crop``) into uint8 tensors beforehand, ``--batch-size`` at a time (what ``Tokenizer.encode``
  runs after its preprocessing);
- ``vqtok tokenize`` (``vqtok.tokenize.run``, the command's whole run: model load, folder scan, JPEG
  decoding and fitting, encoding, shard writing with sha256 and fsync, manifest) on the folder, with
  ``--workers 0`` and with each of ``--workers-list``.

    python bench/bulk_tokenize.py                       # bundled model, 256x256, batch 16: a few minutes on 2 cores
    python bench/bulk_tokenize.py --images 32 --repeats 1 --size 128   # quicker

The figures of a shared machine are noisy: compare the ratios of one run, not figures across runs.
(Named ``bulk_tokenize.py``: a ``bench/tokenize.py`` run as a script would shadow the standard library's
``tokenize`` module, which torch imports.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of natural photos (crops of skimage's sample images, 320..448 wide) in ``folder``."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
              data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = int(rng.integers(288, 353)), int(rng.integers(320, 449))
        height, width = min(height, photo.shape[0]), min(width, photo.shape[1])
        y, x = int(rng.integers(0, photo.shape[0] - height + 1)), int(rng.integers(0, photo.shape[1] - width + 1))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(photo[y : y + height, x : x + width])).save(path, quality=90)
        paths.append(path)
    return paths


def ceiling(checkpoint: str, paths: list[Path], size: str, batch_size: int) -> float:
    """Images/s of the engine alone on pre-decoded, pre-fitted (3, H, W) uint8 tensors, ``batch_size`` at a time."""
    from vqtok.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(checkpoint, device="cpu", batch_size=batch_size)
    pixels = [torch.from_numpy(f.pixels).permute(2, 0, 1) for f in tokenizer.prepare(paths, size=size, fit="crop")]
    tokenizer._run(tokenizer.engine.encode_batch, pixels[:batch_size])  # warm up
    started = time.perf_counter()
    tokenizer._run(tokenizer.engine.encode_batch, pixels)
    return len(paths) / (time.perf_counter() - started)


def end_to_end(checkpoint: str, folder: Path, out: Path, size: str, batch_size: int, workers: int) -> float:
    """Images/s of a whole ``vqtok tokenize`` run (model load included) into a fresh ``out``."""
    from vqtok.tokenize import TokenizeConfig, run

    shutil.rmtree(out, ignore_errors=True)
    config = TokenizeConfig(checkpoint=checkpoint, input=str(folder), out=out, size=size, fit="crop",
                            batch_size=batch_size, shard_size=1000, workers=workers, device="cpu")
    started = time.perf_counter()
    summary = run(config, progress=False)
    elapsed = time.perf_counter() - started
    assert summary["counts"]["done"] == len(list(folder.glob("*.jpg"))), summary["counts"]
    return summary["counts"]["done"] / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="256")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers-list", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import os

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    with tempfile.TemporaryDirectory(prefix="vqtok-bench-tokenize-") as temp:
        folder = Path(temp) / "images"
        folder.mkdir()
        paths = write_jpegs(folder, args.images)
        counts = [0, *(w for w in args.workers_list if w != 0)]
        best: dict[str, float] = {}
        for round_ in range(args.repeats):
            figures = {"ceiling": ceiling(args.checkpoint, paths, args.size, args.batch_size)}
            for workers in counts:
                figures[f"workers {workers}"] = end_to_end(args.checkpoint, folder, Path(temp) / "out", args.size,
                                                           args.batch_size, workers)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in figures.items()), flush=True)
            best = {k: max(v, best.get(k, 0.0)) for k, v in figures.items()}
    print(f"\n{args.images} JPEGs ~384x320 -> {args.size} crop, batch {args.batch_size}, model {args.checkpoint}, "
          f"best of {args.repeats} round(s); load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'':>26} {'images/s':>9} {'of ceiling':>11}")
    print(f"{'Tokenizer engine (ceiling)':>26} {best['ceiling']:9.1f} {'100%':>11}")
    for workers in counts:
        figure = best[f"workers {workers}"]
        print(f"{f'vqtok tokenize --workers {workers}':>26} {figure:9.1f} {figure / best['ceiling']:10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
