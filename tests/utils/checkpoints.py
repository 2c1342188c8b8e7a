"""Test helpers shared by the test packages: a tiny checkpoint that honours the contract, and service settings."""

import json
import zipfile

import torch

from diffusion.schedules import make_alphas_cumprod
from service.settings import Settings
from training.export import export_checkpoint
from training.model import DenoiserMLP, NetConfig

TINY_T = 10
# The tiny checkpoint carries one tuned schedule, as training writes them: dpmpp_2m at 4 steps.
TINY_TUNED = [9, 6, 3, 0]


def write_tiny_checkpoint(
    path,
    prediction_type="v",
    num_timesteps=TINY_T,
    width=8,
    blocks=1,
    bf16_hidden=False,
    seed=None,
    **metadata_overrides,
):
    """A small scripted checkpoint (untrained, width 8) that honours the contract: API tests need shapes, not skill.
    bf16_hidden: its blocks' weights rounded to bfloat16 values, as a student trained so has them. seed: the weights
    from this seed, the same file whatever ran before (a tolerance then holds for one known network, not for whichever
    the run's order drew); None: from the global generator (two calls give two different models)."""
    config = NetConfig(
        width=width, blocks=blocks, residual=True, time_embedding="sinusoidal", prediction_type=prediction_type
    )
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        net = DenoiserMLP(config, num_timesteps)
    if bf16_hidden:
        with torch.no_grad():
            for block in net.blocks:
                block.linear.weight.copy_(block.linear.weight.bfloat16().float())
    metadata = {
        "num_timesteps": num_timesteps,
        "schedule": "cosine",
        "prediction_type": prediction_type,
        "model": {"preset": "tiny-test"},
        "data": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
        "training": {"final_train_loss": 1.0, "final_val_loss": 1.0},
        "created_at": "2026-01-01T00:00:00+00:00",
        "tuned_timesteps": {"dpmpp_2m": {str(len(TINY_TUNED)): TINY_TUNED}} if num_timesteps == TINY_T else {},
        **metadata_overrides,
    }
    return export_checkpoint(net, make_alphas_cumprod("cosine", num_timesteps), metadata, path)


def make_settings(checkpoint, **overrides) -> Settings:
    return Settings(checkpoint=checkpoint, device="cpu", torch_threads=1, **overrides)


def write_tiny_conditional_checkpoint(path, width=8):
    """A small conditional checkpoint (format_version 2, `condition`, forward(x, t, c)), untrained but with a
    random null input, so conditional and unconditional rows differ."""
    import torch

    from training.conditional import NULL_POSITION, ConditionalMLP, condition_metadata

    config = NetConfig(width=width, blocks=1, residual=True, time_embedding="sinusoidal", prediction_type="v")
    torch.manual_seed(0)
    net = ConditionalMLP(config, TINY_T, 4, NULL_POSITION)
    with torch.no_grad():
        net.null.normal_()
    metadata = {
        "num_timesteps": TINY_T,
        "schedule": "cosine",
        "prediction_type": "v",
        "model": {"preset": "tiny-cond-test"},
        "data": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
        "training": {},
        "condition": condition_metadata(0.3),
    }
    return export_checkpoint(net, make_alphas_cumprod("cosine", TINY_T), metadata, path)


def edit_metadata(path, edit) -> None:
    """Rewrite metadata.json inside a checkpoint archive: edit(dict) -> dict."""
    with zipfile.ZipFile(path) as z:
        items = {i.filename: z.read(i.filename) for i in z.infolist()}
    name = next(n for n in items if n.endswith("extra/metadata.json"))
    items[name] = json.dumps(edit(json.loads(items[name]))).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in items.items():
            z.writestr(n, data)
