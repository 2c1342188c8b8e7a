"""Runs one request's sampling job: validate against the loaded model, seed, sample in a compute slot."""

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffusion.checkpoint import LoadedModel
from diffusion.denoiser import Denoiser
from diffusion.guidance import guided
from diffusion.noise import from_generator
from diffusion.samplers import (
    SamplerSpec,
    get_sampler,
    resolve_params,
    resolve_steps,
    resolve_timesteps,
)
from service.blocks import run_sampler
from service.compute import ComputeGate, Job, Timing
from service.render import animation_mp4
from service.schemas import SamplerChoice

if TYPE_CHECKING:
    from service.batching import Batcher


@dataclass(frozen=True)
class Plan:
    """A validated request: what will run, with the seed fixed (drawn if the client gave none)."""

    spec: SamplerSpec
    n: int
    timesteps: tuple[int, ...]  # the levels evaluated, noisiest first
    spacing: str  # what chose them: "trailing" or "tuned" (the checkpoint's schedule for this sampler and steps)
    seed: int
    params: dict[str, float]
    position: float | None = None  # conditional models: a per-row input, so plans with different ones batch together
    guidance: float = 1.0  # part of the computation (key): 1 whenever position is None

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def cost(self) -> int:
        """Points x network evaluations: what admission control estimates compute time from."""
        return self.n * self.steps

    def key(self) -> tuple:
        """What decides the computation apart from the model, n and the seed: with the model's id, plans with equal
        keys share network calls (computation_key, batching.py); with the model's id, the seed and n it names one
        result (the /animation cache and its ETag, video_cache.animation_key)."""
        guidance = (("guidance", self.guidance),) if self.guidance != 1.0 else ()
        return (self.spec.name, self.timesteps, tuple(sorted(self.params.items())), *guidance)

    def describe(self) -> dict:
        return {
            "n": self.n,
            "sampler": self.spec.name,
            "steps": self.steps,
            "spacing": self.spacing,
            "seed": self.seed,
            **self.params,
            **({"position": self.position, "guidance": self.guidance} if self.position is not None else {}),
        }


def computation_key(model: LoadedModel, p: Plan) -> tuple:
    """Which model runs which computation: requests with equal keys may share network calls (batching.py), and
    never across models (a server may hold several)."""
    return (model.id, p.key())


@dataclass(frozen=True)
class Result:
    points: np.ndarray  # [n, 2] float32
    frames: np.ndarray | None  # [steps + 1, n, 2]: x_T, then the state after every step
    x0: np.ndarray | None  # [steps, n, 2]
    timing: Timing


def plan(model: LoadedModel, params: SamplerChoice) -> Plan:
    """Raises SamplerError (-> 422) for steps beyond this model's T, parameters the sampler lacks, or a sampler,
    steps or spacing a distilled model was not made for."""
    # No sampler: ddpm, or what a distilled model was made for; a distilled model refuses anything else (422).
    spec = get_sampler(params.sampler.value if params.sampler is not None else None, model.denoiser)
    steps = resolve_steps(spec, params.steps, model.denoiser.num_timesteps, model.denoiser)
    ts, spacing = resolve_timesteps(spec, model.denoiser, steps, params.spacing)
    extra = resolve_params(spec, {"eta": params.eta})
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    # Without a position the rows are unconditional, which guidance leaves unchanged: w = 1 lets them batch with
    # every other unconditional or w = 1 request.
    guidance = params.guidance if params.position is not None else 1.0
    return Plan(spec, params.n, tuple(ts), spacing, seed, extra, params.position, guidance)


def conditioned(denoiser: Denoiser, rows: list[tuple[float | None, int]], guidance: float) -> Denoiser:
    """A conditional model's denoiser with each run of rows' condition ((position or None, rows), in row order;
    None: unconditional, the model's null value); an unconditional model's as it is."""
    if not denoiser.conditional:
        return denoiser
    null = denoiser.null_condition
    c = torch.cat([torch.full((n,), null if where is None else where) for where, n in rows])
    return guided(denoiser, c, guidance)


def run_plan(model: LoadedModel, p: Plan, job: Job, record: bool = False, record_x0: bool = False):
    """The work done in a compute thread. Returns (points, frames, x0s) as numpy arrays."""
    device = model.device
    generator = torch.Generator(device=device).manual_seed(p.seed)
    # CUDA: one noise draw per request, shared by all its paths (cuda_fast_path.py); conditional models run eager.
    if model.fast_path is not None and not model.denoiser.conditional:
        if not (record or record_x0):
            job.check()
            return model.fast_path.sample(p.spec, p.timesteps, p.params, [(generator, p.n)]).cpu().numpy(), None, None
        noise, denoiser = model.fast_path.eager_state(p.spec, p.timesteps, p.params, [(generator, p.n)])
    else:
        noise, denoiser = from_generator(generator), conditioned(model.denoiser, [(p.position, p.n)], p.guidance)
    # job.check: deadline and client disconnect are honoured at every step boundary.
    x, out, frames, x0s = run_sampler(
        job.blocks, p.spec, denoiser, p.n, p.timesteps, noise, job.check, record, record_x0, **p.params
    )
    # One device->host copy per array, after all steps: no per-step synchronization.
    stacked = torch.stack([x, *frames]).cpu().numpy() if record else None
    return out.cpu().numpy(), stacked, (torch.stack(x0s).cpu().numpy() if record_x0 else None)


async def sample_points(
    gate: ComputeGate,
    model: LoadedModel,
    p: Plan,
    is_disconnected=None,
    record: bool = False,
    record_x0: bool = False,
    batcher: "Batcher | None" = None,
) -> Result:
    """Points only (no trajectory) go through the batcher when there is one; trajectories run as their own job."""
    if batcher is not None and not record:
        points, timing = await batcher.sample(model, p, is_disconnected)
        return Result(points, None, None, timing)
    (points, frames, x0), timing = await gate.run(
        lambda job: run_plan(model, p, job, record, record_x0), is_disconnected, points=p.n, cost=p.cost
    )
    return Result(points, frames, x0, timing)


async def render_animation(
    gate: ComputeGate, model: LoadedModel, p: Plan, size: int, fps: int, is_disconnected=None
) -> tuple[bytes, Timing]:
    """Sample with a recorded trajectory and encode it, as one job in one compute slot."""

    def work(job: Job) -> bytes:
        _, frames, _ = run_plan(model, p, job, record=True)
        job.check()
        return animation_mp4(frames, p.spec.name, p.timesteps, size, fps, job.check)

    return await gate.run(work, is_disconnected, points=p.n, cost=p.cost)
