"""HTTP routes: validate, call, serialize. Nothing here does maths."""

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from diffusion.checkpoint import LoadedModel
from diffusion.samplers import SamplerError
from service.auth import require_api_key
from service.byte_ranges import not_modified, ranged_response
from service.catalog import details, listing, samplers_of
from service.compute import ComputeGate, Timing
from service.encoding import compact, json_response, npy_response
from service.field import check_level, run_field
from service.forward import forward_plan, render_forward_animation, run_forward
from service.jobs import plan, render_animation, sample_points
from service.metrics import Metrics
from service.model_repository import ModelRepository
from service.openapi import ANY_ROUTE, COMPUTE, MP4, NPY, PROMETHEUS_TEXT, binary, errors, headers, ok
from service.query_route import QueryRoute
from service.render import even
from service.responses import (
    FieldResult,
    ForwardResult,
    Health,
    ModelDetails,
    ModelList,
    Readiness,
    SampleResult,
    SamplerInfo,
    TrajectoryResult,
)
from service.schemas import (
    AnimationParams,
    FieldParams,
    ForwardParams,
    ModelChoice,
    SampleParams,
    TrajectoryParams,
)
from service.video_cache import VideoCache, animation_key, etag


# Dependencies are `async def`: FastAPI runs a plain `def` one in the thread pool, a thread hop per request per
# dependency (a third of the event loop's time at 64 clients x n = 100, measured with py-spy).
async def get_models(request: Request) -> ModelRepository:
    return request.app.state.models


async def get_gate(request: Request) -> ComputeGate:
    return request.app.state.gate


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_video_cache(request: Request) -> VideoCache:
    return request.app.state.video_cache


Models = Annotated[ModelRepository, Depends(get_models)]
Gate = Annotated[ComputeGate, Depends(get_gate)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
Cache = Annotated[VideoCache, Depends(get_video_cache)]

router = APIRouter()


def query_get(path: str, **kwargs):
    """@router.get for an endpoint `(params: Annotated[M, Query()], request)` served by QueryRoute (the compute
    endpoints: their hot path skips FastAPI's dependency solver, see service/query_route.py)."""

    def register(endpoint):
        router.add_api_route(path, endpoint, methods=["GET"], route_class_override=QueryRoute, **kwargs)
        return endpoint

    return register


def services(request: Request) -> tuple[ModelRepository, ComputeGate, Metrics]:
    """The app's model repository, compute gate and metrics (the QueryRoute endpoints' dependencies)."""
    state = request.app.state
    return state.models, state.gate, state.metrics


# Declared so the API docs (and the schema fuzzer) know /animation reads them; ranged_response parses them.
RangeHeader = Annotated[str | None, Header(alias="Range", description="bytes=first-last, bytes=first- or bytes=-N")]
IfNoneMatch = Annotated[str | None, Header(alias="If-None-Match", description="an ETag of this URL, or *")]
IfRange = Annotated[str | None, Header(alias="If-Range", description="the ETag a Range is conditional on")]


def choose(models: ModelRepository, request: Request, name: str | None) -> LoadedModel:
    """The request's model (UnknownModel -> 422 listing the served ones). The request keeps this reference to the
    end: a reload meanwhile serves the next requests, never this one."""
    served = models.served(name)
    request.state.model = served.name  # the metrics label: a file stem, never the client's string
    return served.model


def check_condition(models: ModelRepository, model: LoadedModel, params) -> None:
    """position and guidance are for conditional models: anywhere else a 422 naming the models that take them.
    guidance=1 (its default, which generated clients send) changes nothing and is accepted everywhere."""
    asked = [n for n in ("position", "guidance") if n in params.model_fields_set and getattr(params, n) != 1.0]
    asked = ["position"] if params.position is not None else asked
    if asked and not model.denoiser.conditional:
        having = [name for name in models.names() if models.get(name).denoiser.conditional]
        raise SamplerError(
            asked[0],
            f"{asked[0]} needs a conditional model; this one has no condition. Conditional models: "
            + (", ".join(having) or "none is served"),
        )


# What every /animation video response says about itself (206 adds Content-Range).
ANIMATION_HEADERS = (
    "X-Seed",
    "X-Model",
    "X-Model-Name",
    "X-Cache",
    "ETag",
    "Accept-Ranges",
    "Cache-Control",
    "Content-Location",
)


def _record(metrics: Metrics, endpoint: str, sampler: str, n: int, timing: Timing) -> None:
    metrics.points.labels(sampler).inc(n)
    metrics.queue_wait.observe(timing.queue_s)
    metrics.compute.labels(endpoint, sampler).observe(timing.compute_s)


@query_get(
    "/sample",
    dependencies=[Depends(require_api_key)],
    summary="Sample points from the model",
    tags=["sampling"],
    response_model=None,  # declared below, not validated per request: orjson writes the arrays directly
    responses={
        **ok(
            SampleResult,
            "X-Seed",
            "X-Model",
            "X-Model-Name",
            "X-Elapsed-Ms",
            media=binary(NPY, "format=npy: float32 [n, 2], NumPy .npy"),
        ),
        **errors(*COMPUTE),
    },
)
async def sample(params: Annotated[SampleParams, Query()], request: Request) -> Response:
    models, gate, metrics = services(request)
    model = choose(models, request, params.model)
    check_condition(models, model, params)
    p = plan(model, params)
    request.state.sampler = p.spec.name
    result = await sample_points(gate, model, p, request.is_disconnected, batcher=request.app.state.batcher)
    _record(metrics, "/sample", p.spec.name, p.n, result.timing)
    elapsed_ms = round(result.timing.compute_s * 1000, 2)
    headers = {
        "X-Seed": str(p.seed),
        "X-Model": model.id,
        "X-Model-Name": request.state.model,
        "X-Elapsed-Ms": str(elapsed_ms),
    }
    if params.format == "npy":
        return npy_response(result.points, headers)
    return json_response(
        {
            **p.describe(),
            "model": model.id,
            "model_name": request.state.model,
            "elapsed_ms": elapsed_ms,
            "points": result.points,
        },
        headers=headers,
    )


@query_get(
    "/trajectory",
    dependencies=[Depends(require_api_key)],
    summary="Every intermediate state of one sampling run (for animation)",
    tags=["sampling"],
    response_model=None,
    responses={
        **ok(
            TrajectoryResult,
            "X-Seed",
            "X-Model",
            "X-Model-Name",
            "X-Elapsed-Ms",
            "X-Sampler",
            "X-Spacing",
            "X-Timesteps",
            media=binary(NPY, "format=npy: [steps + 1, n, 2], or [2, steps + 1, n, 2] with include_x0; float32/16"),
        ),
        **errors(*COMPUTE),
    },
)
async def trajectory(params: Annotated[TrajectoryParams, Query()], request: Request) -> Response:
    models, gate, metrics = services(request)
    model = choose(models, request, params.model)
    check_condition(models, model, params)
    p = plan(model, params)
    request.state.sampler = p.spec.name
    result = await sample_points(gate, model, p, request.is_disconnected, record=True, record_x0=params.include_x0)
    _record(metrics, "/trajectory", p.spec.name, p.n, result.timing)
    if params.format == "npy":
        # The JSON fields travel as headers; the body is the bare array (see TrajectoryParams.format for its shape).
        headers = {
            "X-Seed": str(p.seed),
            "X-Model": model.id,
            "X-Model-Name": request.state.model,
            "X-Elapsed-Ms": str(round(result.timing.compute_s * 1000, 2)),
            "X-Sampler": p.spec.name,
            "X-Spacing": p.spacing,
            "X-Timesteps": ",".join(map(str, p.timesteps)),
        }
        if not params.include_x0:
            return npy_response(result.frames, headers, params.dtype)
        x0 = np.concatenate([result.x0, np.full_like(result.x0[:1], np.nan)])  # no prediction from the last frame
        return npy_response(np.stack([result.frames, x0]), headers, params.dtype)
    payload = {
        **p.describe(),
        "model": model.id,
        "model_name": request.state.model,
        "elapsed_ms": round(result.timing.compute_s * 1000, 2),
        "timesteps": p.timesteps,
        "frames": compact(result.frames),
    }
    if params.include_x0:
        payload["x0"] = compact(result.x0)
    return json_response(
        payload, headers={"X-Seed": str(p.seed), "X-Model": model.id, "X-Model-Name": request.state.model}
    )


@router.get(
    "/animation",
    dependencies=[Depends(require_api_key)],
    summary="MP4 (H.264) of one sampling run's denoising, seekable (Range requests)",
    tags=["sampling"],
    response_class=Response,
    responses={
        **ok(
            None,
            *ANIMATION_HEADERS,
            description="the whole video",
            media=binary(MP4, "H.264 MP4, faststart"),
        ),
        206: {
            "description": "the requested byte range (Range)",
            "content": binary(MP4, "bytes first..last of the video"),
            "headers": headers(*ANIMATION_HEADERS, "Content-Range"),
        },
        304: {
            "description": "not modified (If-None-Match)",
            "headers": headers("X-Seed", "X-Model", "X-Model-Name", "ETag", "Cache-Control"),
        },
        **errors(416, *COMPUTE),
    },
)
async def animation(
    params: Annotated[AnimationParams, Query()],
    request: Request,
    models: Models,
    gate: Gate,
    metrics: MetricsDep,
    cache: Cache,
    _range: RangeHeader = None,
    _if_none_match: IfNoneMatch = None,
    _if_range: IfRange = None,
) -> Response:
    model = choose(models, request, params.model)
    size = even(params.size)
    if params.process == "forward":
        for name in ("sampler", "spacing", "eta", "position", "guidance"):
            if name in params.model_fields_set:  # a sampling parameter with nothing to sample: say so, don't ignore it
                raise SamplerError(name, f"{name} does not apply to process=forward (it uses n, steps and seed)")
        fp = forward_plan(model, params.n, params.steps, params.seed)
        request.state.sampler = "forward"
        key = animation_key(model.id, "forward", fp.levels, fp.seed, fp.n, params.fps, size)
        seed = fp.seed
    else:
        check_condition(models, model, params)
        p = plan(model, params)
        request.state.sampler = p.spec.name
        # The position is a per-row input, not part of Plan.key() (requests at different positions batch together),
        # but it is part of what a video shows.
        computation = p.key() if p.position is None else (*p.key(), ("position", p.position))
        key = animation_key(model.id, "reverse", computation, p.seed, p.n, params.fps, size)
        seed = p.seed
    tag = etag(key)
    headers = {"X-Seed": str(seed), "X-Model": model.id, "X-Model-Name": request.state.model}
    if not_modified(request, None):  # "If-None-Match: *": this URL always has a representation; no need to render
        return Response(status_code=304, headers=headers if params.seed is not None else {})
    if params.seed is None:
        # A drawn seed makes this URL's content differ per request: point at the reproducible one, never cache.
        headers["Content-Location"] = f"{request.url.path}?{request.url.query}&seed={seed}".replace("?&", "?")
        headers["Cache-Control"] = "no-store"
    else:
        headers["Cache-Control"] = "public, max-age=86400, immutable"  # deterministic given all parameters
        if not_modified(request, tag):
            return Response(status_code=304, headers={**headers, "ETag": tag})

    async def render() -> bytes:
        if params.process == "forward":
            data, timing = await render_forward_animation(gate, model, fp, size, params.fps, request.is_disconnected)
            _record(metrics, "/animation", "forward", fp.n, timing)
            return data
        data, timing = await render_animation(gate, model, p, size, params.fps, request.is_disconnected)
        _record(metrics, "/animation", p.spec.name, p.n, timing)
        return data

    data, cached = await cache.get_or_render(key, render)
    headers["X-Cache"] = "hit" if cached else "miss"
    return ranged_response(request, data, "video/mp4", tag, headers)


@query_get(
    "/forward",
    dependencies=[Depends(require_api_key)],
    summary="The forward (noising) process on real data: frames from the data to noise, with the model's schedule",
    tags=["explain"],
    response_model=None,
    responses={
        **ok(
            ForwardResult,
            "X-Seed",
            "X-Model",
            "X-Model-Name",
            "X-Elapsed-Ms",
            "X-Levels",
            media=binary(NPY, "format=npy: [steps + 1, n, 2] (data, then each level); float32/16"),
        ),
        **errors(*COMPUTE),
    },
)
async def forward(params: Annotated[ForwardParams, Query()], request: Request) -> Response:
    models, gate, metrics = services(request)
    model = choose(models, request, params.model)
    p = forward_plan(model, params.n, params.steps, params.seed)
    request.state.sampler = "forward"
    frames, timing = await run_forward(gate, model, p, request.is_disconnected)
    _record(metrics, "/forward", "forward", p.n, timing)
    elapsed_ms = round(timing.compute_s * 1000, 2)
    headers = {
        "X-Seed": str(p.seed),
        "X-Model": model.id,
        "X-Model-Name": request.state.model,
        "X-Elapsed-Ms": str(elapsed_ms),
    }
    if params.format == "npy":
        return npy_response(frames, {**headers, "X-Levels": ",".join(map(str, p.levels))}, params.dtype)
    ab = model.denoiser.alphas_cumprod
    payload = {
        **p.describe(),
        "model": model.id,
        "model_name": request.state.model,
        "elapsed_ms": elapsed_ms,
        "levels": list(p.levels),  # frames[k] is at levels[k - 1]; frames[0] is the data
        "alphas_cumprod": [round(ab[t], 8) for t in p.levels],
        "data": {k: model.metadata.get("data", {}).get(k) for k in ("noise", "mean", "std")},
        "frames": compact(frames),
    }
    return json_response(payload, headers=headers)


@query_get(
    "/field",
    dependencies=[Depends(require_api_key)],
    summary="The learned field at one level: predicted noise and clean point on a regular grid (quiver plots)",
    tags=["explain"],
    response_model=None,
    responses={**ok(FieldResult, "X-Model", "X-Model-Name"), **errors(*COMPUTE)},
)
async def field(params: Annotated[FieldParams, Query()], request: Request) -> Response:
    models, gate, metrics = services(request)
    model = choose(models, request, params.model)
    t = check_level(model, params.t)
    request.state.sampler = "field"
    f, timing = await run_field(gate, model, t, params.grid, params.extent, request.is_disconnected)
    _record(metrics, "/field", "field", params.grid**2, timing)
    ab = model.denoiser.alphas_cumprod[t]
    payload = {
        "t": t,
        "grid": params.grid,
        "extent": params.extent,
        "alpha_bar": ab,
        "sigma": (1 - ab) ** 0.5,  # score = -eps / sigma
        "model": model.id,
        "model_name": request.state.model,
        "elapsed_ms": round(timing.compute_s * 1000, 2),
        "points": f.points,  # point k = (xs[k % grid], ys[k // grid]), xs = ys = linspace(-extent, extent, grid)
        "eps": f.eps,
        "x0": f.x0,
    }
    return json_response(payload, headers={"X-Model": model.id, "X-Model-Name": request.state.model})


@router.get(
    "/samplers",
    summary="The samplers a model offers (default: the default model), with their steps, schedules and parameters",
    tags=["model"],
    response_model=None,
    responses={**ok(list[SamplerInfo]), **errors(*ANY_ROUTE)},
)
async def samplers(params: Annotated[ModelChoice, Query()], request: Request, models: Models) -> list[dict]:
    return samplers_of(choose(models, request, params.model))


# Behind the key when keys are set: the training environment (torch and Python versions, device) is not for
# anonymous callers. No absolute paths, ever: file names only.
@router.get(
    "/models",
    dependencies=[Depends(require_api_key)],
    summary="Every served model (name, id, device, default, load time, metadata summary) and files that failed",
    tags=["model"],
    name="models",
    response_model=None,
    responses={**ok(ModelList), **errors(401, *ANY_ROUTE)},
)
async def models_listing(models: Models) -> dict:
    return listing(models)


@router.get(
    "/models/{name}",
    dependencies=[Depends(require_api_key)],
    summary="One served model in full: summary, samplers, threads, CUDA fast path, metadata",
    tags=["model"],
    name="model_by_name",
    response_model=None,
    responses={**ok(ModelDetails), **errors(401, 404, *ANY_ROUTE)},
)
async def model_by_name(
    name: Annotated[str, Path(max_length=200, description="a model name from /models")],
    request: Request,
    models: Models,
) -> dict:
    if name not in models.models:
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise HTTPException(404, f"no model {shown!r}; served models: {', '.join(models.names())}")
    return details(models.models[name], name == models.default, request.app.state.threads)


@router.get(
    "/model",
    dependencies=[Depends(require_api_key)],
    summary="The default model in full (as /models/{default}); needs the API key when keys are set",
    tags=["model"],
    name="model",
    response_model=None,
    responses={**ok(ModelDetails), **errors(401, *ANY_ROUTE)},
)
async def model_info(models: Models, request: Request) -> dict:
    return details(models.served(), True, request.app.state.threads)


@router.get(
    "/healthz",
    summary="Liveness: the process answers",
    tags=["ops"],
    response_model=None,
    responses={**ok(Health), **errors(*ANY_ROUTE)},
)
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: model loaded and warmed up, not shutting down",
    tags=["ops"],
    response_model=None,
    responses={**ok(Readiness), 503: {"model": Readiness, "description": "not ready"}, **errors(*ANY_ROUTE)},
)
async def readyz(request: Request) -> Response:
    if getattr(request.app.state, "ready", False):
        return json_response({"status": "ready"})
    return json_response({"status": "not ready"}, status_code=503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    tags=["ops"],
    name="metrics",
    response_class=Response,
    responses={
        **ok(None, media={PROMETHEUS_TEXT: {"schema": {"type": "string"}}}, description="Prometheus text format"),
        **errors(*ANY_ROUTE),
    },
)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
