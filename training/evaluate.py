"""Sample quality of a trained network, measured with the service's own samplers against fresh real data."""

import numpy as np
import torch

from diffusion.denoiser import Denoiser
from diffusion.samplers import SAMPLERS, sample
from training.data import raw_swiss_roll
from training.distances import sliced_w2


def fresh_real(n: int, noise: float, seed: int, mean, std) -> np.ndarray:
    """New Swiss-roll points (never seen in training), normalized with the checkpoint's statistics."""
    return ((raw_swiss_roll(n, noise, seed) - np.asarray(mean)) / np.asarray(std)).astype(np.float32)


def quality_summary(denoiser: Denoiser, mean, std, noise: float, n: int = 20_000, seed: int = 12345) -> dict:
    """Sliced W2 of every sampler at its default steps, and the real-vs-real floor at the same n."""
    real = fresh_real(n, noise, seed, mean, std)
    floor = sliced_w2(real, fresh_real(n, noise, seed + 1, mean, std))
    rows = {}
    for name, spec in SAMPLERS.items():
        if not spec.for_diffusion_models:
            continue  # the consistency sampler is for distilled students (training/distill.py measures those)
        steps = spec.steps_default(denoiser.num_timesteps)
        points = sample(denoiser, name, n, torch.Generator().manual_seed(seed), steps).numpy()
        w2 = sliced_w2(real, points)
        rows[name] = {"steps": steps, "sliced_w2": round(w2, 5), "ratio_to_floor": round(w2 / floor, 2)}
    return {"metric": "sliced_w2", "n": n, "floor": round(floor, 5), "samplers": rows}
