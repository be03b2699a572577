"""Nearest-code search + lookup: vqtok's quantizer against the one-hot scatter + matmul reference.

The reference is what older VQ-VAE code does (and what the seed analysis describes): the full
N x K distance matrix, an N x K one-hot matrix filled by scatter_, and one-hot @ codebook to fetch
the vectors. vqtok computes distances in row chunks (bounded memory) and fetches vectors by index.

With ``l2`` (l2-normalised codes, ViT-VQGAN / LlamaGen) both rank codes by dot product (cosine similarity
for unit codes) instead of the euclidean distance. K = 16,384 runs at N = 16,384 by default: the reference's
N x K matrices would need several GiB each at N = 65,536.

Each measurement runs in a fresh subprocess so peak memory is its own: on CPU the growth of peak
RSS over the inputs, on CUDA torch.cuda.max_memory_allocated over the inputs.

    python bench/quantizer.py                 # the default cases below, CPU
    python bench/quantizer.py --k 512 --d 64  # one case (N from --n)
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

from vqtok.model.quantizers import nearest_code

# (K, D, l2, N) measured by default: the seed's sizes, then LlamaGen's K = 16,384 with code_dim 8 and 64.
DEFAULT_CASES = [
    (512, 64, False, 65_536), (8_192, 64, False, 65_536),
    (16_384, 8, False, 16_384), (16_384, 64, False, 16_384), (16_384, 8, True, 16_384), (16_384, 64, True, 16_384),
]


def reference_one_hot(flat: torch.Tensor, codebook: torch.Tensor, l2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The old way: full distances, one-hot scatter, matmul. (N, D), (K, D) -> ((N,), (N, D))."""
    if l2:
        indices = (flat @ codebook.t()).argmax(dim=1)  # (N, K) cosine similarities for unit codes
    else:
        distances = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t())  # (N, K)
        indices = distances.argmin(dim=1)
    one_hot = torch.zeros(flat.shape[0], codebook.shape[0], device=flat.device)  # (N, K)
    one_hot.scatter_(1, indices.unsqueeze(1), 1.0)
    return indices, one_hot @ codebook


def vqtok_quantizer(flat: torch.Tensor, codebook: torch.Tensor, l2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """vqtok: chunked argmin of ||e||^2 - 2 x.e (argmax x.e with l2), then an index lookup.
    (N, D), (K, D) -> ((N,), (N, D))."""
    indices = nearest_code(flat, codebook, cosine=l2)
    return indices, F.embedding(indices, codebook)


METHODS = {"reference": reference_one_hot, "vqtok": vqtok_quantizer}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(method: str, n: int, k: int, d: int, l2: bool, device: str, repeats: int) -> dict[str, float]:
    """Time (median of ``repeats``) and peak extra memory of one method, in this process."""
    torch.manual_seed(0)
    flat = torch.randn(n, d, device=device)
    codebook = torch.randn(k, d, device=device)
    if l2:
        flat, codebook = F.normalize(flat, dim=1), F.normalize(codebook, dim=1)
    function = METHODS[method]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()
    indices, _ = function(flat, codebook, l2)  # first call: also the peak-memory measurement
    sync()
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss_bytes()) - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(flat, codebook, l2)
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    checksum = int(indices.sum())
    return {"seconds": times[len(times) // 2], "peak_extra_mib": max(peak, 0) / 2**20, "checksum": checksum}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=65_536, help="vectors to quantize (with --k)")
    parser.add_argument("--d", type=int, nargs="+", default=[64], help="code dims (with --k)")
    parser.add_argument("--k", type=int, nargs="+", help="codebook sizes (default: the DEFAULT_CASES)")
    parser.add_argument("--l2", action="store_true", help="l2-normalised codes, cosine search (with --k)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "K", "D", "L2"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        method, k, d, l2 = args.worker[0], int(args.worker[1]), int(args.worker[2]), args.worker[3] == "1"
        print(json.dumps(measure(method, args.n, k, d, l2, args.device, args.repeats)))
        return 0

    cases = DEFAULT_CASES if args.k is None else [(k, d, args.l2, args.n) for k in args.k for d in args.d]
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'K':>6} {'D':>4} {'l2':>3} {'N':>7} {'method':>10} {'time (s)':>10} {'peak extra (MiB)':>17}")
    for k, d, l2, n in cases:
        results = {}
        label = f"{k:>6} {d:>4} {'yes' if l2 else 'no':>3} {n:>7}"
        for method in METHODS:
            command = [sys.executable, __file__, "--n", str(n), "--device", args.device,
                       "--repeats", str(args.repeats), "--worker", method, str(k), str(d), str(int(l2))]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[method] = json.loads(output.strip().splitlines()[-1])
            print(f"{label} {method:>10} {results[method]['seconds']:>10.3f} "
                  f"{results[method]['peak_extra_mib']:>17.1f}", flush=True)
        ref, ours = results["reference"], results["vqtok"]
        same = "same indices" if ref["checksum"] == ours["checksum"] else "INDICES DIFFER"
        print(f"{label} {'ratio':>10} {ref['seconds'] / ours['seconds']:>9.2f}x "
              f"{ref['peak_extra_mib'] / max(ours['peak_extra_mib'], 1e-6):>16.1f}x   "
              f"(reference / vqtok; {same})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
