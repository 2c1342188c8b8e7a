"""Samplers against exact references: the closed-form Gaussian denoiser, diffusers' schedulers, algebra."""

import threading

import pytest
import torch

from diffusion import samplers as S
from diffusion.noise import from_generator, from_sources
from diffusion.samplers import SAMPLERS, SamplerError, sample, timesteps
from diffusion.schedules import make_alphas_cumprod
from tests.diffusion.gaussian_oracle import MU, SIGMA, empirical_moments, exact_moments, oracle

AB40 = make_alphas_cumprod("cosine", 40)  # the service's schedule
AB1000 = make_alphas_cumprod("cosine", 1000)  # fine enough that discretization error is below sampling error
N = 100_000
# Sampling error of 100k points (per coordinate, Sigma entries <= 1): std of a mean <= sqrt(1/N) = 0.0032 and of a
# covariance entry <= sqrt((S_ii S_jj + S_ij^2) / N) <= 0.0038. Five standard errors:
MEAN_TOL, COV_TOL = 0.016, 0.02


def moment_errors(mean, cov):
    return (mean - MU).abs().max().item(), (cov - SIGMA).abs().max().item()


def assert_recovers_gaussian(points, extra_cov_tol=0.0):
    mean_err, cov_err = moment_errors(*empirical_moments(points))
    assert mean_err < MEAN_TOL, f"mean off by {mean_err:.4f}"
    assert cov_err < COV_TOL + extra_cov_tol, f"covariance off by {cov_err:.4f}"


# --- closed-form oracle -------------------------------------------------------------------------------------------


# The consistency sampler is for consistency-distilled models: on a plain denoiser it re-noises posterior means,
# which is no sampler of the data (its own test below checks it is Algorithm 1).
DIFFUSION_SAMPLERS = [name for name in SAMPLERS if name != "consistency"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_every_sampler_recovers_the_gaussian_at_full_steps(name, prediction_type):
    # T = 1000: the exact discretization error of the worst sampler here (ddpm_x0) is < 0.005, under COV_TOL.
    points = sample(oracle(AB1000, prediction_type), name, N, torch.Generator().manual_seed(0), steps=1000)
    assert points.shape == (N, 2) and points.dtype == torch.float32
    assert_recovers_gaussian(points)


# Bounds: the exact errors measured for a correct implementation (0.062, 0.0139, 0.0027, 0.0103) plus ~15%.
@pytest.mark.parametrize(
    "name, steps, bound",
    [("dpmpp_2m", 10, 0.07), ("dpmpp_2m", 20, 0.016), ("dpmpp_2m", 50, 0.0032), ("ddim", 250, 0.012)],
)
def test_fast_samplers_at_few_steps_exact_moments(name, steps, bound):
    # Deterministic samplers are affine in x_T for Gaussian data: exact output moments, no sampling noise.
    mean_err, cov_err = moment_errors(*exact_moments(SAMPLERS[name].fn, oracle(AB1000), steps))
    assert mean_err < 1e-4
    assert cov_err < bound


@pytest.mark.parametrize("name, order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_discretization_error_shrinks_at_the_solvers_order(name, order):
    errors = [moment_errors(*exact_moments(SAMPLERS[name].fn, oracle(AB1000), s))[1] for s in (10, 20, 40, 80)]
    # Doubling the steps must cut the error by about 2^order (first order: ~2, second: ~4).
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert coarse / fine > 0.7 * 2**order, errors


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_fast_samplers_on_the_service_schedule_improve_with_steps(name):
    errors = [moment_errors(*exact_moments(SAMPLERS[name].fn, oracle(AB40), s))[1] for s in (2, 5, 10, 20, 40)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_every_sampler_on_the_service_schedule(name):
    # T = 40 adds a real discretization error at the default steps: measured exactly for the deterministic
    # samplers (ddim@40 0.062, dpmpp_2m@10 0.059) and by 1M-point runs for the stochastic ones (ddpm@40 0.017,
    # ddpm_x0@40 0.11: beta-tilde ignores the x0 uncertainty, which a 40-level chain is too coarse to hide).
    discretization = {"ddpm": 0.02, "ddpm_x0": 0.12, "ddim": 0.065, "dpmpp_2m": 0.065}[name]
    points = sample(oracle(AB40), name, N, torch.Generator().manual_seed(1))
    assert_recovers_gaussian(points, extra_cov_tol=discretization)


def test_consistency_sampler_is_algorithm_1():
    # Song et al. 2023, Algorithm 1, written out: x0 = f(x, t), re-noised to the next level with the request's own
    # noise, the last x0 returned. (On a plain denoiser f is only the posterior mean, so no distribution test here:
    # re-noising means loses variance every step; the distilled model's quality is in bench/results/distillation.md.)
    d = oracle(AB40, "v")
    got = sample(d, "consistency", 100, torch.Generator().manual_seed(5), steps=3)
    noise = from_generator(torch.Generator().manual_seed(5))
    x, ts, ab = noise(torch.empty(100, 2)), timesteps(40, 3), AB40.tolist()
    for i, t in enumerate(ts):
        x0 = d.predict(x, t)[1]
        x = x0 if i + 1 == len(ts) else ab[ts[i + 1]] ** 0.5 * x0 + (1 - ab[ts[i + 1]]) ** 0.5 * noise(x0)
    assert torch.equal(got, x)


def _ddpm_without_noise(denoiser, x, ts, generator, callback=None):
    for t, ab_t, ab_prev in S.step_levels(denoiser, ts):
        eps, _ = denoiser.predict(x, t)
        x = S.ddpm_mean(x, eps, ab_t, ab_prev)
    return x


def _dpmpp_wrong_sign(denoiser, x, ts, generator, callback=None):
    import math

    levels = S.step_levels(denoiser, ts)
    x0_prev, h_prev = None, 0.0
    for i, (t, ab_s, ab_t) in enumerate(levels):
        _, x0 = denoiser.predict(x, t)
        if i + 1 == len(levels):
            return x0
        lam = lambda ab: 0.5 * (math.log(ab) - math.log1p(-ab))  # noqa: E731
        h = lam(ab_t) - lam(ab_s)
        d = x0 if x0_prev is None else x0 - 0.5 * (h / h_prev) * (x0 - x0_prev)  # sign flipped
        x = math.sqrt((1 - ab_t) / (1 - ab_s)) * x - math.sqrt(ab_t) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def test_a_wrong_sampler_fails_the_oracle():
    points = _ddpm_without_noise(
        oracle(AB1000), torch.randn(N, 2, generator=torch.Generator().manual_seed(0)), timesteps(1000, 1000), None
    )
    with pytest.raises(AssertionError, match="covariance"):
        assert_recovers_gaussian(points)
    _, cov_err = moment_errors(*exact_moments(_dpmpp_wrong_sign, oracle(AB1000), 50))
    assert cov_err > 0.0032, "the few-step bound used above must catch a broken second-order correction"


# --- algebraic identities -------------------------------------------------------------------------------------------


def test_ddpm_and_ddpm_x0_share_the_posterior_mean():
    g = torch.Generator().manual_seed(0)
    x, eps = (
        torch.randn(1000, 2, generator=g, dtype=torch.float64),
        torch.randn(1000, 2, generator=g, dtype=torch.float64),
    )
    ab = AB40.tolist()
    for t in range(40):
        ab_t, ab_prev = ab[t], ab[t - 1] if t > 0 else 1.0
        x0 = (x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
        torch.testing.assert_close(
            S.ddpm_mean(x, eps, ab_t, ab_prev), S.posterior_mean(x, x0, ab_t, ab_prev), rtol=1e-9, atol=1e-9
        )


def test_ddpm_and_ddpm_x0_differ_only_in_variance():
    # With zero noise (a batched source without a generator) both reduce to their (shared) mean path.
    d = oracle(AB40)
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    zero = from_sources([(None, 500)])
    a = S.sample_ddpm(d, x, timesteps(40, 40), zero)
    b = S.sample_ddpm_x0(d, x, timesteps(40, 40), zero)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # ...and with noise they differ: beta_t > beta-tilde_t.
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ts = timesteps(40, 40)
    a, b = S.sample_ddpm(d, x, ts, from_generator(g1)), S.sample_ddpm_x0(d, x, ts, from_generator(g2))
    assert not torch.allclose(a, b, atol=1e-3)


def test_ddim_at_eta_one_is_the_posterior_sampler():
    # Song et al. 2021: sigma(eta = 1) is the DDPM posterior std, and the DDIM update is the posterior mean.
    d = oracle(AB40)
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))
    a = S.sample_ddim(d, x, timesteps(40, 10), from_generator(torch.Generator().manual_seed(7)), eta=1.0)
    b = S.sample_ddpm_x0(d, x, timesteps(40, 10), from_generator(torch.Generator().manual_seed(7)))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --- diffusers as a step-by-step oracle -------------------------------------------------------------------------------


def _diffusers_run(scheduler, net, x, generator, step_kwargs):
    states = []
    for t in scheduler.timesteps:
        out = net(x, torch.full((x.shape[0],), int(t), dtype=torch.int64))
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
        states.append(x)
    return states


def _betas(ab: torch.Tensor) -> torch.Tensor:
    return 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])


CASES = [
    ("ddpm", 40, "DDPMScheduler", {"variance_type": "fixed_large"}, {}),
    ("ddpm_x0", 40, "DDPMScheduler", {"variance_type": "fixed_small"}, {}),
    ("ddpm_x0", 10, "DDPMScheduler", {"variance_type": "fixed_small"}, {}),
    ("ddpm_x0", 4, "DDPMScheduler", {"variance_type": "fixed_small"}, {}),
    ("ddim", 40, "DDIMScheduler", {"set_alpha_to_one": True}, {"eta": 0.0}),
    ("ddim", 10, "DDIMScheduler", {"set_alpha_to_one": True}, {"eta": 0.0}),
    ("ddim", 8, "DDIMScheduler", {"set_alpha_to_one": True}, {"eta": 0.5}),
    ("dpmpp_2m", 10, "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    ("dpmpp_2m", 5, "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    ("dpmpp_2m", 20, "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    # A tuned schedule (the committed checkpoint's for 10 steps): uneven gaps exercise the multistep ratio r.
    (
        "dpmpp_2m",
        [39, 35, 31, 26, 20, 16, 10, 5, 3, 1],
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        {},
    ),
]


# Float64 isolates the algorithm: in float32, recovering x0 from an eps-prediction at alpha_bar = 1.5e-6 cancels
# ~800x of rounding, so two correct float32 implementations already differ by ~5e-5 there. v-prediction is
# well conditioned, so it is held to 1e-5 in float32 too.
@pytest.mark.parametrize(
    "prediction_type, dtype", [("epsilon", torch.float64), ("v", torch.float64), ("v", torch.float32)]
)
@pytest.mark.parametrize("name, steps, cls, config, step_kwargs", CASES)
def test_step_for_step_agreement_with_diffusers(name, steps, cls, config, step_kwargs, prediction_type, dtype):
    diffusers = pytest.importorskip("diffusers")
    scheduler = getattr(diffusers, cls)(
        num_train_timesteps=40,
        trained_betas=_betas(AB40).numpy(),
        prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[prediction_type],
        timestep_spacing="trailing",
        **({"clip_sample": False} if cls != "DPMSolverMultistepScheduler" else {}),
        **config,
    )
    # Same alphas_cumprod, exactly: diffusers keeps them in float32, whose rounding of 1 - alpha_bar alone is
    # amplified ~800x at the last level under eps-prediction. Give it our float64 values.
    scheduler.alphas_cumprod = AB40.clone()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "lambda_t"):
        scheduler.alpha_t, scheduler.sigma_t = AB40.sqrt(), (1 - AB40).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    # steps: a number (trailing spacing) or an explicit list of levels (a tuned schedule)
    ts = steps if isinstance(steps, list) else timesteps(40, steps)
    scheduler.set_timesteps(timesteps=ts) if isinstance(steps, list) else scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == ts
    if hasattr(scheduler, "sigmas"):  # DPM-Solver recasts its sigmas to float32 in set_timesteps
        sigmas = ((1 - AB40) / AB40).sqrt()[scheduler.timesteps]
        scheduler.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    # The optimal Gaussian denoiser as the "small model": a well-trained model keeps states O(1), so float32
    # agreement to 1e-5 is meaningful (a random network's eps-prediction blows states up ~800x at t = 39).
    denoiser = oracle(AB40, prediction_type)
    net = denoiser.net
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(11), dtype=dtype)
    ours = []
    with torch.no_grad():
        theirs = _diffusers_run(scheduler, net, x_T, torch.Generator().manual_seed(4), step_kwargs)
    SAMPLERS[name].fn(
        denoiser,
        x_T,
        ts,
        from_generator(torch.Generator().manual_seed(4)),
        lambda s: ours.append(s.x),
        **{k: v for k, v in step_kwargs.items() if k == "eta" and name == "ddim"},
    )
    assert len(ours) == len(theirs) == len(ts)
    worst = max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))
    assert worst < 1e-5, f"max step difference {worst:.2e}"


# --- shape, determinism, isolation, validation ---------------------------------------------------------------------


def test_trailing_timesteps():
    assert timesteps(40, 40) == list(range(39, -1, -1))
    assert timesteps(40, 4) == [39, 29, 19, 9]
    assert timesteps(40, 1) == [39]
    for steps in range(1, 41):
        ts = timesteps(40, steps)
        assert ts[0] == 39 and len(set(ts)) == steps and ts == sorted(ts, reverse=True) and ts[-1] >= 0


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_sees_every_step(name):
    d = oracle(AB40)
    seen = []
    steps = 7
    out = sample(d, name, 50, torch.Generator().manual_seed(0), steps, callback=seen.append)
    assert [s.i for s in seen] == list(range(steps))
    assert [s.t for s in seen] == timesteps(40, steps)
    assert torch.equal(seen[-1].x, out)
    assert all(s.x.shape == s.x0.shape == (50, 2) for s in seen)
    assert d.net.calls == steps, "one network evaluation per step"


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_points(name):
    d = oracle(AB40)
    a = sample(d, name, 1000, torch.Generator().manual_seed(42))
    b = sample(d, name, 1000, torch.Generator().manual_seed(42))
    c = sample(d, name, 1000, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_interleaved_requests_are_isolated():
    d = oracle(AB40)
    alone = {seed: sample(d, "ddpm", 500, torch.Generator().manual_seed(seed)) for seed in (1, 2)}
    results, barrier = {}, threading.Barrier(2)

    def run(seed):
        def lockstep(_step):
            barrier.wait(timeout=10)  # forces the two requests' steps to alternate

        results[seed] = sample(d, "ddpm", 500, torch.Generator().manual_seed(seed), callback=lockstep)

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for seed in (1, 2):
        assert torch.equal(results[seed], alone[seed])
    state = torch.get_rng_state()
    sample(d, "ddpm", 10, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state()), "samplers never touch the global RNG"


def test_batched_noise_sources_match_separate_requests():
    x = torch.cat(
        [
            torch.randn(3, 2, generator=torch.Generator().manual_seed(1)),
            torch.randn(5, 2, generator=torch.Generator().manual_seed(2)),
        ]
    )
    noise = from_sources([(torch.Generator().manual_seed(1), 3), (torch.Generator().manual_seed(2), 5)])(x)
    padded = from_sources([(torch.Generator().manual_seed(1), 3), (None, 2), (torch.Generator().manual_seed(2), 5)])(
        torch.empty(10, 2)
    )
    assert torch.equal(padded[3:5], torch.zeros(2, 2)) and torch.equal(padded[5:], x[3:])
    torch.testing.assert_close(noise, x)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(SamplerError, match="valid samplers: ddpm, ddpm_x0, ddim, dpmpp_2m") as e:
        sample(oracle(AB40), "euler", 10, torch.Generator())
    assert e.value.param == "sampler"


@pytest.mark.parametrize("steps", [0, 41, -3])
def test_steps_out_of_range_names_the_range(steps):
    with pytest.raises(SamplerError, match=r"steps must be in 1\.\.40") as e:
        sample(oracle(AB40), "ddim", 10, torch.Generator(), steps)
    assert e.value.param == "steps"


def test_eta_only_for_ddim_and_bounded():
    with pytest.raises(SamplerError, match="eta is not a parameter of sampler 'ddpm'"):
        sample(oracle(AB40), "ddpm", 10, torch.Generator(), eta=0.5)
    with pytest.raises(SamplerError, match=r"eta must be in \[0.0, 1.0\]"):
        sample(oracle(AB40), "ddim", 10, torch.Generator(), eta=1.5)


def test_default_steps():
    assert SAMPLERS["ddpm"].steps_default(40) == 40
    assert SAMPLERS["ddim"].steps_default(40) == 40
    assert SAMPLERS["dpmpp_2m"].steps_default(40) == 10
    assert SAMPLERS["dpmpp_2m"].steps_default(6) == 6
