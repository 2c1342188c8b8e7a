"""A loaded model bundled with its own noise schedule, answering "given x_t at level t, what are eps and x0?"."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffusion.folded import FusedFoldedNet

PREDICTION_TYPES = ("epsilon", "v")
# CPU GEMM kernels vectorize across rows: a row's last bit can depend on its position modulo the vector
# width and on whether it falls in a partial tail. Padding every call to a multiple of ROW_ALIGN rows (and
# starting each batched request on such a boundary, see batching.py) makes every row's result independent of
# what else is in the batch, which is what batch-invariant dynamic batching needs.
ROW_ALIGN = 16
# Large batches on CPU run the network in chunks (a multiple of ROW_ALIGN, so rows are unchanged): 8192 x 64 float32
# activations stay in cache; one 100k-row call is ~1.6x slower on a 2-core machine (measured, see bench/).
FORWARD_CHUNK = 8192


def prediction_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """What the network learns to output at x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps; Denoiser.predict
    inverts it."""
    if prediction_type == "epsilon":
        return eps
    # v-prediction (Salimans & Ho 2022, eq. 9): v = alpha * eps - sigma * x0.
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


@dataclass(frozen=True)
class Denoiser:
    net: Callable[..., torch.Tensor]  # (x [B, 2], t [B] int64) -> [B, 2]; conditional: (x, t, c [B] float32)
    alphas_cumprod: tuple[float, ...]  # host-side float64 copy: per-step coefficients never sync the device
    prediction_type: str = "epsilon"
    device: torch.device = torch.device("cpu")  # where the net's weights live; samplers draw noise there
    # sampler -> steps -> levels chosen for this network (checkpoint metadata "tuned_timesteps"; may be empty)
    tuned_timesteps: dict[str, dict[int, tuple[int, ...]]] = field(default_factory=dict, hash=False, compare=False)
    # A distilled student (metadata "distillation"): the only sampler -> steps -> levels it serves; empty = any.
    distilled: dict[str, dict[int, tuple[int, ...]]] = field(default_factory=dict, hash=False, compare=False)
    default_choice: tuple[str, int] | None = None  # (sampler, steps) for a request naming neither; distilled only
    # A conditional network (checkpoint metadata "condition"): the c that selects its learned "no condition" input.
    # None: the network takes no condition. Without a condition, predict() runs a conditional network unconditionally.
    null_condition: float | None = None
    # The net's faster CPU stand-in, fused oneDNN layers (diffusion/folded.py); only used while it stands for `net`
    # (a copy of this Denoiser with another net runs that net).
    cpu_net: FusedFoldedNet | None = field(default=None, hash=False, compare=False)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def conditional(self) -> bool:
        return self.null_condition is not None

    def predict(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) predicted at integer level t."""
        return self.from_output(x, t, self.output(x, t))

    def output(self, x: torch.Tensor, t: int, c: torch.Tensor | None = None) -> torch.Tensor:
        """The network's own output at level t (noise or v); c: per-row condition [B] of a conditional network
        (None: every row unconditional)."""
        if c is None and self.null_condition is not None:
            c = x.new_full((x.shape[0],), self.null_condition)
        elif c is not None and self.null_condition is None:
            raise ValueError("this network takes no condition")
        return self._forward_cpu(x, t, c) if x.device.type == "cpu" else self._forward_accelerator(x, t, c)

    def from_output(self, x: torch.Tensor, t: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) from the network output at level t: the prediction type's inverse."""
        alpha, sigma = self.alphas_cumprod[t] ** 0.5, (1 - self.alphas_cumprod[t]) ** 0.5
        if self.prediction_type == "epsilon":
            # x_t = alpha x0 + sigma eps  =>  x0 = (x_t - sigma eps) / alpha
            return out, (x - sigma * out) / alpha
        # v = alpha eps - sigma x0 (Salimans & Ho 2022)  =>  x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v
        return sigma * x + alpha * out, alpha * x - sigma * out

    def _forward_cpu(self, x: torch.Tensor, t: int, c: torch.Tensor | None = None) -> torch.Tensor:
        # Padded to ROW_ALIGN (batch invariance) and run in cache-sized chunks.
        rows = x.shape[0]
        pad = -rows % ROW_ALIGN
        x_in = torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x
        fast = self.cpu_net
        if c is None and fast is not None and fast.module is self.net:
            outs = [fast(xc, t) for xc in x_in.split(FORWARD_CHUNK)]
        else:
            t_in = torch.full((x_in.shape[0],), t, dtype=torch.int64, device=x.device)
            inputs = [x_in.split(FORWARD_CHUNK), t_in.split(FORWARD_CHUNK)]
            if c is not None:
                c_in = torch.cat([c, c.new_full((pad,), self.null_condition)]) if pad else c
                inputs.append(c_in.split(FORWARD_CHUNK))
            outs = [self.net(*chunk) for chunk in zip(*inputs, strict=True)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs))[:rows]

    def _forward_accelerator(self, x: torch.Tensor, t: int, c: torch.Tensor | None = None) -> torch.Tensor:
        # One call per step: on a GPU the per-call launch cost dominates this small network, chunks only add
        # launches (measured in scripts/cuda_check.py), and its GEMMs are not batch-invariant anyway.
        t_in = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        return self.net(x, t_in) if c is None else self.net(x, t_in, c)
