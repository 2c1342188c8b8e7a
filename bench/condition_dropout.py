"""The condition-dropout rate of `make train-cond`, chosen by a small measurement: short trainings (100 epochs) at
several rates, each judged on the conditional task (w = 1, the 5 positions) and the unconditional one.

    python -m bench.condition_dropout   # writes bench/results/condition_dropout.{json,md}
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.conditional import PositionEstimator, conditional_rows, unconditional
from diffusion.checkpoint import load_model
from diffusion.cpus import threads_from_env
from training.model import PRESETS
from training.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    torch.set_num_threads(threads_from_env().threads)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="0.05,0.1,0.2")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--width", type=int, default=PRESETS["cond"].width)
    args = parser.parse_args()
    preset = f"cond-width{args.width}"
    PRESETS[preset] = dataclasses.replace(PRESETS["cond"], width=args.width)
    default = load_model("checkpoints/swissroll.pt", torch.device("cpu"))
    seeds = list(range(args.seeds))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in [float(r) for r in args.rates.split(",")]:
            out = Path(tmp) / f"cond-{rate}.pt"
            config = TrainConfig(
                preset=preset,
                epochs=args.epochs,
                ema_decay=0.995,
                condition_dropout=rate,
                out=str(out),
                progress=False,
                loss_curve=False,
                evaluate=False,
            )
            train(config)
            model = load_model(out, torch.device("cpu"))
            meta = model.metadata["data"]
            estimator = PositionEstimator(meta["mean"], meta["std"], meta["noise"], n=200_000)
            cond = conditional_rows(model, estimator, 10_000, seeds)
            uncond = unconditional(model, default, 20_000, seeds)
            rows.append(
                {
                    "dropout": rate,
                    "error_ratio": float(np.mean([r["error_ratio"] for r in cond])),
                    "w2_ratio": float(np.mean([r["w2_ratio"] for r in cond])),
                    "unconditional_ratio": uncond["ratio"],
                    "unconditional_ratio_sd": uncond["ratio_sd"],
                }
            )
            print(rows[-1], flush=True)
    lines = [
        f"# Condition dropout: {args.epochs}-epoch trainings (`cond` preset at width {args.width}, EMA 0.995), "
        f"seeds {seeds}",
        "",
        f"Measured {time.strftime('%Y-%m-%d')}; command: `python -m bench.condition_dropout --rates {args.rates} "
        f"--epochs {args.epochs} --seeds {args.seeds} --width {args.width}`. Conditional columns: ddpm@40 at w = 1, "
        "n = 10,000 per position, mean over the 5 positions of the per-seed ratio to the real-data floor "
        "(bench/conditional.py). Unconditional: sliced W2 at n = 20,000, position omitted, over the default's.",
        "",
        "| dropout | position error × floor | conditional sliced W2 × floor | unconditional × default |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dropout']} | {r['error_ratio']:.2f} | {r['w2_ratio']:.2f} | "
            f"{r['unconditional_ratio']:.2f} ± {r['unconditional_ratio_sd']:.2f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "condition_dropout.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    (RESULTS / "condition_dropout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
