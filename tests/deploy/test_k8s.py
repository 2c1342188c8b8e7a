"""deploy/k8s: valid against the Kubernetes schemas (kubernetes-validate --strict, offline) and in step with
the app's routes, its settings, the image and each other. No cluster is needed."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# Pinned so a newer kubernetes-validate cannot change the verdict; it ships schemas for 1.25 onwards.
KUBERNETES_VERSION = "1.30.0"
DEFAULT_PORT = Settings.model_fields["port"].default
DEFAULT_DRAIN_S = Settings.model_fields["drain_s"].default
GPU = "nvidia.com/gpu"


def tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def quantity(value) -> float:
    """Kubernetes quantities: '2', '500m', '4Gi', 1."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
    assert match, f"not a quantity: {value!r}"
    scale = {
        None: 1,
        "m": 1e-3,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
    }
    return float(match[1]) * scale[match[2]]


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    by_kind = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in by_kind, f"two {doc['kind']} manifests"
                by_kind[doc["kind"]] = doc
    return by_kind


@pytest.fixture(scope="module")
def pod(docs) -> dict:
    return docs["Deployment"]["spec"]["template"]


@pytest.fixture(scope="module")
def api(pod) -> dict:
    containers = pod["spec"]["containers"]
    assert [c["name"] for c in containers] == ["api"]
    return containers[0]


@pytest.fixture(scope="module")
def env(api) -> dict[str, str]:
    return {e["name"]: e["value"] for e in api.get("env", [])}


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(Settings(warmup=False)))  # no lifespan: routes without a model


def test_the_expected_manifests():
    assert [p.name for p in MANIFESTS] == ["deployment.yaml", "hpa.yaml", "ingress.yaml", "pdb.yaml", "service.yaml"]


def test_valid_against_the_kubernetes_schemas_strictly():
    result = kubernetes_validate(*MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(MANIFESTS), result.stdout


def test_the_schema_check_can_fail(tmp_path):
    manifest = yaml.safe_load((K8S / "deployment.yaml").read_text())
    manifest["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    bad = tmp_path / "deployment.yaml"
    bad.write_text(yaml.safe_dump(manifest))
    result = kubernetes_validate(bad)
    assert result.returncode != 0 and "pathh" in result.stdout + result.stderr


def test_api_versions(docs):
    assert {kind: d["apiVersion"] for kind, d in docs.items()} == {
        "Deployment": "apps/v1",
        "Service": "v1",
        "HorizontalPodAutoscaler": "autoscaling/v2",
        "PodDisruptionBudget": "policy/v1",
        "Ingress": "networking.k8s.io/v1",
    }


def test_probes_hit_routes_of_the_app(api, client):
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    probes = {name: api[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for name, get in probes.items():
        port = ports.get(get["port"], get["port"])
        assert port == DEFAULT_PORT, name
        status = client.get(get["path"]).status_code
        assert status != 404, f"{name}: {get['path']} is not a route of the app"
    # liveness answers as soon as the process serves; readiness waits for the model (503 here, none loaded)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    startup = api["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # CUDA init + warm-up
    for name in probes:
        assert api[name]["timeoutSeconds"] < api[name]["periodSeconds"]


def test_gpu_requests_equal_limits(api):
    resources = api["resources"]
    assert resources["requests"][GPU] == resources["limits"][GPU] == 1
    for key in ("cpu", "memory"):
        assert quantity(resources["requests"][key]) <= quantity(resources["limits"][key]), key
    assert quantity(resources["limits"]["memory"]) >= 2 * 2**30  # the CUDA build of torch alone needs over 1 GiB


def test_settings_in_env_are_valid_and_match_the_pod(api, env):
    values = {k.removeprefix("SWISSROLL_").lower(): v for k, v in env.items() if k.startswith("SWISSROLL_")}
    settings = Settings(**values)  # unknown SWISSROLL_* names (extra="forbid") or bad values raise
    assert settings.host == "0.0.0.0"
    assert settings.port == DEFAULT_PORT
    assert [p["containerPort"] for p in api["ports"]] == [settings.port]
    assert settings.device.startswith("cuda")
    threads = settings.torch_threads
    assert 1 <= threads <= quantity(api["resources"]["limits"]["cpu"]), "torch threads beyond the CPU limit"


def test_termination_grace_covers_prestop_and_drain(pod, api, env):
    drain_s = float(env.get("SWISSROLL_DRAIN_S", DEFAULT_DRAIN_S))
    command = api["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    assert pre_stop_s > 0  # endpoints drop before the server sees SIGTERM
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop_s + drain_s
    assert grace > drain_s


def test_hardened_container(pod, api):
    pod_ctx, ctx = pod["spec"].get("securityContext", {}), api["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    # the uid the image declares (USER 10001:10001), so runAsNonRoot can be checked by the kubelet
    user = next(line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("USER "))
    assert uid == int(user.split(":")[0]) != 0
    # The read-only root needs a writable /tmp (HOME points there too).
    mounts = {m["mountPath"]: m["name"] for m in api["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert pod["spec"].get("automountServiceAccountToken") is False


def test_service_selects_the_pods(docs, pod, api):
    service = docs["Service"]["spec"]
    labels = pod["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in api["ports"]}
    assert all(p["targetPort"] in port_names or p["targetPort"] == DEFAULT_PORT for p in service["ports"])


def test_hpa_scales_the_deployment(docs, api):
    hpa, deployment = docs["HorizontalPodAutoscaler"]["spec"], docs["Deployment"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    for metric in hpa["metrics"]:
        if metric["type"] == "Resource":  # utilization is relative to the requests, which must be set
            assert metric["resource"]["name"] in api["resources"]["requests"]


def test_pdb_protects_the_pods_without_blocking_drains(docs, pod):
    pdb, hpa = docs["PodDisruptionBudget"]["spec"], docs["HorizontalPodAutoscaler"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert 1 <= pdb["minAvailable"] < hpa["minReplicas"]  # at least one pod may always be evicted


def test_ingress_routes_to_the_service_and_adds_per_client_limits(docs, env):
    ingress, service = docs["Ingress"], docs["Service"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert int(notes[prefix + "limit-connections"]) >= 1 and int(notes[prefix + "limit-rps"]) >= 1
    # The proxy waits longer than the service's own deadline: the client gets the service's 504, not a proxy's.
    request_timeout_s = float(
        env.get("SWISSROLL_REQUEST_TIMEOUT_S", Settings.model_fields["request_timeout_s"].default)
    )
    assert float(notes[prefix + "proxy-read-timeout"]) > request_timeout_s


def test_server_limits_are_set_in_the_pod(env):
    values = {k.removeprefix("SWISSROLL_").lower(): v for k, v in env.items() if k.startswith("SWISSROLL_")}
    settings = Settings(**values)
    for name in ("max_header_bytes", "max_headers", "header_timeout_s", "max_connections"):
        assert name in values, f"SWISSROLL_{name.upper()} not set explicitly in deployment.yaml"
    assert settings.header_timeout_s < settings.request_timeout_s
