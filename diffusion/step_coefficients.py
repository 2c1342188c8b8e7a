"""Every sampler step as one linear update, so a fused GPU kernel can run any of them from a small table.

Each of our samplers (samplers.py) computes, at every step, an update that is linear in the current state x,
the network output `out`, the step's noise z and the previous step's predicted clean point x0_prev:

    x0   = p0x * x + p0o * out                        (the prediction type's inverse, at level t)
    x'   = cx * x + co * out + cz * z + cp * x0_prev

so a sampling run is fully described by its levels and one row (cx, co, cz, cp, p0x, p0o) per step. The
rows are derived here from the same float64 schedule and the same formulas as samplers.py; the unit tests
check that `run_reference` (the table applied in plain torch) reproduces every sampler. The CUDA kernel
(triton_chain.py) applies exactly this table, keeping x on chip for the whole run.

A step draws noise (in the same order as the eager sampler, so a seed gives the same z) iff its cz != 0.
"""

import math
from collections.abc import Callable, Sequence

import torch

from diffusion.denoiser import Denoiser
from diffusion.samplers import step_levels

COLUMNS = ("cx", "co", "cz", "cp", "p0x", "p0o")


def _prediction(prediction_type: str, ab_t: float) -> tuple[float, float, float, float]:
    """(pe_x, pe_o, p0x, p0o): eps = pe_x x + pe_o out and x0 = p0x x + p0o out (see Denoiser.predict)."""
    alpha, sigma = math.sqrt(ab_t), math.sqrt(1 - ab_t)
    if prediction_type == "epsilon":
        return 0.0, 1.0, 1 / alpha, -sigma / alpha
    return sigma, alpha, alpha, -sigma  # v = alpha eps - sigma x0


def _ddpm(ab_t, ab_prev, last, pred, _state, _params):
    pe_x, pe_o, _, _ = pred
    a = ab_t / ab_prev
    k = (1 - a) / math.sqrt(1 - ab_t)  # Ho et al. 2020, eq. 11
    return (1 - k * pe_x) / math.sqrt(a), -k * pe_o / math.sqrt(a), 0.0 if last else math.sqrt(1 - a), 0.0


def _ddpm_x0(ab_t, ab_prev, last, pred, _state, _params):
    _, _, p0x, p0o = pred
    a = ab_t / ab_prev
    c_x0 = math.sqrt(ab_prev) * (1 - a) / (1 - ab_t)  # Ho et al. 2020, eq. 7
    c_x = math.sqrt(a) * (1 - ab_prev) / (1 - ab_t)
    cz = 0.0 if last else math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - a))
    return c_x + c_x0 * p0x, c_x0 * p0o, cz, 0.0


def _ddim(ab_t, ab_prev, _last, pred, _state, params):
    pe_x, pe_o, p0x, p0o = pred
    sigma = params.get("eta", 0.0) * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    c_x0, c_eps = math.sqrt(ab_prev), math.sqrt(max(1 - ab_prev - sigma**2, 0.0))  # Song et al. 2021, eq. 12
    return c_x0 * p0x + c_eps * pe_x, c_x0 * p0o + c_eps * pe_o, sigma, 0.0


def _dpmpp_2m(ab_s, ab_t, last, pred, state, _params):
    _, _, p0x, p0o = pred
    if last:
        return p0x, p0o, 0.0, 0.0  # lands on sigma = 0: x = x0
    lam = lambda ab: 0.5 * (math.log(ab) - math.log1p(-ab))  # noqa: E731
    h = lam(ab_t) - lam(ab_s)
    m = 0.5 * h / state["h_prev"] if "h_prev" in state else 0.0  # D = (1 + m) x0 - m x0_prev
    state["h_prev"] = h
    ratio, e = math.sqrt(1 - ab_t) / math.sqrt(1 - ab_s), -math.sqrt(ab_t) * math.expm1(-h)
    return ratio + e * (1 + m) * p0x, e * (1 + m) * p0o, 0.0, -e * m


def _consistency(_ab_t, ab_next, _last, pred, _state, _params):
    _, _, p0x, p0o = pred
    a = math.sqrt(ab_next)  # x' = sqrt(ab_next) x0 + sqrt(1 - ab_next) z; the last step lands on ab = 1: x' = x0
    return a * p0x, a * p0o, math.sqrt(1 - ab_next), 0.0


_STEP_RULES: dict[str, Callable] = {
    "ddpm": _ddpm,
    "ddpm_x0": _ddpm_x0,
    "ddim": _ddim,
    "dpmpp_2m": _dpmpp_2m,
    "consistency": _consistency,
}


def supports(sampler: str) -> bool:
    return sampler in _STEP_RULES


def coefficient_table(denoiser: Denoiser, sampler: str, ts: Sequence[int], params: dict) -> list[tuple[float, ...]]:
    """One row (cx, co, cz, cp, p0x, p0o) per step of `sampler` over levels `ts` (noisiest first)."""
    rule, state = _STEP_RULES[sampler], {}
    levels = step_levels(denoiser, ts)
    rows = []
    for i, (_t, ab_t, ab_prev) in enumerate(levels):
        pred = _prediction(denoiser.prediction_type, ab_t)
        cx, co, cz, cp = rule(ab_t, ab_prev, i + 1 == len(levels), pred, state, params)
        rows.append((cx, co, cz, cp, pred[2], pred[3]))
    return rows


def noise_draws(table: Sequence[tuple[float, ...]]) -> int:
    return sum(1 for row in table if row[2] != 0.0)


_RUN_DRAWS: dict[tuple, int] = {}


def run_draws(denoiser: Denoiser, sampler: str, ts: Sequence[int], params: dict) -> int | None:
    """How many noise draws a run of `sampler` over `ts` makes, x_T included (None: a sampler without a table).
    Remembered per schedule, sampler, levels and parameters: a table of 40 steps takes ~30 us to build."""
    if not supports(sampler):
        return None
    key = (denoiser.alphas_cumprod, denoiser.prediction_type, sampler, tuple(ts), tuple(sorted(params.items())))
    draws = _RUN_DRAWS.get(key)
    if draws is None:
        if len(_RUN_DRAWS) >= 4096:
            _RUN_DRAWS.clear()
        draws = _RUN_DRAWS[key] = 1 + noise_draws(coefficient_table(denoiser, sampler, ts, params))
    return draws


def run_reference(
    net: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    ts: Sequence[int],
    table: Sequence[tuple[float, ...]],
    noise: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The table applied step by step in plain torch: what the fused kernel computes, for tests on CPU."""
    x0_prev = torch.zeros_like(x)
    for t, (cx, co, cz, cp, p0x, p0o) in zip(ts, table, strict=True):
        out = net(x, t)
        x0 = p0x * x + p0o * out
        x_next = cx * x + co * out + cp * x0_prev
        if cz != 0.0:
            x_next = x_next + cz * noise(x)
        x, x0_prev = x_next, x0
    return x
