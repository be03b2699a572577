"""Nearest-code search + lookup: vqtok's quantizer against the one-hot scatter + matmul reference.

The reference is what older VQ-VAE code does (and what the seed analysis describes): the full
N x K distance matrix, an N x K one-hot matrix filled by scatter_, and one-hot @ codebook to fetch
the vectors. vqtok computes distances in row chunks (bounded memory) and fetches vectors by index.

Each measurement runs in a fresh subprocess so peak memory is its own: on CPU the growth of peak
RSS over the inputs, on CUDA torch.cuda.max_memory_allocated over the inputs.

    python bench/quantizer.py                 # N=65,536, D=64, K=512 and 8,192, CPU
    python bench/quantizer.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqtok.model.quantizer import nearest_code


def reference_one_hot(flat: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The old way: full distances, one-hot scatter, matmul. (N, D), (K, D) -> ((N,), (N, D))."""
    distances = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t())  # (N, K)
    indices = distances.argmin(dim=1)
    one_hot = torch.zeros(flat.shape[0], codebook.shape[0], device=flat.device)  # (N, K)
    one_hot.scatter_(1, indices.unsqueeze(1), 1.0)
    return indices, one_hot @ codebook


def vqtok_quantizer(flat: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vqtok: chunked argmin of ||e||^2 - 2 x.e, then an index lookup. (N, D), (K, D) -> ((N,), (N, D))."""
    indices = nearest_code(flat, codebook)
    return indices, F.embedding(indices, codebook)


METHODS = {"reference": reference_one_hot, "vqtok": vqtok_quantizer}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(method: str, n: int, k: int, d: int, device: str, repeats: int) -> dict[str, float]:
    """Time (median of ``repeats``) and peak extra memory of one method, in this process."""
    torch.manual_seed(0)
    flat = torch.randn(n, d, device=device)
    codebook = torch.randn(k, d, device=device)
    function = METHODS[method]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()
    indices, _ = function(flat, codebook)  # first call: also the peak-memory measurement
    sync()
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss_bytes()) - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(flat, codebook)
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    checksum = int(indices.sum())
    return {"seconds": times[len(times) // 2], "peak_extra_mib": max(peak, 0) / 2**20, "checksum": checksum}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=65_536, help="vectors to quantize")
    parser.add_argument("--d", type=int, default=64, help="embedding dim")
    parser.add_argument("--k", type=int, nargs="+", default=[512, 8192], help="codebook sizes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        method, k = args.worker[0], int(args.worker[1])
        print(json.dumps(measure(method, args.n, k, args.d, args.device, args.repeats)))
        return 0

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"N={args.n:,}, D={args.d}")
    print(f"{'K':>6} {'method':>10} {'time (s)':>10} {'peak extra (MiB)':>17}")
    for k in args.k:
        results = {}
        for method in METHODS:
            command = [sys.executable, __file__, "--n", str(args.n), "--d", str(args.d), "--device", args.device,
                       "--repeats", str(args.repeats), "--worker", method, str(k)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[method] = json.loads(output.strip().splitlines()[-1])
            print(f"{k:>6} {method:>10} {results[method]['seconds']:>10.3f} {results[method]['peak_extra_mib']:>17.1f}")
        ref, ours = results["reference"], results["vqtok"]
        same = "same indices" if ref["checksum"] == ours["checksum"] else "INDICES DIFFER"
        print(f"{k:>6} {'ratio':>10} {ref['seconds'] / ours['seconds']:>9.2f}x "
              f"{ref['peak_extra_mib'] / max(ours['peak_extra_mib'], 1e-6):>16.1f}x   "
              f"(reference / vqtok; {same})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
