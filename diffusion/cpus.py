"""How many CPUs this process may really use, for its torch thread count.

os.cpu_count() is the host's count: a 2-CPU container on a 64-core node would start 64 threads, and all but two
of them would only wait (and, with OpenMP, spin at barriers; see blocks.py). What bounds us is the affinity
mask (taskset, cpusets, Kubernetes' static CPU manager) and the CFS quota of our cgroup (docker --cpus,
Kubernetes CPU limits), whichever is smaller. Standalone (no torch, no service imports): training and the
benchmarks use it too.
"""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

THREADS_ENV = "SWISSROLL_TORCH_THREADS"


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # why: what bounded it, e.g. "cgroup cpu.max 200000/100000"

    def describe(self) -> dict:
        return {"threads": self.threads, "source": self.source}


def cgroup_quota(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> tuple[float, str] | None:
    """(CPUs, where it came from) of the tightest CFS quota on this process's cgroups, or None when unlimited."""
    found = []
    for directory in _cgroup_dirs(root, proc_cgroup):
        try:
            v2 = _read(directory / "cpu.max")  # "max 100000" = no limit; "200000 100000" = 2 CPUs
            if v2 is not None:
                quota, period = v2.split()
                if quota != "max":
                    found.append((int(quota) / int(period), f"cgroup cpu.max {quota}/{period}"))
                continue
            quota_us, period_us = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
            if quota_us is not None and period_us is not None and int(quota_us) > 0:  # v1: -1 = no limit
                found.append((int(quota_us) / int(period_us), f"cgroup cpu.cfs_quota_us {quota_us}/{period_us}"))
        except (ValueError, ZeroDivisionError):  # a file we do not understand limits nothing we can prove
            continue
    return min(found) if found else None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """Our cgroup and its ancestors up to the mount root: a limit on any of them binds us. In a container the
    mount root is our own cgroup (cgroup namespace), so the root alone is also checked."""
    dirs = [root, root / "cpu", root / "cpu,cpuacct"]
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            base = root
        elif "cpu" in controllers.split(","):
            base = root / controllers
        else:
            continue
        parts = Path(path).relative_to("/").parts if path.startswith("/") else ()
        dirs += [base.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return list(dict.fromkeys(dirs))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _affinity() -> set[int] | None:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None  # not on macOS, Windows


def available_cpus(
    affinity: Callable[[], set[int] | None] = _affinity,
    quota: Callable[[], tuple[float, str] | None] = cgroup_quota,
) -> ThreadChoice:
    """The CPUs we may use: affinity mask and cgroup quota, whichever is smaller."""
    mask = affinity()
    cpus, source = (len(mask), "affinity mask") if mask else (os.cpu_count() or 1, "os.cpu_count()")
    limit = quota()
    # A quota of 1.5 CPUs gets 2 threads: block-parallel sampling has no barriers, so a throttled second thread
    # still finishes its half sooner than one thread would finish both.
    if limit is not None and math.ceil(limit[0]) < cpus:
        cpus, source = max(1, math.ceil(limit[0])), limit[1]
    return ThreadChoice(cpus, f"{source} ({cpus} CPU{'s' if cpus != 1 else ''})")


def choose_threads(override: int = 0, **probes) -> ThreadChoice:
    """`override` > 0 (SWISSROLL_TORCH_THREADS) wins; otherwise the CPUs this process may use."""
    if override > 0:
        return ThreadChoice(override, f"{THREADS_ENV}={override}")
    return available_cpus(**probes)


def threads_from_env(**probes) -> ThreadChoice:
    """For the processes without the service's settings (training, benchmarks): same variable, same rule."""
    value = os.environ.get(THREADS_ENV, "").strip()
    return choose_threads(int(value) if value.isdigit() else 0, **probes)
