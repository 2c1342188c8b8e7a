"""Samplers: pure functions turning Gaussian noise into points, and the registry the API validates against.

Every sampler has the signature
    sampler(denoiser, x, ts, noise, callback=None, **params) -> x_0
where x is the initial noise x_T; `ts` lists the training levels to evaluate, noisiest first, one network
evaluation each (as k-diffusion's samplers take a list of sigmas: trailing spacing from `timesteps`, or a
schedule the checkpoint carries, see `resolve_timesteps`); `noise(like)` draws the request's noise (noise.py);
and `callback`, if given, receives a Step after every update. Per-step coefficients are Python floats computed
from the float64 schedule, so no step synchronizes with the device.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from diffusion.denoiser import Denoiser
from diffusion.noise import from_generator, initial_noise


class Step(NamedTuple):
    i: int  # 0-based index of the step just taken
    t: int  # the training level the model was evaluated at
    x: torch.Tensor  # the state after the step
    x0: torch.Tensor  # the model's prediction of the clean points at this step


Callback = Callable[[Step], None]


def timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Trailing spacing (Lin et al. 2024, Table 2): always starts at T-1, e.g. T=40, steps=4 -> [39, 29, 19, 9]."""
    return [round(num_timesteps - k * num_timesteps / steps) - 1 for k in range(steps)]


def step_levels(denoiser: Denoiser, ts: Sequence[int]) -> list[tuple[int, float, float]]:
    """(t, alpha_bar_t, alpha_bar_prev) per step; the level after the last step is clean (alpha_bar = 1)."""
    ab = denoiser.alphas_cumprod
    return [(t, ab[t], ab[ts[i + 1]] if i + 1 < len(ts) else 1.0) for i, t in enumerate(ts)]


def ddpm_mean(x, eps, ab_t: float, ab_prev: float):
    # Ho et al. 2020, eq. 11, with the respaced beta_t = 1 - ab_t / ab_prev (Nichol & Dhariwal 2021, sec. 4).
    alpha_t = ab_t / ab_prev
    return (x - (1 - alpha_t) / math.sqrt(1 - ab_t) * eps) / math.sqrt(alpha_t)


def posterior_mean(x, x0, ab_t: float, ab_prev: float):
    # Mean of q(x_{t-1} | x_t, x_0), Ho et al. 2020, eq. 7.
    alpha_t = ab_t / ab_prev
    return (math.sqrt(ab_prev) * (1 - alpha_t) * x0 + math.sqrt(alpha_t) * (1 - ab_prev) * x) / (1 - ab_t)


@torch.inference_mode()
def sample_ddpm(denoiser, x, ts, noise, callback=None):
    """Ho et al. 2020, Algorithm 2: ancestral sampling with sigma_t^2 = beta_t."""
    levels = step_levels(denoiser, ts)
    for i, (t, ab_t, ab_prev) in enumerate(levels):
        eps, x0 = denoiser.predict(x, t)
        x = ddpm_mean(x, eps, ab_t, ab_prev)  # 4. mu_theta(x_t, t)
        if i + 1 < len(levels):  # 3. z = 0 on the last step
            x = x + math.sqrt(1 - ab_t / ab_prev) * noise(x)
        if callback is not None:
            callback(Step(i, t, x, x0))
    return x


@torch.inference_mode()
def sample_ddpm_x0(denoiser, x, ts, noise, callback=None):
    """Ho et al. 2020, eqs. 6-7: predict x0, then sample the posterior q(x_{t-1} | x_t, x0) (no clipping)."""
    levels = step_levels(denoiser, ts)
    for i, (t, ab_t, ab_prev) in enumerate(levels):
        eps, x0 = denoiser.predict(x, t)
        x = posterior_mean(x, x0, ab_t, ab_prev)
        if i + 1 < len(levels):
            # 7. beta~_t = (1 - ab_prev) / (1 - ab_t) * beta_t
            x = x + math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) * noise(x)
        if callback is not None:
            callback(Step(i, t, x, x0))
    return x


@torch.inference_mode()
def sample_ddim(denoiser, x, ts, noise, callback=None, eta: float = 0.0):
    """Song et al. 2021, eq. 12: DDIM, deterministic at eta = 0, DDPM-like at eta = 1."""
    levels = step_levels(denoiser, ts)
    for i, (t, ab_t, ab_prev) in enumerate(levels):
        eps, x0 = denoiser.predict(x, t)
        # 16. sigma_t(eta) = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        # 12. x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise(x)
        if callback is not None:
            callback(Step(i, t, x, x0))
    return x


@torch.inference_mode()
def sample_dpmpp_2m(denoiser, x, ts, noise, callback=None):
    """Lu et al. 2022, Algorithm 2: DPM-Solver++(2M), data prediction, first order on the first and last steps."""
    levels = step_levels(denoiser, ts)

    def lam(ab: float) -> float:  # lambda = log(alpha / sigma), half the log-SNR
        return 0.5 * (math.log(ab) - math.log1p(-ab))

    x0_prev, h_prev = None, 0.0
    for i, (t, ab_s, ab_t) in enumerate(levels):
        _, x0 = denoiser.predict(x, t)
        if i + 1 == len(levels):
            # The last step lands on sigma = 0, where the first-order update is exactly x0.
            x = x0
        else:
            h = lam(ab_t) - lam(ab_s)
            alpha_t, sigma_t, sigma_s = math.sqrt(ab_t), math.sqrt(1 - ab_t), math.sqrt(1 - ab_s)
            d = x0
            if x0_prev is not None:
                # D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i (midpoint form)
                d = x0 + 0.5 * (h / h_prev) * (x0 - x0_prev)
            # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D
            x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(Step(i, t, x, x0))
    return x


@torch.inference_mode()
def sample_consistency(denoiser, x, ts, noise, callback=None):
    """Song et al. 2023, Algorithm 1: multistep consistency sampling, for consistency-distilled models."""
    levels = step_levels(denoiser, ts)
    for i, (t, _ab_t, ab_next) in enumerate(levels):
        _, x0 = denoiser.predict(x, t)  # 3./7. x <- f_theta(x_tau, tau): the model's clean point
        x = x0
        if i + 1 < len(levels):
            # 6. x_tau = x + sqrt(tau^2 - eps^2) z, in variance-preserving form: noised afresh to the next level.
            x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * noise(x0)
        if callback is not None:
            callback(Step(i, t, x, x0))
    return x


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    description: str
    paper: str
    default_steps: int | None  # None: all T levels
    params: dict = field(default_factory=dict)  # extra parameter -> (default, low, high, description)
    stochastic: bool = True
    # False: a sampler for distilled students only (consistency), not measured on ordinary models after training
    for_diffusion_models: bool = True

    def steps_default(self, num_timesteps: int) -> int:
        return num_timesteps if self.default_steps is None else min(self.default_steps, num_timesteps)


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in [
        SamplerSpec(
            "ddpm",
            sample_ddpm,
            "Ancestral DDPM, variance beta_t (the original notebook's sampler)",
            "Ho et al. 2020, Algorithm 2",
            None,
        ),
        SamplerSpec(
            "ddpm_x0",
            sample_ddpm_x0,
            "Predict x0, then sample the posterior q(x_t-1 | x_t, x0)",
            "Ho et al. 2020, eqs. 6-7 (diffusers' DDPMScheduler)",
            None,
        ),
        SamplerSpec(
            "ddim",
            sample_ddim,
            "DDIM; deterministic at eta = 0",
            "Song et al. 2021, eq. 12",
            None,
            {"eta": (0.0, 0.0, 1.0, "stochasticity: 0 = deterministic ODE, 1 = DDPM-like")},
        ),
        SamplerSpec(
            "dpmpp_2m",
            sample_dpmpp_2m,
            "DPM-Solver++(2M): second-order multistep ODE solver for few steps",
            "Lu et al. 2022, Algorithm 2",
            10,
            stochastic=False,
        ),
        SamplerSpec(
            "consistency",
            sample_consistency,
            "Consistency multistep: x0 from the model, noised afresh to the next level (for consistency-distilled "
            "models)",
            "Song et al. 2023, Algorithm 1",
            2,
            for_diffusion_models=False,
        ),
    ]
}
DEFAULT_SAMPLER = "ddpm"  # a request naming no sampler, on a model that is not distilled


class SamplerError(ValueError):
    """Bad sampler name, steps or parameters; the message names the parameter and what is allowed."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def supported_text(denoiser: Denoiser) -> str:
    """What a distilled model serves, for error messages: 'consistency at steps 1, 2, 4'."""
    return "; ".join(f"{name} at steps {', '.join(map(str, sorted(by)))}" for name, by in denoiser.distilled.items())


def get_sampler(name: str | None, denoiser: Denoiser | None = None) -> SamplerSpec:
    """The named sampler; None: the model's default (a distilled model's own, else DEFAULT_SAMPLER). With a
    denoiser, a distilled model refuses samplers it was not made for."""
    if name is None:
        name = denoiser.default_choice[0] if denoiser is not None and denoiser.default_choice else DEFAULT_SAMPLER
    if name not in SAMPLERS:
        raise SamplerError("sampler", f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    if denoiser is not None and denoiser.distilled and name not in denoiser.distilled:
        raise SamplerError(
            "sampler", f"this model is distilled and serves only {supported_text(denoiser)}; not sampler {name!r}"
        )
    return SAMPLERS[name]


def resolve_steps(spec: SamplerSpec, steps: int | None, num_timesteps: int, denoiser: Denoiser | None = None) -> int:
    """Steps asked for, or the default: the sampler's own, or for a distilled model (given `denoiser`) its default
    setting (or the fewest steps it serves with this sampler); a distilled model refuses other step counts."""
    made = denoiser.distilled.get(spec.name) if denoiser is not None and denoiser.distilled else None
    if made is None:
        if steps is None:
            return spec.steps_default(num_timesteps)
        if not 1 <= steps <= num_timesteps:
            raise SamplerError("steps", f"steps must be in 1..{num_timesteps} for this model, got {steps}")
        return steps
    if steps is None:
        default = denoiser.default_choice
        return default[1] if default is not None and default[0] == spec.name else min(made)
    if steps not in made:
        raise SamplerError(
            "steps", f"this model is distilled and serves only {supported_text(denoiser)}; not {steps} steps"
        )
    return steps


SPACINGS = ("trailing", "tuned", "distilled")


def resolve_timesteps(spec: SamplerSpec, denoiser: Denoiser, steps: int, spacing: str | None) -> tuple[list[int], str]:
    """The levels to evaluate and the spacing that chose them. A distilled model: the levels it was made for
    ("distilled"), nothing else. Otherwise by default the checkpoint's schedule tuned for this sampler and number of
    steps when it has one (see training/timestep_search.py), else trailing spacing."""
    if denoiser.distilled:
        get_sampler(spec.name, denoiser)
        resolve_steps(spec, steps, denoiser.num_timesteps, denoiser)
        if spacing not in (None, "distilled"):
            raise SamplerError(
                "spacing", f"spacing={spacing}: this model is distilled and visits only its own levels (distilled)"
            )
        return list(denoiser.distilled[spec.name][steps]), "distilled"
    if spacing == "distilled":
        raise SamplerError("spacing", "spacing=distilled: this model is not distilled; use trailing or tuned")
    tuned = denoiser.tuned_timesteps.get(spec.name, {})
    if spacing is None:
        spacing = "tuned" if steps in tuned else "trailing"
    if spacing == "trailing":
        return timesteps(denoiser.num_timesteps, steps), spacing
    if spacing != "tuned":
        raise SamplerError("spacing", f"unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")
    if not tuned:
        raise SamplerError("spacing", f"spacing=tuned: this model has no tuned timesteps for sampler {spec.name!r}")
    if steps not in tuned:
        have = ", ".join(map(str, sorted(tuned)))
        raise SamplerError(
            "spacing",
            f"spacing=tuned: this model has tuned timesteps for sampler {spec.name!r} at steps {have}, not at {steps}",
        )
    return list(tuned[steps]), spacing


def resolve_params(spec: SamplerSpec, params: dict[str, float | None]) -> dict[str, float]:
    out = {}
    for name, value in params.items():
        if value is None:
            continue
        if name not in spec.params:
            takes = ", ".join(spec.params) or "no extra parameters"
            raise SamplerError(name, f"{name} is not a parameter of sampler {spec.name!r} (it takes {takes})")
        _, low, high, _ = spec.params[name]
        if not low <= value <= high:
            raise SamplerError(name, f"{name} must be in [{low}, {high}] for sampler {spec.name!r}, got {value}")
        out[name] = value
    return out


def sample(
    denoiser: Denoiser,
    name: str | None,
    n: int,
    generator,
    steps: int | None = None,
    callback: Callback | None = None,
    spacing: str | None = None,
    **params,
) -> torch.Tensor:
    """Validate, draw x_T from the generator, run the named sampler (None: the model's default): the one-call form
    for offline use."""
    spec = get_sampler(name, denoiser)
    steps = resolve_steps(spec, steps, denoiser.num_timesteps, denoiser)
    ts, _ = resolve_timesteps(spec, denoiser, steps, spacing)
    params = resolve_params(spec, params)
    noise = from_generator(generator)
    return spec.fn(denoiser, initial_noise(n, noise, denoiser.device), ts, noise, callback, **params)
