"""Choose, for one trained network, which of its T levels a few-step ODE sampler should evaluate.

Trailing spacing is a fixed guess. A deterministic sampler maps each x_T to one output, so the error of a short
schedule is measurable directly: the mean squared distance, over fixed noise, between its outputs and those of
the same sampler through all T levels (the finest solve the network allows). Coordinate descent over the levels
minimizes it, starting from trailing spacing and a few random schedules: the idea of optimizing a sampling
schedule per model from its own trajectories (Sabour et al. 2024, "Align Your Steps"; Chen et al. 2024, GITS),
on the discrete levels this network was trained on. It takes seconds on a 2D model; the result goes in the
checkpoint's metadata ("tuned_timesteps") and the service uses it by default (spacing=tuned).
"""

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from diffusion.denoiser import Denoiser
from diffusion.noise import forbidden
from diffusion.samplers import SAMPLERS, timesteps
from training.distances import sliced_w2

# Noise and data seeds of the search's own: no benchmark or quality summary uses them (see tune()).
TUNING_SEED = 54_321
# Deterministic samplers worth tuning, and the step counts tuned at the end of training.
TUNE_STEPS = {"dpmpp_2m": (5, 10)}
# The distance is a proxy with many local minima of nearly equal depth, whose sample quality differs more than
# their distances do (measured: sliced W2 0.0147 to 0.0159 at 10 steps). So every distinct local minimum is kept,
# and a score picks among them: training uses sliced W2 against fresh real data.
Score = Callable[[list[int]], float]


@dataclass(frozen=True)
class SearchResult:
    timesteps: list[int]
    error: float  # mean squared distance to the all-levels solution, per point
    trailing_error: float  # the same for trailing spacing, the first starting point
    score: float | None = None  # the chosen schedule's score, when a score chose it
    trailing_score: float | None = None


def search_timesteps(
    denoiser: Denoiser,
    sampler: str,
    steps: int,
    score: Score | None = None,
    n: int = 8192,
    seed: int = 0,
    restarts: int = 10,
) -> SearchResult:
    """Best schedule found for `sampler` at `steps` evaluations: T-1 first, then any steps-1 distinct lower levels.
    Without a score, the local minimum with the smallest distance wins."""
    fn, T = SAMPLERS[sampler].fn, denoiser.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    generator = torch.Generator(device=denoiser.device).manual_seed(seed)
    z = torch.randn((n, 2), generator=generator, device=denoiser.device)
    deterministic = forbidden(f"the schedule search needs a deterministic sampler, not {sampler!r}")
    reference = fn(denoiser, z, list(range(T - 1, -1, -1)), deterministic)

    def error(ts: list[int]) -> float:
        return float(((fn(denoiser, z, ts, deterministic) - reference) ** 2).sum(dim=1).mean())

    def descend(ts: list[int]) -> tuple[float, list[int]]:
        # Move one level at a time to the best position between its neighbours; stop when no move helps.
        best = error(ts)
        improved = True
        while improved:
            improved = False
            for i in range(1, len(ts)):
                low = ts[i + 1] + 1 if i + 1 < len(ts) else 0
                for level in range(low, ts[i - 1]):
                    if level != ts[i]:
                        candidate = ts[:i] + [level] + ts[i + 1 :]
                        e = error(candidate)
                        if e < best:
                            best, ts, improved = e, candidate, True
        return best, ts

    trailing = timesteps(T, steps)
    rng = random.Random(seed)
    starts = [trailing] + [[T - 1] + sorted(rng.sample(range(T - 1), steps - 1), reverse=True) for _ in range(restarts)]
    minima = {tuple(ts): e for e, ts in map(descend, starts)}
    if score is None:
        best = min(minima, key=minima.get)
        return SearchResult(list(best), minima[best], error(trailing))
    scores = {ts: score(list(ts)) for ts in minima}
    best = min(scores, key=scores.get)
    return SearchResult(list(best), minima[best], error(trailing), scores[best], score(trailing))


def tune(
    denoiser: Denoiser,
    real: np.ndarray | None = None,
    seed: int = TUNING_SEED,
    restarts: int = 10,
    plan=TUNE_STEPS,
    n: int = 8192,
) -> tuple[dict, dict]:
    """(metadata["tuned_timesteps"], metadata["timestep_search"]) for every sampler and step count in `plan`.
    With `real` (fresh data points, normalized), local minima are scored by sliced W2 against it.
    Give it noise and data seeds of its own: a schedule scored on the very x_T a benchmark later samples (the
    benchmarks use seeds 0, 1, 2, ...) would be measured optimistically."""
    tuned, report = {}, {}
    if real is not None:
        g = torch.Generator(device=denoiser.device).manual_seed(seed + 1)
        z = torch.randn((len(real), 2), generator=g, device=denoiser.device)
    for sampler, step_counts in plan.items():
        fn = SAMPLERS[sampler].fn
        deterministic = forbidden(f"tuning needs a deterministic sampler, not {sampler!r}")
        score = (
            None
            if real is None
            else (lambda ts, fn=fn, nz=deterministic: sliced_w2(real, fn(denoiser, z, ts, nz).cpu().numpy()))
        )
        for steps in step_counts:
            if steps <= denoiser.num_timesteps:
                r = search_timesteps(denoiser, sampler, steps, score, n=n, seed=seed, restarts=restarts)
                tuned.setdefault(sampler, {})[str(steps)] = r.timesteps
                report.setdefault(sampler, {})[str(steps)] = {
                    k: round(v, 6) for k, v in vars(r).items() if k != "timesteps" and v is not None
                }
    method = (
        "coordinate descent on the mean squared distance to the all-levels solve, from trailing spacing and random "
        "starts; the local minimum with the lowest sliced W2 against fresh real data wins (training/timestep_search.py)"
    )
    return tuned, {"method": method, "results": report}
