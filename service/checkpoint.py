"""Loads a checkpoint file and checks it honours the contract in checkpoints/README.md."""

import hashlib
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.checkpoint_schema import parse_metadata
from service.denoiser import Denoiser
from service.samplers import SAMPLERS


class CheckpointError(Exception):
    """The file cannot be served; str() is one line naming the file and the problem."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"checkpoint {path}: {problem}")


@dataclass(frozen=True)
class LoadedModel:
    denoiser: Denoiser
    metadata: dict
    id: str  # sha256 of the file: names the exact weights in responses, ETags and logs
    path: Path
    device: torch.device
    fast_path: Any = None  # cuda_fast_path.CudaFastPath on CUDA (set by the app at start-up), else None


@contextmanager
def quiet_jit():
    """torch 2.13 deprecates TorchScript (pointing to torch.export); it still works and is our format."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when available), cpu, cuda or cuda:N; ValueError for anything else or CUDA that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found" if not path.exists() else "not a regular file")
    extra = {"metadata.json": ""}
    try:
        with quiet_jit():
            net = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as e:  # torch raises RuntimeError/ValueError/zip errors for damaged files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"not a readable TorchScript archive (truncated or corrupt?): {first_line}") from e
    try:
        metadata, checked = parse_metadata(extra["metadata.json"])  # every type, one schema
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    alphas_cumprod = _check_schedule(path, net, checked.num_timesteps)
    _check_forward(path, net, len(alphas_cumprod), device)
    try:
        tuned = parse_tuned_timesteps(checked.tuned_timesteps, len(alphas_cumprod))
    except ValueError as e:
        raise CheckpointError(path, str(e)) from e
    denoiser = Denoiser(net, alphas_cumprod, checked.prediction_type, device, tuned)
    return LoadedModel(denoiser, metadata, _sha256(path), path, device)


def _check_schedule(path: Path, net, num_timesteps: int) -> tuple[float, ...]:
    ab = getattr(net, "alphas_cumprod", None)
    if not isinstance(ab, torch.Tensor):
        raise CheckpointError(path, "module has no alphas_cumprod buffer")
    if ab.dtype != torch.float64 or ab.dim() != 1 or ab.numel() != num_timesteps:
        raise CheckpointError(
            path, f"alphas_cumprod must be float64 of shape [{num_timesteps}], got {ab.dtype} {list(ab.shape)}"
        )
    values = tuple(ab.cpu().tolist())
    if not all(0 < v < 1 and math.isfinite(v) for v in values):
        raise CheckpointError(path, "alphas_cumprod must lie in (0, 1)")
    if any(b >= a for a, b in zip(values, values[1:], strict=False)):
        raise CheckpointError(path, "alphas_cumprod must be strictly decreasing")
    return values


def parse_tuned_timesteps(tuned, num_timesteps: int) -> dict[str, dict[int, tuple[int, ...]]]:
    """{"dpmpp_2m": {"10": [39, ...]}} -> {"dpmpp_2m": {10: (39, ...)}}, or ValueError. Each list must be a valid
    schedule for the model: T-1 first (x_T is pure noise), strictly decreasing, within 0..T-1, as long as its key
    says. Schedules for samplers this service does not have are skipped (a newer trainer may know more)."""
    if not isinstance(tuned, dict):
        raise ValueError("tuned_timesteps must be an object {sampler: {steps: [levels]}}")
    out: dict[str, dict[int, tuple[int, ...]]] = {}
    for sampler, by_steps in tuned.items():
        if sampler not in SAMPLERS:
            continue
        if not isinstance(by_steps, dict):
            raise ValueError(f"tuned_timesteps[{sampler!r}] must be an object {{steps: [levels]}}")
        for steps, levels in by_steps.items():
            ok = (
                isinstance(levels, list)
                and all(type(t) is int for t in levels)
                and str(len(levels)) == steps
                and levels[:1] == [num_timesteps - 1]
                and levels[-1] >= 0
                and all(a > b for a, b in zip(levels, levels[1:], strict=False))
            )
            if not ok:
                raise ValueError(
                    f"tuned_timesteps[{sampler!r}][{steps!r}] must list {steps} levels, strictly decreasing from "
                    f"{num_timesteps - 1} to >= 0, got {levels!r}"
                )
            out.setdefault(sampler, {})[int(steps)] = tuple(levels)
    return out


def _check_forward(path: Path, net, num_timesteps: int, device: torch.device) -> None:
    x = torch.zeros(3, 2, device=device)
    t = torch.tensor([0, num_timesteps // 2, num_timesteps - 1], dtype=torch.int64, device=device)
    try:
        with torch.inference_mode():
            out = net(x, t)
    except Exception as e:
        raise CheckpointError(
            path,
            f"forward(x [B, 2] float32, t [B] int64) failed: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
        ) from e
    if not isinstance(out, torch.Tensor) or out.shape != (3, 2) or out.dtype != torch.float32:
        raise CheckpointError(path, f"forward must return a float32 [B, 2] tensor, got {getattr(out, 'shape', out)}")
    if not torch.isfinite(out).all():
        raise CheckpointError(path, "forward returned non-finite values")
