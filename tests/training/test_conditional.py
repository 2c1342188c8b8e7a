"""The conditional network and its checkpoint contract (format_version 2, `condition`): export, loading, refusals."""

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from diffusion.checkpoint import CheckpointError, load_model, read_archive, save_checkpoint
from diffusion.denoiser import ROW_ALIGN
from diffusion.guidance import guided
from diffusion.schedules import make_alphas_cumprod
from tests.utils.checkpoints import edit_metadata, write_tiny_checkpoint
from training.conditional import NULL_POSITION, ConditionalMLP, condition_metadata
from training.data import load_swiss_roll, raw_points_at
from training.export import FoldedConditional, export_checkpoint
from training.model import NetConfig
from training.train import TrainConfig, drop_condition, train

T = 10
CONFIG = NetConfig(
    width=8, blocks=1, residual=True, time_embedding="sinusoidal", prediction_type="v", condition_features=4
)
REPO = Path(__file__).resolve().parents[2]


def tiny_net(seed=0) -> ConditionalMLP:
    torch.manual_seed(seed)
    net = ConditionalMLP(CONFIG, T, CONFIG.condition_features, NULL_POSITION)
    with torch.no_grad():
        net.null.normal_()  # trained nulls are not zero; make the folded null path carry a real value
    return net


def metadata(**overrides) -> dict:
    return {
        "num_timesteps": T,
        "schedule": "cosine",
        "prediction_type": "v",
        "data": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
        "training": {},
        "condition": condition_metadata(0.1),
        **overrides,
    }


def write(path, net=None, **overrides) -> Path:
    return export_checkpoint(net or tiny_net(), make_alphas_cumprod("cosine", T), metadata(**overrides), path)


def test_folded_export_is_the_same_function():
    net = tiny_net().eval()
    x, t = torch.randn(50, 2), torch.randint(0, T, (50,))
    c = torch.where(torch.arange(50) % 4 == 0, NULL_POSITION, torch.rand(50))
    assert torch.allclose(FoldedConditional(net, T)(x, t, c), net(x, t, c), atol=1e-6)


def test_a_conditional_checkpoint_is_version_2_and_loads(tmp_path):
    model = load_model(write(tmp_path / "c.pt"), torch.device("cpu"))
    assert model.metadata["format_version"] == 2
    assert model.metadata["condition"]["name"] == "position"
    assert model.denoiser.null_condition == NULL_POSITION
    # Without a condition it runs unconditionally (the null input on every row): every sampler works unchanged.
    eps, x0 = model.denoiser.predict(torch.zeros(5, 2), 3)
    assert eps.shape == x0.shape == (5, 2)


def test_a_file_without_a_condition_stays_version_1(tmp_path):
    # Writers use format_version 2 only for files that need it (the committed default's bytes stay as they are).
    _, meta = read_archive(write_tiny_checkpoint(tmp_path / "u.pt"))
    assert meta["format_version"] == 1


class IgnoresCondition(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, torch.full_like(c, 0.5))


class MixesRows(IgnoresCondition):  # one condition for the whole batch: requests could not share batches
    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c[:1].expand(c.shape[0]))


class IgnoresNull(IgnoresCondition):
    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, torch.where(c == -1.0, torch.full_like(c, 0.5), c))


class WantsColumn(IgnoresCondition):  # expects c as [B, 1]
    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c[:, 0])


def drop(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


@pytest.mark.parametrize(
    "wrapper, edit, problem",
    [
        (None, drop("condition"), r"forward takes a condition \(x, t, c\) but metadata.json has no condition object"),
        (
            None,
            lambda m: {**m, "format_version": 1},
            "format_version 1 file carries 'condition', which needs format_version 2",
        ),
        (None, lambda m: {**m, "condition": {**m["condition"], "null_value": 0.5}}, "null_value 0.5 must lie outside"),
        (None, lambda m: {**m, "condition": drop("range")(m["condition"])}, "lacks condition.range"),
        (None, lambda m: {**m, "condition": {**m["condition"], "dropout": 1.5}}, "condition.dropout"),
        (IgnoresCondition, None, "forward ignores the condition: c = 0.10 and c = 0.90 give the same output"),
        (MixesRows, None, r"forward mixes rows: a row's output depends on other rows' c"),
        (IgnoresNull, None, "forward ignores the null value -1.0"),
        (WantsColumn, None, r"forward\(x \[B, 2\] float32, t \[B\] int64, c \[B\] float32\) failed"),
    ],
)
def test_contract_violations_are_refused_in_one_line(tmp_path, wrapper, edit, problem):
    path = tmp_path / "c.pt"
    if wrapper is None:
        write(path)
        edit_metadata(path, edit)
    else:
        folded = FoldedConditional(tiny_net().eval(), T)
        save_checkpoint(wrapper(folded), make_alphas_cumprod("cosine", T), metadata(), path)
    with pytest.raises(CheckpointError, match=problem) as e:
        load_model(path, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_a_condition_on_an_unconditional_network_is_refused(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "u.pt")
    edit_metadata(path, lambda m: {**m, "format_version": 2, "condition": condition_metadata(0.1)})
    with pytest.raises(CheckpointError, match="declares condition 'position' but forward does not take one"):
        load_model(path, torch.device("cpu"))


def test_guided_rows_are_batch_invariant_with_a_real_network(tmp_path):
    # What batching requests with different positions needs: each request's rows, padded to a ROW_ALIGN boundary
    # as the service places them, give bit-identical predictions alone and in a batch with others.
    den = load_model(write(tmp_path / "c.pt"), torch.device("cpu")).denoiser
    g = torch.Generator().manual_seed(0)
    sizes, wheres = (5, 21, 16), (0.2, NULL_POSITION, 0.8)
    xs = [torch.randn(n, 2, generator=g) for n in sizes]
    pad = [-n % ROW_ALIGN for n in sizes]
    x = torch.cat([torch.cat([xi, xi.new_zeros(p, 2)]) for xi, p in zip(xs, pad, strict=True)])
    c = torch.cat([torch.full((n + p,), w) for n, p, w in zip(sizes, pad, wheres, strict=True)])
    for scale in (1.0, 2.5):
        together, _ = guided(den, c, scale).predict(x, 4)
        start = 0
        for xi, w, p in zip(xs, wheres, pad, strict=True):
            alone, _ = guided(den, torch.full((len(xi),), w), scale).predict(xi, 4)
            assert torch.equal(together[start : start + len(xi)], alone)
            start += len(xi) + p


def test_condition_dropout_rate():
    c = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    dropped = drop_condition(c, 0.15, torch.Generator().manual_seed(1))
    share = (dropped == NULL_POSITION).double().mean().item()
    assert abs(share - 0.15) < 5 * (0.15 * 0.85 / 100_000) ** 0.5
    kept = dropped != NULL_POSITION
    assert torch.equal(dropped[kept], c[kept])


def test_positions_come_from_the_same_draw_as_the_points():
    data = load_swiss_roll(n=2000, seed=3)
    assert data.train_position.shape == (data.train.shape[0],)
    assert data.train_position.min() >= 0 and data.train_position.max() <= 1
    # A point's angle on the (raw) spiral is its position's angle, up to the data noise.
    raw = data.train.numpy() * data.std + data.mean
    t = 1.5 * torch.pi + 3 * torch.pi * data.train_position.double().numpy()
    radius_error = abs((raw**2).sum(1) ** 0.5 - t)
    assert (radius_error < 5 * 0.5 * 2**0.5).all()
    blob = raw_points_at(10_000, 0.25, noise=0.5, seed=0)
    t = 1.5 * torch.pi * 1.5
    assert (
        abs(blob.mean(0) - [t * torch.cos(torch.tensor(t)).item(), t * torch.sin(torch.tensor(t)).item()]).max() < 0.03
    )


def test_a_tiny_conditional_training_run_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
    import training.model

    monkeypatch.setitem(training.model.PRESETS, "cond-tiny", CONFIG)
    out = tmp_path / "cond.pt"
    meta = train(
        TrainConfig(
            preset="cond-tiny",
            epochs=1,
            n_samples=600,
            batch_size=256,
            condition_dropout=0.2,
            out=str(out),
            progress=False,
            loss_curve=False,
            evaluate=False,
        )
    )
    assert meta["condition"]["dropout"] == 0.2 and meta["model"]["architecture"] == "ConditionalMLP"
    assert meta["training"]["config"]["condition_dropout"] == 0.2
    assert load_model(out, torch.device("cpu")).metadata["format_version"] == 2


def test_committed_conditional_checkpoint_loads():
    model = load_model(REPO / "checkpoints" / "swissroll-cond.pt", torch.device("cpu"))
    assert model.metadata["condition"]["name"] == "position" and model.denoiser.conditional


def test_the_fused_cuda_kernel_does_not_mistake_it_for_an_unconditional_network(tmp_path):
    # The kernel recognizes FoldedDenoiser's buffers; a conditional file must fall back to the eager/graph paths,
    # which call forward(x, t, c), instead of being computed without its condition term.
    from diffusion.folded import FoldedWeights
    from training.model import DenoiserMLP

    wide = dataclasses.replace(CONFIG, width=16)  # the kernel's smallest width
    ab = make_alphas_cumprod("cosine", T)
    cond = export_checkpoint(ConditionalMLP(wide, T, 4, NULL_POSITION), ab, metadata(), tmp_path / "c.pt")
    plain = export_checkpoint(
        DenoiserMLP(wide, T), ab, {k: v for k, v in metadata().items() if k != "condition"}, tmp_path / "u.pt"
    )
    assert FoldedWeights.from_module(load_model(cond, torch.device("cpu")).denoiser.net) is None
    assert FoldedWeights.from_module(load_model(plain, torch.device("cpu")).denoiser.net) is not None  # control
