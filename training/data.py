"""The Swiss roll data set, split and normalized the way the checkpoint records it."""

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import make_swiss_roll


@dataclass(frozen=True)
class SwissRoll:
    train: torch.Tensor  # [N_train, 2] float32, normalized
    val: torch.Tensor  # [N_val, 2] float32, normalized with the *train* statistics
    mean: tuple[float, float]
    std: tuple[float, float]


def raw_swiss_roll(n: int, noise: float, seed: int) -> np.ndarray:
    """Points of sklearn's 3D Swiss roll projected on coordinates 0 and 2 (the original notebook's 2D view)."""
    points, _ = make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    return points[:, [0, 2]]


def load_swiss_roll(n: int = 100_000, noise: float = 0.5, seed: int = 0, val_fraction: float = 0.1) -> SwissRoll:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    points = raw_swiss_roll(n, noise, seed)
    n_val = max(1, round(n * val_fraction))
    # make_swiss_roll draws points i.i.d., so the tail is as random a split as any permutation.
    train, val = points[:-n_val], points[-n_val:]
    mean, std = train.mean(axis=0), train.std(axis=0)

    def normalize(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).float()

    return SwissRoll(normalize(train), normalize(val), tuple(mean.tolist()), tuple(std.tolist()))
