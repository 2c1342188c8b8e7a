"""The forward (noising) process on real data: what the model learns to undo.

Frame 0 is clean Swiss-roll data x_0 drawn by the checkpoint's data recipe; frame k (k >= 1) is
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps          (Ho et al. 2020, eq. 4)
at the k-th level of `levels` (ascending, ending at T-1), with the model's own schedule. Each point keeps one eps
for every level, so it moves on a straight line from its data point to its noise: every frame has the exact
marginal q(x_t | x_0) (the joint across frames is not the Markov chain's, which would only add jitter).
"""

import secrets
from dataclasses import dataclass

import numpy as np

from diffusion.checkpoint import LoadedModel
from diffusion.samplers import SamplerError, timesteps
from service.compute import ComputeGate, Job, Timing
from service.render import captioned_mp4
from service.swissroll import real_points


@dataclass(frozen=True)
class ForwardPlan:
    n: int
    levels: tuple[int, ...]  # ascending, last = T-1
    seed: int

    def describe(self) -> dict:
        return {"n": self.n, "steps": len(self.levels), "seed": self.seed}


def forward_levels(num_timesteps: int, steps: int) -> list[int]:
    """The levels shown, ascending: every level when steps = T, else the reverse of the samplers' trailing
    spacing (so a forward run and a trailing-spaced reverse run with the same steps visit the same levels)."""
    return sorted(timesteps(num_timesteps, steps))


def forward_plan(model: LoadedModel, n: int, steps: int | None, seed: int | None) -> ForwardPlan:
    T = model.denoiser.num_timesteps
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise SamplerError("steps", f"steps must be in 1..{T} for this model, got {steps}")
    seed = seed if seed is not None else secrets.randbits(63)
    return ForwardPlan(n, tuple(forward_levels(T, steps)), seed)


def forward_frames(model: LoadedModel, p: ForwardPlan, job: Job | None = None) -> np.ndarray:
    """[len(levels) + 1, n, 2] float32: the data, then x_t at each level."""
    rng = np.random.default_rng(p.seed)
    x0 = real_points(p.n, model.metadata.get("data", {}), rng).astype(np.float64)
    eps = rng.standard_normal(x0.shape)
    out = np.empty((len(p.levels) + 1, p.n, 2), dtype=np.float32)
    out[0] = x0
    ab = model.denoiser.alphas_cumprod
    for k, t in enumerate(p.levels, start=1):
        if job is not None:
            job.check()
        out[k] = np.sqrt(ab[t]) * x0 + np.sqrt(1 - ab[t]) * eps
    return out


def forward_captions(levels) -> list[str]:
    return ["forward  ·  data x_0"] + [f"forward  ·  {i + 1}/{len(levels)}  ·  t={t}" for i, t in enumerate(levels)]


async def run_forward(gate: ComputeGate, model: LoadedModel, p: ForwardPlan, is_disconnected=None):
    return await gate.run(lambda job: forward_frames(model, p, job), is_disconnected, points=p.n)


async def render_forward_animation(
    gate: ComputeGate, model: LoadedModel, p: ForwardPlan, size: int, fps: int, is_disconnected=None
) -> tuple[bytes, Timing]:
    def work(job: Job) -> bytes:
        frames = forward_frames(model, p, job)
        job.check()
        return captioned_mp4(frames, forward_captions(p.levels), size, fps, job.check)

    return await gate.run(work, is_disconnected, points=p.n)
