"""Classifier-free guidance as a denoiser wrapper (k-diffusion's CFGDenoiser): every sampler works unchanged.

A conditional network (forward(x, t, c)) learned, through condition dropout, both the conditional prediction (c
in its range) and the unconditional one (c = its null value). Guidance combines the two on the network's output:

    out = uncond + w * (cond - uncond)

(diffusers' convention: w = 1 is the plain conditional model, 0 the unconditional one, > 1 sharpens). Both
predictions come from ONE network call per step on the rows doubled, [x; x] with [c; null]. Combining the
network output (eps or v) is the same as combining eps or x0: at fixed x both are affine in the output, and the
weights (1 - w) + w sum to one.
"""

from dataclasses import dataclass, field, fields, replace

import torch

from diffusion.denoiser import ROW_ALIGN, Denoiser


def combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    # Ho & Salimans 2022, eq. 6, eps~ = (1 + w') eps(c) - w' eps(null), written with w = 1 + w' (diffusers).
    return uncond + scale * (cond - uncond)


@dataclass(frozen=True)
class GuidedDenoiser(Denoiser):
    """Ho & Salimans 2022, classifier-free guidance: a Denoiser whose predict() is the guided prediction."""

    # Per-row condition [B]: rows of different requests may ask for different positions; a row equal to the null
    # value is sampled unconditionally (its two halves are the same computation, so guidance leaves it unchanged).
    condition: torch.Tensor | None = field(default=None, compare=False)
    scale: float = 1.0

    def predict(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.condition.to(device=x.device, dtype=x.dtype)
        rows = x.shape[0]
        if c.shape != (rows,):
            raise ValueError(f"condition must be [{rows}] (one per row), got {list(c.shape)}")
        if self.scale == 1.0:
            # The unconditional half has weight 0: one call on the conditional rows is the plain conditional model.
            return self.from_output(x, t, self.output(x, t, c))
        if self.scale == 0.0:
            return self.from_output(x, t, self.output(x, t, torch.full_like(c, self.null_condition)))
        # 1. Rows doubled: [x; x] with [c; null]. Each half starts on a ROW_ALIGN boundary, so a row's outputs do
        #    not depend on the batch around it (batch-invariant batching, see denoiser.py).
        half = rows + (-rows % ROW_ALIGN)
        x_half = torch.cat([x, x.new_zeros(half - rows, x.shape[1])])
        c_half = torch.cat([c, c.new_full((half - rows,), self.null_condition)])
        out = self.output(
            torch.cat([x_half, x_half]), t, torch.cat([c_half, torch.full_like(c_half, self.null_condition)])
        )
        # 2. The guided network output.
        return self.from_output(x, t, combine(out[:rows], out[half : half + rows], self.scale))

    def rows(self, start: int, stop: int) -> "GuidedDenoiser":
        """The same guidance for rows [start, stop) of the batch (a block of a split run, service/blocks.py)."""
        return replace(self, condition=self.condition[start:stop])


def guided(denoiser: Denoiser, condition: torch.Tensor, scale: float = 1.0) -> GuidedDenoiser:
    """The denoiser guided towards `condition` ([B] per row; the null value for unconditional rows) at `scale`."""
    if not denoiser.conditional:
        raise ValueError("guidance needs a conditional network (checkpoint metadata 'condition')")
    inherited = {f.name: getattr(denoiser, f.name) for f in fields(Denoiser)}  # whatever Denoiser grows
    return GuidedDenoiser(**inherited, condition=condition, scale=float(scale))
