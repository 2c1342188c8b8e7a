"""The learned field: the model's prediction on a regular grid at one level, for quiver plots.

Grid point (i, j) is (xs[j], ys[i]) with xs = ys = linspace(-extent, extent, grid); rows are listed y-major,
so point k = i * grid + j. At each point the response has the predicted noise eps and clean point x0
(`Denoiser.predict`); -eps / sqrt(1 - alpha_bar_t) is the model's score there.
"""

from dataclasses import dataclass

import numpy as np
import torch

from diffusion.checkpoint import LoadedModel
from diffusion.samplers import SamplerError
from service.compute import ComputeGate, Job


@dataclass(frozen=True)
class Field:
    points: np.ndarray  # [grid * grid, 2] float32
    eps: np.ndarray  # [grid * grid, 2]
    x0: np.ndarray  # [grid * grid, 2]


def grid_points(grid: int, extent: float) -> np.ndarray:
    axis = np.linspace(-extent, extent, grid, dtype=np.float64)
    ys, xs = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def check_level(model: LoadedModel, t: int) -> int:
    T = model.denoiser.num_timesteps
    if not 0 <= t < T:
        raise SamplerError("t", f"t must be in 0..{T - 1} for this model, got {t}")
    return t


def predict_field(model: LoadedModel, t: int, grid: int, extent: float, job: Job | None = None) -> Field:
    points = grid_points(grid, extent)
    if job is not None:
        job.check()
    with torch.inference_mode():
        eps, x0 = model.denoiser.predict(torch.from_numpy(points).to(model.device), t)
    return Field(points, eps.float().cpu().numpy(), x0.float().cpu().numpy())


async def run_field(gate: ComputeGate, model: LoadedModel, t: int, grid: int, extent: float, is_disconnected=None):
    return await gate.run(lambda job: predict_field(model, t, grid, extent, job), is_disconnected, points=grid * grid)
