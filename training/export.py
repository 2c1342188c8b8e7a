"""Writes the checkpoint: a TorchScript module carrying its noise schedule, plus metadata.json."""

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from service.checkpoint import quiet_jit
from training.model import Block, DenoiserMLP

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


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


class Checkpoint(nn.Module):
    """The file's contract: forward(x [B, 2] f32, t [B] i64) -> [B, 2] f32 and a float64 `alphas_cumprod` [T]."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)


def save_checkpoint(net: nn.Module, alphas_cumprod: torch.Tensor, metadata: dict, path: str | Path) -> Path:
    """Script and write atomically: the target is either the old file or the complete new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = net.to("cpu").eval()
    if isinstance(net, DenoiserMLP):
        net = FoldedDenoiser(net, len(alphas_cumprod))
    module = Checkpoint(net, alphas_cumprod.cpu())
    extra = {METADATA_FILE: json.dumps({"format_version": FORMAT_VERSION, **metadata}, indent=2)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with quiet_jit():
                torch.jit.save(torch.jit.script(module), f, _extra_files=extra)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; a checkpoint is meant to be read by others (e.g. a container's service user).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: drop the partial temp file, leave the previous checkpoint untouched.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {METADATA_FILE: ""}
    with quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[METADATA_FILE])
