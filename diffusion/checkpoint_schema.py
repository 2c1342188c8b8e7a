"""The declared schema of a checkpoint's metadata.json (format_versions 1 and 2; the contract in checkpoints/README.md).

Every type problem is found here, at load, and reported in one line (`describe_error`); nothing downstream has to
re-check a type. Objects allow extra fields: newer trainers may add some (the contract says so). What depends on
the network itself (the schedule buffer, T, the tuned schedules' levels) is checked by diffusion/checkpoint.py.
"""

import json
import math
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from diffusion.denoiser import PREDICTION_TYPES

SUPPORTED_FORMAT_VERSIONS = (1, 2)
# Optional top-level objects that format_version 2 added. A file using none of them is written as version 1 (so
# older readers, and the committed default's bytes, stay as they were); a version-1 file carrying one is refused: a
# version-1 reader would ignore the object and serve the network wrongly.
V2_OBJECTS: tuple[str, ...] = ("distillation", "condition")
# Deeper nesting anywhere is refused before validation (a JSON bomb of nested arrays stays one line).
MAX_DEPTH = 64


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError("must be finite")
    return x


Finite = Annotated[float, AfterValidator(_finite)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # JSON types as declared: no "1" for 1


class DataInfo(_Open):
    mean: tuple[Finite, Finite]
    std: tuple[
        Annotated[float, Field(gt=0), AfterValidator(_finite)], Annotated[float, Field(gt=0), AfterValidator(_finite)]
    ]


class SamplerQuality(_Open):
    steps: StrictInt | None = None
    sliced_w2: Finite | None = None
    ratio_to_floor: Finite | None = None


class Quality(_Open):
    metric: str | None = None
    n: StrictInt | None = None
    floor: Finite | None = None
    samplers: dict[str, SamplerQuality] = {}


class DistilledSetting(_Open):
    # The levels the student was trained to visit, noisiest first; checked against T and the key by the loader.
    levels: list[StrictInt]
    sliced_w2: Finite | None = None
    precision: Finite | None = None
    recall: Finite | None = None


class DistilledDefault(_Open):
    sampler: str
    steps: StrictInt


class Distillation(_Open):
    """A student distilled from a teacher checkpoint (format_version 2): it is only good at what it was made for."""

    teacher: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # sha256 of the teacher's file
    method: Annotated[str, Field(min_length=1)]
    # {sampler: {steps: {levels, measured quality}}}: the only settings the model serves.
    samplers: Annotated[dict[str, dict[str, DistilledSetting]], Field(min_length=1)]
    default: DistilledDefault | None = None  # what a request naming no sampler/steps gets


class ConditionInfo(_Open):
    """format_version 2: the network is forward(x, t, c) with c a float32 [B] per-row condition."""

    name: str  # what the condition is, e.g. "position"
    range: tuple[Finite, Finite]  # [low, high] of a meaningful c
    normalization: str  # how c was derived from the data (human-readable)
    null_value: Finite  # rows whose c equals this get the learned "no condition" input (unconditional)
    dropout: Annotated[float, Field(ge=0, lt=1)]  # fraction of training rows given null_value instead of c

    @model_validator(mode="after")
    def _coherent(self):
        low, high = self.range
        if not low < high:
            raise ValueError(f"condition.range must be [low, high] with low < high, got {list(self.range)}")
        if low <= self.null_value <= high:
            raise ValueError(
                f"condition.null_value {self.null_value} must lie outside condition.range {list(self.range)}"
            )
        return self


class CheckpointMetadata(_Open):
    format_version: StrictInt
    num_timesteps: Annotated[StrictInt, Field(ge=2, le=100_000)]
    schedule: str
    prediction_type: str
    model: dict[str, Any] = {}
    data: DataInfo
    training: dict[str, Any]
    created_at: str | None = None
    # {sampler: {steps: [levels]}}; the levels are checked against T by the loader (parse_tuned_timesteps).
    tuned_timesteps: dict[str, dict[str, list[StrictInt]]] = {}
    timestep_search: dict[str, Any] = {}
    quality: Quality = Field(default_factory=Quality)
    distillation: Distillation | None = None  # format_version 2
    condition: ConditionInfo | None = None  # format_version 2

    @field_validator("format_version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(f"format_version {v} unsupported (this service reads {SUPPORTED_FORMAT_VERSIONS})")
        return v

    @field_validator("prediction_type")
    @classmethod
    def _known_prediction(cls, v: str) -> str:
        if v not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {v!r} not one of {PREDICTION_TYPES}")
        return v

    @model_validator(mode="after")
    def _v2_objects_need_v2(self):
        used = [k for k in V2_OBJECTS if k in self.model_fields_set or k in (self.model_extra or {})]
        if self.format_version < 2 and used:
            raise ValueError(
                f"format_version {self.format_version} file carries {used[0]!r}, which needs format_version 2"
            )
        return self


def format_version_for(metadata: dict) -> int:
    """What a writer declares: 1 unless the file uses an object of version 2 (older readers keep loading it)."""
    return 2 if any(k in metadata for k in V2_OBJECTS) else 1


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of decoded JSON, iteratively (no recursion), stopping once past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def describe_error(error: ValidationError) -> str:
    """The first problem, in one line: 'lacks training', 'data.std.0: Input should be greater than 0', ..."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return f"metadata.json lacks {loc}"
    if first["type"] == "model_type" and not first["loc"]:
        return f"metadata.json must be a JSON object, got {type(first['input']).__name__}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return msg
    shown = repr(first.get("input"))
    shown = shown if len(shown) <= 60 else shown[:60] + "..."
    return f"metadata.json {loc}: {msg}, got {shown}"


def parse_metadata(text: str) -> tuple[dict, CheckpointMetadata]:
    """metadata.json's text -> (the decoded object, its validated form); ValueError (one line) for anything the
    contract does not allow: not JSON, not an object, nested absurdly deep, a missing key or a wrong type."""
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"metadata.json is missing or not JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"metadata.json nests deeper than {MAX_DEPTH} levels") from None
    if depth(metadata) > MAX_DEPTH:
        raise ValueError(f"metadata.json nests deeper than {MAX_DEPTH} levels")
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata.json must be a JSON object, got {type(metadata).__name__}")
    try:
        return metadata, CheckpointMetadata.model_validate_json(text)
    except ValidationError as e:
        raise ValueError(describe_error(e)) from None
