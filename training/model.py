"""The noise-prediction MLP and its presets. Everything here must stay TorchScript-able."""

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from diffusion.denoiser import PREDICTION_TYPES


@dataclass(frozen=True)
class NetConfig:
    width: int = 64
    blocks: int = 4
    residual: bool = False
    # "raw": the integer timestep concatenated as one number (the original); "sinusoidal": Transformer-style
    # features of t, which an MLP separates far more easily than one unbounded scalar.
    time_embedding: str = "raw"
    time_features: int = 16
    # What the network is trained to output: "epsilon" (the noise) or "v" (Salimans & Ho 2022,
    # v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0), which stays well conditioned at low SNR.
    prediction_type: str = "epsilon"
    # > 0: a conditional network (training/conditional.py) taking the position along the roll as this many features.
    condition_features: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, NetConfig] = {
    # The original notebook: Linear(3, 64) -> 4 x [Linear(64, 64), ReLU] -> Linear(64, 2), raw t, epsilon.
    "seed": NetConfig(),
    # The committed default (`make train`: 300 epochs, EMA 0.995): same width and depth, residual
    # blocks, sinusoidal time features and v-prediction; chosen by bench/quality.py.
    "default": NetConfig(residual=True, time_embedding="sinusoidal", prediction_type="v"),
    # The conditional model (`make train-cond`, issue 15): the default twice as wide (one network learns the
    # conditional and the unconditional task; width 64 left the unconditional one 3.4x the default), plus
    # position features.
    "cond": NetConfig(
        width=128, residual=True, time_embedding="sinusoidal", prediction_type="v", condition_features=16
    ),
}
TIME_EMBEDDINGS = ("raw", "sinusoidal")


def get_preset(name: str) -> NetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


class RawTime(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).unsqueeze(1)


class SinusoidalTime(nn.Module):
    def __init__(self, features: int, num_timesteps: int):
        super().__init__()
        half = features // 2
        # Periods from 2 steps up to ~4T so that neighbouring levels and the whole chain are both resolved.
        periods = torch.logspace(math.log10(2.0), math.log10(4.0 * num_timesteps), half)
        self.register_buffer("freqs", 2 * math.pi / periods)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(torch.float32).unsqueeze(1) * self.freqs.unsqueeze(0)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class Block(nn.Module):
    def __init__(self, width: int, residual: bool):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.residual = residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.linear(h))
        return h + y if self.residual else y


class DenoiserMLP(nn.Module):
    """(x_t [B, 2], t [B] int64) -> network output [B, 2] (noise or v, per NetConfig.prediction_type)."""

    def __init__(self, config: NetConfig, num_timesteps: int):
        super().__init__()
        if config.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"unknown time_embedding {config.time_embedding!r}; valid: {TIME_EMBEDDINGS}")
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {config.prediction_type!r}; valid: {PREDICTION_TYPES}")
        if config.time_embedding == "raw":
            self.time = RawTime()
            time_dim = 1
        else:
            self.time = SinusoidalTime(config.time_features, num_timesteps)
            time_dim = 2 * (config.time_features // 2)
        self.inp = nn.Linear(2 + time_dim, config.width)
        self.blocks = nn.Sequential(*[Block(config.width, config.residual) for _ in range(config.blocks)])
        self.out = nn.Linear(config.width, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(torch.cat([x, self.time(t)], dim=1))))


def flops_per_sample(config: NetConfig) -> int:
    """Multiply-adds x 2 of one forward pass for one point (the Linear layers; activations are negligible)."""
    time_dim = 1 if config.time_embedding == "raw" else 2 * (config.time_features // 2)
    macs = (2 + time_dim) * config.width + config.blocks * config.width**2 + config.width * 2
    return 2 * macs
