"""The CUDA fast paths' maths, checked on CPU: the per-step coefficient table (what the fused kernel applies)
reproduces every sampler, the pre-drawn noise is the eager samplers' noise, and the plain-torch network the
graphs capture is the checkpoint's function. The CUDA-only parts are checked by scripts/cuda_check.py."""

import os

import pytest
import torch
from pydantic import ValidationError

from diffusion.checkpoint import load_model
from diffusion.folded import FoldedWeights
from diffusion.noise import Tape, from_generator, initial_noise
from diffusion.samplers import SAMPLERS, timesteps
from diffusion.step_coefficients import coefficient_table, noise_draws, run_reference
from service.cuda_fast_path import CudaFastPath, TorchNet, draw_noise
from service.settings import Settings
from service.triton_chain import available

CASES = [
    ("ddpm", 40, {}),
    ("ddpm", 7, {}),
    ("ddpm_x0", 40, {}),
    ("ddpm_x0", 5, {}),
    ("ddim", 10, {}),
    ("ddim", 10, {"eta": 0.7}),
    ("dpmpp_2m", 10, {}),
    ("dpmpp_2m", 2, {}),
    ("dpmpp_2m", 1, {}),
    ("consistency", 4, {}),
    ("consistency", 1, {}),
]


@pytest.fixture(scope="module")
def model():
    return load_model("checkpoints/swissroll.pt", torch.device("cpu"))


def eager(model, name, ts, params, seed, n):
    g = torch.Generator().manual_seed(seed)
    noise = from_generator(g)
    return SAMPLERS[name].fn(model.denoiser, initial_noise(n, noise, "cpu"), ts, noise, None, **params)


def net_at(model):
    return lambda x, t: model.denoiser.net(x, torch.full((x.shape[0],), t, dtype=torch.int64))


@pytest.mark.parametrize(("name", "steps", "params"), CASES)
def test_coefficient_table_reproduces_each_sampler(model, name, steps, params):
    ts = timesteps(model.denoiser.num_timesteps, steps)
    table = coefficient_table(model.denoiser, name, ts, params)
    g = torch.Generator().manual_seed(3)
    x = initial_noise(2000, from_generator(g), "cpu")
    got = run_reference(net_at(model), x, ts, table, lambda like: torch.randn(like.shape, generator=g))
    want = eager(model, name, ts, params, 3, 2000)
    # Same maths, other float association: differences are rounding, amplified at most ~100x over 40 steps.
    assert (got - want).abs().max().item() < 2e-4
    assert noise_draws(table) == (0 if name == "dpmpp_2m" or (name == "ddim" and not params) else steps - 1)


def test_coefficients_for_an_epsilon_model_too(model):
    # The committed model predicts v; an epsilon model uses the other inverse. A made-up epsilon "network"
    # (any function works: the table must reproduce the sampler for every network).
    import dataclasses

    eps_denoiser = dataclasses.replace(
        model.denoiser, net=lambda x, t: torch.tanh(x * 0.5 + t[:, None] * 0.01), prediction_type="epsilon"
    )
    ts = timesteps(40, 12)
    for name in ("ddpm", "ddpm_x0", "ddim", "dpmpp_2m"):
        table = coefficient_table(eps_denoiser, name, ts, {})
        g1 = torch.Generator().manual_seed(1)
        x = initial_noise(500, from_generator(g1), "cpu")
        net = lambda x, t: eps_denoiser.net(x, torch.full((x.shape[0],), t))  # noqa: E731
        got = run_reference(net, x, ts, table, lambda like: torch.randn(like.shape, generator=g1))  # noqa: B023
        g = torch.Generator().manual_seed(1)
        noise = from_generator(g)
        want = SAMPLERS[name].fn(eps_denoiser, initial_noise(500, noise, "cpu"), ts, noise, None)
        # An epsilon model's x0 = (x - sigma eps) / alpha scales rounding by 1 / alpha: compare relatively.
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5, name


@pytest.fixture(scope="module")
def fast(model):
    """The CUDA fast path's eager mode runs on CPU too: its noise handling is checked here, bit for bit."""
    return CudaFastPath(model.id, model.denoiser, None, "fp32", "eager")


def test_one_noise_block_per_request_whatever_its_batch(model):
    sources = [(torch.Generator().manual_seed(1), 300), (None, 4), (torch.Generator().manual_seed(2), 200)]
    drawn = draw_noise(sources, 39, "cpu")
    assert drawn.shape == (40, 504, 2) and torch.equal(drawn[:, 300:304], torch.zeros(40, 4, 2))
    assert torch.equal(drawn[:, :300], torch.randn((40, 300, 2), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(drawn[:, 304:], draw_noise([(torch.Generator().manual_seed(2), 200)], 39, "cpu"))


@pytest.mark.parametrize(("name", "steps", "params"), CASES)
def test_fast_path_rows_do_not_depend_on_batch_mates(fast, name, steps, params):
    ts, spec = timesteps(40, steps), SAMPLERS[name]
    alone = fast.sample(spec, ts, params, [(torch.Generator().manual_seed(7), 200)])
    batched = fast.sample(
        spec, ts, params, [(torch.Generator().manual_seed(3), 100), (None, 12), (torch.Generator().manual_seed(7), 200)]
    )
    assert torch.equal(batched[112:], alone)
    assert fast.noise_slots(spec, ts, params) == noise_draws(coefficient_table(fast.denoiser, name, ts, params))


def test_trajectory_ends_where_the_sample_does(fast):
    ts, spec = timesteps(40, 40), SAMPLERS["ddpm"]
    frames = []
    noise, denoiser = fast.eager_state(spec, ts, {}, [(torch.Generator().manual_seed(4), 300)])
    x = initial_noise(300, noise, "cpu")
    out = spec.fn(denoiser, x, ts, noise, lambda step: frames.append(step.x), **{})
    assert torch.equal(out, fast.sample(spec, ts, {}, [(torch.Generator().manual_seed(4), 300)]))
    assert len(frames) == 40 and torch.equal(frames[-1], out)


@pytest.mark.parametrize(("name", "steps", "params"), [c for c in CASES if c[0] != "dpmpp_2m"])
def test_a_padded_static_buffer_replays_the_same_run(fast, name, steps, params):
    """What a captured graph sees: the request's block copied into a bucket-sized static buffer, consumed
    through a noise Tape. On CPU (aligned rows) the result is the unpadded run's, exactly."""
    ts, spec = timesteps(40, steps), SAMPLERS[name]
    drawn = draw_noise([(torch.Generator().manual_seed(5), 1000)], fast.noise_slots(spec, ts, params), "cpu")
    xz = torch.full((drawn.shape[0], 1024, 2), float("nan"))
    xz[:, :1000] = drawn
    xz[0, 1000:] = 0.0
    out = spec.fn(fast.denoiser, xz[0], ts, Tape(xz[1:]), None, **params)
    assert torch.equal(out[:1000], fast.sample(spec, ts, params, [(torch.Generator().manual_seed(5), 1000)]))


def test_folded_weights_compute_the_checkpoint(model):
    weights = FoldedWeights.from_module(model.denoiser.net)
    assert weights is not None and weights.width == 64 and weights.depth == 4 and weights.residual
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model.denoiser.net(x, t)
        assert torch.allclose(TorchNet(weights, torch.float32)(x, t), want, atol=1e-5)
        assert torch.allclose(TorchNet(weights, torch.bfloat16)(x, t), want, atol=0.1)  # bf16: ~3 digits


def test_modules_of_another_shape_are_not_fused():
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

        def forward(self, x, t):
            return self.net(x)

    assert FoldedWeights.from_module(torch.jit.script(Other())) is None


@pytest.mark.skipif(not available(), reason="Triton not installed (the CUDA image has it; CI does not)")
def test_triton_kernel_in_the_interpreter(model, monkeypatch):
    """The fused kernel's code, run by Triton's CPU interpreter on a few rows (slow, so small)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernel on CPU")
    from service.triton_chain import launch

    weights = FoldedWeights.from_module(model.denoiser.net)
    for name, steps, params in [("ddpm", 6, {}), ("dpmpp_2m", 4, {}), ("ddim", 5, {"eta": 0.5})]:
        ts = timesteps(40, steps)
        table = coefficient_table(model.denoiser, name, ts, params)
        slots, k = [], 0
        for row in table:
            slots.append(k if row[2] else -1)
            k += bool(row[2])
        g = torch.Generator().manual_seed(3)
        x = initial_noise(70, from_generator(g), "cpu")
        noise = torch.stack([torch.randn((70, 2), generator=g) for _ in range(max(k, 1))])
        as_i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
        got = launch(weights, x, noise, as_i32(ts), as_i32(slots), torch.tensor(table), "fp32")
        assert (got - eager(model, name, ts, params, 3, 70)).abs().max().item() < 2e-4, name


@pytest.mark.parametrize(
    ("name", "value"),
    [("cuda_kernel", "cudnn"), ("cuda_precision", "fp16"), ("cuda_graph_mb", -1), ("cpu_network", "bf16")],
)
def test_cuda_settings_are_validated(name, value):
    with pytest.raises(ValidationError, match=name):
        Settings(**{name: value})


def test_fused_kernel_refuses_what_it_cannot_compute(model):
    import dataclasses

    other = dataclasses.replace(model.denoiser, net=torch.jit.script(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="kernel=fused needs"):
        CudaFastPath(model.id, other, None, "fp32", "fused")
    assert CudaFastPath(model.id, other, None, "fp32", "auto").kernel == "eager"  # no graph cache given


def test_the_fused_kernel_takes_power_of_two_widths_from_16():
    from service.triton_chain import fits

    def folded(width: int) -> FoldedWeights:
        z = torch.zeros
        return FoldedWeights(z(2, width), z(4, width), z(1, width, width), z(1, width), z(width, 2), z(2), True)

    assert [fits(folded(w)) for w in (8, 16, 48, 64, 128)] == [False, True, False, True, True]
