"""A first look at quality: 10,000 points from every sampler at its default steps, over fresh real data.

python -m bench.scatter          # writes bench/results/scatter.png
"""

from pathlib import Path

import matplotlib
import torch

from diffusion.checkpoint import load_model
from diffusion.cpus import threads_from_env
from diffusion.samplers import SAMPLERS, sample
from training.evaluate import fresh_real

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(checkpoint: str = "checkpoints/swissroll.pt", n: int = 10_000) -> None:
    torch.set_num_threads(threads_from_env().threads)  # as the server and training choose them
    model = load_model(checkpoint, torch.device("cpu"))
    data = model.metadata["data"]
    real = fresh_real(n, data["noise"], 777, data["mean"], data["std"])
    fig, axes = plt.subplots(1, len(SAMPLERS), figsize=(4 * len(SAMPLERS), 4.2), sharex=True, sharey=True)
    for ax, (name, spec) in zip(axes, SAMPLERS.items(), strict=True):
        steps = spec.steps_default(model.denoiser.num_timesteps)
        points = sample(model.denoiser, name, n, torch.Generator().manual_seed(0), steps).numpy()
        ax.scatter(real[:, 0], real[:, 1], s=1, c="#9db9d8", alpha=0.5, linewidths=0, label="real (fresh)")
        ax.scatter(points[:, 0], points[:, 1], s=1, c="#d64812", alpha=0.6, linewidths=0, label="samples")
        ax.set(title=f"{name}, {steps} steps", xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), aspect="equal")
    axes[0].legend(loc="lower left", markerscale=6, fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "scatter.png", dpi=90)


if __name__ == "__main__":
    main()
