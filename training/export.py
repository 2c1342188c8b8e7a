"""Exports a trained network: its inference form (folded time features, in-place activations), written in the
checkpoint format of diffusion/checkpoint.py."""

from pathlib import Path

import torch
from torch import nn

from diffusion.checkpoint import save_checkpoint
from training.conditional import ConditionalMLP
from training.model import Block, DenoiserMLP


class InferenceBlock(nn.Module):
    """model.Block for inference only: ReLU and the residual add in place on the fresh GEMM output (no autograd
    runs on an exported checkpoint), saving two [B, width] temporaries per block."""

    def __init__(self, block: Block):
        super().__init__()
        self.linear = block.linear
        self.residual = block.residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = torch.relu_(self.linear(h))
        return y.add_(h) if self.residual else y


class FoldedDenoiser(nn.Module):
    """Inference form of DenoiserMLP, same function: the time features feed only the first layer and t takes just
    T values, so their contribution plus the first bias is precomputed per level,
        h0 = x W_x^T + level_bias[t],   level_bias[t] = W_t time(t) + b,
    instead of embedding and concatenating t for every row (a third of a forward pass at width 64)."""

    def __init__(self, net: DenoiserMLP, num_timesteps: int):
        super().__init__()
        with torch.no_grad():
            weight, bias = net.inp.weight, net.inp.bias  # [width, 2 + time_dim], [width]
            levels = torch.arange(num_timesteps, device=weight.device)
            self.register_buffer("w_x", weight[:, :2].t().contiguous().clone())  # [2, width]
            self.register_buffer("level_bias", (net.time(levels) @ weight[:, 2:].t() + bias).contiguous())
        self.blocks = nn.Sequential(*[InferenceBlock(b) for b in net.blocks])
        self.out = net.out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(torch.addmm(self.level_bias[t], x, self.w_x)))


class FoldedConditional(nn.Module):
    """Inference form of ConditionalMLP, same function: the time part folded as in FoldedDenoiser, and the null
    input's contribution (a constant) precomputed; the position features of a continuous c cannot be tabled,
        h0 = x W_x^T + level_table[t] + (null_term if c == null_value else features(c) W_c^T)."""

    def __init__(self, net: ConditionalMLP, num_timesteps: int):
        super().__init__()
        with torch.no_grad():
            weight, bias = net.inp.weight, net.inp.bias  # [width, 2 + time_dim + cond_dim], [width]
            time_dim = net.time.freqs.numel() * 2
            w_t, w_c = weight[:, 2 : 2 + time_dim], weight[:, 2 + time_dim :]
            levels = torch.arange(num_timesteps, device=weight.device)
            # Names of their own, not FoldedDenoiser's: the CUDA fused kernel recognizes an unconditional folded
            # network by w_x / level_bias and would silently compute this one without its condition term.
            self.register_buffer("x_weight", weight[:, :2].t().contiguous().clone())  # [2, width]
            self.register_buffer("level_table", (net.time(levels) @ w_t.t() + bias).contiguous())
            self.register_buffer("c_weight", w_c.t().contiguous().clone())  # [cond_dim, width]
            self.register_buffer("null_term", (net.null @ w_c.t()).unsqueeze(0).contiguous())  # [1, width]
        self.position = net.position
        self.null_value = net.null_value
        self.blocks = nn.Sequential(*[InferenceBlock(b) for b in net.blocks])
        self.out = net.out

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        null = (c == self.null_value).unsqueeze(1)
        cond = torch.where(null, self.null_term, self.position(c) @ self.c_weight)
        return self.out(self.blocks(torch.addmm(self.level_table[t] + cond, x, self.x_weight)))


def export_checkpoint(net: nn.Module, alphas_cumprod: torch.Tensor, metadata: dict, path: str | Path) -> Path:
    """A trained DenoiserMLP or ConditionalMLP is written in its folded inference form; any other module as it is."""
    net = net.to("cpu").eval()
    if isinstance(net, DenoiserMLP):
        net = FoldedDenoiser(net, len(alphas_cumprod))
    elif isinstance(net, ConditionalMLP):
        net = FoldedConditional(net, len(alphas_cumprod))
    return save_checkpoint(net, alphas_cumprod, metadata, path)
