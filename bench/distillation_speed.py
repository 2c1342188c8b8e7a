"""The distilled student's speed over HTTP: `/sample?n=10000` from swissroll-fast at 2 evaluations against the
default (ddpm, 40 evaluations), same server, from curl (what the README's user runs) and from httpx; and the same two
runs in-process (no HTTP), which bounds what any request can reach.

Two orders of the same requests, both cancelling drift in the machine's speed:
- runs of RUN consecutive requests per setting, the settings taking turns: what a client calling one endpoint sees
  (the headline);
- request by request, the settings interleaved: every student request then comes right after a 40-step job that kept
  both cores busy for ~50 ms and evicted the interpreter and the student's data from the caches, ~0.4 ms more.

    python -m bench.distillation_speed   # 5 rounds (~2 min); writes bench/results/distillation_speed.{json,md}
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import torch

from bench.live_server import REPO, LiveServer
from diffusion.checkpoint import load_model
from diffusion.cpus import threads_from_env
from diffusion.folded import cpu_has_bf16_units
from diffusion.samplers import sample
from service.__main__ import tune_allocator

RESULTS = Path(__file__).parent / "results"
DEFAULT = "/sample?n=10000&seed={seed}"
STUDENT = "/sample?model=swissroll-fast&steps={steps}&n=10000&seed={seed}"
# Three ways a client gets the points: JSON gzipped (httpx, browsers and curl --compressed ask for it: the server
# compresses ~236 kB at level 1, the client inflates it), JSON as sent to plain curl, and float32 .npy (never
# compressed).
FORMATS = {"": ({}, ""), ", uncompressed JSON": ({"Accept-Encoding": "identity"}, ""), ", npy": ({}, "&format=npy")}
ROWS = {
    f"{label}{fmt}": (path.format(steps=steps, seed="{seed}") + query, headers)
    for fmt, (headers, query) in FORMATS.items()
    for label, path, steps in [
        ("default ddpm@40", DEFAULT, 40),
        ("swissroll-fast consistency@2", STUDENT, 2),
        ("swissroll-fast consistency@1", STUDENT, 1),
    ]
}
REPS = 30
RUN = 10  # consecutive requests per setting in the "runs" order
ORDERS = ("runs", "interleaved")
FLOAT32 = "swissroll-fast consistency@2, float32 GEMMs"


def _format_of(label: str) -> str:
    return next((fmt for fmt in FORMATS if fmt and label.endswith(fmt)), "")


def in_process_ms() -> dict[str, float]:
    """Median of REPS interleaved in-process runs at n = 10,000, torch threads as the server's (no HTTP, no JSON)."""
    tune_allocator()
    torch.set_num_threads(threads_from_env().threads)
    cpu = torch.device("cpu")
    runs = {
        "default ddpm@40": (load_model(REPO / "checkpoints/swissroll.pt", cpu).denoiser, "ddpm", 40),
        "swissroll-fast consistency@2": (
            load_model(REPO / "checkpoints/swissroll-fast.pt", cpu).denoiser,
            "consistency",
            2,
        ),
        # The same file with SWISSROLL_CPU_NETWORK=float32: its hidden layers in float32 (diffusion/folded.py).
        FLOAT32: (load_model(REPO / "checkpoints/swissroll-fast.pt", cpu, "float32").denoiser, "consistency", 2),
    }
    times: dict[str, list[float]] = {label: [] for label in runs}
    for rep in range(REPS + 2):  # the first two are warm-up
        for label, (denoiser, sampler, steps) in runs.items():
            began = time.perf_counter()
            sample(denoiser, sampler, 10_000, torch.Generator().manual_seed(rep), steps)
            if rep >= 2:
                times[label].append(time.perf_counter() - began)
    return {label: statistics.median(v) * 1000 for label, v in times.items()}


def bf16_note(in_process: dict[str, float]) -> str:
    student, float32 = in_process["swissroll-fast consistency@2"], in_process[FLOAT32]
    if not cpu_has_bf16_units():
        return "This CPU has no bf16 units: the student's network ran in float32 (diffusion/folded.py)."
    return (
        f"Its hidden GEMMs ran in bfloat16 (its hidden weights are bfloat16 values, this CPU has bf16 units; "
        f"diffusion/folded.py); the same file with SWISSROLL_CPU_NETWORK=float32 took {float32:.2f} ms "
        f"({float32 / student:.2f}x)."
    )


def request_order(order: str) -> list[tuple[str, int]]:
    """(row label, seed) for REPS requests per row: in runs of RUN per row, rows taking turns, or row by row."""
    if order == "interleaved":
        return [(label, rep) for rep in range(REPS) for label in ROWS]
    return [(label, run + i) for run in range(0, REPS, RUN) for label in ROWS for i in range(RUN)]


def httpx_ms(url: str, order: str) -> dict[str, list[float]]:
    """Seconds per request from httpx (gzip asked for unless a row says identity), REPS per row in the given order."""
    times: dict[str, list[float]] = {label: [] for label in ROWS}
    with httpx.Client(timeout=120) as client:
        for label, (path, headers) in ROWS.items():  # warm-up, and a check that every row is served
            assert client.get(url + path.format(seed=0), headers=headers).status_code == 200, label
        for label, seed in request_order(order):
            path, headers = ROWS[label]
            began = time.perf_counter()
            r = client.get(url + path.format(seed=seed), headers=headers)
            times[label].append(time.perf_counter() - began)
            assert r.status_code == 200 and len(r.content) > 80_000  # 10,000 points, JSON or float32 .npy
            assert ("gzip" in r.headers.get("content-encoding", "")) == (headers == {} and "npy" not in path)
    return times


def curl_ms(url: str, order: str) -> dict[str, list[float]]:
    """Seconds per request as curl reports them (time_total), what the README's user runs: one curl process, its
    connection reused, REPS per row in the given order after one warm-up round; gzipped rows with --compressed."""
    groups, labels = [], []
    for label, seed in [(label, -1) for label in ROWS] + request_order(order):
        path, headers = ROWS[label]
        flags = [] if headers or "npy" in path else ["--compressed"]
        groups.append(["--silent", "--fail", *flags, "-o", "/dev/null", "-w", "%{time_total}\n"])
        groups[-1].append(url + path.format(seed=seed))
        labels.append(label)
    args = ["curl", *[arg for i, group in enumerate(groups) for arg in ([] if i == 0 else ["--next"]) + group]]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout
    times: dict[str, list[float]] = {label: [] for label in ROWS}
    for i, (label, value) in enumerate(zip(labels, out.split(), strict=True)):
        if i >= len(ROWS):  # the warm-up round
            times[label].append(float(value))
    return times


def _speedups(medians: dict[str, float]) -> dict[str, float]:
    """Each row's speed-up over the default in the same format."""
    return {label: medians[f"default ddpm@40{_format_of(label)}"] / v for label, v in medians.items()}


def one_round(url: str) -> dict[str, dict[str, list[float]]]:
    """Seconds per request, per (client, order) and row: every row REPS times in each order, from both clients."""
    return {
        f"{client}, {order}": measure(url, order)
        for order in ORDERS
        for client, measure in (("curl", curl_ms), ("httpx", httpx_ms))
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.distillation_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="whole measurements, each a ratio of its own medians")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with LiveServer(SWISSROLL_MODELS_DIR="checkpoints") as server:
        rounds = [one_round(server.url) for _ in range(args.rounds)]
    load_after = os.getloadavg()
    in_process = in_process_ms()
    # Per round: each row's median, and its ratio to the default's median in that round (same format and order).
    round_medians = [
        {name: {k: statistics.median(v) * 1000 for k, v in t.items()} for name, t in r.items()} for r in rounds
    ]
    round_speedups = [{name: _speedups(m) for name, m in rm.items()} for rm in round_medians]
    clients = rounds[0]
    medians = {name: {k: statistics.mean(rm[name][k] for rm in round_medians) for k in ROWS} for name in clients}
    speedup = {name: {k: statistics.mean(rs[name][k] for rs in round_speedups) for k in ROWS} for name in clients}
    spread = {
        name: {k: statistics.stdev([rs[name][k] for rs in round_speedups]) if len(rounds) > 1 else 0.0 for k in ROWS}
        for name in clients
    }
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before_after": [round(x, 2) for x in load_before + load_after],
        "reps": REPS,
        "run": RUN,
        "rounds": len(rounds),
        "median_ms": medians,  # mean over rounds of each round's median
        "speedup_vs_default": speedup,  # mean over rounds
        "speedup_sd": spread,
        "rounds_median_ms": round_medians,
        "rounds_speedup": round_speedups,
        "in_process_median_ms": in_process,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distillation_speed.json").write_text(json.dumps(results, indent=2))
    student_ms, default_ms = in_process["swissroll-fast consistency@2"], in_process["default ddpm@40"]
    npy = {name: m["swissroll-fast consistency@2, npy"] for name, m in medians.items()}
    gzip_ms = {name: m["swissroll-fast consistency@2"] - npy[name] for name, m in medians.items()}
    cold = npy["curl, interleaved"] - npy["curl, runs"]
    lines = [
        f"# Distilled student vs default over HTTP: `/sample?n=10000` (JSON gzipped or not, and .npy), {len(rounds)} "
        f"rounds of {REPS} requests per setting, two request orders, two clients",
        "",
        f"Measured {results['date']} UTC on {results['machine']} (one server, `SWISSROLL_MODELS_DIR=checkpoints`); "
        f"1-minute load average before/after: {results['load_average_before_after'][0]} / "
        f"{results['load_average_before_after'][3]} on 2 cores (above ~1, other jobs inflate the absolute times; "
        "each ratio is measured in one run). Clients: curl (one process, connection reused, `--compressed` for the "
        "gzipped rows; its own `time_total`) and httpx (Python, what the tests and benches use). Orders: *runs*, "
        f"{RUN} consecutive requests per setting with the settings taking turns (what a client calling one endpoint "
        "sees); *interleaved*, the settings taking turns request by request, so that every student request follows "
        f"a 40-step job that kept both cores busy for ~50 ms and left the caches cold: {cold:+.1f} ms to the "
        "student's .npy request (curl). Each round's ratio is of its own medians (same server, same minutes); the "
        "table gives the mean over rounds of the medians (ms) and of the ratios, ± their standard deviation.",
        "",
        f"In-process (no HTTP, same threads, interleaved): the default {default_ms:.1f} ms, the student at 2 "
        f"evaluations {student_ms:.2f} ms: {default_ms / student_ms:.1f}x, the most any request can reach. "
        f"{bf16_note(in_process)} Over HTTP each request also pays a fixed cost (parsing, validation, the hop to a "
        f"compute thread and back, the response, the client): the student's .npy request (interleaved) less its "
        f"in-process run is {npy['curl, interleaved'] - student_ms:.1f} ms with curl, "
        f"{npy['httpx, interleaved'] - student_ms:.1f} ms with httpx. Gzipped JSON (encoding, compressing and "
        f"inflating 236 kB) adds {gzip_ms['curl, runs']:.1f} ms (curl, runs) / {gzip_ms['httpx, runs']:.1f} ms "
        "(httpx, runs): nothing to the default's request, as much as the student's two network evaluations.",
        "",
        "| setting | network evaluations | " + " | ".join(f"{name}: ms | speed-up" for name in clients) + " |",
        "|---|---:|" + "---:|---:|" * len(clients),
    ]
    for label in ROWS:
        nfe = 40 if "ddpm@40" in label else int(label.split("@")[1][0])
        cells = [
            f"{medians[name][label]:.1f} | {speedup[name][label]:.1f}x ± {spread[name][label]:.1f}" for name in clients
        ]
        lines.append(f"| {label} | {nfe} | " + " | ".join(cells) + " |")
    (RESULTS / "distillation_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
