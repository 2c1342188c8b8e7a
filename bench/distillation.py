"""Few-step students against their teacher: sliced W2 against fresh real data (n = 50,000) and k-NN precision and
recall, over 10 seeds (mean ± sd), for the teacher's default (ddpm@40, the reference), its tuned dpmpp_2m@10, and
every student at every step count it serves; plus a scatter figure of the students over real data.

    python -m training.distill --students-dir /tmp/students   # every student, one file per progressive step count
    python -m bench.distillation --students /tmp/students      # writes bench/results/distillation.{json,md,png}

Without --students the students are distilled first, into a temporary directory (make distill's settings).
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusion.checkpoint import load_model
from diffusion.cpus import threads_from_env
from diffusion.samplers import sample
from training.distances import precision_recall, sliced_w2
from training.distill import DistillConfig, distil
from training.evaluate import fresh_real

RESULTS = Path(__file__).parent / "results"
METRICS = ("sliced_w2", "precision", "recall")
TARGETS = {4: 1.1, 2: 1.25}  # evaluations -> sliced W2 at most this times the default's (issue 14)
REAL_SEED, FLOOR_SEED = 60_000, 70_000  # fresh real data per seed: seen by no training, tuning or other bench


def settings(teacher, students: list) -> list[tuple[str, object, str, int]]:
    """(label, model, sampler, steps) for every row: the teacher's two, then each student's declared settings."""
    rows = [
        ("default ddpm@40 (reference)", teacher, "ddpm", 40),
        ("default dpmpp_2m@10 (tuned)", teacher, "dpmpp_2m", 10),
    ]
    for model in students:
        method = model.metadata["distillation"]["method"]
        for sampler, by_steps in model.denoiser.distilled.items():
            rows += [(f"{method} {sampler}@{steps}", model, sampler, steps) for steps in sorted(by_steps)]
    return rows


def evaluate(teacher, students: list, n: int, seeds: list[int]) -> dict:
    data = teacher.metadata["data"]

    def real(seed):
        return fresh_real(n, data["noise"], seed, data["mean"], data["std"])

    rows = settings(teacher, students)
    values = {label: {k: [] for k in METRICS} for label, *_ in rows}
    floor = {k: [] for k in METRICS}
    for s in seeds:
        reference = real(REAL_SEED + s)
        other = real(FLOOR_SEED + s)
        p, r = precision_recall(reference, other)
        for k, v in zip(METRICS, (sliced_w2(reference, other), p, r), strict=True):
            floor[k].append(v)
        for label, model, sampler, steps in rows:
            points = sample(model.denoiser, sampler, n, torch.Generator().manual_seed(s), steps).numpy()
            p, r = precision_recall(reference, points)
            for k, v in zip(METRICS, (sliced_w2(reference, points), p, r), strict=True):
                values[label][k].append(v)
        print(f"seed {s} done", flush=True)
    default = np.asarray(values[rows[0][0]]["sliced_w2"])
    out = []
    for label, model, sampler, steps in rows:
        v = values[label]
        ratio = np.asarray(v["sliced_w2"]) / default
        row = {"label": label, "sampler": sampler, "nfe": steps, "file": model.path.name, "model_id": model.id[:12]}
        for k in METRICS:
            row[k], row[f"{k}_sd"], row[f"{k}_per_seed"] = float(np.mean(v[k])), float(np.std(v[k])), v[k]
        row["ratio_per_seed_mean"], row["ratio_per_seed_sd"] = float(ratio.mean()), float(ratio.std())
        row["ratio_of_means"] = float(np.mean(v["sliced_w2"]) / default.mean())
        out.append(row)
    return {
        "floor": {
            **{k: float(np.mean(v)) for k, v in floor.items()},
            **{f"{k}_sd": float(np.std(v)) for k, v in floor.items()},
        },
        "rows": out,
    }


def verdicts(results: dict) -> list[str]:
    rows = results["rows"]
    default = rows[0]
    lines = []
    for row in rows[2:]:
        target = TARGETS.get(row["nfe"])
        w2 = f"{row['ratio_of_means']:.2f}x the default's sliced W2"
        w2 += f" (target <= {target}x: {'met' if row['ratio_of_means'] <= target else 'MISSED'})" if target else ""
        gap = row["precision"] - default["precision"]
        prec = f"precision {gap:+.3f} vs the default (target >= -0.01: {'met' if gap >= -0.01 else 'MISSED'})"
        lines.append(f"- {row['label']}: {w2}; {prec}")
    return lines


def markdown(results: dict) -> str:
    f = results["floor"]
    lines = [
        f"# Distilled students (n = {results['n']:,}, {len(results['seeds'])} seeds, mean ± sd)",
        "",
        f"Measured {results['date']} on {results['machine']}, torch {results['torch']}. Teacher: "
        f"`{results['teacher']}`; students: {', '.join(f'`{s}`' for s in results['students'])} "
        "(made by `python -m training.distill`; the kept one is `checkpoints/swissroll-fast.pt`). Reference: "
        "fresh Swiss-roll points per seed, never trained on; precision/recall: k-NN (k = 5) on the first 10,000. "
        f"Students' hidden GEMMs as served on this CPU (diffusion/folded.py): {_gemms(results)}. "
        "Ratio: the row's sliced W2 over the default's (ddpm@40) on the same real points, per seed (mean ± sd), "
        "and as a ratio of the means.",
        "",
        f"Floor (real vs real): sliced W2 {f['sliced_w2']:.4f} ± {f['sliced_w2_sd']:.4f}, precision "
        f"{f['precision']:.3f}, recall {f['recall']:.3f}",
        "",
        "| setting | NFE | sliced W2 | × default (per seed) | × default (of means) | precision | recall |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['label']} | {r['nfe']} | {r['sliced_w2']:.4f} ± {r['sliced_w2_sd']:.4f} | "
            f"{r['ratio_per_seed_mean']:.2f} ± {r['ratio_per_seed_sd']:.2f} | {r['ratio_of_means']:.2f} | "
            f"{r['precision']:.3f} ± {r['precision_sd']:.3f} | {r['recall']:.3f} ± {r['recall_sd']:.3f} |"
        )
    lines += ["", "## Against the targets (4 evaluations <= 1.1x, 2 <= 1.25x, precision within 0.01)", ""]
    lines += verdicts(results) + [""]
    if results.get("notes"):
        lines += ["## Notes", "", *results["notes"], ""]
    return "\n".join(lines)


def _gemms(results: dict) -> str:
    by_type: dict[str, list[str]] = {}
    for name, dtype in results.get("student_gemms", {}).items():
        by_type.setdefault(dtype, []).append(f"`{name}`")
    return "; ".join(f"{dtype} for {', '.join(names)}" for dtype, names in by_type.items()) or "not recorded"


def plot(teacher, students: list, path: Path, n: int = 10_000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = teacher.metadata["data"]
    real = fresh_real(n, data["noise"], 777, data["mean"], data["std"])
    by_method: dict[str, list] = {}
    for label, model, sampler, steps in settings(teacher, students)[2:]:
        by_method.setdefault(label.split()[0], []).append((label, model, sampler, steps))
    cols = 1 + max(len(v) for v in by_method.values())
    fig, axes = plt.subplots(len(by_method), cols, figsize=(3.6 * cols, 3.8 * len(by_method)), squeeze=False)
    for row_axes, (method, rows) in zip(axes, by_method.items(), strict=True):
        panels = [("default ddpm@40 (40 evals)", teacher, "ddpm", 40)] + rows
        for ax, (label, model, sampler, steps) in zip(row_axes, panels, strict=False):
            points = sample(model.denoiser, sampler, n, torch.Generator().manual_seed(0), steps).numpy()
            ax.scatter(real[:, 0], real[:, 1], s=1, c="#9db9d8", alpha=0.5, linewidths=0, label="real (fresh)")
            ax.scatter(points[:, 0], points[:, 1], s=1, c="#d64812", alpha=0.6, linewidths=0, label="samples")
            title = label if label.startswith("default") else f"{method}, {steps} eval{'s' if steps > 1 else ''}"
            ax.set(title=title, xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), aspect="equal")
        for ax in row_axes[len(panels) :]:
            ax.axis("off")
    axes[0][0].legend(loc="lower left", markerscale=6, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    torch.set_num_threads(threads_from_env().threads)  # as the server and training choose them
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="checkpoints/swissroll.pt")
    parser.add_argument("--students", default="", help="directory of student checkpoints (default: distil now)")
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    teacher = load_model(args.teacher, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.students or tmp)
        if not args.students:
            distil(DistillConfig(teacher=args.teacher, out=str(Path(tmp) / "best.pt"), students_dir=tmp))
        students = [load_model(p, torch.device("cpu")) for p in sorted(directory.glob("*.pt")) if p.name != "best.pt"]
        seeds = list(range(args.seeds))
        results = {
            "n": args.n,
            "seeds": seeds,
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "teacher": args.teacher,
            "students": [s.path.name for s in students],
            # As the service runs them here (diffusion/folded.py): the numbers are those of the served function.
            "student_gemms": {
                s.path.name: s.denoiser.cpu_net.precision if s.denoiser.cpu_net else "float32" for s in students
            },
            **evaluate(teacher, students, args.n, seeds),
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "distillation.json").write_text(json.dumps(results, indent=2))
        (RESULTS / "distillation.md").write_text(markdown(results))
        plot(teacher, students, RESULTS / "distillation.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
