"""Sampling speed: in-process and over HTTP, against the machine's own matmul rate, and against what a user
would otherwise run (diffusers' scheduler loop, the original notebook's loop), all in one run.

    python -m bench.speed            # ~3 min on 2 CPU cores; writes bench/results/speed.{json,md}
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import orjson
import torch

from bench.live_server import LiveServer
from diffusion.checkpoint import load_model
from diffusion.cpus import threads_from_env
from diffusion.samplers import SAMPLERS, sample
from service.__main__ import tune_allocator

RESULTS = Path(__file__).parent / "results"
CHECKPOINT = "checkpoints/swissroll.pt"
SIZES = (100, 1_000, 10_000, 100_000)


def repeats(n: int) -> int:
    return {100: 30, 1_000: 20, 10_000: 10, 100_000: 4}[n]


def timed(fn, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def matmul_gflops() -> float:
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    return 2 * 4096**3 / statistics.median(timed(lambda: torch.mm(a, b), 5)) / 1e9


def diffusers_loop(model, scheduler_name: str, steps: int, n: int):
    """What a user would write with diffusers: its scheduler object stepping our model."""
    import diffusers

    ab = torch.tensor(model.denoiser.alphas_cumprod, dtype=torch.float64)
    betas = (1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])).numpy()
    kwargs = {
        "prediction_type": {"v": "v_prediction", "epsilon": "epsilon"}[model.denoiser.prediction_type],
        "timestep_spacing": "trailing",
        "trained_betas": betas,
        "num_train_timesteps": len(ab),
    }
    if scheduler_name == "DDPMScheduler":
        kwargs.update(variance_type="fixed_large", clip_sample=False)
    scheduler = getattr(diffusers, scheduler_name)(**kwargs)
    net = model.denoiser.net

    def run():
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 2, generator=g)
        with torch.inference_mode():
            for t in scheduler.timesteps:
                x = scheduler.step(net(x, torch.full((n,), int(t))), t, x, generator=g).prev_sample
        return x

    return run


def original_loop(model, n: int):
    """The notebook's sample_ddpm: tensor-indexed coefficients, a Python loop over all T levels."""
    ab = torch.tensor(model.denoiser.alphas_cumprod, dtype=torch.float32)
    alphas = ab / torch.cat([torch.ones(1), ab[:-1]])
    net = model.denoiser.net
    # The original predicted eps; for a v-checkpoint convert (two extra elementwise ops per step, same cost class).
    v = model.denoiser.prediction_type == "v"

    def run():
        x = torch.randn(n, 2)
        with torch.no_grad():
            for t in reversed(range(len(ab))):
                out = net(x, torch.full((n,), t))
                eps = (1 - ab[t]).sqrt() * x + ab[t].sqrt() * out if v else out
                x = 1 / alphas[t].sqrt() * (x - (1 - alphas[t]) / (1 - ab[t]).sqrt() * eps)
                if t > 0:
                    x = x + (1 - alphas[t]).sqrt() * torch.randn_like(x)
        return x

    return run


def allocator_probe() -> dict:
    """ddpm n = 10,000 in a fresh process (allocator settings are per process), default vs tuned."""
    code = (
        "import sys, json, time, torch; from service.__main__ import tune_allocator\n"
        "if sys.argv[1] == 'tuned': tune_allocator()\n"
        "from diffusion.checkpoint import load_model; from diffusion.samplers import sample\n"
        f"m = load_model('{CHECKPOINT}', torch.device('cpu')); ts = []\n"
        "for i in range(14):\n"
        "    t0 = time.perf_counter(); sample(m.denoiser, 'ddpm', 10000, torch.Generator().manual_seed(i)); "
        "ts.append(time.perf_counter() - t0)\n"
        "print(json.dumps(ts[2:]))\n"
    )
    out = {}
    for mode in ("default", "tuned"):
        ts = json.loads(
            subprocess.run(
                [sys.executable, "-c", code, mode],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            ).stdout
        )
        out[mode] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3}
    return out


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    tune_allocator()
    torch.set_num_threads(threads_from_env().threads)  # as the server and training choose them
    model = load_model(CHECKPOINT, torch.device("cpu"))
    flops = model.metadata["model"]["flops_per_sample"]
    gflops = matmul_gflops()
    print(f"matmul: {gflops:.0f} GFLOP/s, {torch.get_num_threads()} threads", flush=True)
    rows = []
    with LiveServer(SWISSROLL_CHECKPOINT=CHECKPOINT) as server, httpx.Client(timeout=120) as client:
        for n in SIZES:
            for name, spec in SAMPLERS.items():
                steps = spec.steps_default(model.denoiser.num_timesteps)
                g = torch.Generator()
                inproc = timed(lambda nm=name, k=n, g=g: sample(model.denoiser, nm, k, g.manual_seed(0)), repeats(n))
                url = f"{server.url}/sample?n={n}&sampler={name}&seed=0"
                http = timed(lambda u=url: client.get(u).raise_for_status(), repeats(n))
                bound = flops * steps * n / (gflops * 1e9)
                rows.append(
                    {
                        "n": n,
                        "sampler": name,
                        "steps": steps,
                        "inprocess_ms": statistics.median(inproc) * 1e3,
                        "http_ms": statistics.median(http) * 1e3,
                        "bound_ms": bound * 1e3,
                    }
                )
                r = rows[-1]
                print(
                    f"n={n:>6} {name:9s} in-process {r['inprocess_ms']:8.1f} ms  HTTP {r['http_ms']:8.1f} ms  "
                    f"GEMM time {r['bound_ms']:7.1f} ms",
                    flush=True,
                )
    points = sample(model.denoiser, "ddpm", 10_000, torch.Generator().manual_seed(0)).numpy()
    encode_ms = (
        statistics.median(timed(lambda: orjson.dumps({"points": points}, option=orjson.OPT_SERIALIZE_NUMPY), 20)) * 1e3
    )
    alternatives = {
        "ours: ddpm (40 steps)": statistics.median(
            timed(lambda: sample(model.denoiser, "ddpm", 10_000, torch.Generator().manual_seed(0)), 10)
        ),
        "diffusers DDPMScheduler loop (40 steps)": statistics.median(
            timed(diffusers_loop(model, "DDPMScheduler", 40, 10_000), 10)
        ),
        "original notebook loop (40 steps)": statistics.median(timed(original_loop(model, 10_000), 10)),
        "ours: dpmpp_2m (10 steps)": statistics.median(
            timed(lambda: sample(model.denoiser, "dpmpp_2m", 10_000, torch.Generator().manual_seed(0)), 10)
        ),
        "diffusers DPMSolverMultistepScheduler loop (10 steps)": statistics.median(
            timed(diffusers_loop(model, "DPMSolverMultistepScheduler", 10, 10_000), 10)
        ),
    }
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "matmul_gflops": gflops,
        "flops_per_sample": flops,
        "rows": rows,
        "json_encode_ms_10000": encode_ms,
        "alternatives_ms_10000": {k: v * 1e3 for k, v in alternatives.items()},
        "allocator_ddpm_10000": allocator_probe(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "speed.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [
        f"# Sampling speed ({r['machine']}, torch {r['torch']}, {r['date']})",
        "",
        f"fp32 matmul rate measured in the same run: **{r['matmul_gflops']:.0f} GFLOP/s** (4096² `torch.mm`). "
        f"Network: {r['flops_per_sample']:,} FLOPs per point per evaluation. GEMM time = FLOPs × steps × n / rate: "
        "the network's arithmetic at a large GEMM's rate, a reference rather than a bound: the CPU path's fused "
        "oneDNN layers on [rows, 64] blocks run faster per FLOP here than that GEMM (diffusion/folded.py), and the "
        "FLOP count includes the time features the folded network does not evaluate (~6%). "
        "Medians; HTTP = `GET /sample` end to end against `python -m service` on loopback (JSON body).",
        "",
        "| n | sampler | steps | in-process ms | HTTP ms | GEMM time ms | HTTP / GEMM time |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['n']:,} | {row['sampler']} | {row['steps']} | {row['inprocess_ms']:.1f} | "
            f"{row['http_ms']:.1f} | {row['bound_ms']:.1f} | {row['http_ms'] / row['bound_ms']:.2f} |"
        )
    key = next(x for x in r["rows"] if x["n"] == 10_000 and x["sampler"] == "ddpm")
    fast = next(x for x in r["rows"] if x["n"] == 10_000 and x["sampler"] == "dpmpp_2m")
    a = r["allocator_ddpm_10000"]
    lines += [
        "",
        "## Headline (n = 10,000)",
        "",
        f"- `/sample?n=10000&sampler=ddpm` over HTTP: {key['http_ms']:.1f} ms = "
        f"{key['http_ms'] / key['bound_ms']:.2f}x its FLOPs' time at the 4096² matmul rate ({key['bound_ms']:.1f} ms); "
        "in-process "
        f"{key['inprocess_ms']:.1f} ms",
        f"- JSON encoding of 10,000 points: {r['json_encode_ms_10000']:.2f} ms = "
        f"{100 * r['json_encode_ms_10000'] / key['http_ms']:.1f}% of the request",
        f"- dpmpp_2m (10 steps) vs ddpm (40 steps), HTTP: {key['http_ms'] / fast['http_ms']:.1f}x faster",
        f"- glibc allocator, ddpm in a fresh process: default {a['default']['median_ms']:.0f} ms "
        f"(min {a['default']['min_ms']:.0f}, max {a['default']['max_ms']:.0f}) vs tuned (what the launchers "
        f"use) {a['tuned']['median_ms']:.0f} ms (min {a['tuned']['min_ms']:.0f}, max {a['tuned']['max_ms']:.0f})",
        "",
        "## Against the alternatives (in-process, same model, same machine, n = 10,000)",
        "",
        "| implementation | ms |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["alternatives_ms_10000"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
