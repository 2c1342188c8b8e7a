"""Response bodies of the API, declared for the OpenAPI contract (and the clients generated from it).

The routes do not build these models: the large bodies (10,000-point clouds, trajectories) are written by orjson
straight from numpy arrays (service/encoding.py), and validating them per request would cost more than encoding
them. The models are the declaration; tests check that what the routes send matches them (schemathesis checks
every fuzzed response, the generated-client test parses every status into them).

`extra="forbid"`: the schema says `additionalProperties: false`, so a field a route adds without declaring it
here fails those tests instead of drifting silently.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffusion.checkpoint_schema import CheckpointMetadata, DataInfo, SamplerQuality
from service.schemas import SEED_MAX, SamplerName, Spacing

MODEL_ID = "250fe3521b839d375c0a7ddf9b856cd5be1a2cca02fef2c333ac389861a56027"  # an example checkpoint id

# One point, [x, y] in the model's normalized coordinates.
Point = Annotated[list[float], Field(min_length=2, max_length=2, examples=[[0.512, -1.204]])]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description="the seed used (drawn when the request gave none)")]
ModelId = Annotated[str, Field(description="the checkpoint id: sha256 of the model file", examples=[MODEL_ID])]
ModelName = Annotated[
    str,
    Field(description="the model's name: its file stem in the models directory (see /models)", examples=["swissroll"]),
]
ElapsedMs = Annotated[float, Field(ge=0, description="compute time of this request, milliseconds")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Run(_Body):
    """What a sampling run used: every choice the server made for the request is stated."""

    n: int = Field(ge=1, description="number of points")
    sampler: SamplerName
    steps: int = Field(ge=1, description="network evaluations")
    spacing: Spacing = Field(description="which levels the steps visited")
    seed: Seed
    eta: float | None = Field(None, ge=0, le=1, description="ddim only, present when given")
    position: float | None = Field(None, ge=0, le=1, description="conditional models: present when given")
    guidance: float | None = Field(None, ge=0, description="classifier-free guidance scale, present with position")
    model: ModelId
    model_name: ModelName
    elapsed_ms: ElapsedMs


class SampleResult(Run):
    points: list[Point] = Field(description="n points, [x, y] each")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "n": 2,
                    "sampler": "dpmpp_2m",
                    "steps": 10,
                    "spacing": "tuned",
                    "seed": 7,
                    "model": MODEL_ID,
                    "model_name": "swissroll",
                    "elapsed_ms": 3.1,
                    "points": [[0.512, -1.204], [-1.033, 0.871]],
                }
            ]
        }
    )


class TrajectoryResult(Run):
    timesteps: list[int] = Field(description="the level of each step, in sampling order")
    frames: list[list[Point]] = Field(description="steps + 1 frames of n points: the initial noise, then each step")
    x0: list[list[Point]] | None = Field(
        None, description="with include_x0=true: the clean points predicted from each frame but the last"
    )


class DataRecipe(_Body):
    """How the checkpoint's training data was drawn (its metadata.data), as /forward draws real points."""

    noise: float | None = Field(description="Swiss-roll noise")
    mean: list[float] | None = Field(description="mean of the training data, [x, y]")
    std: list[float] | None = Field(description="std of the training data, [x, y]")


class ForwardResult(_Body):
    n: int = Field(ge=1)
    steps: int = Field(ge=1, description="noising levels shown")
    seed: Seed
    model: ModelId
    model_name: ModelName
    elapsed_ms: ElapsedMs
    levels: list[int] = Field(description="ascending; frames[k] is at levels[k - 1]")
    alphas_cumprod: list[float] = Field(description="alpha_bar at each level")
    data: DataRecipe
    frames: list[list[Point]] = Field(description="steps + 1 frames: the data, then each level")


class FieldResult(_Body):
    t: int = Field(ge=0, description="the level")
    grid: int = Field(ge=2)
    extent: float
    alpha_bar: float
    sigma: float = Field(description="sqrt(1 - alpha_bar); the score is -eps / sigma")
    model: ModelId
    model_name: ModelName
    elapsed_ms: ElapsedMs
    points: list[Point] = Field(description="grid^2 points: k = (xs[k % grid], ys[k // grid])")
    eps: list[Point] = Field(description="predicted noise at each point")
    x0: list[Point] = Field(description="predicted clean point at each point")


class StepsRange(_Body):
    min: int
    max: int
    default: int
    allowed: list[int] | None = Field(None, description="a distilled model: the only step counts it serves")


class SamplerParam(_Body):
    default: float
    min: float
    max: float
    description: str


class SamplerInfo(_Body):
    name: SamplerName
    description: str
    paper: str
    steps: StepsRange
    tuned_timesteps: dict[str, list[int]] = Field(
        description="steps -> levels: used by default at these step counts (spacing=tuned)",
        examples=[{"10": [39, 30, 22, 15, 10, 6, 3, 1, 0, 0]}],
    )
    params: dict[str, SamplerParam] = Field(description="extra query parameters, e.g. eta")
    stochastic: bool
    quality: SamplerQuality | None = Field(description="measured after training (metadata.quality)")


class Threads(_Body):
    threads: int = Field(ge=1)
    source: str = Field(description="why that many: SWISSROLL_TORCH_THREADS, affinity mask or cgroup quota")
    cpu_parallel: Literal["blocks", "intra_op"]


class CudaFastPathInfo(_Body):
    kernel: str
    precision: str
    graphs: dict[str, int] | None = Field(description="CUDA graph cache counters")


class ServedDataInfo(DataInfo):
    """metadata.data as training writes it: the load-time schema requires mean and std; these are also there."""

    noise: float | None = Field(None, description="Swiss-roll noise of the training data")
    source: str | None = None
    n_samples: int | None = None
    n_train: int | None = None
    n_val: int | None = None
    seed: int | None = None


class ServedMetadata(CheckpointMetadata):
    """The checkpoint's metadata.json as /model serves it (extra fields allowed: newer trainers add some)."""

    data: ServedDataInfo


class StepBounds(_Body):
    min: int
    max: int
    allowed: list[int] | None = Field(None, description="a distilled model: the only step counts it serves")


class SamplerSupport(_Body):
    steps: StepBounds
    tuned_steps: list[int] = Field(description="step counts with a tuned schedule (spacing=tuned)")
    distilled_timesteps: dict[str, list[int]] | None = Field(
        None, description="a distilled model: steps -> the levels it was trained to visit (the only ones it serves)"
    )


class DistilledChoice(_Body):
    sampler: SamplerName
    steps: int = Field(ge=1)


class DistillationSummary(_Body):
    """A few-step student (checkpoint metadata `distillation`, checkpoints/README.md)."""

    teacher: str = Field(description="sha256 of the teacher checkpoint", examples=[MODEL_ID])
    teacher_file: str | None
    method: str = Field(examples=["consistency"])
    default: DistilledChoice = Field(description="what a request naming no sampler or steps gets")
    samplers: dict[str, dict[str, dict]] = Field(
        description="sampler -> steps -> the setting's levels and measured quality (sliced_w2, precision, recall)"
    )
    evaluation: dict | None = Field(description="how the quality was measured")


class ModelQuality(_Body):
    metric: str | None
    floor: float | None = Field(description="the metric between two real samples: the best reachable")
    samplers: dict[str, SamplerQuality]


class ConditionSummary(_Body):
    """What a conditional model is conditioned on (checkpoint metadata `condition`, checkpoints/README.md)."""

    name: str = Field(examples=["position"])
    range: tuple[float, float] = Field(description="meaningful values of the condition", examples=[[0.0, 1.0]])
    normalization: str
    null_value: float = Field(description="the value its network reads as 'no condition'")
    dropout: float = Field(ge=0, lt=1, description="fraction of training rows trained without the condition")


class ModelSummary(_Body):
    """One model of /models: enough to choose one and to see how good each sampler is on it."""

    name: ModelName
    id: ModelId
    file: str = Field(description="the checkpoint's file name (never a path)", examples=["swissroll.pt"])
    device: str = Field(examples=["cpu", "cuda:0"])
    default: bool = Field(description="used when a request names no model")
    loaded_at: str = Field(
        description="when this version was loaded, ISO 8601 UTC", examples=["2026-01-01T00:00:00+00:00"]
    )
    load_s: float = Field(ge=0, description="seconds to load and check it")
    preset: str | None = Field(description="architecture preset", examples=["default", "seed"])
    prediction_type: str = Field(examples=["v", "epsilon"])
    num_timesteps: int = Field(ge=2)
    schedule: str | None = Field(examples=["cosine"])
    condition: "ConditionSummary | None" = Field(
        description="a conditional model (position= and guidance= on the sampling routes), else null"
    )
    samplers: dict[SamplerName, SamplerSupport]
    distillation: DistillationSummary | None = Field(description="a distilled few-step student, else null")
    quality: ModelQuality


class LoadFailureInfo(_Body):
    """A file in the models directory that did not load: skipped (or, for a replacement, the old version kept)."""

    name: ModelName
    file: str
    reason: str = Field(description="the one-line reason")
    at: str = Field(description="when, ISO 8601 UTC")
    still_serving: str | None = Field(description="the id of the previous version, which keeps serving; None if none")


class ModelList(_Body):
    default: ModelName
    models: list[ModelSummary]
    failures: list[LoadFailureInfo]


class ModelDetails(ModelSummary):
    """One model in full (/models/{name}; /model for the default)."""

    threads: Threads
    cuda_fast_path: CudaFastPathInfo | None
    cpu_network: str | None = Field(
        description="on CPU, how the network runs (SWISSROLL_CPU_NETWORK): fused oneDNN layers in bfloat16 (a network "
        "whose hidden weights are bfloat16 values, on a CPU with bf16 units) or in float32, or the checkpoint's own "
        "module (SWISSROLL_CPU_NETWORK=module, or a network of another layout, e.g. conditional); null on CUDA"
    )
    sampler_details: list[SamplerInfo] = Field(description="as /samplers?model=<name>")
    metadata: ServedMetadata = Field(description="the checkpoint's metadata.json, paths reduced to file names")


class Health(_Body):
    status: Literal["ok"]


class Readiness(_Body):
    status: Literal["ready", "not ready"]


class ValidationIssue(_Body):
    """One problem with the request, FastAPI's shape: `loc` ends with the parameter's name."""

    loc: list[str | int] = Field(examples=[["query", "n"]])
    msg: str = Field(
        description="what is wrong and what is allowed",
        examples=["n: Input should be less than or equal to 100000 (allowed: 1..100000)"],
    )
    type: str = Field(examples=["less_than_equal", "enum", "extra_forbidden", "repeated", "value_error"])
    input: str | None = Field(None, description="the value sent (at most 100 characters), when it was a string")


class Error(_Body):
    """Every error the service sends: a message, or (422) one issue per bad parameter."""

    detail: str | list[ValidationIssue]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"detail": "server overloaded: 2000000 points in flight, limit 2000000; retry later"},
                {
                    "detail": [
                        {
                            "type": "enum",
                            "loc": ["query", "sampler"],
                            "msg": "Input should be 'ddpm', 'ddpm_x0', 'ddim' or 'dpmpp_2m'",
                            "input": "dpm",
                        }
                    ]
                },
            ]
        }
    )
