# shellcheck shell=bash
# The Docker engine for the smoke scripts (sourced by scripts/docker-smoke.sh and scripts/scale-smoke.sh, which
# define `log`, `fail` and `$WORK`). Nothing here runs on its own.

STARTED_DOCKERD_PID=""

# ensure_docker_engine NAME: use the engine that answers; else, as root, install Debian's docker.io if needed
# and start dockerd (its log in ${TMPDIR:-/tmp}/vqtok-NAME-dockerd.log), remembered in STARTED_DOCKERD_PID.
ensure_docker_engine() {
    docker info >/dev/null 2>&1 && return 0
    [[ $(id -u) == 0 ]] || fail "no Docker engine answers and this is not root: start dockerd first"
    if ! command -v dockerd >/dev/null; then
        log "installing Debian's docker.io (dockerd)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >"$WORK/apt.log" 2>&1 \
            || { tail -20 "$WORK/apt.log"; fail "apt-get install docker.io failed"; }
    fi
    command -v docker >/dev/null || fail "no docker client"
    # No iptables (not allowed in our sandboxes) and no docker0 bridge: builds and containers
    # here use the host's network.
    local dockerd_log=${TMPDIR:-/tmp}/vqtok-$1-dockerd.log
    log "starting dockerd --iptables=false --bridge=none (log: $dockerd_log)"
    dockerd --iptables=false --bridge=none >"$dockerd_log" 2>&1 &
    STARTED_DOCKERD_PID=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || { tail -20 "$dockerd_log"; fail "dockerd exited"; }
        sleep 1
    done
    docker info >/dev/null 2>&1 || { tail -20 "$dockerd_log"; fail "dockerd did not answer in 60s"; }
}

# stop_started_dockerd: stop the dockerd ensure_docker_engine started (unless VQTOK_SMOKE_KEEP_DOCKERD=1).
stop_started_dockerd() {
    if [[ -n $STARTED_DOCKERD_PID && ${VQTOK_SMOKE_KEEP_DOCKERD:-0} != 1 ]]; then
        kill "$STARTED_DOCKERD_PID" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        log "stopped the dockerd this script started"
    fi
}
