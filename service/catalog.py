"""What the service says about its models: the samplers each supports, a summary per model, one model in full.

One source of truth for /samplers, /models, /models/{name} and /model: what a sampler supports depends on the model
(its T, its tuned schedules), so every listing is computed from the loaded model.
"""

from datetime import UTC, datetime
from pathlib import PurePath

from diffusion.checkpoint import LoadedModel
from diffusion.samplers import SAMPLERS
from service.model_repository import LoadFailure, ModelRepository, ServedModel


def _steps(model: LoadedModel, spec) -> dict:
    """The steps a sampler takes on this model: 1..T, or for a distilled model only those it was made for."""
    T, d = model.denoiser.num_timesteps, model.denoiser
    if not d.distilled:
        return {"min": 1, "max": T, "default": spec.steps_default(T)}
    made = sorted(d.distilled[spec.name])
    default = d.default_choice[1] if d.default_choice and d.default_choice[0] == spec.name else made[0]
    return {"min": made[0], "max": made[-1], "default": default, "allowed": made}


def _served_samplers(model: LoadedModel) -> list:
    return (
        [SAMPLERS[name] for name in model.denoiser.distilled] if model.denoiser.distilled else list(SAMPLERS.values())
    )


def _distilled_quality(model: LoadedModel) -> dict:
    """A distilled model's measured quality per sampler: {sampler: {steps: {levels, sliced_w2, ...}}}."""
    return model.metadata.get("distillation", {}).get("samplers", {}) if model.denoiser.distilled else {}


def samplers_of(model: LoadedModel) -> list[dict]:
    """Every sampler this model serves with its steps, tuned (or distilled) schedules, parameters and measured
    quality. A distilled model lists only what it was made for."""
    quality = model.metadata.get("quality", {}).get("samplers", {}) | _distilled_quality(model)
    tuned = model.denoiser.distilled or model.denoiser.tuned_timesteps
    return [
        {
            "name": s.name,
            "description": s.description,
            "paper": s.paper,
            "steps": _steps(model, s),
            # steps -> levels: used by default at these step counts (spacing=tuned), trailing spacing elsewhere
            "tuned_timesteps": {str(k): list(v) for k, v in sorted(tuned.get(s.name, {}).items())},
            "params": {
                k: {"default": d, "min": lo, "max": hi, "description": desc}
                for k, (d, lo, hi, desc) in s.params.items()
            },
            "stochastic": s.stochastic,
            "quality": quality.get(s.name),
        }
        for s in _served_samplers(model)
    ]


def without_paths(value):
    """Metadata as served: any absolute path (e.g. where the trainer wrote the file) reduced to its file name."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~", "\\\\")) or value[1:3] in (":\\", ":/")):
        return PurePath(value.replace("\\", "/")).name
    return value


def _when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")


def summary(served: ServedModel, default: bool) -> dict:
    """One line of /models: enough to choose a model and to see how good each sampler is on it."""
    model, meta = served.model, served.model.metadata
    quality = meta.get("quality", {})
    return {
        "name": served.name,
        "id": model.id,
        "file": model.path.name,
        "device": str(model.device),
        "default": default,
        "loaded_at": _when(served.loaded_at),
        "load_s": round(served.load_s, 3),
        "preset": meta.get("model", {}).get("preset"),
        "prediction_type": model.denoiser.prediction_type,
        "num_timesteps": model.denoiser.num_timesteps,
        "schedule": meta.get("schedule"),
        # A conditional model takes position= and guidance= on the sampling routes (the page shows sliders for it).
        "condition": (
            {k: meta["condition"][k] for k in ("name", "range", "normalization", "null_value", "dropout")}
            if model.denoiser.conditional
            else None
        ),
        "samplers": {
            s.name: {
                "steps": {k: v for k, v in _steps(model, s).items() if k != "default"},
                "tuned_steps": sorted(model.denoiser.tuned_timesteps.get(s.name, {})),
                **({"distilled_timesteps": _distilled_levels(model, s.name)} if model.denoiser.distilled else {}),
            }
            for s in _served_samplers(model)
        },
        "distillation": _distillation_summary(model),
        "quality": {
            "metric": quality.get("metric"),
            "floor": quality.get("floor"),
            "samplers": quality.get("samplers", {}),
        },
    }


def _distilled_levels(model: LoadedModel, sampler: str) -> dict:
    return {str(k): list(v) for k, v in sorted(model.denoiser.distilled[sampler].items())}


def _distillation_summary(model: LoadedModel) -> dict | None:
    """None for an ordinary model; a student's teacher, method, default setting and measured quality per setting."""
    d = model.metadata.get("distillation")
    if not model.denoiser.distilled or d is None:
        return None
    sampler, steps = model.denoiser.default_choice
    return {
        "teacher": d["teacher"],
        "teacher_file": d.get("teacher_file"),
        "method": d["method"],
        "default": {"sampler": sampler, "steps": steps},
        "samplers": _distilled_quality(model),
        "evaluation": d.get("evaluation"),
    }


def _cpu_network(model: LoadedModel) -> str | None:
    """How the network runs on CPU (diffusion/folded.py); None on another device."""
    if model.device.type != "cpu":
        return None
    fused = model.denoiser.cpu_net
    if fused is None:
        return "the checkpoint's module, float32"
    if fused.precision == "bfloat16":
        return "fused oneDNN layers in bfloat16: its hidden weights are bfloat16 values and this CPU has bf16 units"
    return "fused oneDNN layers in float32"


def failure(f: LoadFailure) -> dict:
    return {"name": f.name, "file": f.file, "reason": f.reason, "at": _when(f.at), "still_serving": f.still_serving}


def listing(models: ModelRepository) -> dict:
    """GET /models."""
    return {
        "default": models.default,
        "models": [summary(models.models[name], name == models.default) for name in models.names()],
        "failures": [failure(models.failures[name]) for name in sorted(models.failures)],
    }


def details(served: ServedModel, default: bool, threads: dict) -> dict:
    """GET /models/{name} (and /model for the default): everything, metadata included (paths reduced to names)."""
    model = served.model
    return {
        **summary(served, default),
        # torch threads, why that many (SWISSROLL_TORCH_THREADS, affinity mask or cgroup quota), how a job uses them
        "threads": threads,
        "cuda_fast_path": model.fast_path.describe() if model.fast_path is not None else None,
        "cpu_network": _cpu_network(model),
        "sampler_details": samplers_of(model),
        "metadata": without_paths(model.metadata),
    }
