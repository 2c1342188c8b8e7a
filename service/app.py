"""The app factory: settings in, FastAPI app out. The model is loaded once, in the lifespan."""

import asyncio
import dataclasses
import json
import logging
import signal
import threading
import time
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qsl

import anyio
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from diffusion.checkpoint import LoadedModel, load_model, resolve_device
from diffusion.cpus import choose_threads
from diffusion.samplers import SAMPLERS, SamplerError
from service.batching import Batcher
from service.blocks import BlockPool
from service.compression import IsalGZipMiddleware
from service.compute import Cancelled, ComputeGate, DeadlineExceeded, Job, Overloaded
from service.cuda_fast_path import CudaFastPath
from service.encoding import json_response
from service.graph_cache import GraphCache
from service.http_limits import HeaderCountLimit
from service.jobs import plan, run_plan
from service.metrics import Metrics
from service.model_repository import ModelRepository
from service.openapi import TAGS, operation_id
from service.query_route import refuse_repeated
from service.routes import router
from service.schemas import PARAMS_BY_PATH, SampleParams, allowed_values
from service.settings import Settings
from service.video_cache import VideoCache

log = logging.getLogger("swissroll")
STATIC_DIR = Path(__file__).parent / "static"
GZIP_LEVEL = 1
GZIP_EXCLUDED = ("video/*", "image/*", "audio/*", "application/x-npy", "application/gzip", "text/event-stream")

# What error bodies and log lines echo of client input, at most (characters).
ECHO_MAX = 100
# Query parameter names never logged, whatever the route: anything that may carry a credential.
SECRET_NAME_PARTS = ("key", "token", "secret", "pass", "auth", "credential", "session", "cookie", "signature")
# CORS: what a browser page may send and read.
CORS_ALLOW_HEADERS = ["Authorization", "Range", "If-None-Match", "If-Range"]
CORS_EXPOSE_HEADERS = [
    "X-Seed", "X-Model", "X-Model-Name", "X-Elapsed-Ms", "X-Cache", "ETag", "Content-Range", "Accept-Ranges",
    "Content-Length", "Content-Location", "Retry-After", "X-Sampler", "X-Spacing", "X-Timesteps", "X-Levels",
]  # fmt: skip


def clip(value, limit: int = ECHO_MAX):
    """A string (or the str() of anything else) cut to `limit` characters, saying how long it was."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


async def reject_repeated_params(request: Request) -> None:
    """`?n=5&n=7` is ambiguous (FastAPI would take the last silently): 422 naming the parameter."""
    refuse_repeated(request)


def _warm_up(model: LoadedModel, blocks: BlockPool | None) -> float:
    """One small run of every sampler: first-call costs (allocator, kernels, block threads, the CUDA fast path's
    compiles and captures) are paid before ready. Returns the time of one more small (default) run: admission
    control's first estimate of a job's time."""
    n = blocks.min_block_rows * blocks.threads if blocks is not None else 64  # reaches every block thread
    # A distilled model serves only its own samplers (at their default steps); any other model every sampler.
    for name in model.denoiser.distilled or SAMPLERS:
        p = plan(model, SampleParams(n=n, sampler=name, seed=0))
        run_plan(model, p, Job(float("inf"), threading.Event(), blocks), record=True)
        if model.fast_path is not None:  # the fused kernel's tile sizes (triton_chain.block_rows), or common graphs
            for rows in (64, 20_000, 100_000):
                model.fast_path.sample(p.spec, p.timesteps, p.params, [(torch.Generator(model.device), rows)])
    began = time.perf_counter()
    run_plan(model, plan(model, SampleParams(n=64, seed=0)), Job(float("inf"), threading.Event(), blocks))
    return time.perf_counter() - began


def load_configured_model(settings: Settings) -> LoadedModel:
    """The default model's file on settings.device, checked (no warm-up yet). Raises CheckpointError or ValueError
    with a one-line message (python -m service calls it before serving, to fail fast)."""
    return load_model(settings.default_model_path(), resolve_device(settings.device), settings.cpu_network)


def _with_fast_path(app: FastAPI, model: LoadedModel, settings: Settings) -> LoadedModel:
    """The CUDA fast path for this model (graphs are keyed by model id, so a reloaded model never replays
    another's graphs; `graphs.invalidate(id)` frees them)."""
    if model.denoiser.conditional:
        # Its per-row condition (and the doubled rows of guidance) are not in the fused kernel or the captured
        # graphs: a conditional model runs the eager path (jobs.run_plan, batching.run_batch).
        return model
    if getattr(app.state, "graphs", None) is None:
        budget = settings.cuda_graph_mb << 20
        app.state.graphs = GraphCache(budget, settings.cuda_graph_max_rows, on_evict=torch.cuda.empty_cache)
    if settings.cuda_precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True  # process-wide: every CUDA matmul of this service
    fast = CudaFastPath(model.id, model.denoiser, app.state.graphs, settings.cuda_precision, settings.cuda_kernel)
    return dataclasses.replace(model, fast_path=fast)


# A reload waits for room in the compute gate (it is work like any request's), up to this long.
_RELOAD_PATIENCE_S = 300.0


async def _in_gate(gate: ComputeGate, work):
    """gate.run for the service's own work (loading, warm-up): waits while the gate is full instead of failing."""
    give_up = time.monotonic() + _RELOAD_PATIENCE_S
    while True:
        try:
            result, _ = await gate.run(work)
            return result
        except Overloaded as e:
            if not gate.accepting or time.monotonic() > give_up:
                raise
            await anyio.sleep(min(max(e.retry_after_s, 0.1), 2.0))


async def _prepare(app: FastAPI, settings: Settings, model: LoadedModel) -> LoadedModel:
    """A checked model made ready to serve: its CUDA fast path, then the warm-up, both on the compute threads."""
    gate: ComputeGate = app.state.gate
    if model.device.type == "cuda":
        model = await _in_gate(gate, lambda _job: _with_fast_path(app, model, settings))
    if settings.warmup:
        app.state.warmup_s[model.id] = await _in_gate(gate, lambda job: _warm_up(model, job.blocks))
    return model


def _repository(app: FastAPI, settings: Settings) -> ModelRepository:
    async def load(path: Path) -> LoadedModel:
        device = resolve_device(settings.device)
        model = await _in_gate(app.state.gate, lambda _job: load_model(path, device, settings.cpu_network))
        return await _prepare(app, settings, model)

    def changed(name: str, result: str, old: LoadedModel | None, new: LoadedModel | None) -> None:
        app.state.metrics.reloads.labels(result).inc()
        replaced = old is not None and (new is None or new.id != old.id)
        graphs = getattr(app.state, "graphs", None)
        if replaced and graphs is not None and all(m.model.id != old.id for m in app.state.models.models.values()):
            graphs.invalidate(old.id)  # graphs of a replaced model; requests still on it re-capture if they must

    return ModelRepository(settings.models_dir, settings.default_model_name(), load, settings.checkpoint, changed)


def _watch_sighup(repository: ModelRepository) -> bool:
    """SIGHUP reloads at once (only where the event loop runs on the main thread: under uvicorn, not TestClient)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, repository.wake)
        return True
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return False


def create_app(settings: Settings | None = None, model: LoadedModel | None = None) -> FastAPI:
    """`model`: the default model, already loaded and checked (python -m service loads it first, to fail fast);
    otherwise the lifespan loads it. The lifespan loads every other model file, then watches for changes."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gate: ComputeGate = app.state.gate
        models: ModelRepository = app.state.models
        preloaded = models.models.get(models.default)
        if preloaded is not None:
            models.add(models.default, await _prepare(app, settings, preloaded.model), preloaded.stamp)
        await models.start()  # the default must load (DefaultModelError); other files may fail, and are listed
        default = models.get()
        if default.id in app.state.warmup_s:
            gate.calibrate(app.state.warmup_s[default.id])
        app.state.ready = True
        info = {"models": models.names(), "default": models.default, "model": default.id[:12]}
        info["device"] = str(default.device)
        if default.fast_path is not None:
            info["cuda"] = default.fast_path.describe()
        log.info(json.dumps({"event": "ready", **info, **app.state.threads}))
        sighup = _watch_sighup(models)
        try:
            async with AsyncExitStack() as running:
                if app.state.batcher is not None:
                    await running.enter_async_context(app.state.batcher.serving())
                async with anyio.create_task_group() as tasks:  # inside the batcher's: cancel scopes nest
                    tasks.start_soon(models.watch, settings.reload_poll_s)
                    try:
                        yield
                    finally:
                        tasks.cancel_scope.cancel()
        finally:
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            app.state.ready = False
            gate.close()

    app = FastAPI(
        title="swissroll-diffusion",
        version="0.1.0",
        description="Diffusion-model sampling of the 2D Swiss roll: points, trajectories and animations.",
        lifespan=lifespan,
        dependencies=[Depends(reject_repeated_params)],
        generate_unique_id_function=operation_id,
        openapi_tags=TAGS,
        telemetry={kind: settings.opentelemetry for kind in ("tracing", "metrics", "logs")},
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.warmup_s = {}  # model id -> one small run's time after its warm-up (admission's first estimate)
    choice = choose_threads(settings.torch_threads)
    blocks = BlockPool(choice.threads) if settings.cpu_parallel == "blocks" and choice.threads > 1 else None
    app.state.threads = {**choice.describe(), "cpu_parallel": settings.cpu_parallel}
    # Per compute thread: torch.set_num_threads only sets the calling thread's OpenMP and MKL counts (and the
    # default of threads that have not run torch yet). With blocks, the compute thread runs one block itself.
    intra_op = 1 if settings.cpu_parallel == "blocks" else choice.threads
    app.state.gate = ComputeGate(
        settings.max_concurrency,
        settings.max_queue,
        settings.request_timeout_s,
        settings.max_points_in_flight,
        thread_init=lambda: torch.set_num_threads(intra_op),
        blocks=blocks,
    )
    app.state.metrics = Metrics()
    app.state.models = _repository(app, settings)
    if model is not None:
        app.state.models.add(settings.default_model_name(), model)
    app.state.batcher = (
        Batcher(app.state.gate, app.state.metrics, settings.max_batch_points, settings.max_wait_ms)
        if settings.batching
        else None
    )
    app.state.video_cache = VideoCache(settings.animation_cache_mb << 20)
    app.include_router(router)
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    _install_error_handlers(app)
    if settings.gzip_min_bytes:
        # JSON point clouds shrink ~2.2x. Never the MP4: video is already compressed and Range offsets (206) refer to
        # its bytes; npy floats gain ~10% for the CPU it costs. ISA-L level 1 (service/compression.py): a 10k-point
        # /sample body in ~0.6 ms on one core, 3x faster than zlib's level 1 (bench/results/compression.md).
        app.add_middleware(
            IsalGZipMiddleware,
            minimum_size=settings.gzip_min_bytes,
            compresslevel=GZIP_LEVEL,
            exclude_content_types=GZIP_EXCLUDED,
        )
    app.add_middleware(HeadAsGet)
    app.add_middleware(RequestLog, metrics=app.state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD"],
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
        )
    app.add_middleware(HeaderCountLimit, max_headers=settings.max_headers)  # outermost: before anything reads them
    return app


def _install_error_handlers(app: FastAPI) -> None:
    metrics: Metrics = app.state.metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's errors name the parameter; add what is allowed, so one reply is enough to fix the call.
        # What is echoed of the client's input (names, values) is clipped: an error body stays small.
        errors = []
        for err in exc.errors():
            err = {k: v for k, v in err.items() if k not in ("url", "ctx")}
            name = err["loc"][-1] if err.get("loc") else None
            allowed = allowed_values(request.url.path, name) if isinstance(name, str) else None
            shown = clip(name, 40) if isinstance(name, str) else name
            if err.get("type") == "extra_forbidden":
                err["msg"] = f"unknown parameter {shown!r}; valid parameters: {allowed}"
            elif allowed and err.get("type") not in ("enum", "literal_error"):  # those already list them
                err["msg"] = f"{shown}: {err['msg']} (allowed: {allowed})"
            err["loc"] = [clip(part, 40) if isinstance(part, str) else part for part in err.get("loc", ())]
            if "input" in err:
                err["input"] = clip(err["input"]) if isinstance(err["input"], str) else None
            err["msg"] = clip(err["msg"], 300)
            errors.append(err)
        return json_response({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(SamplerError)
    async def sampler_error(_request: Request, exc: SamplerError):
        # Same shape as FastAPI's own validation errors, so clients parse one format.
        return json_response(
            {"detail": [{"loc": ["query", exc.param], "msg": str(exc), "type": "value_error"}]}, status_code=422
        )

    @app.exception_handler(Overloaded)
    async def overloaded(_request: Request, exc: Overloaded):
        metrics.rejected.labels("overloaded").inc()
        return json_response(
            {"detail": f"server overloaded: {exc}; retry later"},
            status_code=503,
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    @app.exception_handler(DeadlineExceeded)
    async def deadline(_request: Request, _exc: DeadlineExceeded):
        metrics.rejected.labels("deadline").inc()
        return json_response(
            {"detail": f"request exceeded the {app.state.settings.request_timeout_s:g} s deadline"}, status_code=504
        )

    @app.exception_handler(Cancelled)
    async def cancelled(_request: Request, _exc: Cancelled):
        metrics.rejected.labels("client_disconnected").inc()
        return json_response({"detail": "client disconnected"}, status_code=499)


class RequestLog:
    """Pure ASGI middleware: per-request metrics and one JSON log line (BaseHTTPMiddleware costs more per call)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            state = scope.get("state", {})
            sampler = state.get("sampler", "")  # set by sampling routes once validated
            model = state.get("model", "")  # a served model's name (a file stem), set once it was found
            self.metrics.requests.labels(endpoint, model, sampler, str(status)).inc()
            self.metrics.latency.labels(endpoint, model, sampler).observe(seconds)
            if log.isEnabledFor(logging.INFO):
                line = {"endpoint": clip(scope["path"], 200), "method": scope["method"], "status": status}
                line.update(logged_params(scope["path"], scope.get("query_string", b"")))
                line["ms"] = round(seconds * 1000, 2)
                log.info(json.dumps(line))


def logged_params(path: str, query_string: bytes) -> dict:
    """The route's own parameters, clipped; others are only counted (their names and values are the client's, and
    may be credentials, e.g. ?api_key=...). Nothing named like a secret is logged, even if a route had it."""
    known = PARAMS_BY_PATH.get(path)
    names = known.model_fields if known else {}
    params, unknown = {}, 0
    for name, value in parse_qsl(query_string[:65_536].decode("latin-1"), keep_blank_values=True):
        if name in names and not any(part in name.lower() for part in SECRET_NAME_PARTS):
            params[name] = clip(value, 40)
        else:
            unknown += 1
    out = {"params": params}
    if unknown:
        out["unknown_params"] = unknown
    return out


class HeadAsGet:
    """HEAD on any GET route: the GET's status and headers (Content-Length included), no body (RFC 9110 9.3.2).
    uvicorn omits a HEAD response's body itself; this also makes the app correct in-process."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)
