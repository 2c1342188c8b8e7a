"""Conditional generation with classifier-free guidance (issue 15): how well `swissroll-cond` puts its points
where they were asked for, against the same statistics for real data (the floors).

    python -m bench.conditional      # writes bench/results/conditional.{json,md,png}

- position error: each generated point's position is estimated as that of its nearest neighbour in a large real
  sample (positions known); the mean |estimate - requested|. Floor: the same for real points drawn at exactly
  the requested position (make_swiss_roll with t fixed).
- conditional sliced W2: generated points at a position vs real points at that position (n each); floor: two
  independent real samples at it (a small blob: the floor is tiny).
- guidance sweep: the two above plus k-NN precision / recall (against the real points at the position).
- unconditional quality (position omitted) next to the committed default's, against fresh real data.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import KDTree

from diffusion.checkpoint import load_model
from diffusion.cpus import threads_from_env
from diffusion.guidance import guided
from diffusion.noise import from_generator, initial_noise
from diffusion.samplers import SAMPLERS, resolve_timesteps, sample
from training.data import raw_points_at, raw_swiss_roll_with_positions
from training.distances import precision_recall, sliced_w2
from training.evaluate import fresh_real

RESULTS = Path(__file__).parent / "results"
POSITIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
GUIDANCE = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)
REFERENCE_N = 500_000  # the real sample whose nearest points estimate positions
REFERENCE_SEED = 777


class PositionEstimator:
    """Position of a point = that of its nearest neighbour in a large real sample (normalized coordinates)."""

    def __init__(self, mean, std, noise: float, n: int = REFERENCE_N, seed: int = REFERENCE_SEED):
        points, self.positions = raw_swiss_roll_with_positions(n, noise, seed)
        self.tree = KDTree((points - np.asarray(mean)) / np.asarray(std))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        return self.positions[self.tree.query(points, k=1, return_distance=False)[:, 0]]

    def error(self, points: np.ndarray, where: float) -> float:
        return float(np.abs(self(points) - where).mean())


def real_at(n: int, where: float, seed: int, meta: dict) -> np.ndarray:
    """Real points at one position, normalized with the checkpoint's statistics."""
    raw = raw_points_at(n, where, meta["noise"], seed)
    return ((raw - np.asarray(meta["mean"])) / np.asarray(meta["std"])).astype(np.float32)


def generate(model, n: int, where: float | None, scale: float, seed: int, sampler: str = "ddpm", steps=None):
    """n points at position `where` (None: unconditional) with guidance `scale`, as the service would run it."""
    denoiser = model.denoiser
    if where is None:
        return sample(denoiser, sampler, n, torch.Generator().manual_seed(seed), steps).numpy()
    spec = SAMPLERS[sampler]
    steps = steps or spec.steps_default(denoiser.num_timesteps)
    ts, _ = resolve_timesteps(spec, denoiser, steps, None)
    g = guided(denoiser, torch.full((n,), where), scale)
    noise = from_generator(torch.Generator().manual_seed(seed))
    return spec.fn(g, initial_noise(n, noise, denoiser.device), ts, noise).numpy()


def conditional_rows(model, estimator, n: int, seeds: list[int], scale: float = 1.0) -> list[dict]:
    """Per position: position error and conditional sliced W2 of the model and of real data, over seeds."""
    meta = model.metadata["data"]
    rows = []
    for where in POSITIONS:
        runs = []
        for s in seeds:
            fake = generate(model, n, where, scale, seed=s)
            real, real2 = real_at(n, where, 1000 + s, meta), real_at(n, where, 2000 + s, meta)
            runs.append(
                {
                    "error": estimator.error(fake, where),
                    "error_floor": estimator.error(real2, where),
                    "w2": sliced_w2(real, fake),
                    "w2_floor": sliced_w2(real, real2),
                }
            )
        row = {"position": where}
        for k in ("error", "error_floor", "w2", "w2_floor"):
            row[k] = float(np.mean([r[k] for r in runs]))
            row[f"{k}_sd"] = float(np.std([r[k] for r in runs]))
        for k in ("error", "w2"):
            ratios = np.array([r[k] / r[f"{k}_floor"] for r in runs])
            row[f"{k}_ratio"], row[f"{k}_ratio_sd"] = float(ratios.mean()), float(ratios.std())
        rows.append(row)
        print(
            f"  w={scale} position {where}: error {row['error']:.4f} (floor {row['error_floor']:.4f}, "
            f"{row['error_ratio']:.2f}x), sliced W2 {row['w2']:.4f} "
            f"(floor {row['w2_floor']:.4f}, {row['w2_ratio']:.2f}x)",
            flush=True,
        )
    return rows


def sweep(model, estimator, n: int, seeds: list[int]) -> list[dict]:
    """Guidance scale against position error, sliced W2, precision and recall, averaged over the positions."""
    meta = model.metadata["data"]
    rows = []
    for scale in GUIDANCE:
        values: dict[str, list[float]] = {"error": [], "w2": [], "precision": [], "recall": []}
        for where in POSITIONS:
            for s in seeds:
                fake = generate(model, n, where, scale, seed=s)
                real = real_at(n, where, 1000 + s, meta)
                precision, recall = precision_recall(real, fake)
                values["error"].append(estimator.error(fake, where))
                values["w2"].append(sliced_w2(real, fake))
                values["precision"].append(precision)
                values["recall"].append(recall)
        row = {"guidance": scale}
        for k, v in values.items():
            row[k], row[f"{k}_sd"] = float(np.mean(v)), float(np.std(v))
        rows.append(row)
        print(f"  sweep w={scale}: " + ", ".join(f"{k} {row[k]:.4f}" for k in values), flush=True)
    return rows


def unconditional(cond_model, default_model, n: int, seeds: list[int]) -> dict:
    """Sliced W2 against fresh real data, position omitted, next to the committed default (same seeds, same real)."""
    meta = default_model.metadata["data"]
    cond_meta = cond_model.metadata["data"]
    values: dict[str, list[float]] = {"conditional model": [], "default model": [], "floor": []}
    for s in seeds:
        real = fresh_real(n, meta["noise"], 40_000 + s, meta["mean"], meta["std"])
        real2 = fresh_real(n, meta["noise"], 50_000 + s, meta["mean"], meta["std"])
        # Both models' points compared in the default's normalized coordinates (the two data sets agree closely).
        cond = generate(cond_model, n, None, 1.0, seed=s) * np.asarray(cond_meta["std"]) + np.asarray(cond_meta["mean"])
        cond = (cond - np.asarray(meta["mean"])) / np.asarray(meta["std"])
        values["conditional model"].append(sliced_w2(real, cond))
        values["default model"].append(sliced_w2(real, generate(default_model, n, None, 1.0, seed=s)))
        values["floor"].append(sliced_w2(real, real2))
    ratios = np.array(values["conditional model"]) / np.array(values["default model"])
    out = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v))} for k, v in values.items()}
    out |= {"n": n, "seeds": seeds, "ratio": float(ratios.mean()), "ratio_sd": float(ratios.std())}
    print(f"  unconditional: {out}", flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["sweep"]
    w = [r["guidance"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.errorbar(w, [r["error"] for r in rows], yerr=[r["error_sd"] for r in rows], marker="o", capsize=3)
    floor = np.mean([r["error_floor"] for r in results["positions"]])
    ax.axhline(floor, color="grey", linestyle="--", label="real data (floor)")
    ax.set(xlabel="guidance w", ylabel="position error (mean |estimated - requested|)", title="accuracy")
    ax.legend()
    ax = axes[1]
    ax.errorbar(w, [r["w2"] for r in rows], yerr=[r["w2_sd"] for r in rows], marker="o", capsize=3)
    ax.axhline(np.mean([r["w2_floor"] for r in results["positions"]]), color="grey", linestyle="--", label="floor")
    ax.set(xlabel="guidance w", ylabel=f"sliced W2 vs real at the position (n = {results['n']:,})", yscale="log")
    ax.set_title("fit to the real points there")
    ax.legend()
    ax = axes[2]
    ax.plot(w, [r["precision"] for r in rows], marker="o", label="precision (fidelity)")
    ax.plot(w, [r["recall"] for r in rows], marker="s", label="recall (coverage)")
    ax.set(xlabel="guidance w", ylim=(0, 1.02), title="k-NN precision / recall (k = 5)")
    ax.legend()
    fig.suptitle("classifier-free guidance on swissroll-cond (ddpm, 40 steps; mean over 5 positions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(r: dict) -> str:
    u = r["unconditional"]
    lines = [
        f"# Conditional generation (`{r['checkpoint']}`, ddpm 40 steps, n = {r['n']:,} per position)",
        "",
        f"Measured {r['date']} on {r['machine']}, torch {r['torch']}; command: `{r['command']}`. "
        f"Positions estimated from the nearest of {REFERENCE_N:,} real points. Floors: real points drawn at "
        "exactly the requested position (make_swiss_roll with t fixed), with the same statistic. Mean ± sd over "
        f"{len(r['seeds'])} seeds (ratios: per seed, then mean ± sd).",
        "",
        "## At guidance w = 1 (the plain conditional model)",
        "",
        "| position | position error | floor | × floor (target 1.5) | sliced W2 | floor | × floor (target 3) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["positions"]:
        lines.append(
            f"| {p['position']} | {p['error']:.4f} ± {p['error_sd']:.4f} | {p['error_floor']:.4f} | "
            f"{p['error_ratio']:.2f} ± {p['error_ratio_sd']:.2f} | {p['w2']:.4f} ± {p['w2_sd']:.4f} | "
            f"{p['w2_floor']:.4f} | {p['w2_ratio']:.2f} ± {p['w2_ratio_sd']:.2f} |"
        )
    lines += [
        "",
        f"## Guidance sweep (mean over the 5 positions and {len(r['sweep_seeds'])} seeds)",
        "",
        "| w | position error | sliced W2 | precision | recall |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in r["sweep"]:
        lines.append(
            f"| {s['guidance']} | {s['error']:.4f} ± {s['error_sd']:.4f} | {s['w2']:.4f} ± {s['w2_sd']:.4f} | "
            f"{s['precision']:.3f} | {s['recall']:.3f} |"
        )
    lines += [
        "",
        "![guidance sweep](conditional.png)",
        "",
        f"## Unconditional quality (position omitted), n = {u['n']:,}, {len(u['seeds'])} seeds",
        "",
        "| model | sliced W2 vs fresh real data |",
        "|---|---:|",
        f"| swissroll-cond, position omitted | {u['conditional model']['mean']:.4f} ± "
        f"{u['conditional model']['sd']:.4f} |",
        f"| swissroll (committed default) | {u['default model']['mean']:.4f} ± {u['default model']['sd']:.4f} |",
        f"| real vs real (floor) | {u['floor']['mean']:.4f} ± {u['floor']['sd']:.4f} |",
        "",
        f"Ratio conditional / default, per seed: {u['ratio']:.2f} ± {u['ratio_sd']:.2f} (target <= 1.2).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(threads_from_env().threads)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="checkpoints/swissroll-cond.pt")
    parser.add_argument("--default", default="checkpoints/swissroll.pt")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--sweep-seeds", type=int, default=3)
    parser.add_argument("--uncond-n", type=int, default=50_000)
    args = parser.parse_args()
    model = load_model(args.checkpoint, torch.device("cpu"))
    default = load_model(args.default, torch.device("cpu"))
    meta = model.metadata["data"]
    estimator = PositionEstimator(meta["mean"], meta["std"], meta["noise"])
    seeds, sweep_seeds = list(range(args.seeds)), list(range(args.sweep_seeds))
    results = {
        "checkpoint": args.checkpoint,
        "n": args.n,
        "seeds": seeds,
        "sweep_seeds": sweep_seeds,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "command": "python -m bench.conditional "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "positions": conditional_rows(model, estimator, args.n, seeds),
        "sweep": sweep(model, estimator, args.n, sweep_seeds),
        "unconditional": unconditional(model, default, args.uncond_n, seeds),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "conditional.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "conditional.md").write_text(markdown(results))
    plot(results, RESULTS / "conditional.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
