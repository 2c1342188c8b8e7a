"""How the committed default was chosen: candidate networks and objectives trained with the same loop, judged by
sliced W2 (n = 50,000, 2 seeds) at the default DDPM setting and at <= 10 network evaluations, against cost.

    python -m bench.model_selection  # ~6 min on 2 CPU cores; writes bench/results/model_selection.md
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusion.checkpoint import load_model
from diffusion.samplers import sample
from training.distances import sliced_w2
from training.evaluate import fresh_real
from training.model import PRESETS, NetConfig, flops_per_sample
from training.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
RES_SIN = dict(residual=True, time_embedding="sinusoidal")
CANDIDATES = {
    # name: (network, training overrides, what it tests)
    "seed (original)": (NetConfig(), {}, "the notebook's MLP, eps-prediction"),
    "seed + v": (NetConfig(prediction_type="v"), {}, "same MLP, v-prediction"),
    "res+sin, eps": (NetConfig(**RES_SIN), {}, "residual blocks, sinusoidal t, eps-prediction"),
    "res+sin, v": (NetConfig(**RES_SIN, prediction_type="v"), {}, "residual, sinusoidal t, v-prediction"),
    "res+sin, v, EMA": (NetConfig(**RES_SIN, prediction_type="v"), {"ema_decay": 0.995}, "+ EMA of weights"),
    "res+sin, v, EMA, 300 ep (default)": (
        NetConfig(**RES_SIN, prediction_type="v"),
        {"ema_decay": 0.995, "epochs": 300},
        "+ 3x the epochs: committed",
    ),
    "width 96, v, EMA": (
        NetConfig(width=96, **RES_SIN, prediction_type="v"),
        {"ema_decay": 0.995},
        "2.2x the inference FLOPs",
    ),
}
SETTINGS = [("ddpm", 40), ("ddim", 10), ("dpmpp_2m", 10)]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (net, overrides, what)) in enumerate(CANDIDATES.items()):
            preset = f"candidate-{i}"
            PRESETS[preset] = net  # a temporary preset for this run only
            path = Path(tmp) / f"{preset}.pt"
            meta = train(
                TrainConfig(preset=preset, out=str(path), progress=False, loss_curve=False, evaluate=False, **overrides)
            )
            model = load_model(path, torch.device("cpu"))
            data = meta["data"]
            row = {"name": name, "what": what, "flops": flops_per_sample(net), "train_s": meta["training"]["seconds"]}
            for sampler, steps in SETTINGS:
                values = []
                for seed in (1, 2):
                    real = fresh_real(50_000, data["noise"], 1000 + seed, data["mean"], data["std"])
                    points = sample(model.denoiser, sampler, 50_000, torch.Generator().manual_seed(seed), steps)
                    values.append(sliced_w2(real, points.numpy()))
                row[f"{sampler}@{steps}"] = float(np.mean(values))
            rows.append(row)
            print(row, flush=True)
            del PRESETS[preset]
    lines = [
        f"# Model selection ({time.strftime('%Y-%m-%d')}): sliced W2, n = 50,000, mean of 2 seeds",
        "",
        "All trained with the same loop (100 epochs unless said, batch 2048, Adam 1e-3 decaying to 1e-5).",
        "",
        "| candidate | what | FLOPs/point/eval | train s | ddpm@40 | ddim@10 | dpmpp_2m@10 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['what']} | {r['flops']:,} | {r['train_s']:.0f} | {r['ddpm@40']:.4f} | "
            f"{r['ddim@10']:.4f} | {r['dpmpp_2m@10']:.4f} |"
        )
    lines += [
        "",
        "v-prediction is what makes few-step samplers work (eps-prediction amplifies its error ~800x at "
        "the last cosine level); EMA and more epochs improve the default DDPM setting at no inference cost; "
        "width 96 costs 2.2x the FLOPs for no clear gain, so the default keeps width 64.",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_selection.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
