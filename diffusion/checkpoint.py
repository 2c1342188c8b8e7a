"""The checkpoint format, both sides of it: the writer training uses and the reader the service uses.

A checkpoint is one TorchScript file: the network (forward(x [B, 2] f32, t [B] i64) -> [B, 2] f32; a conditional
one, format_version 2, takes c [B] f32 too), its float64 `alphas_cumprod` buffer, and `metadata.json` beside it in
the archive. The contract is documented in checkpoints/README.md.
"""

import hashlib
import json
import math
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion.checkpoint_schema import ConditionInfo, format_version_for, parse_metadata
from diffusion.denoiser import Denoiser
from diffusion.folded import cpu_net_for
from diffusion.samplers import SAMPLERS

# What save_checkpoint writes for a file using no version-2 object (format_version_for: a distilled or
# conditional file is 2); checkpoint_schema.SUPPORTED_FORMAT_VERSIONS is what load_model reads.
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


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


def _read(path: Path, device) -> tuple[torch.jit.ScriptModule, str]:
    """The module and the text of its metadata.json; CheckpointError if the file cannot be read at all."""
    if not path.is_file():
        raise CheckpointError(path, "file not found" if not path.exists() else "not a regular file")
    extra = {METADATA_FILE: ""}
    try:
        with quiet_jit():
            net = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as e:  # torch raises RuntimeError/ValueError/zip errors for damaged files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"not a readable TorchScript archive (truncated or corrupt?): {first_line}") from e
    return net, extra[METADATA_FILE]


def read_archive(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """The module and its metadata as stored, unchecked (for tools and tests); CheckpointError if unreadable."""
    net, text = _read(Path(path), device)
    try:
        return net, json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(Path(path), f"metadata.json is missing or not JSON ({e.msg})") from e


def load_model(path: str | Path, device: torch.device, cpu_network: str = "auto") -> LoadedModel:
    """Reads a checkpoint and checks it honours the contract: the only way a served model is loaded. cpu_network:
    what runs a folded MLP on CPU (diffusion/folded.py, CPU_NETWORKS)."""
    path = Path(path)
    net, text = _read(path, device)
    try:
        metadata, checked = parse_metadata(text)  # every type, one schema (checkpoint_schema.py)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    alphas_cumprod = _check_schedule(path, net, checked.num_timesteps)
    if _takes_condition(net) or checked.condition is not None:
        _check_conditional_forward(path, net, len(alphas_cumprod), device, checked.condition)
    else:
        _check_forward(path, net, len(alphas_cumprod), device)
    try:
        tuned = parse_tuned_timesteps(checked.tuned_timesteps, len(alphas_cumprod))
        distilled, default = parse_distillation(checked.distillation, len(alphas_cumprod))
    except ValueError as e:
        raise CheckpointError(path, str(e)) from e
    null = checked.condition.null_value if checked.condition is not None else None
    cpu_net = cpu_net_for(net, cpu_network) if device.type == "cpu" and null is None else None
    denoiser = Denoiser(net, alphas_cumprod, checked.prediction_type, device, tuned, distilled, default, null, cpu_net)
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
            ok = isinstance(levels, list) and all(type(t) is int for t in levels)
            if not (ok and _is_schedule(levels, steps, num_timesteps)):
                raise ValueError(
                    f"tuned_timesteps[{sampler!r}][{steps!r}] must list {steps} levels, strictly decreasing from "
                    f"{num_timesteps - 1} to >= 0, got {levels!r}"
                )
            out.setdefault(sampler, {})[int(steps)] = tuple(levels)
    return out


def _is_schedule(levels: list[int], steps: str, num_timesteps: int) -> bool:
    """As many levels as the `steps` key says, strictly decreasing from T-1 to >= 0: what a sampler can visit."""
    return (
        str(len(levels)) == steps
        and levels[:1] == [num_timesteps - 1]
        and levels[-1] >= 0
        and all(a > b for a, b in zip(levels, levels[1:], strict=False))
    )


def parse_distillation(distillation, num_timesteps: int) -> tuple[dict[str, dict[int, tuple[int, ...]]], tuple | None]:
    """The settings a distilled model serves, {sampler: {steps: levels}}, and its default (sampler, steps); ({}, None)
    for a model that is not distilled. ValueError (one line) when a declared setting does not match its levels (as
    many as its key says, strictly decreasing from T-1, within 0..T-1) or the default is not among them. Samplers
    this service lacks are skipped, but a student must leave at least one it can run."""
    if distillation is None:
        return {}, None
    out: dict[str, dict[int, tuple[int, ...]]] = {}
    for sampler, by_steps in distillation.samplers.items():
        for steps, setting in by_steps.items():
            levels = setting.levels
            if not (steps.isdigit() and _is_schedule(levels, steps, num_timesteps)):
                raise ValueError(
                    f"distillation.samplers[{sampler!r}][{steps!r}].levels must list {steps} levels, strictly "
                    f"decreasing from {num_timesteps - 1} to >= 0, got {levels!r}"
                )
            if sampler in SAMPLERS:
                out.setdefault(sampler, {})[int(steps)] = tuple(levels)
    if not out:
        raise ValueError(
            f"distillation declares only samplers this service lacks ({', '.join(distillation.samplers)}); "
            f"it has {', '.join(SAMPLERS)}"
        )
    if distillation.default is None:
        sampler = next(iter(out))
        return out, (sampler, min(out[sampler]))
    default = (distillation.default.sampler, distillation.default.steps)
    if default[1] not in out.get(default[0], {}):
        raise ValueError(f"distillation.default {default[0]}@{default[1]} is not one of the declared settings")
    return out, default


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


def _takes_condition(net) -> bool:
    """forward(x, t, c) rather than forward(x, t): read from the scripted method's schema (self, x, t[, c])."""
    return len(net.forward.schema.arguments) == 4


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_conditional_forward(path: Path, net, num_timesteps: int, device, condition: ConditionInfo | None) -> None:
    """A conditional network, called on conditional and null rows: one line for anything the contract forbids."""
    if condition is None:
        raise CheckpointError(path, "forward takes a condition (x, t, c) but metadata.json has no condition object")
    if not _takes_condition(net):
        raise CheckpointError(
            path, f"metadata.json declares condition {condition.name!r} but forward does not take one (x, t, c)"
        )
    low, high = condition.range
    # Four rows at the same x and t: two conditions, the null value, a third condition.
    c = torch.tensor([low + 0.1 * (high - low), low + 0.9 * (high - low), condition.null_value, (low + high) / 2])
    c = c.to(device=device, dtype=torch.float32)
    x = torch.tensor([[0.3, -0.2]], device=device).expand(4, 2).contiguous()
    t = torch.full((4,), num_timesteps // 2, dtype=torch.int64, device=device)
    try:
        with torch.inference_mode():
            out = net(x, t, c)
            alone = [net(x[i : i + 1], t[i : i + 1], c[i : i + 1]) for i in range(4)]
    except Exception as e:
        raise CheckpointError(
            path, f"forward(x [B, 2] float32, t [B] int64, c [B] float32) failed: {_first_line(e)}"
        ) from e
    if not isinstance(out, torch.Tensor) or out.shape != (4, 2) or out.dtype != torch.float32:
        raise CheckpointError(path, f"forward must return a float32 [B, 2] tensor, got {getattr(out, 'shape', out)}")
    if not torch.isfinite(out).all():
        raise CheckpointError(path, "forward returned non-finite values")
    if any(a.shape != (1, 2) or not torch.allclose(a[0], out[i], rtol=1e-4, atol=1e-5) for i, a in enumerate(alone)):
        raise CheckpointError(
            path, "forward mixes rows: a row's output depends on other rows' c (c must be per row, [B])"
        )
    if torch.equal(out[0], out[1]):
        raise CheckpointError(
            path, f"forward ignores the condition: c = {c[0]:.2f} and c = {c[1]:.2f} give the same output"
        )
    if any(torch.equal(out[2], out[i]) for i in (0, 1, 3)):
        raise CheckpointError(
            path, f"forward ignores the null value {condition.null_value}: it gives a condition's output"
        )


class Checkpoint(nn.Module):
    """The file's contract: forward(x [B, 2] f32, t [B] i64) -> [B, 2] f32 and a float64 `alphas_cumprod` [T]."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)


class ConditionalCheckpoint(nn.Module):
    """format_version 2 with a `condition` object: forward(x, t, c [B] f32), c = null_value for unconditional rows."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c)


def save_checkpoint(net: nn.Module, alphas_cumprod: torch.Tensor, metadata: dict, path: str | Path) -> Path:
    """Script and write atomically: the target is either the old file or the complete new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ConditionalCheckpoint if "condition" in metadata else Checkpoint
    module = wrapper(net.to("cpu").eval(), alphas_cumprod.cpu())
    extra = {METADATA_FILE: json.dumps({"format_version": format_version_for(metadata), **metadata}, indent=2)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with quiet_jit():
                torch.jit.save(torch.jit.script(module), f, _extra_files=extra)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; a checkpoint is meant to be read by others (e.g. a container's service user).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: drop the partial temp file, leave the previous checkpoint untouched.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
