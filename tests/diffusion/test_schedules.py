import math

import pytest
import torch

from diffusion.schedules import MAX_BETA, SCHEDULES, make_alphas_cumprod, make_betas


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("num_timesteps", [2, 40, 1000])
def test_schedule_is_monotonic_and_in_range(name, num_timesteps):
    betas = make_betas(name, num_timesteps)
    ab = make_alphas_cumprod(name, num_timesteps)
    assert betas.dtype == ab.dtype == torch.float64
    assert ab.shape == (num_timesteps,)
    assert (betas > 0).all() and (betas <= MAX_BETA).all()
    assert (ab > 0).all() and (ab < 1).all(), "diffusers convention: every level, level 0 included, is noisy"
    assert (ab[1:] < ab[:-1]).all()


def test_cosine_matches_closed_form():
    # Nichol & Dhariwal eq. 17 with the diffusers indexing: alpha_bar_i = f(i + 1) / f(0) while uncapped.
    T, s = 40, 0.008

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    ab = make_alphas_cumprod("cosine", T)
    betas = make_betas("cosine", T)
    uncapped = betas < MAX_BETA
    assert uncapped[:-1].all() and not uncapped[-1], "only the last level hits the 0.999 cap at T = 40"
    expected = torch.tensor([f(i + 1) / f(0) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(ab[:-1], expected[:-1], rtol=1e-12, atol=0)
    assert ab[-1].item() == pytest.approx(ab[-2].item() * (1 - MAX_BETA))
    assert ab[0].item() < 1, "the original's alpha_bar_0 = 1 wasted a step; we must not"


def test_cosine_agrees_with_diffusers_squaredcos_cap_v2():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=40, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(make_alphas_cumprod("cosine", 40).float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-9)


def test_linear_and_quadratic_use_scaled_ho_range():
    b = make_betas("linear", 1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    q = make_betas("quadratic", 1000)
    assert q[0].item() == pytest.approx(1e-4) and q[-1].item() == pytest.approx(0.02)
    assert q[500] < b[500], "quadratic grows slower than linear in the middle"
    # Same total noise for a 40-level chain: the scaled range ends at 0.5.
    assert make_betas("linear", 40)[-1].item() == pytest.approx(0.5)


def test_unknown_schedule_lists_valid_ones():
    with pytest.raises(ValueError, match="cosine, linear, quadratic"):
        make_betas("sigmoid", 40)
