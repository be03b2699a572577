"""Static checks of the Kubernetes manifests in deploy/kubernetes: rendered, schema-validated, cross-checked.

No cluster is needed. Each kustomization (the cpu and gpu overlays, the tokenize Job, and the overlays
with each opt-in component) is rendered with ``kubectl kustomize`` where kubectl is installed, else with
the small renderer below, which applies exactly what these kustomizations use (resources, components,
strategic-merge patches on named resources, images); where both are there, they must agree. Every
rendered object is validated offline against the Kubernetes JSON schemas bundled by
``kubernetes-validate`` (strict: unknown fields fail), and its probe paths, ports, environment variable
names and values are checked against the service's own routes and settings, as
tests/test_deployment_files.py does for Compose.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes minor the manifests are meant for (autoscaling/v2, policy/v1 and indexed Jobs
# are GA well before it) and the newest schema kubernetes-validate bundles.
OLDEST_KUBERNETES = "1.29.0"

# What `vqtok serve` needs before /ready, measured with the bundled checkpoint (README.md, Deployment):
# 7.1 s to ready, 602 MiB resident at the warm-up peak. The manifests must leave room above both.
MEASURED_READY_S = 7.1
MEASURED_PEAK_RSS_MIB = 602
UVICORN_GRACEFUL_S = 5  # service/server.py: timeout_graceful_shutdown, after the drain

KUSTOMIZATIONS = {
    "cpu": ("overlays/cpu", []),
    "gpu": ("overlays/gpu", []),
    "tokenize": ("tokenize", []),
    "cpu+checkpoint-pvc": ("overlays/cpu", ["components/checkpoint-pvc"]),
    "gpu+checkpoint-init": ("overlays/gpu", ["components/checkpoint-init"]),
    "gpu+hpa-queue-depth": ("overlays/gpu", ["components/hpa-queue-depth"]),
}
SERVING = [name for name in KUSTOMIZATIONS if name != "tokenize"]


# --------------------------------------------------------------------------------------------- rendering
# Strategic-merge keys of the lists these manifests patch (the Kubernetes API's patchMergeKey); any
# other list in a patch replaces the original whole, as in a strategic merge.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def _merge(original: Any, patch: Any, key: str | None = None) -> Any:
    if isinstance(original, dict) and isinstance(patch, dict):
        out = dict(original)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(original, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        out = [copy.deepcopy(item) for item in original]
        index = {item.get(merge_key): i for i, item in enumerate(out)}
        for item in patch:
            if item.get(merge_key) in index:
                i = index[item[merge_key]]
                out[i] = _merge(out[i], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _read_kustomization(folder: Path) -> dict:
    for name in KUSTOMIZATION_FILES:
        if (folder / name).is_file():
            return yaml.safe_load((folder / name).read_text()) or {}
    raise FileNotFoundError(f"no kustomization in {folder}")


def _apply(folder: Path, spec: dict, resources: list[dict]) -> list[dict]:
    """A kustomization's (or component's) own resources, components and transformers on ``resources``."""
    supported = {"apiVersion", "kind", "resources", "components", "patches", "images"}
    unsupported = set(spec) - supported
    assert not unsupported, f"{folder}: the test's renderer does not know {sorted(unsupported)}"
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            resources += render_python(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for entry in spec.get("components", []):
        path = (folder / entry).resolve()
        component = _read_kustomization(path)
        assert component.get("kind") == "Component", f"{path} is not a kustomize Component"
        resources = _apply(path, component, resources)
    for patch_entry in spec.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{folder}: only strategic-merge patches by path: {patch_entry}"
        patch = yaml.safe_load((folder / patch_entry["path"]).read_text())
        targets = [i for i, r in enumerate(resources)
                   if (r["kind"], r["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])]
        assert len(targets) == 1, f"{folder}/{patch_entry['path']} matches {len(targets)} resources"
        resources[targets[0]] = _merge(resources[targets[0]], patch)
    for image in spec.get("images", []):
        for resource in resources:
            pod = resource.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return resources


def render_python(folder: Path) -> list[dict]:
    return _apply(folder, _read_kustomization(folder), [])


def kubectl_kustomize() -> str | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    probe = subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, text=True, check=False)
    return kubectl if probe.returncode == 0 else None


def render_kubectl(kubectl: str, folder: Path) -> list[dict]:
    result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kustomization_dir(name: str, tmp_root: Path) -> Path:
    """The folder to render for a case: the overlay itself, or a throwaway overlay adding components."""
    base, components = KUSTOMIZATIONS[name]
    if not components:
        return K8S / base
    folder = tmp_root / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        # kustomize takes no absolute paths: relative ones, from the throwaway folder
        "resources": [os.path.relpath(K8S / base, folder)],
        "components": [os.path.relpath(K8S / c, folder) for c in components],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return folder


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every case rendered, with the real kustomize where kubectl is installed, else the renderer above."""
    tmp_root = tmp_path_factory.mktemp("kustomize")
    kubectl = kubectl_kustomize()
    out = {}
    for name in KUSTOMIZATIONS:
        folder = kustomization_dir(name, tmp_root)
        out[name] = render_kubectl(kubectl, folder) if kubectl else render_python(folder)
    return out


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = by_kind(docs, kind)
    return doc


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def container(doc: dict, name: str | None = None) -> dict:
    containers = pod_spec(doc)["containers"]
    if name is None:
        (c,) = containers
        return c
    return next(c for c in containers if c["name"] == name)


def env_values(c: dict) -> dict[str, str | None]:
    """Name -> literal value (None for valueFrom)."""
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def settings_module():
    return pytest.importorskip("vqtok.service.settings", reason="service.settings does not import here")


def _canonical(doc: Any, key: str | None = None) -> Any:
    """Order-free form for comparing renders: dict keys sorted, keyed lists sorted by their key."""
    if isinstance(doc, dict):
        return {k: _canonical(v, k) for k, v in sorted(doc.items())}
    if isinstance(doc, list):
        items = [_canonical(v) for v in doc]
        if key in MERGE_KEYS:
            items.sort(key=lambda item: str(item.get(MERGE_KEYS[key])))
        return items
    return doc


# --------------------------------------------------------------------------------------------- the renders
def test_every_kustomization_is_covered():
    folders = {p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")}
    covered = {base for base, _ in KUSTOMIZATIONS.values()} | {c for _, cs in KUSTOMIZATIONS.values() for c in cs}
    assert folders - {"base"} == covered, "a kustomization under deploy/kubernetes is not rendered by these tests"


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_python_renderer_agrees_with_kustomize(name, tmp_path):
    kubectl = kubectl_kustomize()
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: the renderer above stands in")
    folder = kustomization_dir(name, tmp_path)
    ours = sorted((_canonical(d) for d in render_python(folder)), key=lambda d: (d["kind"], d["metadata"]["name"]))
    theirs = sorted((_canonical(d) for d in render_kubectl(kubectl, folder)),
                    key=lambda d: (d["kind"], d["metadata"]["name"]))
    assert ours == theirs


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_manifests_match_the_kubernetes_schemas(name, rendered):
    """Strict validation (unknown fields fail) against the oldest and the newest supported Kubernetes,
    from the schemas kubernetes-validate ships: no cluster, no network."""
    kv = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")
    docs = rendered[name]
    assert docs
    for version in (OLDEST_KUBERNETES, kv.latest_version()):
        for doc in docs:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} against Kubernetes {version}: "
                            f"{exc.message} at {'/'.join(map(str, exc.path))}")


def test_the_validator_really_rejects_a_bad_manifest(rendered):
    kv = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    container(deployment)["readinessProbe"]["httpGett"] = {"path": "/ready"}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.latest_version(), strict=True)


# --------------------------------------------------------------------------------------------- against the service
def service_routes() -> set[str]:
    health = pytest.importorskip("vqtok.service.routers.health", reason="the service does not import here")
    return {route.path for route in health.router.routes}


@pytest.mark.parametrize("name", SERVING)
def test_probes_and_ports_match_the_service(name, rendered):
    routes = service_routes()
    docs = rendered[name]
    deployment = one(docs, "Deployment")
    c = container(deployment, "vqtok")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = env_values(c)
    assert ports == {"http": int(env["PORT"])}
    # The port the server will listen on, by its own rules (VQTOK_PORT wins over PORT; neither set here).
    assert "VQTOK_PORT" not in env
    assert env["VQTOK_HOST"] == "0.0.0.0"
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["startupProbe"]["path"] == "/ready"
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health", "liveness must not need the model"
    for probe in probes.values():
        assert probe["path"] in routes
        assert probe["port"] in ports or probe["port"] in ports.values()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    service = one(docs, "Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ports


@pytest.mark.parametrize("name", SERVING)
def test_environment_is_the_services_own_settings(name, rendered, monkeypatch):
    """Every VQTOK_* variable is a setting, and the literal values are ones the service accepts."""
    settings = settings_module()
    c = container(one(rendered[name], "Deployment"), "vqtok")
    env = env_values(c)
    known = {"VQTOK_" + field.upper() for field in settings.Settings.model_fields}
    unknown = {n for n in env if n.startswith("VQTOK_")} - known
    assert not unknown, f"not settings of the service: {sorted(unknown)}"
    for variable in [*known, "PORT"]:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        if value is not None and (variable.startswith("VQTOK_") or variable == "PORT"):
            if variable == "VQTOK_CHECKPOINT":
                continue  # a path on a volume that exists only in the pod
            monkeypatch.setenv(variable, value)
    parsed = settings.Settings()
    assert parsed.port == int(env["PORT"])
    # The API key comes from a Secret, and is optional (no Secret: no key needed).
    (api_key,) = [e for e in c["env"] if e["name"] == "VQTOK_API_KEY"]
    ref = api_key["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "vqtok-api-key" and ref["key"] == "api-key" and ref["optional"] is True


def test_service_links_are_off_because_they_break_the_settings(rendered, monkeypatch):
    """A Service named vqtok would inject VQTOK_PORT=tcp://IP:80, which `vqtok serve` refuses: links off."""
    settings = settings_module()
    monkeypatch.setenv("VQTOK_PORT", "tcp://10.0.0.10:80")
    with pytest.raises(ValueError):
        settings.Settings()
    for name, docs in rendered.items():
        for doc in by_kind(docs, "Deployment") + by_kind(docs, "Job"):
            assert pod_spec(doc)["enableServiceLinks"] is False, f"{name}: {doc['kind']}"


@pytest.mark.parametrize("name", SERVING)
def test_shutdown_drains_within_the_grace_period(name, rendered):
    settings = settings_module()
    deployment = one(rendered[name], "Deployment")
    c = container(deployment, "vqtok")
    drain = float(env_values(c).get("VQTOK_DRAIN_TIMEOUT_S")
                  or settings.Settings.model_fields["drain_timeout_s"].default)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", "preStop waits for the endpoint removal to spread"
    pre_stop = float(command[1])
    assert pre_stop >= 3
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain + UVICORN_GRACEFUL_S, (grace, pre_stop, drain)


@pytest.mark.parametrize("name", SERVING)
def test_startup_budget_fits_the_model_load(name, rendered):
    c = container(one(rendered[name], "Deployment"), "vqtok")
    startup = c["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    start_period = int(re.search(r"--start-period=(\d+)s", DOCKERFILE.read_text()).group(1))
    assert budget >= start_period >= 10 * MEASURED_READY_S, "as long as the image's HEALTHCHECK allows"
    readiness = c["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 15, "a draining pod leaves fast"
    liveness = c["livenessProbe"]
    assert liveness["timeoutSeconds"] >= 3 and liveness["failureThreshold"] >= 3, "no restarts on a busy moment"


@pytest.mark.parametrize("name", [*SERVING, "tokenize"])
def test_non_root_and_read_only_root_filesystem(name, rendered):
    user = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")][-1]
    uid = int(user.split(":")[0])
    for doc in by_kind(rendered[name], "Deployment") + by_kind(rendered[name], "Job"):
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == uid, "the image's user"
        assert spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]
        main = spec["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on a read-only root"
        if doc["kind"] == "Deployment":
            # Multipart uploads over 1 MiB spool to /tmp: room for every admitted request's body at once,
            # or a full /tmp evicts the pod.
            defaults = settings_module().Settings.model_fields
            room = defaults["max_concurrent_requests"].default * defaults["max_body_bytes"].default
            assert _mebibytes(volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"]) * 2**20 >= room


def test_cpu_and_gpu_overlays(rendered):
    cpu = container(one(rendered["cpu"], "Deployment"), "vqtok")
    gpu_deployment = one(rendered["gpu"], "Deployment")
    gpu = container(gpu_deployment, "vqtok")
    assert cpu["image"].endswith(":cpu") and gpu["image"].endswith(":cuda")
    assert env_values(cpu)["VQTOK_DEVICE"] == "cpu" and env_values(gpu)["VQTOK_DEVICE"] == "cuda"
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    spec = pod_spec(gpu_deployment)
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert gpu_deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "no spare GPU needed to roll"
    for c in (cpu, gpu):
        requests = c["resources"]["requests"]
        assert "cpu" in requests, "the CPU HPA measures utilisation against the request"
        assert _mebibytes(requests["memory"]) >= MEASURED_PEAK_RSS_MIB
        assert _mebibytes(c["resources"]["limits"]["memory"]) >= 2 * MEASURED_PEAK_RSS_MIB
        (threads,) = [e for e in c["env"] if e["name"] == "OMP_NUM_THREADS"]
        assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu", "torch threads = cores"


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)", str(quantity))
    assert match, quantity
    return float(match.group(1)) * units[match.group(2)]


@pytest.mark.parametrize("name", SERVING)
def test_service_pdb_and_hpa_select_the_deployment(name, rendered):
    docs = rendered[name]
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert one(docs, "Service")["spec"]["selector"].items() <= labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "the PDB (maxUnavailable 1) keeps one serving"


def test_queue_depth_hpa_uses_the_exported_gauge(rendered):
    metrics = pytest.importorskip("vqtok.service.metrics", reason="the service does not import here")
    exported = metrics.ServiceMetrics().render().decode()
    cpu_hpa = one(rendered["gpu"], "HorizontalPodAutoscaler")
    assert [m["type"] for m in cpu_hpa["spec"]["metrics"]] == ["Resource"]
    hpa = one(rendered["gpu+hpa-queue-depth"], "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert f"# TYPE {name} gauge" in exported, f"/metrics exports no gauge {name}"
    component = (K8S / "components" / "hpa-queue-depth" / "kustomization.yaml").read_text()
    assert f"seriesQuery: '{name}" in component, "the documented prometheus-adapter rule names the gauge"


@pytest.mark.parametrize(("name", "volume"), [("cpu+checkpoint-pvc", "persistentVolumeClaim"),
                                              ("gpu+checkpoint-init", "emptyDir")])
def test_checkpoint_from_a_volume(name, volume, rendered):
    deployment = one(rendered[name], "Deployment")
    c = container(deployment, "vqtok")
    checkpoint = env_values(c)["VQTOK_CHECKPOINT"]
    (mount,) = [m for m in c["volumeMounts"] if checkpoint.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    (source,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    assert volume in source
    if volume == "persistentVolumeClaim":
        claims = {d["metadata"]["name"] for d in by_kind(rendered[name], "PersistentVolumeClaim")}
        assert source[volume]["claimName"] in claims
    else:
        (init,) = pod_spec(deployment)["initContainers"]
        assert any(m["name"] == mount["name"] and not m.get("readOnly") for m in init["volumeMounts"])
    for plain in ("cpu", "gpu"):
        assert "VQTOK_CHECKPOINT" not in env_values(container(one(rendered[plain], "Deployment"))), \
            "the overlays serve the bundled checkpoint"


# --------------------------------------------------------------------------------------------- bulk tokenize Job
def _torchrun_args(job: dict) -> tuple[list[str], Any]:
    c = container(job, "tokenize")
    assert c["command"] == ["torchrun"]
    args = [a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in c["args"]]
    run = pytest.importorskip("torch.distributed.run", reason="torch is not installed")
    return args, run.get_args_parser().parse_args(args)


def test_tokenize_job_rendezvous(rendered):
    docs = rendered["tokenize"]
    job = one(docs, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    _, parsed = _torchrun_args(job)
    assert parsed.module and parsed.training_script == "vqtok.tokenize"
    assert importlib.util.find_spec("vqtok.tokenize") is not None
    assert int(parsed.nnodes) == spec["completions"], "one pod per node"
    c = container(job, "tokenize")
    assert int(parsed.nproc_per_node) == c["resources"]["limits"]["nvidia.com/gpu"], "one rank per GPU"
    assert parsed.rdzv_backend == "c10d"
    # pod 0 of an indexed Job is <job>-0, reachable as <job>-0.<subdomain> through the headless Service
    service = one(docs, "Service")
    host, port = parsed.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod_spec(job)['subdomain']}"
    assert pod_spec(job)["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert pod_spec(job)["restartPolicy"] == "Never"


def test_tokenize_job_environment_and_volumes(rendered, monkeypatch):
    tokenize = pytest.importorskip("vqtok.tokenize", reason="vqtok.tokenize does not import here")
    from vqtok.model.options import config_from_args

    docs = rendered["tokenize"]
    job = one(docs, "Job")
    c = container(job, "tokenize")
    env = env_values(c)
    fields = {tokenize.ENV_PREFIX + f.name.upper() for f in dataclasses.fields(tokenize.TokenizeConfig)}
    names = {n for n in env if n.startswith("VQTOK_")}
    assert names <= fields, f"not tokenize settings: {sorted(names - fields)}"
    for variable in fields:
        monkeypatch.delenv(variable, raising=False)
    for variable in names:
        monkeypatch.setenv(variable, env[variable])
    config = config_from_args(tokenize.TokenizeConfig, tokenize.build_parser().parse_args([]))
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert str(config.out).startswith("/out/") and not mounts["/out"].get("readOnly")
    assert config.input == "/data" and mounts["/data"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    claims = {d["metadata"]["name"]: d for d in by_kind(docs, "PersistentVolumeClaim")}
    out_claim = claims[volumes[mounts["/out"]["name"]]["persistentVolumeClaim"]["claimName"]]
    assert out_claim["spec"]["accessModes"] == ["ReadWriteMany"], "every pod writes and the last one merges"
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
