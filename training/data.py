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
    train_position: torch.Tensor | None = None  # [N_train] float32: each point's position in [0, 1] (position())
    val_position: torch.Tensor | None = None


def position(t: np.ndarray) -> np.ndarray:
    """make_swiss_roll's t (the angle along the roll, in [1.5 pi, 4.5 pi]) -> position in [0, 1], 0 = inner end."""
    return (t - 1.5 * np.pi) / (3 * np.pi)


def raw_swiss_roll_with_positions(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """raw_swiss_roll's points (the same draw) and each one's position in [0, 1]."""
    points, t = make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    return points[:, [0, 2]], position(t)


def raw_swiss_roll(n: int, noise: float, seed: int) -> np.ndarray:
    """Points of sklearn's 3D Swiss roll projected on coordinates 0 and 2 (the original notebook's 2D view)."""
    return raw_swiss_roll_with_positions(n, noise, seed)[0]


def raw_points_at(n: int, where: float, noise: float, seed: int) -> np.ndarray:
    """n real points at one position, as make_swiss_roll makes them: (t cos t, t sin t) + noise * N(0, I), with
    t = 1.5 pi + 3 pi * where fixed instead of uniform (a blob of std `noise` around one point of the spiral)."""
    t = 1.5 * np.pi * (1 + 2 * where)
    centre = np.array([t * np.cos(t), t * np.sin(t)])
    return centre + noise * np.random.default_rng(seed).standard_normal((n, 2))


def load_swiss_roll(n: int = 100_000, noise: float = 0.5, seed: int = 0, val_fraction: float = 0.1) -> SwissRoll:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    points, positions = raw_swiss_roll_with_positions(n, noise, seed)
    n_val = max(1, round(n * val_fraction))
    # make_swiss_roll draws points i.i.d., so the tail is as random a split as any permutation.
    train, val = points[:-n_val], points[-n_val:]
    mean, std = train.mean(axis=0), train.std(axis=0)

    def normalize(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).float()

    pos = torch.from_numpy(positions).float()
    return SwissRoll(
        normalize(train), normalize(val), tuple(mean.tolist()), tuple(std.tolist()), pos[:-n_val], pos[-n_val:]
    )
