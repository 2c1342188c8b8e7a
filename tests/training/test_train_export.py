import json
import zipfile

import pytest
import torch

from diffusion.checkpoint import FORMAT_VERSION, load_model
from diffusion.checkpoint import read_archive as load_checkpoint
from training.__main__ import parse_args
from training.export import export_checkpoint
from training.model import PRESETS, DenoiserMLP
from training.train import TrainConfig, train

TINY = dict(epochs=2, batch_size=256, n_samples=2000, progress=False, loss_curve=False, evaluate=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    metadata = train(TrainConfig(**{**TINY, "loss_curve": True}, out=str(out)))
    return out, metadata


def test_tiny_training_writes_a_checkpoint_that_honours_the_contract(tiny_run):
    path, metadata = tiny_run
    module, meta = load_checkpoint(path)
    assert meta == json.loads(json.dumps({"format_version": FORMAT_VERSION, **metadata}))
    x = torch.randn(5, 2)
    t = torch.tensor([0, 1, 20, 38, 39], dtype=torch.int64)
    out = module(x, t)
    assert out.shape == (5, 2) and out.dtype == torch.float32
    ab = module.alphas_cumprod
    assert ab.dtype == torch.float64 and ab.shape == (meta["num_timesteps"],)
    assert ((ab > 0) & (ab < 1)).all()
    for key in ("format_version", "num_timesteps", "schedule", "prediction_type", "data", "training", "created_at"):
        assert key in meta
    assert len(meta["data"]["mean"]) == len(meta["data"]["std"]) == 2
    assert meta["data"]["n_train"] + meta["data"]["n_val"] == 2000
    assert meta["data"]["n_val"] == 200
    assert meta["training"]["final_val_loss"] > 0 and meta["training"]["torch_version"] == torch.__version__
    assert len(meta["training"]["loss_history"]) == 2
    assert path.with_suffix(".loss.png").stat().st_size > 1000


def test_plain_torch_jit_load_reads_the_file(tiny_run):
    path, _ = tiny_run
    extra = {"metadata.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["prediction_type"] in ("epsilon", "v")
    assert module(torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64)).shape == (1, 2)


def test_training_is_deterministic_on_cpu_given_the_seed(tmp_path):
    a = train(TrainConfig(**{**TINY, "epochs": 1}, out=str(tmp_path / "a.pt"), device="cpu"))
    b = train(TrainConfig(**{**TINY, "epochs": 1}, out=str(tmp_path / "b.pt"), device="cpu"))
    assert a["training"]["loss_history"] == b["training"]["loss_history"]
    ma, _ = load_checkpoint(tmp_path / "a.pt")
    mb, _ = load_checkpoint(tmp_path / "b.pt")
    for (na, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na


def test_training_reduces_the_loss(tmp_path):
    meta = train(TrainConfig(**{**TINY, "epochs": 6, "preset": "seed"}, out=str(tmp_path / "s.pt")))
    hist = meta["training"]["loss_history"]
    assert hist[-1][0] < hist[0][0] and hist[-1][1] < 1.0


def test_seed_preset_is_the_original_architecture():
    net = DenoiserMLP(PRESETS["seed"], 40)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 64)] + [(64, 64)] * 4 + [(64, 2)]
    # Raw timestep as the third input: the output must depend on t through that one number.
    x = torch.zeros(1, 2)
    assert not torch.equal(net(x, torch.tensor([0])), net(x, torch.tensor([7])))


def test_interrupted_write_leaves_the_previous_checkpoint_intact(tiny_run, tmp_path, monkeypatch):
    path, _ = tiny_run
    target = tmp_path / "swissroll.pt"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()
    real_save = torch.jit.save

    def save_then_interrupt(module, f, _extra_files=None):
        real_save(module, f, _extra_files=_extra_files)
        f.write(b"partial")
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing

    monkeypatch.setattr(torch.jit, "save", save_then_interrupt)
    module, meta = load_checkpoint(path)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(DenoiserMLP(PRESETS["seed"], 40), module.alphas_cumprod, {"x": 1}, target)
    assert target.read_bytes() == before
    assert zipfile.is_zipfile(target)
    assert list(tmp_path.iterdir()) == [target], "the temporary file is cleaned up"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--schedule", "sigmoid"], "valid schedules: cosine, linear, quadratic"),
        (["--preset", "huge"], "valid presets: cond, default, seed"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--device", "tpu"], "invalid device"),
        (["--val-fraction", "1.5"], "val_fraction must be in (0, 1)"),
        (["--batch-size", "many"], "invalid int value"),
    ],
)
def test_cli_rejects_bad_values_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--epochs",
        "--batch-size",
        "--lr",
        "--num-timesteps",
        "--schedule",
        "--preset",
        "--seed",
        "--device",
        "--out",
    ):
        assert option in text


def test_quality_is_measured_and_stored(tmp_path):
    # A small tuning budget: the search itself is tested in test_timestep_search.py.
    budget = {"tune_restarts": 1, "tune_points": 5000, "tune_search_points": 512}
    meta = train(TrainConfig(**{**TINY, "evaluate": True, "epochs": 1, **budget}, out=str(tmp_path / "q.pt")))
    _, stored = load_checkpoint(tmp_path / "q.pt")
    quality = stored["quality"]
    assert quality == meta["quality"] and quality["metric"] == "sliced_w2"
    assert set(quality["samplers"]) == {"ddpm", "ddpm_x0", "ddim", "dpmpp_2m"}
    assert 0 < quality["floor"] < 0.05, "real-vs-real at n = 20,000"
    # One epoch on 2,000 points is a poor model: its samples must be measurably worse than the floor.
    assert all(row["ratio_to_floor"] > 1.5 for row in quality["samplers"].values())
    # Few-step schedules are tuned for this network and stored where the service reads them.
    assert stored["tuned_timesteps"] == meta["tuned_timesteps"] and set(stored["tuned_timesteps"]["dpmpp_2m"]) == {
        "5",
        "10",
    }
    assert load_model(tmp_path / "q.pt", torch.device("cpu")).denoiser.tuned_timesteps["dpmpp_2m"][10][0] == 39
    assert stored["timestep_search"]["results"]["dpmpp_2m"]["10"]["error"] > 0


@pytest.mark.parametrize("preset", ["seed", "default"])
def test_exported_network_is_the_trained_function(preset, tmp_path):
    # Export folds the time input into a per-level table: same outputs as the training-time network.
    net = DenoiserMLP(PRESETS[preset], 40)
    torch.nn.init.normal_(net.inp.weight, std=0.5)
    path = export_checkpoint(net, torch.linspace(0.99, 0.01, 40, dtype=torch.float64), {"x": 1}, tmp_path / "f.pt")
    module, _ = load_checkpoint(path)
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    for level in (0, 1, 17, 39):
        t = torch.full((500,), level)
        with torch.no_grad():
            torch.testing.assert_close(module(x, t), net(x, t), rtol=1e-5, atol=1e-5)


def test_cpu_training_uses_the_services_thread_choice(tmp_path, monkeypatch):
    # SWISSROLL_TORCH_THREADS overrides for training as for the server; the checkpoint says what was used.
    before = torch.get_num_threads()
    monkeypatch.setenv("SWISSROLL_TORCH_THREADS", "1")
    try:
        meta = train(TrainConfig(**{**TINY, "epochs": 1}, out=str(tmp_path / "t.pt"), device="cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert meta["training"]["threads"] == {"threads": 1, "source": "SWISSROLL_TORCH_THREADS=1"}
