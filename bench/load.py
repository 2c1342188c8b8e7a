"""Throughput and latency under concurrent load, dynamic batching on vs off, against a real server on loopback.

    python -m bench.load                              # ~6 min on 2 CPU cores; writes bench/results/load.{json,md}
    python -m bench.load --baseline /path/to/checkout # and that checkout's server, cell by cell in turn (~12 min)

Every cell runs `--repeats` times (median and range reported): a cell of a few hundred requests lasts under a
second at n = 100, and one such run varies by +-15% on a 2-core machine, as much as the differences we look for.
With --baseline, the other checkout's `python -m service` (e.g. a `git worktree` at an earlier commit) runs beside
this one (the idle server costs nothing) and each cell alternates between the two (who goes first alternates too),
so both see the same machine.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from bench.live_server import REPO, LiveServer

RESULTS = Path(__file__).parent / "results"
CLIENTS = (1, 4, 16, 64)
SIZES = (100, 10_000)


def requests_per_client(n: int, clients: int) -> int:
    # n = 100: 1,024 requests per cell (several seconds at any concurrency); n = 10,000: 16 to 128 (about 100 ms each).
    return max(16, 1024 // clients) if n == 100 else max(2, 16 // clients)


def _client_process(url: str, n: int, clients: int, first_worker: int, per_client: int, start_at: float, out) -> None:
    """One load-generator process: `clients` closed-loop async clients, results sent back through `out`."""

    async def run() -> list[tuple[float, int]]:
        results = []
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            await client.get(f"{url}/healthz")  # open a connection before the clock starts
            await asyncio.sleep(max(0.0, start_at - time.time()))

            async def worker(w: int) -> None:
                for i in range(per_client):
                    t0 = time.perf_counter()
                    r = await client.get(f"{url}/sample?n={n}&seed={w * 1000 + i}&format=npy")
                    results.append((time.perf_counter() - t0, r.status_code))

            await asyncio.gather(*(worker(first_worker + w) for w in range(clients)))
        return results

    out.put(asyncio.run(run()))


def run_cell(url: str, n: int, clients: int) -> dict:
    """Clients spread over up to 4 processes: one Python asyncio process cannot absorb a batch's burst of responses
    fast enough (with 64 clients in one process its own queueing added a ~1.2 s p99 that the server never saw)."""
    per_client = requests_per_client(n, clients)
    procs = min(4, clients)
    queue = mp.Queue()
    start_at = time.time() + 1.0
    workers = [
        mp.Process(
            target=_client_process, args=(url, n, clients // procs, k * (clients // procs), per_client, start_at, queue)
        )
        for k in range(procs)
    ]
    for w in workers:
        w.start()
    results = [r for _ in workers for r in queue.get()]
    for w in workers:
        w.join()
    wall = max(time.time() - start_at, 1e-9)
    latencies = sorted(r[0] for r in results)
    ok = sum(1 for r in results if r[1] == 200)
    return {
        "n": n,
        "clients": clients,
        "requests": len(results),
        "ok": ok,
        "wall_s": wall,
        "throughput_rps": ok / wall,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
    }


def summarize(runs: list[dict]) -> dict:
    """One cell's repeats: the median run (by throughput) with its latencies, and the throughput range."""
    ranked = sorted(runs, key=lambda r: r["throughput_rps"])
    median = ranked[len(ranked) // 2]
    return {
        **median,
        "repeats": len(runs),
        "throughput_min": ranked[0]["throughput_rps"],
        "throughput_max": ranked[-1]["throughput_rps"],
        "throughput_runs": [r["throughput_rps"] for r in runs],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each cell (median and range reported)")
    parser.add_argument("--baseline", type=Path, help="another checkout whose server is measured alongside")
    args = parser.parse_args(argv)
    servers = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    rows = []
    for batching in (True, False):
        env = {
            "SWISSROLL_BATCHING": str(batching).lower(),
            "SWISSROLL_MAX_QUEUE": "256",
            "SWISSROLL_LOG_LEVEL": "warning",
        }
        live = {name: LiveServer(cwd=path, **env).wait_ready() for name, path in servers.items()}
        try:
            for n in SIZES:
                for clients in CLIENTS:
                    runs: dict[str, list[dict]] = {name: [] for name in live}
                    for repeat in range(args.repeats):
                        order = list(live.items())  # who goes first alternates: no server always follows the other
                        for name, server in order if repeat % 2 == 0 else order[::-1]:
                            runs[name].append(run_cell(server.url, n, clients))
                    for name, cell in runs.items():
                        row = {"server": name, "batching": batching, **summarize(cell)}
                        rows.append(row)
                        print(_line(row), flush=True)
        finally:
            for server in live.values():
                server.terminate()
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "repeats": args.repeats,
        "baseline": str(args.baseline) if args.baseline else None,
        "baseline_commit": _commit(args.baseline) if args.baseline else None,
        "commit": _commit(REPO),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "load.md").write_text(markdown(results))
    print(markdown(results))


def _line(row: dict) -> str:
    return (
        f"{row['server']:8} batching={row['batching']!s:5} n={row['n']:>6} clients={row['clients']:>3}  "
        f"{row['throughput_rps']:8.1f} req/s ({row['throughput_min']:.1f}-{row['throughput_max']:.1f})  "
        f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  ok {row['ok']}/{row['requests']}"
    )


def _commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def markdown(r: dict) -> str:
    servers = f"this checkout ({r['commit']})"
    if r.get("baseline"):
        servers += f" and, cell by cell in turn, the baseline checkout ({r['baseline_commit']})"
    lines = [
        f"# Load: `GET /sample` (ddpm, 40 steps, npy), {r['machine']}, {r['date']}",
        "",
        f"Closed-loop asyncio clients on loopback against `python -m service` (default settings, queue 256): "
        f"{servers}. Each cell ran {r['repeats']} times: the median run by throughput (its p50 and p99), and the "
        f"range of throughput over the runs. Throughput counts 200s only. 1-minute load average at the end: "
        f"{r['load_average'][0]}.",
        "",
        "| n | clients | batching | server | req/s (median) | req/s range | p50 ms | p99 ms | ok |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for x in sorted(r["rows"], key=lambda x: (x["n"], x["clients"], not x["batching"], x["server"] != "this")):
        lines.append(
            f"| {x['n']:,} | {x['clients']} | {'on' if x['batching'] else 'off'} | {x['server']} | "
            f"{x['throughput_rps']:.1f} | {x['throughput_min']:.1f}-{x['throughput_max']:.1f} | "
            f"{x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['ok']}/{x['requests']} |"
        )
    cell = {(x["n"], x["clients"], x["batching"]): x for x in r["rows"] if x["server"] == "this"}
    on, off = cell[(100, 16, True)], cell[(100, 16, False)]
    lines += [
        "",
        f"**Batching on/off throughput at 16 clients x n = 100: "
        f"{on['throughput_rps'] / off['throughput_rps']:.1f}x** "
        f"({on['throughput_rps']:.0f} vs {off['throughput_rps']:.0f} req/s)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
