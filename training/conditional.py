"""The conditional denoiser (issue 15): the position along the roll enters as features of its own, as the time
does, and a learned "no condition" input stands in for them when the condition is dropped (Ho & Salimans 2022:
one network gives the conditional and the unconditional prediction). Everything here must stay TorchScript-able.

The condition is c = position = (t - 1.5 pi) / (3 pi) in [0, 1], t being make_swiss_roll's position along the roll;
c = NULL_POSITION (outside the range) selects the learned null input.
"""

import math

import torch
from torch import nn

from training.model import Block, NetConfig, SinusoidalTime

NULL_POSITION = -1.0
POSITION_RANGE = (0.0, 1.0)
NORMALIZATION = (
    "position = (t - 1.5 pi) / (3 pi), t = make_swiss_roll's second output (the angle along the roll, "
    "in [1.5 pi, 4.5 pi]); 0 = inner end, 1 = outer end"
)


def condition_metadata(dropout: float) -> dict:
    """The checkpoint's `condition` object (format_version 2, checkpoints/README.md)."""
    return {
        "name": "position",
        "range": list(POSITION_RANGE),
        "normalization": NORMALIZATION,
        "null_value": NULL_POSITION,
        "null_convention": "rows whose c equals null_value get the learned no-condition input (unconditional)",
        "dropout": dropout,
    }


class PositionFeatures(nn.Module):
    """c in [0, 1] -> [sin(pi k c), cos(pi k c)], k = 1..K: periods from 2 (the whole roll) down to 2/K. The roll
    turns 1.5 times (k = 3 is its angle), its blobs are ~1/100 of the range wide: K = 8 resolves both."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, features // 2 + 1, dtype=torch.float32))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        angles = c.unsqueeze(1) * self.freqs.unsqueeze(0)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ConditionalMLP(nn.Module):
    """(x_t [B, 2], t [B] int64, c [B] float32) -> output [B, 2]; rows with c == null_value are unconditional."""

    def __init__(self, config: NetConfig, num_timesteps: int, condition_features: int, null_value: float):
        super().__init__()
        self.time = SinusoidalTime(config.time_features, num_timesteps)
        self.position = PositionFeatures(condition_features)
        cond_dim = 2 * (condition_features // 2)
        # The learned "no condition" input, in place of the position features. Zero at the start: no position's
        # features are all zero (sin^2 + cos^2 = 1), so it is distinct from every condition from the first step.
        self.null = nn.Parameter(torch.zeros(cond_dim))
        self.null_value = null_value
        self.inp = nn.Linear(2 + 2 * (config.time_features // 2) + cond_dim, config.width)
        self.blocks = nn.Sequential(*[Block(config.width, config.residual) for _ in range(config.blocks)])
        self.out = nn.Linear(config.width, 2)

    def condition(self, c: torch.Tensor) -> torch.Tensor:
        null = (c == self.null_value).unsqueeze(1)
        return torch.where(null, self.null.unsqueeze(0), self.position(c))

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(torch.cat([x, self.time(t), self.condition(c)], dim=1))))


def flops_per_sample(config: NetConfig, condition_features: int) -> int:
    """Multiply-adds x 2 of one forward pass for one point (Linear layers); a guided step (w != 0, 1) costs two."""
    inputs = 2 + 2 * (config.time_features // 2) + 2 * (condition_features // 2)
    return 2 * (inputs * config.width + config.blocks * config.width**2 + config.width * 2)
