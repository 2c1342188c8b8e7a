"""Noise schedules in the diffusers convention: T levels indexed 0..T-1, every alpha_bar in (0, 1)."""

import math

import torch

MAX_BETA = 0.999


def _cosine_betas(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),
    # with beta_t = 1 - alpha_bar(t+1) / alpha_bar(t): level 0 already carries a little noise.
    def f(t: float) -> float:
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([1 - f(i + 1) / f(i) for i in range(num_timesteps)], dtype=torch.float64)


def _ho_range(num_timesteps: int) -> tuple[float, float]:
    # Ho et al. 2020 use beta in [1e-4, 0.02] for T = 1000; scaling by 1000 / T keeps the same total
    # amount of noise for shorter chains (Nichol & Dhariwal's get_named_beta_schedule).
    scale = 1000 / num_timesteps
    return scale * 1e-4, scale * 0.02


def _linear_betas(num_timesteps: int) -> torch.Tensor:
    start, end = _ho_range(num_timesteps)
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


def _quadratic_betas(num_timesteps: int) -> torch.Tensor:
    start, end = _ho_range(num_timesteps)
    return torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2


SCHEDULES = {"cosine": _cosine_betas, "linear": _linear_betas, "quadratic": _quadratic_betas}


def make_betas(name: str, num_timesteps: int) -> torch.Tensor:
    """float64 betas of the named schedule, capped at MAX_BETA."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(sorted(SCHEDULES))}")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    return SCHEDULES[name](num_timesteps).clamp(max=MAX_BETA)


def make_alphas_cumprod(name: str, num_timesteps: int) -> torch.Tensor:
    return torch.cumprod(1.0 - make_betas(name, num_timesteps), dim=0)
