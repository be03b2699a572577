"""Where the service's time goes: small requests at concurrency 32, driven by wrk, sampled by py-spy.

A real ``python -m vqtok.service`` process serves the bundled model on the CPU. Debian's ``wrk`` (one thread,
``--connections`` connections, a Lua script that POSTs the same 32x32 PNG to ``/encode``) loads it for
``--seconds``, while ``py-spy record`` samples every thread of the server (``--nonblocking``: the server is
never paused). The script prints, side by side in one run:

- throughput and wrk's latency percentiles, as a share of the in-process batch-16 encode throughput of the
  service's own engine measured here first;
- the CPU each side used: the server's and wrk's CPU seconds per wall second (2.0 is both cores);
- the flame summary: the functions with the largest share of samples, by own time (the leaf frame of a
  sample) and, among vqtok's own functions, by total time (anywhere in the stack), over the server's busy
  samples (a thread waiting on a lock, a queue or the selector is idle and dropped).

    apt-get install wrk && pip install py-spy
    python bench/profile_service.py                   # about a minute on 2 cores
    python bench/profile_service.py --top 25 --raw out.txt
    python bench/profile_service.py --images-per-request 64 --connections 1   # one multipart request at a time
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from idle_delay import in_process
from service_load import REPO, _coffee_png, free_port, start_server, wait_ready

# Frames that mean "waiting, not working": a thread blocked in these is idle, not a cost of the request.
IDLE_FUNCTIONS = frozenset({"select", "poll", "wait", "_wait_for_tstate_lock", "acquire", "sleep", "accept",
                            "run_forever", "run_until_complete"})

# py-spy names files relative to sys.path: the service's and the model's own functions.
OUR_FILES = ("service/", "model/", "vqtok/")

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
local file = io.open("{path}", "rb")
wrk.body = file:read("*all")
file:close()
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(folded: Path, top: int) -> tuple[int, int, list[tuple[str, int]], list[tuple[str, int]]]:
    """py-spy's raw (folded) stacks -> (all samples, busy samples, top own frames, top total frames).

    A line is ``thread;frame;frame;...;leaf count``; a frame is ``function (file:line)``. A sample whose
    leaf is an idle wait (IDLE_FUNCTIONS) is dropped from the busy share."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    all_samples = busy = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        all_samples += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")[1:]]  # drop the thread, line numbers
        # "Class.method (file)" -> "method": a thread whose innermost frame is a wait is idle.
        if not frames or frames[-1].split(" (")[0].rsplit(".", 1)[-1] in IDLE_FUNCTIONS:
            continue
        busy += count
        own[frames[-1]] += count
        for frame in set(frames):
            if frame.split(" (")[-1].startswith(OUR_FILES):  # total time: vqtok's own functions only
                total[frame] += count
    return all_samples, busy, own.most_common(top), total.most_common(top)


def multipart_body(png: bytes, count: int) -> tuple[bytes, str]:
    """(body, Content-Type) of a request with ``count`` copies of ``png``: the raw PNG for 1, else a
    multipart/form-data body of ``image`` parts."""
    if count == 1:
        return png, "image/png"
    boundary = "vqtok-profile-boundary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"i.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + png + b"\r\n"
    return part * count + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def write_wrk_post(folder: Path, size: int, images_per_request: int) -> Path:
    """The wrk Lua script (``folder/post.lua``) that POSTs ``images_per_request`` copies of a ``size`` x ``size``
    PNG of the coffee photo to ``/encode``, its body written beside it; returns the script's path."""
    photo = Image.open(io.BytesIO(_coffee_png())).resize((size, size), Image.Resampling.BICUBIC)
    png = io.BytesIO()
    photo.save(png, format="PNG")
    body, content_type = multipart_body(png.getvalue(), images_per_request)
    (folder / "body").write_bytes(body)
    script = folder / "post.lua"
    script.write_text(WRK_SCRIPT.format(path=folder / "body", content_type=content_type))
    return script


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/s and latency percentiles (ms) from ``wrk --latency`` output."""
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    figures = {"rate": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))}
    for percent in ("50", "99"):
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups()
        figures[f"p{percent}"] = float(value) * units[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    figures["errors"] = float(errors.group(1)) if errors else 0.0
    figures["requests"] = float(re.search(r"(\d+) requests in", output).group(1))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "model" / "weights" / "default")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--size", type=int, default=32, help="side of the square PNG each request sends")
    parser.add_argument("--images-per-request", type=int, default=1,
                        help="more than 1: a multipart request of that many copies of the PNG")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--raw", type=Path, help="also keep py-spy's folded stacks here")
    args = parser.parse_args()
    wrk, py_spy = shutil.which("wrk"), shutil.which("py-spy")
    if wrk is None or py_spy is None:
        sys.exit("needs wrk (apt-get install wrk) and py-spy (pip install py-spy)")

    _, batch16_rate = in_process(args.checkpoint, args.size, 200)
    workdir = Path(tempfile.mkdtemp(prefix="vqtok-profile-"))
    post = write_wrk_post(workdir, args.size, args.images_per_request)
    folded = args.raw or workdir / "stacks.txt"

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.checkpoint, port, args.max_batch_size, 0.0, args.size)
    try:
        wait_ready(url, server, timeout=180)
        warm = [wrk, "-t1", f"-c{args.connections}", "-d3s", "-s", str(post), f"{url}/encode"]
        subprocess.run(warm, capture_output=True, check=True)
        spy = subprocess.Popen([py_spy, "record", "--pid", str(server.pid), "--duration", str(args.seconds),
                                "--rate", "200", "--nonblocking", "--threads", "--format", "raw",
                                "--output", str(folded)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server_cpu0, started = cpu_seconds(server.pid), time.monotonic()
        load = subprocess.Popen([wrk, "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency",
                                 "-s", str(post), f"{url}/encode"], stdout=subprocess.PIPE, text=True)
        wrk_cpu = 0.0
        while load.poll() is None:  # sample wrk's CPU until it exits (its /proc entry goes with it)
            try:
                wrk_cpu = cpu_seconds(load.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.2)
        output = load.communicate()[0]
        wall = time.monotonic() - started
        server_cpu = cpu_seconds(server.pid) - server_cpu0
        spy.wait(timeout=args.seconds + 60)
    finally:
        server.terminate()
        server.wait(timeout=30)

    figures = parse_wrk(output)
    print(f"in process (engine, CPU): batch-16 encode {batch16_rate:.0f} images/s at {args.size}x{args.size}")
    images_rate = figures["rate"] * args.images_per_request
    print(f"HTTP /encode, {args.images_per_request} {args.size}x{args.size} PNG per request, {args.connections} "
          f"connections (wrk), max batch {args.max_batch_size}: {figures['rate']:.0f} req/s, {images_rate:.0f} "
          f"images/s = {images_rate / batch16_rate:.1%} of in-process; p50 {figures['p50']:.1f} ms, "
          f"p99 {figures['p99']:.1f} ms; "
          f"{int(figures['requests'])} requests, {int(figures['errors'])} non-2xx")
    print(f"CPU per wall second: server {server_cpu / wall:.2f}, wrk {wrk_cpu / wall:.2f} (2.0 = both cores)")
    all_samples, busy, own, total = summarise(folded, args.top)
    print(f"py-spy: {all_samples} samples over every server thread, {busy} busy (idle waits dropped)")
    tables = (("own time (leaf frame)", own), ("total time (anywhere in the stack; vqtok's functions)", total))
    for title, rows in tables:
        print(f"\ntop {len(rows)} by {title}, share of busy samples:")
        for frame, count in rows:
            print(f"  {count / max(busy, 1):6.1%}  {frame}")


if __name__ == "__main__":
    main()
