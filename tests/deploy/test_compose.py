"""docker-compose.yml (GPU) and docker-compose.cpu.yml: valid against the compose specification, and in step
with the service's settings, the app's routes, the training CLI and each other. No Docker engine is needed."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
GPU_FILE = REPO / "docker-compose.yml"
CPU_FILE = REPO / "docker-compose.cpu.yml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEFAULT_PORT = Settings.model_fields["port"].default
DEFAULT_DRAIN_S = Settings.model_fields["drain_s"].default
GPU_DEVICE = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def tool(name: str) -> str:
    """A console script of the test environment (next to this interpreter), else from PATH."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def seconds(duration: str) -> float:
    """Compose durations: '30s', '1m30s', '1h', '500ms'."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def env_dict(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def swissroll_settings(service: dict) -> Settings:
    values = {
        k.removeprefix("SWISSROLL_").lower(): v for k, v in env_dict(service).items() if k.startswith("SWISSROLL_")
    }
    return Settings(**values)  # unknown SWISSROLL_* names (extra="forbid") or bad values raise


def gpu_devices(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def volume(service: dict, target: str) -> tuple[str, str]:
    """(source, mode) of the short-syntax bind mount on `target`."""
    for v in service.get("volumes", []):
        assert isinstance(v, str), f"use the short volume syntax: {v}"
        source, dest, *mode = v.split(":")
        if dest == target:
            return source, (mode[0] if mode else "rw")
    raise AssertionError(f"no volume mounted on {target}")


@pytest.fixture(scope="module")
def gpu():
    return load(GPU_FILE)


@pytest.fixture(scope="module")
def cpu():
    return load(CPU_FILE)


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(Settings(warmup=False)))  # no lifespan: routes without a model


@pytest.mark.parametrize("path", [GPU_FILE, CPU_FILE], ids=lambda p: p.name)
def test_valid_against_the_compose_spec(path):
    result = check_compose_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_can_fail(tmp_path):
    broken = load(GPU_FILE)
    broken["services"]["api"]["healthcheck"]["intervall"] = "15s"
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(broken))
    result = check_compose_schema(bad)
    assert result.returncode != 0 and "intervall" in result.stdout + result.stderr


def test_gpu_reservation(gpu):
    for name in ("api", "train"):
        assert gpu_devices(gpu["services"][name]) == [GPU_DEVICE], name
    assert env_dict(gpu["services"]["api"])["SWISSROLL_DEVICE"].startswith("cuda")


def test_cpu_file_reserves_no_gpu(cpu):
    assert set(cpu["services"]) == {"api"}
    api = cpu["services"]["api"]
    assert "deploy" not in api and "gpus" not in api and "runtime" not in api
    assert env_dict(api)["SWISSROLL_DEVICE"] == "cpu"


@pytest.mark.parametrize("which", ["gpu", "cpu"])
def test_api_port_host_and_settings(which, request):
    api = request.getfixturevalue(which)["services"]["api"]
    settings = swissroll_settings(api)
    assert settings.host == "0.0.0.0"
    assert settings.port == DEFAULT_PORT  # the image's EXPOSE and HEALTHCHECK use the default
    container_ports = [str(p).rsplit(":", 1)[-1].split("/")[0] for p in api["ports"]]
    assert container_ports == [str(DEFAULT_PORT)]
    assert settings.checkpoint is None and settings.models_dir.is_absolute()  # a directory of models, not one file


@pytest.mark.parametrize("which", ["gpu", "cpu"])
def test_api_healthcheck_probes_readyz(which, request, client):
    check = request.getfixturevalue(which)["services"]["api"]["healthcheck"]
    test = check["test"]
    assert test[0] == "CMD" and test[1] == "python"  # no curl in the slim image
    url = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w/]*)", " ".join(test))
    assert url and int(url[1]) == DEFAULT_PORT
    assert url[2] == "/readyz"
    assert client.get(url[2]).status_code == 503  # the readiness route: not ready before the model is loaded
    assert seconds(check["timeout"]) < seconds(check["interval"])
    assert seconds(check["start_period"]) >= 30 and check["retries"] >= 1


@pytest.mark.parametrize("which", ["gpu", "cpu"])
def test_api_restarts_and_drains(which, request):
    api = request.getfixturevalue(which)["services"]["api"]
    assert api["restart"] in ("always", "unless-stopped", "on-failure")
    assert api.get("stop_signal", "SIGTERM") == "SIGTERM"
    drain_s = swissroll_settings(api).drain_s
    assert drain_s == float(env_dict(api).get("SWISSROLL_DRAIN_S", DEFAULT_DRAIN_S))
    assert seconds(api["stop_grace_period"]) > drain_s  # docker's default 10 s would cut the drain short


@pytest.mark.parametrize("which", ["gpu", "cpu"])
def test_models_directory_mounted_read_only(which, request):
    api = request.getfixturevalue(which)["services"]["api"]
    settings = swissroll_settings(api)
    source, mode = volume(api, str(PurePosixPath(settings.models_dir)))
    assert mode == "ro"
    # the committed checkpoints are what gets served: the default among them, and a reload interval that is on
    assert (REPO / source / f"{settings.default_model}.pt").is_file()
    assert len(list((REPO / source).glob("*.pt"))) >= 2
    assert settings.reload_poll_s > 0


def test_train_profile_writes_into_the_mounted_checkpoints(gpu, monkeypatch):
    import torch

    from training.__main__ import parse_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the container has the GPU; this machine may not

    train = gpu["services"]["train"]
    assert train["profiles"] == ["train"]  # not started by a plain `docker compose up`
    assert train["build"]["args"]["EXTRAS"] == "train"
    assert "train" in PYPROJECT["project"]["optional-dependencies"]
    source, mode = volume(train, "/app/checkpoints")
    assert mode == "rw" and source == volume(gpu["services"]["api"], "/app/checkpoints")[0]
    argv = list(train["entrypoint"]) + list(train["command"])
    assert argv[0] in PYPROJECT["project"]["scripts"] and argv[0] == "swissroll-train"
    config = parse_args(argv[1:])  # the training CLI accepts them (exits on unknown or invalid arguments)
    assert config.device == "cuda"
    assert PurePosixPath(config.out).parent == PurePosixPath("/app/checkpoints")
    assert train.get("restart", "no") == "no"


def test_cpu_file_is_the_gpu_api_without_the_gpu(gpu, cpu):
    g, c = gpu["services"]["api"], cpu["services"]["api"]
    g_env, c_env = env_dict(g), env_dict(c)
    assert {k: v for k, v in g_env.items() if k != "SWISSROLL_DEVICE"} == {
        k: v for k, v in c_env.items() if k != "SWISSROLL_DEVICE"
    }
    keys = (
        "ports",
        "volumes",
        "healthcheck",
        "restart",
        "stop_signal",
        "stop_grace_period",
        "init",
        "cap_drop",
        "ulimits",
    )
    for key in keys:
        assert g.get(key) == c.get(key), key
    assert g["image"] != c["image"]  # different torch builds must not overwrite each other's tag


@pytest.mark.parametrize("which", ["gpu", "cpu"])
def test_api_sets_the_server_limits_and_enough_file_descriptors(which, request):
    # No proxy in front in compose: the server's own limits are all there is, so they are set explicitly.
    api = request.getfixturevalue(which)["services"]["api"]
    env = env_dict(api)
    for name in ("MAX_HEADER_BYTES", "MAX_HEADERS", "HEADER_TIMEOUT_S", "MAX_CONNECTIONS"):
        assert f"SWISSROLL_{name}" in env, name
    settings = swissroll_settings(api)
    nofile = api["ulimits"]["nofile"]
    soft = nofile if isinstance(nofile, int) else nofile["soft"]
    assert soft >= settings.max_connections + 64
