"""The folded network read from a checkpoint, and its fused CPU forward (diffusion/folded.py): float32 for any folded
network, bfloat16 only where that rounds no weight; close to the module's own function, and with each row's result
independent of its batch (what batching and block splits rely on)."""

import dataclasses

import pytest
import torch

from diffusion.checkpoint import load_model
from diffusion.denoiser import ROW_ALIGN
from diffusion.folded import FoldedWeights, FusedFoldedNet, cpu_has_bf16_units
from diffusion.samplers import sample
from tests.utils.checkpoints import write_tiny_checkpoint

CPU = torch.device("cpu")
needs_bf16_units = pytest.mark.skipif(not cpu_has_bf16_units(), reason="this CPU has no bf16 dot-product units")


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("bf16") / "m.pt", width=64, blocks=3, bf16_hidden=True, seed=0)
    return load_model(path, CPU)


def test_folded_weights_compute_the_checkpoints_function(bf16_model):
    weights = FoldedWeights.from_module(bf16_model.denoiser.net)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    expected = bf16_model.denoiser.net(x, torch.full((32,), 7))
    torch.testing.assert_close(weights.forward(x, 7), expected, rtol=1e-5, atol=1e-5)
    assert weights.hidden_in_bfloat16


@pytest.fixture(scope="module")
def float32_model(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("f32") / "m.pt", width=64, blocks=3, seed=1)
    return load_model(path, CPU)


def test_a_float32_network_runs_fused_in_float32_as_its_module_does(float32_model):
    denoiser = float32_model.denoiser
    assert not FoldedWeights.from_module(denoiser.net).hidden_in_bfloat16
    assert isinstance(denoiser.cpu_net, FusedFoldedNet) and denoiser.cpu_net.dtype == torch.float32
    x = torch.randn(4096, 2, generator=torch.Generator().manual_seed(2))
    for t in (0, 5, 9):
        torch.testing.assert_close(denoiser.output(x, t), denoiser.net(x, torch.full((4096,), t)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not bfloat16 values"):
        FusedFoldedNet(FoldedWeights.from_module(denoiser.net), denoiser.net, torch.bfloat16)


@needs_bf16_units
def test_bfloat16_hidden_weights_run_in_bfloat16_close_to_the_module(bf16_model):
    denoiser = bf16_model.denoiser
    assert isinstance(denoiser.cpu_net, FusedFoldedNet) and denoiser.cpu_net.dtype == torch.bfloat16
    x = torch.randn(4096, 2, generator=torch.Generator().manual_seed(2))
    for t in (0, 5, 9):
        exact = denoiser.net(x, torch.full((4096,), t))
        fast = denoiser.output(x, t)
        assert not torch.equal(fast, exact)  # the bfloat16 path ran
        # Each GEMM's input and output rounded to 8 significant bits (relative 2^-9 each) through 3 blocks: errors
        # of a few 2^-9 relative to the activations' scale; the output's scale is the reference.
        scale = exact.abs().max()
        assert (fast - exact).abs().max() <= 8 * 2**-9 * scale


@pytest.mark.parametrize("which", ["float32_model", pytest.param("bf16_model", marks=needs_bf16_units)])
def test_each_rows_result_is_independent_of_its_batch(which, request):
    denoiser = request.getfixturevalue(which).denoiser
    assert denoiser.cpu_net is not None
    x = torch.randn(9000, 2, generator=torch.Generator().manual_seed(3))
    whole = denoiser.output(x, 4)
    for start, stop in [(0, 1), (0, 17), (16, 9000), (4096, 4099), (8192, 9000), (32, 8224)]:
        assert start % ROW_ALIGN == 0
        assert torch.equal(denoiser.output(x[start:stop], 4), whole[start:stop]), (start, stop)


@needs_bf16_units
def test_the_bfloat16_path_is_deterministic_given_the_seed(bf16_model):
    a = sample(bf16_model.denoiser, "ddim", 3000, torch.Generator().manual_seed(5), 4)
    b = sample(bf16_model.denoiser, "ddim", 3000, torch.Generator().manual_seed(5), 4)
    assert torch.equal(a, b)


def test_a_copy_with_another_net_runs_that_net(bf16_model):
    other = torch.jit.script(torch.nn.Linear(2, 2))
    copy = dataclasses.replace(bf16_model.denoiser, net=lambda x, t: other(x))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(copy.output(x, 3), other(x), rtol=0, atol=0)


def test_bfloat16_or_the_fused_path_can_be_turned_off(bf16_model):
    assert load_model(bf16_model.path, CPU, "float32").denoiser.cpu_net.dtype == torch.float32
    assert load_model(bf16_model.path, CPU, "module").denoiser.cpu_net is None
    with pytest.raises(ValueError, match="valid: auto, float32, module"):
        load_model(bf16_model.path, CPU, "int8")


def test_a_conditional_network_keeps_its_module(tmp_path):
    from tests.utils.checkpoints import write_tiny_conditional_checkpoint

    assert load_model(write_tiny_conditional_checkpoint(tmp_path / "c.pt"), CPU).denoiser.cpu_net is None


def test_a_fused_path_that_fails_or_disagrees_leaves_the_model_on_its_module(float32_model, monkeypatch):
    import diffusion.folded as folded

    def broken(h, w, b):
        raise RuntimeError("no oneDNN kernel for this platform")

    monkeypatch.setattr(folded, "_linear_relu", broken)
    assert load_model(float32_model.path, CPU).denoiser.cpu_net is None
    monkeypatch.setattr(folded, "_linear_relu", lambda h, w, b: torch.nn.functional.linear(h, w, b))  # no ReLU
    assert load_model(float32_model.path, CPU).denoiser.cpu_net is None
