"""Writes the checkpoint: a TorchScript module carrying its noise schedule, plus metadata.json."""

import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


class Checkpoint(nn.Module):
    """The file's contract: forward(x [B, 2] f32, t [B] i64) -> [B, 2] f32 and a float64 `alphas_cumprod` [T]."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)


@contextmanager
def quiet_jit():
    """torch 2.13 deprecates TorchScript (pointing to torch.export); it still works and is our format."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


def save_checkpoint(net: nn.Module, alphas_cumprod: torch.Tensor, metadata: dict, path: str | Path) -> Path:
    """Script and write atomically: the target is either the old file or the complete new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = Checkpoint(net.to("cpu").eval(), alphas_cumprod.cpu())
    extra = {METADATA_FILE: json.dumps({"format_version": FORMAT_VERSION, **metadata}, indent=2)}
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


def load_checkpoint(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {METADATA_FILE: ""}
    with quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[METADATA_FILE])
