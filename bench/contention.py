"""CPU sampling beside other busy processes: /sample latency with 0, 1 and 2 busy-looping processes next to the
server, as a ratio to the same row's idle time, for the old intra-op path ("before") and block-parallel sampling
("after"), plus the other candidate fixes (OpenMP wait policy, spin count, one thread) and the load benchmark's
p99 at 16 and 64 clients for before and after, all in one run.

    python -m bench.contention            # ~15 min on 2 CPU cores; writes bench/results/contention.{json,md}
    python -m bench.contention --quick    # ~3 min: n = 10,000, npy, all CPUs; prints (--write: writes them too)

Busy processes are `while True: pass` loops started and stopped by the benchmark (each also stops itself after
--busy-bound-s), always killed in a finally. Take the full run on an otherwise idle machine.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from bench.live_server import LiveServer
from bench.load import run_cell

RESULTS = Path(__file__).parent / "results"
# The old path is still selectable (SWISSROLL_CPU_PARALLEL=intra_op), so "before" runs today's code, not a checkout;
# with the old default thread count too (os.cpu_count(), whatever the affinity mask: 2 threads on one taskset CPU).
BEFORE, AFTER = "intra_op (before)", "blocks (after)"
VARIANTS = {
    AFTER: {},
    BEFORE: {"SWISSROLL_CPU_PARALLEL": "intra_op", "SWISSROLL_TORCH_THREADS": str(os.cpu_count() or 1)},
    "intra_op, OMP_WAIT_POLICY=PASSIVE": {"SWISSROLL_CPU_PARALLEL": "intra_op", "OMP_WAIT_POLICY": "PASSIVE"},
    "intra_op, GOMP_SPINCOUNT=10000": {"SWISSROLL_CPU_PARALLEL": "intra_op", "GOMP_SPINCOUNT": "10000"},
    "intra_op, 1 thread": {"SWISSROLL_CPU_PARALLEL": "intra_op", "SWISSROLL_TORCH_THREADS": "1"},
}
SAMPLERS = (("ddpm", 40), ("dpmpp_2m", 10))
BUSY = (0, 1, 2)
REQUEST_TIMEOUT_S = 20.0  # a request slower than this is recorded as 20 s, a lower bound (the old path, busy)


def repeats(n: int) -> int:
    return {1_000: 15, 10_000: 7, 100_000: 3}[n]


@contextmanager
def busy_processes(count: int, bound_s: float):
    """`count` single-threaded busy loops, each bounded in time by itself too, killed on the way out."""
    loop = f"import time\nend = time.monotonic() + {bound_s}\nwhile time.monotonic() < end: pass\n"
    procs = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", loop]))
        time.sleep(0.3 if count else 0)  # let the scheduler see them
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@contextmanager
def server(env: dict[str, str], cpus: set[int] | None):
    """A LiveServer, restricted to `cpus` (like taskset): the child inherits this thread's mask at fork."""
    full_env = {"SWISSROLL_LOG_LEVEL": "warning", "SWISSROLL_MAX_QUEUE": "256", **env}
    old = os.sched_getaffinity(0)
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        s = LiveServer(**full_env)
    finally:
        os.sched_setaffinity(0, old)
    with s:
        yield s


def measure(client: httpx.Client, url: str, reps: int, budget_s: float) -> dict:
    """Median of up to `reps` requests (after one warm-up), stopping early once `budget_s` is spent."""
    times, statuses = [], []
    start = time.monotonic()
    try:
        client.get(url, timeout=REQUEST_TIMEOUT_S)  # warm-up, inside the budget
        while len(times) < reps and (not times or time.monotonic() - start < budget_s):
            t0 = time.perf_counter()
            statuses.append(client.get(url, timeout=REQUEST_TIMEOUT_S).status_code)
            times.append(time.perf_counter() - t0)
    except httpx.TimeoutException:
        times.append(REQUEST_TIMEOUT_S)
        statuses.append("timeout")
    return {
        "median_ms": statistics.median(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "requests": len(times),
        "ok": statuses.count(200),
    }


def latency_rows(variant: str, cpus: str, cells: list[tuple], busy_levels, budget_s: float, bound_s: float):
    rows = []
    with server(VARIANTS[variant], {0} if cpus == "1 (taskset)" else None) as s, httpx.Client() as client:
        threads = client.get(f"{s.url}/model").json()["threads"]
        for busy in busy_levels:
            with busy_processes(busy, bound_s):
                for n, sampler, steps, fmt in cells:
                    url = f"{s.url}/sample?n={n}&sampler={sampler}&steps={steps}&seed=1&format={fmt}"
                    row = {"variant": variant, "cpus": cpus, "threads": threads, "busy": busy, "n": n}
                    row |= {
                        "sampler": f"{sampler}@{steps}",
                        "format": fmt,
                        **measure(client, url, repeats(n), budget_s),
                    }
                    rows.append(row)
                    print(
                        f"{variant:34s} cpus={cpus:11s} busy={busy} n={n:>6} {row['sampler']:11s} {fmt:4s} "
                        f"{row['median_ms']:9.1f} ms (max {row['max_ms']:.0f}, {row['ok']}/{row['requests']} ok)",
                        flush=True,
                    )
    return rows


def load_rows(variant: str, sizes) -> list[dict]:
    rows = []
    with server(VARIANTS[variant], None) as s:
        for n in sizes:
            for clients in (16, 64):
                rows.append({"variant": variant, **run_cell(s.url, n, clients)})
                r = rows[-1]
                print(
                    f"load {variant:20s} n={n:>6} clients={clients:>2}  p50 {r['p50_ms']:7.1f}  p99 {r['p99_ms']:7.1f}"
                )
    return rows


def idle_ab(sizes) -> list[dict]:
    """Idle latency, before vs after, with requests alternating between two servers: on a shared machine the
    background load then drifts under both alike, which separate runs minutes apart cannot promise."""
    rows = []
    client = httpx.Client(timeout=REQUEST_TIMEOUT_S)
    with server(VARIANTS[BEFORE], None) as before, server(VARIANTS[AFTER], None) as after, client:
        for n in sizes:
            for sampler, steps in SAMPLERS:
                times = {BEFORE: [], AFTER: []}
                for i in range(2 * repeats(n) + 1):
                    pair = [(BEFORE, before), (AFTER, after)]
                    for variant, s in pair if i % 2 else pair[::-1]:
                        t0 = time.perf_counter()
                        client.get(f"{s.url}/sample?n={n}&sampler={sampler}&steps={steps}&seed=1&format=npy")
                        if i:  # the first round warms both up
                            times[variant].append(time.perf_counter() - t0)
                med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
                rows.append({"n": n, "sampler": f"{sampler}@{steps}", "before_ms": med[BEFORE], "after_ms": med[AFTER]})
                print(f"idle A/B n={n:>6} {sampler:9s} before {med[BEFORE]:8.1f} ms  after {med[AFTER]:8.1f} ms")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 10,000, npy, all CPUs; print only")
    parser.add_argument("--busy-bound-s", type=float, default=900, help="each busy process stops itself after this")
    parser.add_argument("--no-load", action="store_true", help="skip the bench.load p99 comparison")
    parser.add_argument("--write", action="store_true", help="with --quick: write the results files anyway")
    parser.add_argument("--idle-ab", action="store_true", help="only: idle before vs after, interleaved; prints")
    args = parser.parse_args()
    if args.idle_ab:
        idle_ab((1_000, 10_000) if args.quick else (1_000, 10_000, 100_000))
        return
    sizes = (10_000,) if args.quick else (1_000, 10_000, 100_000)
    formats = ("npy",) if args.quick else ("npy", "json")
    cells = [(n, s, k, f) for n in sizes for s, k in SAMPLERS for f in formats]
    option_cells = [(10_000, s, k, "npy") for s, k in SAMPLERS]
    budget = 4.0 if args.quick else 10.0
    load_average = os.getloadavg()
    rows = []
    for variant in (AFTER, BEFORE):
        for cpus in ("all",) if args.quick else ("all", "1 (taskset)"):
            rows += latency_rows(variant, cpus, cells, BUSY, budget, args.busy_bound_s)
    for variant in VARIANTS:
        if variant not in (AFTER, BEFORE) and not args.quick:
            rows += latency_rows(variant, "all", option_cells, BUSY, budget, args.busy_bound_s)
    load = [] if args.no_load else [r for v in (AFTER, BEFORE) for r in load_rows(v, (100, 10_000))]
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "load_average_at_start": load_average,
        "command": " ".join(["python -m bench.contention", *sys.argv[1:]]),
        "rows": rows,
        "load": load,
    }
    print(markdown(results))
    if not args.quick or args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "contention.json").write_text(json.dumps(results, indent=2))
        (RESULTS / "contention.md").write_text(markdown(results))


def _ratio(row: dict, idle: dict) -> str:
    r = row["median_ms"] / idle["median_ms"]
    return f"{r:.2f}x" + ("+" if row["ok"] < row["requests"] else "")


def markdown(r: dict) -> str:
    by = {(x["variant"], x["cpus"], x["n"], x["sampler"], x["format"], x["busy"]): x for x in r["rows"]}
    lines = [
        f"# CPU sampling beside busy processes ({r['machine']}, torch {r['torch']}, {r['date']})",
        "",
        f"`{r['command']}`; load average at start {', '.join(f'{x:.2f}' for x in r['load_average_at_start'])}. "
        "`GET /sample` over HTTP on loopback, median of up to 15/7/3 requests (n = 1k/10k/100k) per cell; "
        "busy = single-threaded `while True: pass` processes beside the server. Ratios are to the same row's idle "
        "time (busy = 0); `+` marks a cell with a request that hit the "
        f"{REQUEST_TIMEOUT_S:.0f} s client timeout (counted as {REQUEST_TIMEOUT_S:.0f} s).",
        "",
        "Before = the old default: `SWISSROLL_CPU_PARALLEL=intra_op` (torch's OpenMP threads inside every op) with "
        "`SWISSROLL_TORCH_THREADS` = os.cpu_count(); after = the new defaults: `blocks`, threads from the affinity "
        "mask and cgroup quota (1 under taskset). 1 (taskset) = the server pinned to CPU 0; the busy processes "
        "and the client are not pinned.",
        "",
        "| CPUs | n | sampler | format | before idle ms | before 1 busy | before 2 busy | after idle ms | "
        "after 1 busy | after 2 busy |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({k[1:5] for k in by if k[0] == AFTER}, key=lambda k: (k[0], k[1], k[2], k[3]))
    worst = {1: 0.0, 2: 0.0}
    for cpus, n, sampler, fmt in keys:
        cells = []
        for variant in (BEFORE, AFTER):
            idle = by.get((variant, cpus, n, sampler, fmt, 0))
            cells.append(f"{idle['median_ms']:.1f}" if idle else "")
            for busy in (1, 2):
                row = by.get((variant, cpus, n, sampler, fmt, busy))
                cells.append(_ratio(row, idle) if row and idle else "")
                if row and idle and variant == AFTER:
                    worst[busy] = max(worst[busy], row["median_ms"] / idle["median_ms"])
        lines.append(f"| {cpus} | {n:,} | {sampler} | {fmt} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**After, worst row: {worst[1]:.2f}x idle with 1 busy process (target 2.5x), {worst[2]:.2f}x with 2 "
        "(target 4x).**",
        "",
    ]
    options = sorted({k[0] for k in by if k[1] == "all"}, key=list(VARIANTS).index)
    if len(options) > 2:
        lines += [
            "## The candidate fixes (all CPUs, n = 10,000, npy)",
            "",
            "| variant | sampler | idle ms | 1 busy | 2 busy |",
            "|---|---|---:|---:|---:|",
        ]
        for variant in options:
            for sampler in sorted({k[3] for k in by if k[0] == variant}):
                idle = by.get((variant, "all", 10_000, sampler, "npy", 0))
                if not idle:
                    continue
                busy = [by.get((variant, "all", 10_000, sampler, "npy", b)) for b in (1, 2)]
                ratios = [f"{b['median_ms']:.1f} ms ({_ratio(b, idle)})" if b else "" for b in busy]
                lines.append(f"| {variant} | {sampler} | {idle['median_ms']:.1f} | " + " | ".join(ratios) + " |")
        lines.append("")
    if r["load"]:
        lines += [
            "## `bench.load` cells, before vs after (ddpm, npy, batching on, no busy process)",
            "",
            "| variant | n | clients | req/s | p50 ms | p99 ms | ok |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for x in r["load"]:
            lines.append(
                f"| {x['variant']} | {x['n']:,} | {x['clients']} | {x['throughput_rps']:.1f} | {x['p50_ms']:.1f} | "
                f"{x['p99_ms']:.1f} | {x['ok']}/{x['requests']} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
