"""Service configuration: every field can be set from the environment as SWISSROLL_<NAME>."""

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from diffusion.folded import CPU_NETWORKS
from service.model_repository import NAME_PATTERN


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWISSROLL_", extra="forbid")

    # Every *.pt file in models_dir is a model named by its file stem (service/model_repository.py).
    models_dir: Path = Field(Path("checkpoints"), description="directory of checkpoints; each *.pt is a model")
    default_model: str = Field(
        "swissroll", pattern=NAME_PATTERN, description="the model a request without model= gets; must load at start"
    )
    # One file instead of a directory (the setting of earlier versions): a repository of that one model, named by
    # its stem and default; models_dir and default_model are then not used.
    checkpoint: Path | None = Field(None, description="serve only this checkpoint file (instead of models_dir)")
    reload_poll_s: float = Field(
        2.0, ge=0, le=3600, description="check models_dir for new, replaced or removed files this often; 0 = off"
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # 0 = one thread per CPU this process may use (affinity mask and cgroup quota, diffusion/cpus.py). One
    # sampling job at a time uses them all, so concurrent requests queue for the cores instead of oversubscribing.
    torch_threads: int = Field(0, ge=0, le=256)
    # How a CPU job uses those threads. "blocks": rows split into independent blocks, one single-threaded
    # sampler chain per thread (service/blocks.py); "intra_op": torch's own OpenMP threads inside every op, the
    # old path, kept for comparison: it collapses when another process holds a core (bench/results/contention.md).
    cpu_parallel: str = Field("blocks", pattern=r"^(blocks|intra_op)$", description="blocks or intra_op")
    max_concurrency: int = Field(1, ge=1, le=64, description="sampling jobs running at once")
    max_queue: int = Field(32, ge=0, le=10_000, description="jobs waiting for a slot; beyond it: 503")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="deadline: 503 if not started, 504 if not done")
    max_points_in_flight: int = Field(
        2_000_000, ge=1, le=100_000_000, description="points of all admitted requests together; beyond it: 503"
    )
    batching: bool = Field(True, description="merge concurrent /sample requests into shared network calls")
    max_batch_points: int = Field(100_000, ge=1, le=10_000_000, description="points per merged job")
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="how long a request waits for batch-mates")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated; when set, sampling endpoints need a Bearer key"
    )
    drain_s: float = Field(20.0, ge=0, le=600, description="graceful-shutdown time for in-flight requests")
    animation_cache_mb: int = Field(64, ge=0, le=4096)
    gzip_min_bytes: int = Field(
        1024, ge=0, le=1 << 30, description="gzip responses at least this large when the client accepts it; 0 = off"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated")
    # FastAPI's native OpenTelemetry (spans, metrics, logs through a configured provider). Off unless asked for:
    # even with no provider it looks the providers up on every request, ~4% of the event loop at 64 clients (py-spy).
    opentelemetry: bool = Field(False, description="FastAPI's native OpenTelemetry spans, metrics and logs")
    # CPU only: see diffusion/folded.py and bench/results/distillation_speed.md.
    cpu_network: str = Field(
        "auto",
        pattern="^(" + "|".join(CPU_NETWORKS) + ")$",
        description="CPU only: auto = fused oneDNN layers, in bfloat16 for bfloat16 hidden weights (swissroll-fast) "
        "on a CPU with bf16 units; float32 = fused, float32 always; module = the checkpoint's TorchScript module",
    )
    # CUDA only (ignored on CPU): see service/cuda_fast_path.py and bench/results/gpu.md.
    cuda_kernel: str = Field(
        "auto", pattern=r"^(auto|fused|graph|eager)$", description="auto: fused Triton kernel when possible, else graph"
    )
    cuda_precision: str = Field("fp32", pattern=r"^(fp32|tf32|bf16)$", description="network precision on CUDA")
    cuda_graph_mb: int = Field(2048, ge=0, le=1 << 20, description="device memory for captured CUDA graphs")
    cuda_graph_max_rows: int = Field(
        1 << 20, ge=1, le=1 << 26, description="largest run (rows, padded to a bucket) captured as a graph"
    )
    log_level: str = Field("info", pattern=r"^(debug|info|warning|error)$")
    warmup: bool = True
    # Limits of the embedded HTTP server (service/http_limits.py); a proxy in front may add tighter ones.
    max_header_bytes: int = Field(
        65_536, ge=1024, le=1 << 20, description="request line + headers of one request; beyond it: 431 and close"
    )
    max_headers: int = Field(100, ge=8, le=10_000, description="header fields per request; beyond it: 431")
    header_timeout_s: float = Field(
        10.0, gt=0, le=300, description="time to send a request's line and headers; then 408 and close"
    )
    max_connections: int = Field(
        1000, ge=1, le=1_000_000, description="open connections; beyond it a new one gets 503 and is closed"
    )

    def default_model_name(self) -> str:
        return self.checkpoint.stem if self.checkpoint is not None else self.default_model

    def default_model_path(self) -> Path:
        return self.checkpoint if self.checkpoint is not None else self.models_dir / f"{self.default_model}.pt"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value):
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        # Set but holding no key (',' or ' '): a typo that would silently turn authentication off. Refuse it.
        if isinstance(value, str):
            keys = [v.strip() for v in value.split(",") if v.strip()]
            if value and not keys:
                raise ValueError("set but holds no key (comma-separated keys expected; unset it to turn auth off)")
            return keys
        return value


def unknown_env_settings(environ: Mapping[str, str]) -> list[str]:
    """One warning per SWISSROLL_* variable that names no setting, with the closest valid name (a typo stays a
    typo otherwise: pydantic-settings ignores unknown environment variables)."""
    prefix = Settings.model_config["env_prefix"]
    valid = [prefix + name.upper() for name in Settings.model_fields]
    warnings = []
    for name in sorted(environ):
        if name.upper().startswith(prefix) and name.upper() not in valid:
            close = difflib.get_close_matches(name.upper(), valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; valid: {', '.join(valid)}"
            warnings.append(f"warning: unknown setting {name[:100]} ignored{hint}")
    return warnings
