"""The default thread count: affinity mask and cgroup CPU quota (v2 cpu.max, v1 cfs_quota_us), and the override."""

import pytest

from diffusion.cpus import available_cpus, cgroup_quota, choose_threads, threads_from_env
from service.settings import Settings


def fake_cgroup(tmp_path, files: dict[str, str], proc: str = "0::/\n"):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc_cgroup").write_text(proc)
    return cgroup_quota(root, tmp_path / "proc_cgroup")


def test_v2_unlimited_limited_and_absent(tmp_path):
    assert fake_cgroup(tmp_path / "a", {"cpu.max": "max 100000\n"}) is None
    assert fake_cgroup(tmp_path / "b", {"cpu.max": "200000 100000\n"}) == (2.0, "cgroup cpu.max 200000/100000")
    assert fake_cgroup(tmp_path / "c", {}) is None


def test_v2_tightest_limit_on_the_path_to_our_cgroup_wins(tmp_path):
    # Outside a container /proc/self/cgroup names a nested cgroup; a parent's limit binds its children.
    files = {
        "kubepods/cpu.max": "150000 100000",
        "kubepods/pod1/cpu.max": "max 100000",
        "other/cpu.max": "50000 100000",
    }
    assert fake_cgroup(tmp_path, files, proc="0::/kubepods/pod1\n") == (1.5, "cgroup cpu.max 150000/100000")


def test_v1_quota_and_no_limit(tmp_path):
    v1 = {"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}
    proc = "4:cpu,cpuacct:/\n3:memory:/x\n1:name=systemd:/\n"
    assert fake_cgroup(tmp_path / "a", v1, proc) == (3.0, "cgroup cpu.cfs_quota_us 300000/100000")
    unlimited = {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}
    assert fake_cgroup(tmp_path / "b", unlimited, "2:cpu:/\n") is None


def test_malformed_cpu_max_limits_nothing(tmp_path):
    assert fake_cgroup(tmp_path, {"cpu.max": "garbage"}) is None


@pytest.mark.parametrize(
    ("mask", "quota", "threads", "source"),
    [
        (range(64), (2.0, "cgroup cpu.max 200000/100000"), 2, "cgroup cpu.max 200000/100000 (2 CPUs)"),
        (range(2), None, 2, "affinity mask (2 CPUs)"),
        (range(1), (2.0, "cgroup cpu.max 200000/100000"), 1, "affinity mask (1 CPU)"),  # taskset inside a limit
        (range(8), (1.5, "cgroup cpu.max 150000/100000"), 2, "cgroup cpu.max 150000/100000 (2 CPUs)"),
        (range(8), (0.25, "cgroup cpu.max 25000/100000"), 1, "cgroup cpu.max 25000/100000 (1 CPU)"),
    ],
)
def test_threads_are_the_smaller_of_mask_and_quota(mask, quota, threads, source):
    choice = available_cpus(affinity=lambda: set(mask), quota=lambda: quota)
    assert (choice.threads, choice.source) == (threads, source)


def test_override_wins_and_is_named():
    probes = {"affinity": lambda: set(range(64)), "quota": lambda: (2.0, "cgroup cpu.max 200000/100000")}
    assert choose_threads(3, **probes).describe() == {"threads": 3, "source": "SWISSROLL_TORCH_THREADS=3"}
    assert choose_threads(0, **probes).threads == 2


def test_training_and_benchmarks_read_the_same_variable(monkeypatch):
    probes = {"affinity": lambda: set(range(4)), "quota": lambda: None}
    monkeypatch.setenv("SWISSROLL_TORCH_THREADS", "1")
    assert threads_from_env(**probes).threads == 1
    monkeypatch.delenv("SWISSROLL_TORCH_THREADS")
    assert threads_from_env(**probes).threads == 4


def test_model_endpoint_says_what_was_chosen_and_why(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", torch_threads=2)
    with TestClient(create_app(settings)) as client:
        threads = client.get("/model").json()["threads"]
    assert threads == {"threads": 2, "source": "SWISSROLL_TORCH_THREADS=2", "cpu_parallel": "blocks"}
