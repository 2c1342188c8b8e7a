"""CUDA check of the sampling maths (run next to scripts/gpu_smoke.sh on a GPU machine; ~1 min).

    python scripts/cuda_check.py

On the committed checkpoint, loaded on CUDA: sliced W2 of ddpm@40 and tuned dpmpp_2m@10 against fresh real data
(must match the CPU benchmark's quality, bench/results/quality.md), the largest difference between CUDA and CPU
network outputs on the same inputs, whether dynamic batching's rows are unchanged on CUDA (guaranteed on CPU
only; reported, not required), and in-process sampling time for n = 10^4..10^6.
"""

import json
import statistics
import sys
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion.checkpoint import load_model  # noqa: E402
from diffusion.denoiser import FORWARD_CHUNK, Denoiser  # noqa: E402
from diffusion.noise import from_generator, initial_noise  # noqa: E402
from diffusion.samplers import get_sampler, sample, timesteps  # noqa: E402
from service.cuda_fast_path import CudaFastPath  # noqa: E402
from service.graph_cache import GraphCache  # noqa: E402
from training.distances import sliced_w2  # noqa: E402
from training.evaluate import fresh_real  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "swissroll.pt"
QUALITY = REPO / "bench" / "results" / "quality.json"


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    gpu_model, cpu_model = load_model(CHECKPOINT, cuda), load_model(CHECKPOINT, cpu)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    meta = gpu_model.metadata["data"]
    n, failures = 50_000, []

    # 1. Quality on CUDA, against the committed CPU benchmark (bench/results/quality.json, same seeds and n).
    rows = json.loads(QUALITY.read_text())["models"]["committed default"]["rows"]
    bench = {(r["sampler"], r["steps"]): r["sliced_w2"] for r in rows}
    expected = {("ddpm", 40): bench["ddpm", 40], ("dpmpp_2m", 10): bench["dpmpp_2m (tuned)", 10]}
    for (name, steps), cpu_w2 in expected.items():
        values = []
        for seed in range(3):
            g = torch.Generator(device=cuda).manual_seed(seed)
            points = sample(gpu_model.denoiser, name, n, g, steps).cpu().numpy()
            real = fresh_real(n, meta["noise"], 10_000 + seed, meta["mean"], meta["std"])
            values.append(sliced_w2(real, points))
        w2 = float(np.mean(values))
        ok = w2 < 1.5 * cpu_w2
        failures += [] if ok else [f"{name}@{steps}"]
        verdict = "ok" if ok else "BAD"
        print(f"quality on CUDA: {name}@{steps} sliced W2 {w2:.4f} (CPU benchmark {cpu_w2:.4f}) {verdict}")

    # 2. The network itself: CUDA vs CPU on the same inputs, every level.
    x = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.inference_mode():
        for t in range(gpu_model.denoiser.num_timesteps):
            a = gpu_model.denoiser.predict(x.to(cuda), t)[1].cpu()
            b = cpu_model.denoiser.predict(x, t)[1]
            worst = max(worst, (a - b).abs().max().item())
    failures += [] if worst < 1e-3 else ["cuda-vs-cpu"]
    print(f"x0 prediction, CUDA vs CPU, max abs difference over all levels: {worst:.2e}")

    # 3. Batch invariance on CUDA (informational): one request's rows alone vs inside a larger batch.
    ts = timesteps(gpu_model.denoiser.num_timesteps, gpu_model.denoiser.num_timesteps)
    alone = initial_noise(1000, from_generator(torch.Generator(device=cuda).manual_seed(1)), cuda)
    others = torch.randn(7000, 2, device=cuda)
    with torch.inference_mode():
        a = gpu_model.denoiser.predict(alone, ts[5])[1]
        b = gpu_model.denoiser.predict(torch.cat([others, alone]), ts[5])[1][7000:]
    print(f"batch invariance on CUDA: max abs row difference {(a - b).abs().max().item():.2e} (CPU: exactly 0)")

    # 4. In-process sampling time on CUDA: the one-call-per-step path vs the CPU path's padding and chunks.
    def timed(name: str, size: int) -> float:
        runs = []
        for i in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sample(gpu_model.denoiser, name, size, torch.Generator(device=cuda).manual_seed(i))
            torch.cuda.synchronize()
            runs.append((time.perf_counter() - t0) * 1000)
        return statistics.median(runs[1:])

    for name in ("ddpm", "dpmpp_2m"):
        for size in (10_000, 100_000, 1_000_000):
            fast = timed(name, size)
            with patch.object(Denoiser, "_forward_accelerator", Denoiser._forward_cpu):
                chunked = timed(name, size)
            print(
                f"CUDA in-process {name:9s} n={size:>9,}: {fast:8.1f} ms one call per step, "
                f"{chunked:8.1f} ms padded + {FORWARD_CHUNK}-row chunks ({chunked / fast:.1f}x)"
            )
    failures += check_fast_paths(gpu_model)
    if failures:
        sys.exit(f"cuda_check FAILED: {', '.join(failures)}")
    print("cuda_check passed")


def check_fast_paths(model) -> list[str]:
    """5. The graph and fused paths: capture, replay, same seed same points (as eager, alone or batched),
    and a model reload dropping its graphs."""
    failures = []
    spec, ts = get_sampler("ddpm"), timesteps(model.denoiser.num_timesteps, model.denoiser.num_timesteps)

    def gen(seed):
        return torch.Generator(device="cuda").manual_seed(seed)

    # The reference: the eager sampler (per-step launches) over the same one-block noise as the fast paths.
    eager = CudaFastPath(model.id, model.denoiser, None, "fp32", "eager").sample(spec, ts, {}, [(gen(7), 5000)])
    for kernel in ("graph", "fused"):
        graphs = GraphCache(1 << 30, 1 << 20)
        fast = CudaFastPath(model.id, model.denoiser, graphs, "fp32", kernel)
        t0 = time.perf_counter()
        first = fast.sample(spec, ts, {}, [(gen(7), 5000)])
        first_ms = (time.perf_counter() - t0) * 1000
        again = fast.sample(spec, ts, {}, [(gen(7), 5000)])
        batched = fast.sample(spec, ts, {}, [(gen(3), 3000), (None, 8), (gen(7), 5000)])
        vs_eager = (first - eager).abs().max().item()
        vs_batched = (batched[3008:] - first).abs().max().item()
        ok = first is not None and torch.equal(first, again) and vs_eager < 1e-3 and vs_batched < 1e-3
        print(
            f"{kernel} path: first call {first_ms:.0f} ms (capture/compile), replay identical: "
            f"{torch.equal(first, again)}, max abs diff vs eager {vs_eager:.1e}, batched vs alone {vs_batched:.1e}, "
            f"graphs {graphs.stats()} {'ok' if ok else 'BAD'}"
        )
        failures += [] if ok else [f"{kernel}-path"]
    graphs = GraphCache(1 << 30, 1 << 20)
    fast = CudaFastPath(model.id, model.denoiser, graphs, "fp32", "graph")
    fast.sample(spec, ts, {}, [(gen(1), 1000)])
    dropped = graphs.invalidate(model.id)
    fast.sample(spec, ts, {}, [(gen(1), 1000)])
    ok = dropped == 1 and graphs.captures == 2
    print(f"reload: invalidate dropped {dropped} graph(s), next call captured anew: {graphs.captures == 2}")
    return failures + ([] if ok else ["graph-invalidation"])


if __name__ == "__main__":
    main()
