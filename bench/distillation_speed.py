"""The distilled student's speed over HTTP: `/sample?n=10000` from swissroll-fast at 2 evaluations against the
default (ddpm, 40 evaluations), same server, requests interleaved so both see the same machine load; and the same
two runs in-process (no HTTP), which bounds what any request can reach.

    python -m bench.distillation_speed   # writes bench/results/distillation_speed.{json,md}
"""

import json
import os
import platform
import statistics
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
# Three ways a client gets the points: JSON gzipped (httpx and browsers ask for it: the server compresses ~240 kB at
# level 1, the client inflates it), JSON as sent to curl without --compressed, and float32 .npy (never compressed).
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
        # The same file with SWISSROLL_CPU_BF16=false: its hidden GEMMs in float32 (diffusion/folded.py).
        FLOAT32: (load_model(REPO / "checkpoints/swissroll-fast.pt", cpu, cpu_bf16=False).denoiser, "consistency", 2),
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
        f"diffusion/folded.py); the same file with SWISSROLL_CPU_BF16=false took {float32:.2f} ms "
        f"({float32 / student:.2f}x)."
    )


def main() -> None:
    times: dict[str, list[float]] = {label: [] for label in ROWS}
    load_before = os.getloadavg()
    with LiveServer(SWISSROLL_MODELS_DIR="checkpoints") as server, httpx.Client(timeout=120) as client:
        for label, (path, headers) in ROWS.items():  # warm-up, and a check that every row is served
            assert client.get(server.url + path.format(seed=0), headers=headers).status_code == 200, label
        for rep in range(REPS):
            for label, (path, headers) in ROWS.items():
                began = time.perf_counter()
                r = client.get(server.url + path.format(seed=rep), headers=headers)
                times[label].append(time.perf_counter() - began)
                assert r.status_code == 200 and len(r.content) > 80_000  # 10,000 points, JSON or float32 .npy
                assert ("gzip" in r.headers.get("content-encoding", "")) == (headers == {} and "npy" not in path)
    load_after = os.getloadavg()
    in_process = in_process_ms()
    medians = {label: statistics.median(v) * 1000 for label, v in times.items()}
    default = {fmt: medians[f"default ddpm@40{fmt}"] for fmt in FORMATS}
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before_after": [round(x, 2) for x in load_before + load_after],
        "reps": REPS,
        "median_ms": medians,
        "ms_all": {k: [round(x * 1000, 2) for x in v] for k, v in times.items()},
        "speedup_vs_default": {label: default[_format_of(label)] / m for label, m in medians.items()},
        "in_process_median_ms": in_process,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distillation_speed.json").write_text(json.dumps(results, indent=2))
    student_ms, default_ms = in_process["swissroll-fast consistency@2"], in_process["default ddpm@40"]
    fixed_ms = medians["swissroll-fast consistency@2, npy"] - student_ms
    json_ms = medians["swissroll-fast consistency@2"] - medians["swissroll-fast consistency@2, npy"]
    lines = [
        f"# Distilled student vs default over HTTP: `/sample?n=10000` (JSON gzipped or not, and .npy), median of "
        f"{REPS}, interleaved",
        "",
        f"Measured {results['date']} UTC on {results['machine']} (one server, `SWISSROLL_MODELS_DIR=checkpoints`); "
        f"1-minute load average before/after: {results['load_average_before_after'][0]} / "
        f"{results['load_average_before_after'][3]} on 2 cores (above ~1, other jobs inflate the absolute times; "
        "the ratio is measured in one run).",
        "",
        f"In-process (no HTTP, same threads, interleaved): the default {default_ms:.1f} ms, the student at 2 "
        f"evaluations {student_ms:.2f} ms: {default_ms / student_ms:.1f}x, the most any request can reach. "
        f"{bf16_note(in_process)} Over "
        f"HTTP each request also pays a fixed cost (parsing, validation, the hop to a compute thread and back, the "
        f"response): {fixed_ms:.1f} ms here (the student's .npy request less its in-process run), and gzipped JSON "
        f"(encoding, compressing and inflating 240 kB) {json_ms:.1f} ms more: nothing to the default's request, "
        "most of the student's beyond its two network evaluations.",
        "",
        "| setting | network evaluations | median ms | speed-up vs the default (same format) |",
        "|---|---:|---:|---:|",
    ]
    for label, m in medians.items():
        nfe = 40 if "ddpm@40" in label else int(label.split("@")[1][0])
        lines.append(f"| {label} | {nfe} | {m:.1f} | {results['speedup_vs_default'][label]:.1f}x |")
    (RESULTS / "distillation_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
