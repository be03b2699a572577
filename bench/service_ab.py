"""The service's throughput before and after a change, side by side in one run: the issue's HTTP cases.

A baseline commit (``--baseline``, default ``HEAD``) is extracted into a temporary folder laid out as the
``vqtok`` package and served from there (first on the import path); the working tree is served as it is
(through the editable install, ``pip install -e .``).
For every round and every case, both servers run in turn (the order alternates between rounds), each a
fresh ``python -m vqtok.service`` on the CPU, loaded by Debian's ``wrk`` (one thread) for ``--seconds``
after a 3 s warm-up. The in-process batch-16 encode rate of the engine at the case's image size is
measured in every round too, so each figure is also a share of what the model can do in that minute (this
machine's speed drifts by tens of percent over minutes: compare within a round, then take medians).

Cases (the issue's targets):
- ``small``: one 32x32 PNG per request, 32 connections (target: 25% of in-process, p99 under 100 ms);
- ``many``: 64 32x32 PNGs in one multipart request, one connection (target: 80% of in-process);
- ``large``: one 256x256 PNG per request, 16 connections (target: 90% of in-process).

    apt-get install wrk
    python bench/service_ab.py                            # HEAD against the working tree, 3 rounds
    python bench/service_ab.py --baseline main~3 --cases many --rounds 5
    python bench/service_ab.py --baseline-without uvloop httptools   # what an optional package brings
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from idle_delay import in_process
from package_layout import assemble_vqtok
from profile_service import cpu_seconds, parse_wrk, write_wrk_post
from service_load import REPO, free_port, wait_ready


@dataclass(frozen=True)
class Case:
    size: int
    images_per_request: int
    connections: int


CASES = {"small": Case(32, 1, 32), "many": Case(32, 64, 1), "large": Case(256, 1, 16)}


def extract(ref: str, into: Path) -> Path:
    """Commit ``ref`` of this repository as an importable ``vqtok`` package under ``into``; returns ``into``."""
    source = into / "source"
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src/vqtok", "model", "service"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    assemble_vqtok(source, into / "vqtok", shutil.move)
    shutil.rmtree(source)
    return into


def hide_modules(root: Path, names: list[str]) -> None:
    """Make ``names`` unimportable for a process whose import path starts at ``root`` (packages that are
    installed but should be absent in the baseline, e.g. uvicorn's optional uvloop and httptools)."""
    for name in names:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden for this baseline')\n")


def run_server(import_root: Path | None, checkpoint: Path, case: Case, seconds: int, post: Path
               ) -> dict[str, float]:
    """One server (from ``import_root``, else the working tree) under wrk: rate, p50, p99, server CPU/s."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VQTOK_LOG_LEVEL": "warning"}
    if import_root is not None:
        env["PYTHONPATH"] = str(import_root)
    command = [sys.executable, "-m", "vqtok.service", "--checkpoint", str(checkpoint), "--port", str(port),
               "--device", "cpu", "--warmup-size", str(case.size), "--max-queue-depth", "4096"]
    server = subprocess.Popen(command, env=env, cwd=post.parent)  # not the repository: no import from there
    wrk = ["wrk", "-t1", f"-c{case.connections}", "--latency", "-s", str(post), f"{url}/encode"]
    try:
        wait_ready(url, server, timeout=180)
        subprocess.run([*wrk, "-d3s"], capture_output=True, check=True)
        cpu0, started = cpu_seconds(server.pid), time.monotonic()
        output = subprocess.run([*wrk, f"-d{seconds}s"], capture_output=True, check=True, text=True).stdout
        figures = parse_wrk(output)
        figures["cpu"] = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - started)
    finally:
        server.terminate()
        server.wait(timeout=30)
    figures["images"] = figures["rate"] * case.images_per_request
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git ref served as the baseline (default HEAD)")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "model" / "weights" / "default")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["small", "many", "large"])
    parser.add_argument("--baseline-without", nargs="+", default=[], metavar="MODULE",
                        help="installed modules the baseline server must not find (it sees them as absent)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("needs wrk (apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="vqtok-ab-"))
    baseline = extract(args.baseline, workdir / "baseline")
    hide_modules(baseline, args.baseline_without)
    hidden = f" without {' '.join(args.baseline_without)}" if args.baseline_without else ""
    versions = {f"baseline ({args.baseline}){hidden}": baseline, "working tree": None}
    posts = {}  # each case's request, written once
    for name in args.cases:
        (workdir / name).mkdir()
        posts[name] = write_wrk_post(workdir / name, CASES[name].size, CASES[name].images_per_request)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_index in range(args.rounds):
        for name in args.cases:
            case = CASES[name]
            order = list(versions) if round_index % 2 == 0 else list(reversed(versions))
            for version in order:
                figures = run_server(versions[version], args.checkpoint, case, args.seconds, posts[name])
                figures["in_process"] = in_process(args.checkpoint, case.size, 64 if case.size > 64 else 200)[1]
                results.setdefault((name, version), []).append(figures)
                print(f"round {round_index + 1} {name:<5} {version:<24} {figures['images']:8.0f} images/s "
                      f"({figures['images'] / figures['in_process']:.1%} of in-process {figures['in_process']:.0f}) "
                      f"p50 {figures['p50']:.1f} ms p99 {figures['p99']:.1f} ms, server CPU {figures['cpu']:.2f}",
                      flush=True)
    print(f"\nmedians over {args.rounds} rounds ({args.seconds} s of wrk each):")
    print(f"{'case':<6} {'version':<24} {'images/s':>9} {'of in-process':>14} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'server CPU':>10}")
    for name in args.cases:
        for version in versions:
            rows = results[(name, version)]
            share = statistics.median(r["images"] / r["in_process"] for r in rows)
            print(f"{name:<6} {version:<24} {statistics.median(r['images'] for r in rows):9.0f} {share:14.1%} "
                  f"{statistics.median(r['p50'] for r in rows):8.1f} {statistics.median(r['p99'] for r in rows):8.1f} "
                  f"{statistics.median(r['cpu'] for r in rows):10.2f}")
        base, new = (results[(name, version)] for version in versions)
        ratios = [n["images"] / b["images"] for b, n in zip(base, new, strict=True)]
        print(f"{name:<6} working tree / baseline, per round: {' '.join(f'{r:.2f}x' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}x")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
