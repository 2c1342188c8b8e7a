"""Classifier-free guidance against exact references: a labelled mixture of Gaussians with closed-form optimal
conditional and unconditional denoisers (mixture_oracle.py)."""

import pytest
import torch

from diffusion import guidance
from diffusion.denoiser import Denoiser
from diffusion.guidance import guided
from diffusion.noise import forbidden, from_generator, initial_noise
from diffusion.samplers import SAMPLERS, timesteps
from diffusion.schedules import make_alphas_cumprod
from tests.diffusion.mixture_oracle import (
    COV,
    LABELS,
    MEANS,
    NULL,
    MixtureNet,
    exact_mixture_draws,
    mixture_moments,
    nearest_component,
)

AB1000 = make_alphas_cumprod("cosine", 1000)
STEPS = 50  # dpmpp_2m on T = 1000: a deterministic sampler, so Gaussian outputs have exact moments (affine in x_T)
# dpmpp_2m@50 on one Gaussian of this repo's test oracle: covariance off by 0.0027, mean by < 1e-4 (test_samplers).
# COV here is ~10x smaller, so its discretization error is smaller still; these bounds hold with room:
EXACT_MEAN_TOL, EXACT_COV_TOL = 1e-3, 3e-3


def oracle(null_mean=None) -> Denoiser:
    return Denoiser(MixtureNet(AB1000, null_mean), tuple(AB1000.tolist()), "epsilon", null_condition=NULL)


def run(denoiser, x, noise=None):
    noise = noise or forbidden("dpmpp_2m is deterministic")
    return SAMPLERS["dpmpp_2m"].fn(denoiser, x, timesteps(denoiser.num_timesteps, STEPS), noise)


def exact_output_moments(denoiser: Denoiser, labels: torch.Tensor, scale: float):
    """Per label, the exact mean and covariance of guided sampling, when every update is affine in x (Gaussian
    conditional and null predictions): out(x_T) = A x_T + b, so three probes give b and A; mean b, covariance
    A A^T. All labels run in ONE batch with per-row conditions."""
    probes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = probes.repeat(len(labels), 1)
    out = run(guided(denoiser, labels.repeat_interleave(3), scale), x).view(len(labels), 3, 2)
    b = out[:, 0]
    a = torch.stack([out[:, 1] - b, out[:, 2] - b], dim=2)
    return b, a @ a.transpose(1, 2)


def test_w1_reproduces_each_labelled_component_exactly():
    mean, cov = exact_output_moments(oracle(), LABELS, 1.0)
    assert (mean - MEANS).abs().max() < EXACT_MEAN_TOL
    assert (cov - COV).abs().max() < EXACT_COV_TOL


N = 20_000


def test_w0_reproduces_the_mixture():
    # Every row asks for component 0; at w = 0 the condition must not matter: the samples are the whole mixture.
    den = oracle()
    noise = from_generator(torch.Generator().manual_seed(0))
    x = initial_noise(N, noise, "cpu", torch.float64)
    points = run(guided(den, torch.full((N,), LABELS[0].item()), 0.0), x)
    # Tolerances: five standard errors of each statistic at N, the standard errors taken from 400k exact draws of
    # the mixture, plus the sampler's discretization allowance (EXACT_*_TOL, as for one component).
    exact, k_exact = exact_mixture_draws(400_000, seed=1)
    centred = exact - exact.mean(0)
    mean_se = exact.std(0) / N**0.5
    cov_se = (centred[:, :, None] * centred[:, None, :]).std(0) / N**0.5
    mean, cov = mixture_moments()
    assert ((points.mean(0) - mean).abs() < 5 * mean_se + EXACT_MEAN_TOL).all(), (points.mean(0), mean)
    assert ((torch.cov(points.T) - cov).abs() < 5 * cov_se + EXACT_COV_TOL).all(), (torch.cov(points.T), cov)
    # The components' shares (classified at t = 0) against the mixture's own: a binomial standard error each.
    share = torch.bincount(nearest_component(points), minlength=3).double() / N
    expected = torch.bincount(nearest_component(exact), minlength=3).double() / len(exact)
    assert (share - expected).abs().max() < 5 * (expected * (1 - expected) / N).sqrt().max() + 0.002, share
    assert (torch.bincount(k_exact, minlength=3) / len(k_exact) - expected).abs().max() < 0.01  # classifier sane


# With a Gaussian null prediction N(m0, COV) (same covariance as the conditional N(mu_c, COV)), the guided
# prediction at every level is exactly that of N(m0 + w (mu_c - m0), COV): the scores are affine with the same
# C_t^{-1}, and uncond + w (cond - uncond) combines their means. An exact reference for any w.
NULL_MEAN = torch.tensor([0.5, -0.5], dtype=torch.float64)


def guided_errors(scale: float) -> tuple[float, float]:
    mean, cov = exact_output_moments(oracle(NULL_MEAN), LABELS, scale)
    expected = NULL_MEAN + scale * (MEANS - NULL_MEAN)
    return (mean - expected).abs().max().item(), (cov - COV).abs().max().item()


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.5, 2.0, 3.0, 5.0])
def test_guidance_moves_the_mean_exactly_as_the_formula_says(scale):
    mean_err, cov_err = guided_errors(scale)
    assert mean_err < EXACT_MEAN_TOL and cov_err < EXACT_COV_TOL, (mean_err, cov_err)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda cond, uncond, w: uncond + w * (uncond - cond),  # wrong sign
        lambda cond, uncond, w: cond + w * (cond - uncond),  # eq. 6's w used as diffusers' w (off by one)
        lambda cond, uncond, w: uncond + (w - 1) * (cond - uncond),  # the other way round
        lambda cond, uncond, w: w * cond + (1 - w) * cond,  # unconditional half ignored
        lambda cond, uncond, w: cond + w * (uncond - cond),  # halves swapped
    ],
)
def test_a_wrong_guidance_formula_fails_the_reference(monkeypatch, wrong):
    monkeypatch.setattr(guidance, "combine", wrong)
    mean_err, _ = guided_errors(2.0)
    assert mean_err > 10 * EXACT_MEAN_TOL


def test_unconditional_rows_are_unchanged_by_guidance():
    # A row with the null condition in a guided batch is the unconditional prediction, bit for bit.
    den = oracle()
    x = torch.randn(37, 2, generator=torch.Generator().manual_seed(3))
    c = torch.where(torch.arange(37) % 2 == 0, NULL, 0.5)
    eps_guided, _ = guided(den, c, 3.0).predict(x, 500)
    eps_plain, _ = den.predict(x, 500)
    assert torch.equal(eps_guided[::2], eps_plain[::2])
    assert not torch.equal(eps_guided[1::2], eps_plain[1::2])


def test_guided_rows_are_independent_of_each_other():
    # Per-row conditions: each row of a mixed batch equals the same row run alone.
    den = oracle(NULL_MEAN)
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(4))
    c = LABELS[torch.arange(40) % 3].float()
    together, _ = guided(den, c, 2.0).predict(x, 700)
    alone = torch.cat([guided(den, c[i : i + 1], 2.0).predict(x[i : i + 1], 700)[0] for i in range(40)])
    assert torch.equal(together, alone)


def test_guidance_needs_a_conditional_network_and_one_condition_per_row():
    plain = Denoiser(lambda x, t: x, tuple(AB1000.tolist()))
    with pytest.raises(ValueError, match="needs a conditional network"):
        guided(plain, torch.zeros(3))
    with pytest.raises(ValueError, match=r"condition must be \[4\]"):
        guided(oracle(), torch.zeros(3)).predict(torch.zeros(4, 2), 10)
