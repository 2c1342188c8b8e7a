"""Throughput and latency under concurrent load, dynamic batching on vs off, against a real server on loopback.

python -m bench.load             # ~4 min on 2 CPU cores; writes bench/results/load.{json,md}
"""

import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

import httpx

from bench.live_server import LiveServer

RESULTS = Path(__file__).parent / "results"
CLIENTS = (1, 4, 16, 64)
SIZES = (100, 10_000)


def requests_per_client(n: int, clients: int) -> int:
    return max(4, 256 // clients) if n == 100 else max(2, 16 // clients)


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


def main() -> None:
    rows = []
    for batching in (True, False):
        env = {
            "SWISSROLL_BATCHING": str(batching).lower(),
            "SWISSROLL_MAX_QUEUE": "256",
            "SWISSROLL_LOG_LEVEL": "warning",
        }
        with LiveServer(**env) as server:
            for n in SIZES:
                for clients in CLIENTS:
                    row = {"batching": batching, **run_cell(server.url, n, clients)}
                    rows.append(row)
                    print(
                        f"batching={batching!s:5} n={n:>6} clients={clients:>3}  {row['throughput_rps']:8.1f} req/s  "
                        f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  ok {row['ok']}/{row['requests']}",
                        flush=True,
                    )
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "load.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [
        f"# Load: `GET /sample` (ddpm, 40 steps, npy), {r['machine']}, {r['date']}",
        "",
        "Closed-loop asyncio clients on loopback against `python -m service` (default settings, queue 256). "
        "Throughput counts 200s only.",
        "",
        "| n | clients | batching | req/s | p50 ms | p99 ms | ok |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for x in sorted(r["rows"], key=lambda x: (x["n"], x["clients"], not x["batching"])):
        lines.append(
            f"| {x['n']:,} | {x['clients']} | {'on' if x['batching'] else 'off'} | {x['throughput_rps']:.1f} | "
            f"{x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['ok']}/{x['requests']} |"
        )
    cell = {(x["n"], x["clients"], x["batching"]): x for x in r["rows"]}
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
