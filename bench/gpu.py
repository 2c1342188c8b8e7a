"""GPU fast path benchmark (CUDA machine only): eager vs CUDA graph vs fused kernel, per precision.

    python -m bench.gpu                 # writes bench/results/gpu.md and gpu.json (about 3 minutes)
    python -m bench.gpu --quick         # fewer sizes and repeats, no HTTP, for a dry run

In one process, on the committed checkpoint: the GEMM-only floor of each size (the network's 4 hidden
[n x 64] @ [64 x 64] products per step, nothing else); in-process time of ddpm@40 and tuned dpmpp_2m@10 per
path and precision (noise drawn from the request's generator and points copied to the host included, as in
the service); the first call's capture time and the graphs' memory; each path's largest difference from the
eager fp32 points for the same seed; sliced W2 at n = 100,000 per precision; and /sample over HTTP
(format=npy) against servers started with each SWISSROLL_CUDA_KERNEL.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from diffusion import noise
from diffusion.checkpoint import load_model
from diffusion.samplers import get_sampler, resolve_timesteps
from service.cuda_fast_path import CudaFastPath
from service.graph_cache import GraphCache
from training.distances import sliced_w2
from training.evaluate import fresh_real

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RUNS = [("ddpm", 40), ("dpmpp_2m", 10)]
PATHS = [  # (name, kernel, precision); "before": the service's CUDA path before the fast path existed
    ("before: eager, per-step noise", "before", "fp32"),
    ("eager fp32", "eager", "fp32"),
    ("graph fp32", "graph", "fp32"),
    ("graph tf32", "graph", "tf32"),
    ("graph bf16", "graph", "bf16"),
    ("fused fp32 (3xTF32)", "fused", "fp32"),
    ("fused fp32 (FMA)", "fused", "fp32_ieee"),
    ("fused tf32", "fused", "tf32"),
    ("fused bf16", "fused", "bf16"),
]


def cuda_ms(fn, reps: int) -> float:
    """Median wall time of fn() in ms, synchronized (fn's own host copy synchronizes too)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def gemm_floor_ms(n: int, steps: int, precision: str, reps: int) -> float:
    """Only the network's hidden GEMMs of a run: steps x 4 x [n, 64] @ [64, 64], back to back."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    h = torch.randn(n, 64, device="cuda", dtype=dtype)
    w = torch.randn(64, 64, device="cuda", dtype=dtype) / 8
    out = torch.empty_like(h)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"

    def run():
        for _ in range(steps * 4):
            torch.mm(h, w, out=out)

    run()
    ms = cuda_ms(run, reps)
    torch.backends.cuda.matmul.allow_tf32 = False
    return ms


class Runner:
    """One path (kernel + precision) over the loaded model, as the service runs it."""

    def __init__(self, model, kernel: str, precision: str):
        self.model = model
        torch.backends.cuda.matmul.allow_tf32 = False  # a previous path's setting must not leak into this one
        self.graphs = GraphCache(8 << 30, 1 << 21)
        self.fast = (
            None if kernel == "before" else CudaFastPath(model.id, model.denoiser, self.graphs, precision, kernel)
        )
        self.tf32 = precision == "tf32"

    def __call__(self, name: str, steps: int, n: int, seed: int) -> torch.Tensor:
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        spec = get_sampler(name)
        ts, _ = resolve_timesteps(spec, self.model.denoiser, steps, None)
        g = torch.Generator(device="cuda").manual_seed(seed)
        if self.fast is not None:
            return self.fast.sample(spec, ts, {}, [(g, n)]).cpu()
        # Before this work: per-step noise draws and ~12 launches per step (the service's old CUDA path).
        x = torch.randn((n, 2), generator=g, device="cuda")
        return spec.fn(self.model.denoiser, x, ts, noise.from_generator(g), None).cpu()


def in_process(model, sizes, reps: int) -> list[dict]:
    rows = []
    reference = {}
    for label, kernel, precision in PATHS:
        runner = Runner(model, kernel, precision)
        for name, steps in RUNS:
            for n in sizes:
                t0 = time.perf_counter()
                try:
                    first = runner(name, steps, n, 0)
                except Exception as e:  # one broken path must not hide the others' figures
                    rows.append({"path": label, "sampler": f"{name}@{steps}", "n": n, "error": repr(e)[:300]})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                first_ms = (time.perf_counter() - t0) * 1000
                ms = cuda_ms(lambda: runner(name, steps, n, 1), reps if n < 10**6 else max(3, reps // 3))  # noqa: B023
                if kernel == "eager":  # the reference: same noise as every fast path, per-step launches
                    reference[name, n] = first
                diff = (first - reference[name, n]).abs().max().item() if (name, n) in reference else float("nan")
                row = {"path": label, "sampler": f"{name}@{steps}", "n": n, "ms": ms, "first_call_ms": first_ms}
                row |= {"max_abs_diff_vs_eager": diff, "graph_bytes": runner.graphs.used_bytes}
                rows.append(row)
                print(json.dumps(row), flush=True)
        runner.graphs.invalidate(model.id)  # frees this path's graphs before the next path's
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def quality(model, seeds: int) -> list[dict]:
    meta = model.metadata["data"]
    rows = []
    for label, kernel, precision in [PATHS[1], PATHS[5], PATHS[7], PATHS[8], PATHS[4]]:
        runner = Runner(model, kernel, precision)
        for name, steps in RUNS:
            values = []
            for seed in range(seeds):
                try:
                    points = runner(name, steps, 100_000, seed).numpy()
                except Exception as e:
                    print(json.dumps({"path": label, "error": repr(e)[:300]}), flush=True)
                    break
                real = fresh_real(100_000, meta["noise"], 20_000 + seed, meta["mean"], meta["std"])
                values.append(sliced_w2(real, points))
            if not values:
                continue
            rows.append({"path": label, "sampler": f"{name}@{steps}", "sliced_w2": float(np.mean(values))})
            print(json.dumps(rows[-1]), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def http(sizes, reps: int) -> list[dict]:
    rows = []
    for kernel in ("eager", "graph", "auto"):
        port = 18000 + len(rows)
        env = {**os.environ, "SWISSROLL_DEVICE": "cuda", "SWISSROLL_CUDA_KERNEL": kernel, "SWISSROLL_PORT": str(port)}
        env["SWISSROLL_LOG_LEVEL"] = "warning"
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/readyz", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"{kernel} server did not become ready") from None
                    time.sleep(0.5)
            for name, steps in RUNS:
                for n in sizes:
                    url = f"{base}/sample?n={n}&sampler={name}&steps={steps}&seed=0&format=npy"
                    walls = []
                    for i in range(reps + 2):
                        t0 = time.perf_counter()
                        with urllib.request.urlopen(url, timeout=60) as r:
                            r.read()
                        if i >= 2:
                            walls.append((time.perf_counter() - t0) * 1000)
                    row = {"server": kernel, "sampler": f"{name}@{steps}", "n": n, "ms": statistics.median(walls)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    return rows


def markdown(r: dict) -> str:
    lines = [f"# GPU fast path: {r['device']} (torch {r['torch']}, Triton {r['triton']}), {r['date']}", ""]
    lines += ["Command: `python -m bench.gpu`. Milliseconds, median; noise drawn and points copied to the host", ""]
    lines += ["## GEMM-only floor (4 hidden GEMMs [n x 64] @ [64 x 64] per step)", ""]
    lines += ["| steps | n | fp32 | tf32 | bf16 |", "|---:|---:|---:|---:|---:|"]
    for f in r["gemm_floor"]:
        lines.append(f"| {f['steps']} | {f['n']:,} | {f['fp32']:.2f} | {f['tf32']:.2f} | {f['bf16']:.2f} |")
    lines += ["", "## In-process", ""]
    sizes = sorted({row["n"] for row in r["in_process"]})
    for sampler in dict.fromkeys(row["sampler"] for row in r["in_process"]):
        lines += [
            f"### {sampler}",
            "",
            "| path | "
            + " | ".join(f"n = {n:,}" for n in sizes)
            + " | first call, largest n (capture, compile) | graph MB | max abs diff vs eager |",
        ]
        lines.append("|---|" + "---:|" * (len(sizes) + 3))
        for label, *_ in PATHS:
            mine = [row for row in r["in_process"] if row["path"] == label and row["sampler"] == sampler]
            cells = {row["n"]: row for row in mine if "error" not in row}
            if len(cells) < len(mine):
                lines.append(f"| {label} | failed: {next(row['error'] for row in mine if 'error' in row)} |")
            if not cells:
                continue
            big = cells[max(cells)]
            diff = max(c["max_abs_diff_vs_eager"] for c in cells.values())
            lines.append(
                f"| {label} | "
                + " | ".join(f"{cells[n]['ms']:.2f}" for n in sizes)
                + f" | {big['first_call_ms']:.0f} | {big['graph_bytes'] / 2**20:.0f} | {diff:.1e} |"
            )
        lines.append("")
    if r.get("quality"):
        lines += ["## Sliced W2 at n = 100,000 (mean of 3 seeds; CPU benchmark: bench/results/quality.md)", ""]
        lines += ["| path | sampler | sliced W2 |", "|---|---|---:|"]
        lines += [f"| {q['path']} | {q['sampler']} | {q['sliced_w2']:.4f} |" for q in r["quality"]]
        lines.append("")
    if r.get("http"):
        lines += ["## Over HTTP: `/sample?format=npy`, client wall time (SWISSROLL_CUDA_KERNEL per server)", ""]
        lines += ["| server | sampler | n | ms |", "|---|---|---:|---:|"]
        lines += [f"| {h['server']} | {h['sampler']} | {h['n']:,} | {h['ms']:.1f} |" for h in r["http"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.gpu needs a CUDA device")
    import triton

    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000]
    reps = 5 if args.quick else 10
    model = load_model(REPO / "checkpoints" / "swissroll.pt", torch.device("cuda"))
    r = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    r["gemm_floor"] = [
        {"steps": s, "n": n, **{p: gemm_floor_ms(n, s, p, reps) for p in ("fp32", "tf32", "bf16")}}
        for s in (40, 10)
        for n in sizes
    ]
    print(json.dumps(r["gemm_floor"]), flush=True)
    r["in_process"] = in_process(model, sizes, reps)
    r["quality"] = quality(model, 1 if args.quick else 3)
    r["http"] = [] if args.quick else http([1_000, 10_000, 100_000], 10)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(r, indent=1))
    (args.out / "gpu.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
