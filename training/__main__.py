"""python -m training: train a denoiser on the Swiss roll and write the checkpoint."""

import argparse
import sys
from dataclasses import fields

from diffusion.schedules import SCHEDULES
from training.model import PRESETS
from training.train import TrainConfig, train

HELP = {
    "preset": f"network preset: {', '.join(sorted(PRESETS))}",
    "epochs": "passes over the training split",
    "batch_size": "points per optimizer step",
    "lr": "Adam learning rate (decays linearly to lr * final_lr_fraction)",
    "final_lr_fraction": "learning rate at the end, as a fraction of --lr",
    "condition_dropout": "conditional presets (cond): fraction of training rows given the null condition",
    "ema_decay": "exponential moving average of weights (0 = off); the average is what gets exported",
    "num_timesteps": "number of noise levels T (the sampler's maximum number of steps)",
    "schedule": f"noise schedule: {', '.join(sorted(SCHEDULES))}",
    "n_samples": "Swiss roll points generated (train + validation)",
    "data_noise": "noise of make_swiss_roll",
    "val_fraction": "fraction held out for validation",
    "data_seed": "seed of the data set",
    "seed": "seed of initialization, batching and noise (runs on CPU are deterministic given it)",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    "tune_restarts": "random starts of the timestep-schedule search after training (its cost is linear in them)",
    "tune_points": "fresh real points scoring the searched schedules",
    "tune_search_points": "noise points on which the schedule search measures each candidate's error",
    "out": "checkpoint path (written atomically); the loss curve goes next to it as .loss.png",
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name not in HELP:
            continue
        default = getattr(defaults, f.name)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(default),
            default=default,
            help=f"{HELP[f.name]} (default: %(default)s)",
        )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--no-evaluate",
        action="store_true",
        help="skip tuning few-step timestep schedules and measuring each sampler's quality (both stored in the "
        "metadata) after training",
    )
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("no_progress", "no_evaluate")}
    config = TrainConfig(**options, progress=not args.no_progress, evaluate=not args.no_evaluate)
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    return config


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    metadata = train(config)
    t = metadata["training"]
    print(
        f"wrote {config.out}: train loss {t['final_train_loss']:.4f}, validation loss {t['final_val_loss']:.4f}, "
        f"{t['seconds']:.1f} s on {t['device']}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
