"""The training loop: noise the data at random levels, regress the network's target, export the result."""

import copy
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from diffusion.checkpoint import parse_tuned_timesteps, resolve_device
from diffusion.cpus import threads_from_env
from diffusion.denoiser import Denoiser, prediction_target
from diffusion.schedules import SCHEDULES, make_alphas_cumprod
from training.conditional import NULL_POSITION, ConditionalMLP, condition_metadata
from training.conditional import flops_per_sample as conditional_flops
from training.data import SwissRoll, load_swiss_roll
from training.evaluate import fresh_real, quality_summary
from training.export import export_checkpoint
from training.model import DenoiserMLP, NetConfig, flops_per_sample, get_preset
from training.timestep_search import TUNING_SEED, tune


@dataclass
class TrainConfig:
    preset: str = "default"
    epochs: int = 100
    batch_size: int = 2048
    lr: float = 1e-3
    final_lr_fraction: float = 0.01
    ema_decay: float = 0.0  # 0 disables the exponential moving average of weights
    condition_dropout: float = 0.1  # conditional presets: fraction of rows trained with the null condition
    num_timesteps: int = 40
    schedule: str = "cosine"
    n_samples: int = 100_000
    data_noise: float = 0.5
    val_fraction: float = 0.1
    data_seed: int = 0
    seed: int = 0
    device: str = "auto"
    out: str = "checkpoints/swissroll.pt"
    loss_curve: bool = True
    evaluate: bool = True  # tune the few-step schedules, measure every sampler, store both in the metadata
    tune_restarts: int = 10  # the schedule search's random starts (its cost is linear in them)
    tune_points: int = 50_000  # fresh real points scoring the schedules' local minima
    tune_search_points: int = 8192  # noise points on which the search measures each schedule's error
    progress: bool = True
    notes: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Reject bad values before any work starts."""
        get_preset(self.preset)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid schedules: {', '.join(sorted(SCHEDULES))}")
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 < self.final_lr_fraction <= 1, f"final_lr_fraction must be in (0, 1], got {self.final_lr_fraction}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (
                0 < self.condition_dropout < 1,
                f"condition_dropout must be in (0, 1), got {self.condition_dropout}",
            ),
            (2 <= self.num_timesteps <= 1000, f"num_timesteps must be in 2..1000, got {self.num_timesteps}"),
            (self.n_samples >= 20, f"n_samples must be >= 20, got {self.n_samples}"),
            (self.data_noise >= 0, f"data_noise must be >= 0, got {self.data_noise}"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (self.tune_restarts >= 0, f"tune_restarts must be >= 0, got {self.tune_restarts}"),
            (self.tune_points >= 100, f"tune_points must be >= 100, got {self.tune_points}"),
            (self.tune_search_points >= 16, f"tune_search_points must be >= 16, got {self.tune_search_points}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        resolve_device(self.device)


def diffusion_loss(net, x0, alphas_cumprod, prediction_type, generator, c=None) -> torch.Tensor:
    t = torch.randint(0, alphas_cumprod.numel(), (x0.shape[0],), generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    alpha_bar = alphas_cumprod[t].unsqueeze(1)
    # Forward process q(x_t | x_0) = N(sqrt(alpha_bar) x_0, (1 - alpha_bar) I).
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    out = net(x_t, t) if c is None else net(x_t, t, c)
    return nn.functional.mse_loss(out, prediction_target(x0, eps, alpha_bar, prediction_type))


def drop_condition(c: torch.Tensor, rate: float, generator) -> torch.Tensor:
    """Condition dropout (Ho & Salimans 2022, Algorithm 1): each row's c becomes the null value with probability
    `rate`, so the same network learns the unconditional prediction too."""
    dropped = torch.rand(c.shape, generator=generator, device=c.device) < rate
    return torch.where(dropped, torch.full_like(c, NULL_POSITION), c)


@torch.no_grad()
def validation_loss(net, val, alphas_cumprod, prediction_type, seed: int, c=None) -> float:
    # Fixed levels and noise each epoch, so the curve shows the model changing, not the noise. A conditional
    # network is validated on the conditional task (the rows' own positions).
    generator = torch.Generator(device=val.device).manual_seed(seed)
    return diffusion_loss(net, val, alphas_cumprod, prediction_type, generator, c).item()


@dataclass
class Fitted:
    """What fit() produced: the network to export (the EMA copy if enabled) and how it got there."""

    net: nn.Module
    net_config: NetConfig
    alphas_cumprod: torch.Tensor  # float64 [T]
    data: SwissRoll
    history: list[tuple[float, float]]  # (train, validation) loss per epoch
    seconds: float
    device: torch.device
    threads: dict | None  # torch threads on CPU: how many and why (diffusion/cpus.py)


def train(config: TrainConfig) -> dict:
    """Fit, tune and measure (unless config.evaluate is off), export to config.out; return the metadata."""
    config.validate()
    fitted = fit(config)
    metadata = describe(config, fitted)
    if config.evaluate:
        metadata |= tune_and_measure(config, fitted)
    out = export_checkpoint(fitted.net, fitted.alphas_cumprod, metadata, config.out)
    if config.loss_curve:
        write_loss_curve(fitted.history, out.with_suffix(".loss.png"), config.preset)
    return metadata


def fit(config: TrainConfig) -> Fitted:
    """The training loop: Adam with a linear learning-rate decay, optional EMA of the weights."""
    device = resolve_device(config.device)
    threads = threads_from_env()
    if device.type == "cpu":
        # torch's default is one thread per host core: in a 2-CPU container on a big host most would only wait.
        torch.set_num_threads(threads.threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    data = load_swiss_roll(config.n_samples, config.data_noise, config.data_seed, config.val_fraction)
    train_x, val_x = data.train.to(device), data.val.to(device)
    alphas_cumprod64 = make_alphas_cumprod(config.schedule, config.num_timesteps)
    alphas_cumprod = alphas_cumprod64.float().to(device)

    net_config = get_preset(config.preset)
    conditional = net_config.condition_features > 0
    if conditional:
        net = ConditionalMLP(net_config, config.num_timesteps, net_config.condition_features, NULL_POSITION)
        train_c, val_c = data.train_position.to(device), data.val_position.to(device)
    else:
        net = DenoiserMLP(net_config, config.num_timesteps)
        train_c = val_c = None
    net = net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False) if config.ema_decay > 0 else None
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    batches_per_epoch = -(-train_x.shape[0] // config.batch_size)
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, 1.0, config.final_lr_fraction, total_iters=config.epochs * batches_per_epoch
    )

    history: list[tuple[float, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(config.epochs), desc="training", unit="epoch", disable=not config.progress)
    for _epoch in bar:
        net.train()
        order = torch.randperm(train_x.shape[0], generator=generator, device=device)
        epoch_loss = torch.zeros((), device=device)
        for i in range(batches_per_epoch):
            rows = order[i * config.batch_size : (i + 1) * config.batch_size]
            c = drop_condition(train_c[rows], config.condition_dropout, generator) if conditional else None
            loss = diffusion_loss(net, train_x[rows], alphas_cumprod, net_config.prediction_type, generator, c)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                with torch.no_grad():
                    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                        p_ema.lerp_(p, 1 - config.ema_decay)
            # detach(): summing the loss tensor itself would keep every batch's graph alive.
            epoch_loss += loss.detach()
        final_net = ema if ema is not None else net
        final_net.eval()
        val_loss = validation_loss(final_net, val_x, alphas_cumprod, net_config.prediction_type, config.seed + 1, val_c)
        history.append(((epoch_loss / batches_per_epoch).item(), val_loss))
        bar.set_postfix(loss=f"{history[-1][0]:.4f}", val_loss=f"{val_loss:.4f}")
    seconds = time.perf_counter() - start
    cpu_threads = threads.describe() if device.type == "cpu" else None
    return Fitted(final_net, net_config, alphas_cumprod64, data, history, seconds, device, cpu_threads)


def describe(config: TrainConfig, fitted: Fitted) -> dict:
    """The checkpoint's metadata: schedule, network, data recipe, training run (checkpoints/README.md)."""
    net_config, data, history = fitted.net_config, fitted.data, fitted.history
    conditional = net_config.condition_features > 0
    flops = (
        conditional_flops(net_config, net_config.condition_features) if conditional else flops_per_sample(net_config)
    )
    return {
        "num_timesteps": config.num_timesteps,
        "schedule": config.schedule,
        "prediction_type": net_config.prediction_type,
        "model": {
            "preset": config.preset,
            "architecture": "ConditionalMLP" if conditional else "DenoiserMLP",
            **net_config.to_dict(),
            "parameters": sum(p.numel() for p in fitted.net.parameters()),
            "flops_per_sample": flops,
        },
        **({"condition": condition_metadata(config.condition_dropout)} if conditional else {}),
        "data": {
            "source": "sklearn.datasets.make_swiss_roll, coordinates [0, 2]",
            "mean": list(data.mean),
            "std": list(data.std),
            "noise": config.data_noise,
            "n_samples": config.n_samples,
            "n_train": int(data.train.shape[0]),
            "n_val": int(data.val.shape[0]),
            "seed": config.data_seed,
        },
        "training": {
            "config": {
                k: v
                for k, v in asdict(config).items()
                if k not in ("progress", "loss_curve", "evaluate") and (conditional or k != "condition_dropout")
            },
            "final_train_loss": history[-1][0],
            "final_val_loss": history[-1][1],
            "loss_history": [[round(a, 5), round(b, 5)] for a, b in history],
            "seconds": round(fitted.seconds, 2),
            "device": str(fitted.device),
            **({"threads": fitted.threads} if fitted.threads else {}),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def tune_and_measure(config: TrainConfig, fitted: Fitted) -> dict:
    """Few-step timestep schedules chosen for this network, then every sampler's quality: metadata fields."""
    # A conditional network is tuned and measured unconditionally (null condition on every row).
    null = NULL_POSITION if fitted.net_config.condition_features > 0 else None
    denoiser = Denoiser(
        fitted.net.cpu(), tuple(fitted.alphas_cumprod.tolist()), fitted.net_config.prediction_type, null_condition=null
    )
    data = fitted.data
    # Fresh points from a seed of their own: the benchmark's and quality_summary's references stay unseen.
    real = fresh_real(config.tune_points, config.data_noise, TUNING_SEED, data.mean, data.std)
    budget = {"restarts": config.tune_restarts, "n": config.tune_search_points}
    tuned, search = tune(denoiser, real, seed=TUNING_SEED, **budget)
    denoiser = replace(denoiser, tuned_timesteps=parse_tuned_timesteps(tuned, config.num_timesteps))
    quality = quality_summary(denoiser, data.mean, data.std, config.data_noise)
    return {"tuned_timesteps": tuned, "timestep_search": search, "quality": quality}


def write_loss_curve(history: list[tuple[float, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = range(1, len(history) + 1)
    ax.plot(epochs, [h[0] for h in history], label="train")
    ax.plot(epochs, [h[1] for h in history], label="validation")
    ax.set(xlabel="epoch", ylabel="MSE", title=f"loss ({title})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
