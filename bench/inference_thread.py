"""Why every tensor operation of the service runs on its one inference thread: the cost of a second OpenMP team.

PyTorch's CPU build runs intra-op parallel work on an OpenMP thread team, one team per thread that starts
such work. When the teams together hold more threads than the machine has cores, libgomp stops letting its
idle workers spin between parallel regions (``GOMP_SPINCOUNT`` drops to about a thousand spins), so each of
the dozens of parallel regions of a forward pass waits for its workers to be woken. The service therefore
loads the engine on the inference thread and stacks each batch there (``service/batching.py``).

Each case runs in a fresh process, the cases interleaved over ``--rounds`` rounds, and the script prints
the median time of one ``Engine.encode_batch`` on the inference thread:

- ``confined``: the engine is loaded on the inference thread and nothing else runs tensor work (the service
  now);
- ``main-load``: the engine is loaded on the main thread and run on the inference thread (before, ``vqtok
  serve`` checked the weights for NaN on the main thread and loaded them on another: the same effect);
- ``other-thread-stack``: one batch is stacked on another thread first (the event loop did that before);
- ``other-thread-encode``: one batch is encoded on another thread first.

    python bench/inference_thread.py                       # 32x32 images, batch 16
    python bench/inference_thread.py --size 256 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CASES = ("confined", "main-load", "other-thread-stack", "other-thread-encode")


def measure(case: str, checkpoint: str, size: int, batch: int, calls: int) -> float:
    """Median seconds of one encode_batch of ``batch`` ``size``x``size`` images on the inference thread."""
    import torch

    from vqtok.model.weights import resolve_checkpoint
    from vqtok.service.engine import Engine

    inference = ThreadPoolExecutor(max_workers=1)
    path = resolve_checkpoint(checkpoint)
    loaded_on_main = case == "main-load"
    engine = Engine.load(path, "cpu") if loaded_on_main else inference.submit(Engine.load, path, "cpu").result()
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    other = ThreadPoolExecutor(max_workers=1)
    if case == "other-thread-stack":  # the batch stacked on another thread, as the event loop did
        other.submit(torch.stack, list(pixels)).result()
    elif case == "other-thread-encode":  # a warm-up or a tool encoding on another thread
        other.submit(engine.encode_batch, pixels).result()

    def timed() -> float:
        started = time.perf_counter()
        engine.encode_batch(pixels)
        return time.perf_counter() - started

    times = [inference.submit(timed).result() for _ in range(calls)]
    return statistics.median(times[calls // 4:])  # the first quarter warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=200, help="encode calls per process")
    parser.add_argument("--rounds", type=int, default=4, help="fresh processes per case, interleaved")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.checkpoint, args.size, args.batch, args.calls)))
        return
    results: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--case", case, "--checkpoint",
                                  args.checkpoint, "--size", str(args.size), "--batch", str(args.batch),
                                  "--calls", str(args.calls)], check=True, capture_output=True, text=True).stdout
            results[case].append(json.loads(out.strip().splitlines()[-1]))
    confined = statistics.median(results["confined"])
    print(f"{args.checkpoint}: encode_batch of {args.batch} x {args.size}x{args.size} on the inference thread, "
          f"median of {args.rounds} processes per case")
    print(f"{'case':<20} {'ms per batch':>12} {'images/s':>9} {'vs confined':>12}   per process (ms)")
    for case in CASES:
        seconds = statistics.median(results[case])
        each = " ".join(f"{s * 1000:.2f}" for s in results[case])
        print(f"{case:<20} {seconds * 1000:12.2f} {args.batch / seconds:9.0f} {seconds / confined:11.2f}x   {each}")


if __name__ == "__main__":
    main()
