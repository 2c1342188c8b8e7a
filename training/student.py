"""A distillation student: the teacher's exported network made trainable again, and its inference form.

The committed teacher is an exported FoldedDenoiser (training/export.py): h0 = x W_x + level_bias[t], residual ReLU
blocks, a linear head. Its state is read from the checkpoint like any consumer reads it; the student starts as the
same function (Salimans & Ho 2022 initialise each student from its teacher) and every parameter, the per-level
bias table included, is trained.

A student of another width or depth (fewer FLOPs per evaluation: the network is the bulk of a 2-evaluation request)
cannot copy its teacher: it starts `fresh` and is first fitted to the teacher's output (knowledge distillation of
the denoiser, training/distillation.py: regress_teacher) before the few-step distillation proper.

Hidden weights in bfloat16: a student may be trained with its blocks' weight matrices rounded to bfloat16 in every
forward pass (quantization-aware training with a straight-through gradient to float32 master weights, Jacob et al.
2018; Courbariaux et al. 2015), and is exported with the rounded values. Such a network computes the same function
in float32 on any machine, and its hidden layers can run on bfloat16 units where a CPU has them (diffusion/folded.py:
~13% faster per request than fused float32 layers), with no weight rounded a second time. Rounding a float32-trained
student's weights after the fact cost it ~3% sliced W2 at 2 and 4 steps; rounding its activations, nothing
measurable; trained with the rounding, the committed student is within the seed noise of the float32 one
(bench/results/distillation.md).
"""

import copy
import math

import torch
from torch import nn

from training.export import InferenceBlock
from training.model import Block

HIDDEN_WEIGHTS = {"float32": None, "bfloat16": torch.bfloat16}  # a student's hidden weights -> rounded to this


class FoldedStudent(nn.Module):
    """(x [B, 2], t [B] int64) -> v [B, 2], trainable; the folded layout of training/export.py."""

    def __init__(self, width: int, blocks: int, num_timesteps: int, residual: bool = True):
        super().__init__()
        self.hidden_weights = "float32"
        self.w_x = nn.Parameter(torch.zeros(2, width))
        self.level_bias = nn.Parameter(torch.zeros(num_timesteps, width))
        self.blocks = nn.Sequential(*[Block(width, residual) for _ in range(blocks)])
        self.out = nn.Linear(width, 2)

    @classmethod
    def from_teacher(cls, net: nn.Module, residual: bool = True) -> "FoldedStudent":
        """A copy of an exported FoldedDenoiser (a checkpoint's module, its `net`); ValueError for another layout."""
        state = teacher_state(net)
        width, num_timesteps = state["w_x"].shape[1], state["level_bias"].shape[0]
        blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        student = cls(width, blocks, num_timesteps, residual)
        student.load_state_dict({k: v.float().clone() for k, v in state.items()})
        return student

    @classmethod
    def fresh(cls, width: int, blocks: int, num_timesteps: int, residual: bool = True) -> "FoldedStudent":
        """A new network of this shape (torch's global generator), initialised as the unfolded first layer
        nn.Linear(2, width) would be: every level's bias starts equal, the level is learned into the table."""
        student = cls(width, blocks, num_timesteps, residual)
        bound = 1 / math.sqrt(2)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 2
        with torch.no_grad():
            student.w_x.uniform_(-bound, bound)
            student.level_bias.copy_(torch.empty(width).uniform_(-bound, bound).expand(num_timesteps, width))
        return student

    def rounding_hidden_weights(self, name: str) -> "FoldedStudent":
        """This network, its blocks' weight matrices rounded to `name` (HIDDEN_WEIGHTS) in every forward pass."""
        if name not in HIDDEN_WEIGHTS:
            raise ValueError(f"unknown hidden_weights {name!r}; valid: {', '.join(HIDDEN_WEIGHTS)}")
        self.hidden_weights = name
        return self

    def hidden_weight(self, block: Block) -> torch.Tensor:
        """A block's weight as the forward pass uses it: rounded, with the gradient passed straight through to the
        float32 master weight."""
        w, dtype = block.linear.weight, HIDDEN_WEIGHTS[self.hidden_weights]
        return w if dtype is None else w + (w.to(dtype).float() - w).detach()

    @property
    def width(self) -> int:
        return self.w_x.shape[1]

    def describe(self) -> dict:
        """The checkpoint's `model` fields for this network (its own shape, not its teacher's)."""
        return {
            "architecture": "FoldedStudent",
            "width": self.width,
            "blocks": len(self.blocks),
            "residual": bool(self.blocks[0].residual) if len(self.blocks) else True,
            "time_embedding": "level table",  # a free per-level bias, trained (no time features to evaluate)
            "hidden_weights": self.hidden_weights,  # the blocks' weight matrices hold values of this type
            "prediction_type": "v",
            "parameters": sum(p.numel() for p in self.parameters()),
            "flops_per_sample": flops_per_sample(self.width, len(self.blocks)),
        }

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.level_bias[t], x, self.w_x)
        if HIDDEN_WEIGHTS[self.hidden_weights] is None:
            return self.out(self.blocks(h))
        for block in self.blocks:
            y = torch.relu(nn.functional.linear(h, self.hidden_weight(block), block.linear.bias))
            h = h + y if block.residual else y
        return self.out(h)

    def inference(self) -> nn.Module:
        return InferenceStudent(self)


def teacher_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """An exported FoldedDenoiser's weights by the student's names; ValueError for another layout."""
    state = {k.removeprefix("net."): v for k, v in net.state_dict().items() if k != "alphas_cumprod"}
    if "w_x" not in state or "level_bias" not in state:
        raise ValueError("the teacher is not an exported FoldedDenoiser (no w_x / level_bias): cannot copy it")
    return state


def teacher_shape(net: nn.Module) -> tuple[int, int]:
    """(width, blocks) of an exported FoldedDenoiser."""
    state = teacher_state(net)
    return state["w_x"].shape[1], len({k.split(".")[1] for k in state if k.startswith("blocks.")})


def flops_per_sample(width: int, blocks: int) -> int:
    """Multiply-adds x 2 of one folded forward pass for one point, as training/model.py counts them (the Linear
    layers): x W_x (2 x width), the blocks (width^2 each), the head (width x 2). The level table is a gather and an
    add, negligible like the activations; the time features the unfolded teacher counts are not evaluated."""
    return 2 * (2 * width + blocks * width**2 + width * 2)


class InferenceStudent(nn.Module):
    """The same function for export: weights as buffers, in-place activations (as training/export.py does)."""

    def __init__(self, student: FoldedStudent):
        super().__init__()
        self.register_buffer("w_x", student.w_x.detach().clone())
        self.register_buffer("level_bias", student.level_bias.detach().clone())
        self.blocks = nn.Sequential(*[InferenceBlock(_exported(student, b)) for b in student.blocks])
        self.out = student.out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(torch.addmm(self.level_bias[t], x, self.w_x)))


def _exported(student: FoldedStudent, block: Block) -> Block:
    """The block as the student computes it: its weight rounded as in training (a copy; the student is unchanged)."""
    block = copy.deepcopy(block)
    with torch.no_grad():
        block.linear.weight.copy_(student.hidden_weight(block))
    return block
