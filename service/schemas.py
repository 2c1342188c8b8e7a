"""Query parameters of the sampling endpoints. Every parameter that costs compute has a hard bound here."""

from enum import StrEnum
from typing import Annotated, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

from diffusion.samplers import SAMPLERS, SPACINGS
from service.model_repository import NAME_PATTERN

# Named enums (not inline Literals): each is one schema in the OpenAPI document, so a generated client gets one
# type per choice (`Spacing`, `OutputFormat`), not one per parameter (`SampleSpacingType0`, `TrajectoryFormat`).
SamplerName = StrEnum("SamplerName", {name: name for name in SAMPLERS})
Spacing = StrEnum("Spacing", {name: name for name in SPACINGS})


class OutputFormat(StrEnum):
    json = "json"
    npy = "npy"


class NpyElement(StrEnum):
    float32 = "float32"
    float16 = "float16"


SAMPLE_N_MAX = 100_000
TRAJECTORY_N_MAX = 5_000
ANIMATION_N_MAX = 20_000
STEPS_MAX = 1000  # the largest T training accepts; the loaded model's own T is checked per request
SEED_MAX = 2**63 - 1
FORWARD_N_MAX = TRAJECTORY_N_MAX
FIELD_GRID_MAX = 64  # per side: at most 4,096 points per /field call
FIELD_EXTENT_MAX = 10.0
GUIDANCE_MAX = 10.0  # classifier-free guidance beyond ~5 only pushes points off the data (bench/results/conditional.md)


# The element type of format=npy responses (/trajectory, /forward).
NpyDType = Annotated[
    NpyElement,
    Field(
        description="element type of format=npy: float16 halves the bytes (resolution ~0.001 at unit scale, as fine "
        "as the JSON's 3 decimals); ignored for json",
        examples=["float32", "float16"],
    ),
]


class ModelChoice(BaseModel):
    # Unknown query parameters are errors, not silently ignored typos.
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="a served model's name (see /models); omitted: the default model",
        examples=["swissroll", "swissroll-seed"],
    )


class SamplerChoice(ModelChoice):
    sampler: SamplerName | None = Field(
        None,
        description="sampling algorithm (see /samplers); omitted: ddpm, or a distilled model's own (see /models)",
        examples=["ddpm", "dpmpp_2m"],
    )
    steps: int | None = Field(
        None,
        ge=1,
        le=STEPS_MAX,
        examples=[40, 10],
        description="denoising steps, 1..T of the model (default: the sampler's default); a distilled model serves "
        "only the step counts it was made for (see /models)",
    )
    spacing: Spacing | None = Field(
        None,
        examples=["tuned", "trailing"],
        description="which levels the steps visit: trailing (evenly spaced from T-1) or tuned (chosen for this model "
        "and sampler, see /samplers) or distilled (the levels a distilled model was made for, its only spacing); "
        "default: distilled for a distilled model, else tuned where the model has a schedule for these steps",
    )
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, examples=[0], description="random seed; omitted: one is drawn and returned"
    )
    eta: float | None = Field(None, ge=0.0, le=1.0, examples=[0.0], description="ddim only: 0 = deterministic")
    position: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        examples=[0.25],
        description="conditional models only (see /models): where on the roll, 0 = inner end, 1 = outer end; "
        "omitted: unconditional sampling",
    )
    guidance: float = Field(
        1.0,
        ge=0.0,
        le=GUIDANCE_MAX,
        allow_inf_nan=False,
        examples=[1.0, 3.0],
        description="classifier-free guidance scale, with position: 1 = the plain conditional model, 0 = "
        "unconditional, > 1 sharper (and less diverse)",
    )


class SampleParams(SamplerChoice):
    n: int = Field(1000, ge=1, le=SAMPLE_N_MAX, description="number of points", examples=[10000])
    format: OutputFormat = Field(
        "json", description="json, or npy for a float32 [n, 2] array", examples=["json", "npy"]
    )


class TrajectoryParams(SamplerChoice):
    n: int = Field(500, ge=1, le=TRAJECTORY_N_MAX, description="number of points per frame", examples=[2000])
    include_x0: bool = Field(False, description="also return each step's predicted clean points", examples=[True])
    format: OutputFormat = Field(
        "json",
        description="json, or npy: float32 [steps + 1, n, 2] (frames), or [2, steps + 1, n, 2] with include_x0 "
        "([1][k] = x0 predicted from frame k, NaN for the last frame); levels in the X-Timesteps header",
        examples=["json", "npy"],
    )
    dtype: NpyDType = NpyElement.float32


class AnimationParams(SamplerChoice):
    n: int = Field(5000, ge=1, le=ANIMATION_N_MAX, description="number of points", examples=[10000])
    fps: int = Field(10, ge=1, le=60, description="frames per second", examples=[10])
    size: int = Field(480, ge=240, le=1080, description="width and height in pixels (rounded to even)", examples=[480])
    process: Literal["forward", "reverse"] = Field(
        "reverse",
        description="reverse: the denoising of a sampling run; forward: real data noised level by level (as /forward: "
        "uses n, steps, seed; sampler, spacing and eta are refused)",
        examples=["reverse", "forward"],
    )


class ForwardParams(ModelChoice):
    n: int = Field(1000, ge=1, le=FORWARD_N_MAX, description="number of data points", examples=[2000])
    steps: int | None = Field(
        None,
        ge=1,
        le=STEPS_MAX,
        examples=[40, 10],
        description="noising levels shown, 1..T of the model (default T: every level), ending at T-1",
    )
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, examples=[0], description="random seed; omitted: one is drawn and returned"
    )
    format: OutputFormat = Field(
        "json",
        description="json, or npy: float32 [steps + 1, n, 2] (data, then each level); levels in the X-Levels header",
        examples=["json", "npy"],
    )
    dtype: NpyDType = NpyElement.float32


class FieldParams(ModelChoice):
    t: int = Field(..., ge=0, le=STEPS_MAX - 1, description="level, 0..T-1 of the model", examples=[20])
    grid: int = Field(24, ge=2, le=FIELD_GRID_MAX, description="grid points per side", examples=[24])
    extent: float = Field(
        2.5, ge=0.1, le=FIELD_EXTENT_MAX, description="the grid spans [-extent, extent]^2 (normalized)", examples=[2.5]
    )


PARAMS_BY_PATH: dict[str, type[BaseModel]] = {
    "/samplers": ModelChoice,
    "/sample": SampleParams,
    "/trajectory": TrajectoryParams,
    "/animation": AnimationParams,
    "/forward": ForwardParams,
    "/field": FieldParams,
}


def allowed_values(path: str, name: str) -> str | None:
    """'1..100000', 'ddpm, ddim, ...' for a query parameter of a sampling endpoint, from the schema itself."""
    model = PARAMS_BY_PATH.get(path)
    field = model.model_fields.get(name) if model else None
    if field is None:
        return ", ".join(sorted(model.model_fields)) if model else None
    # A StrEnum or Literal["a", "b"], possibly optional: its strings
    annotations = [field.annotation, *getattr(field.annotation, "__args__", ())]
    enums = [a for a in annotations if isinstance(a, type) and issubclass(a, StrEnum)]
    if enums:
        return ", ".join(enums[0])
    low = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
    high = next((m.le for m in field.metadata if hasattr(m, "le")), None)
    if low is not None and high is not None:
        return f"{low}..{high}"
    args = [a for ann in annotations if get_origin(ann) is Literal for a in get_args(ann)]
    return ", ".join(args) if args and all(isinstance(a, str) for a in args) else None
