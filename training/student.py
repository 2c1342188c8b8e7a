"""A distillation student: the teacher's exported network made trainable again, and its inference form.

The committed teacher is an exported FoldedDenoiser (training/export.py): h0 = x W_x + level_bias[t], residual ReLU
blocks, a linear head. Its state is read from the checkpoint like any consumer reads it; the student starts as the
same function (Salimans & Ho 2022 initialise each student from its teacher) and every parameter, the per-level
bias table included, is trained.
"""

import torch
from torch import nn

from training.export import InferenceBlock
from training.model import Block


class FoldedStudent(nn.Module):
    """(x [B, 2], t [B] int64) -> v [B, 2], trainable; the folded layout of training/export.py."""

    def __init__(self, width: int, blocks: int, num_timesteps: int, residual: bool = True):
        super().__init__()
        self.w_x = nn.Parameter(torch.zeros(2, width))
        self.level_bias = nn.Parameter(torch.zeros(num_timesteps, width))
        self.blocks = nn.Sequential(*[Block(width, residual) for _ in range(blocks)])
        self.out = nn.Linear(width, 2)

    @classmethod
    def from_teacher(cls, net: nn.Module, residual: bool = True) -> "FoldedStudent":
        """A copy of an exported FoldedDenoiser (a checkpoint's module, its `net`); ValueError for another layout."""
        state = {k.removeprefix("net."): v for k, v in net.state_dict().items() if k != "alphas_cumprod"}
        if "w_x" not in state or "level_bias" not in state:
            raise ValueError("the teacher is not an exported FoldedDenoiser (no w_x / level_bias): cannot copy it")
        width, num_timesteps = state["w_x"].shape[1], state["level_bias"].shape[0]
        blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        student = cls(width, blocks, num_timesteps, residual)
        student.load_state_dict({k: v.float().clone() for k, v in state.items()})
        return student

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(torch.addmm(self.level_bias[t], x, self.w_x)))

    def inference(self) -> nn.Module:
        return InferenceStudent(self)


class InferenceStudent(nn.Module):
    """The same function for export: weights as buffers, in-place activations (as training/export.py does)."""

    def __init__(self, student: FoldedStudent):
        super().__init__()
        self.register_buffer("w_x", student.w_x.detach().clone())
        self.register_buffer("level_bias", student.level_bias.detach().clone())
        self.blocks = nn.Sequential(*[InferenceBlock(b) for b in student.blocks])
        self.out = student.out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(torch.addmm(self.level_bias[t], x, self.w_x)))
