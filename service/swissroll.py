"""The training data, drawn here: the Swiss roll the checkpoint's metadata describes, without scikit-learn.

scikit-learn's `make_swiss_roll` (which training uses) draws t = 1.5 pi (1 + 2 U), height 21 U and adds isotropic
Gaussian noise to (t cos t, height, t sin t); training keeps coordinates 0 and 2 and normalizes them with the
mean and std it records in `metadata["data"]`. The same distribution in a few lines of numpy, from the request's
own seeded generator (the points differ from sklearn's for a given seed; the distribution does not: see
tests/service/test_swissroll.py).
"""

import numpy as np

DEFAULT_NOISE = 0.5  # the original notebook's; used when a checkpoint's metadata does not record it


def swiss_roll(n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """[n, 2] float64 raw points (x, z) of the 2D Swiss roll."""
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    return np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + noise * rng.standard_normal((n, 2))


def real_points(n: int, data: dict, rng: np.random.Generator) -> np.ndarray:
    """[n, 2] float32 Swiss-roll points in the model's normalized coordinates, by the checkpoint's data recipe."""
    noise = float(data.get("noise", DEFAULT_NOISE))
    mean = np.asarray(data.get("mean", (0.0, 0.0)), dtype=np.float64)
    std = np.asarray(data.get("std", (1.0, 1.0)), dtype=np.float64)
    return ((swiss_roll(n, noise, rng) - mean) / std).astype(np.float32)
