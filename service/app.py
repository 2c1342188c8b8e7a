"""The app factory: settings in, FastAPI app out. The model is loaded once, in the lifespan."""

import dataclasses
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qsl

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.middleware.gzip import GZipMiddleware

from service.batching import Batcher
from service.blocks import MIN_BLOCK_ROWS, BlockPool
from service.checkpoint import LoadedModel, load_model, resolve_device
from service.compute import Cancelled, ComputeGate, DeadlineExceeded, Job, Overloaded
from service.cpus import choose_threads
from service.cuda_fast_path import CudaFastPath
from service.encoding import json_response
from service.graph_cache import GraphCache
from service.metrics import Metrics
from service.routes import router
from service.samplers import SAMPLERS, SamplerError
from service.sampling import plan, run_plan
from service.schemas import SampleParams, allowed_values
from service.settings import Settings
from service.video_cache import VideoCache

log = logging.getLogger("swissroll")
STATIC_DIR = Path(__file__).parent / "static"
GZIP_LEVEL = 5
GZIP_EXCLUDED = ("video/*", "image/*", "audio/*", "application/x-npy", "application/gzip", "text/event-stream")


def _warm_up(model: LoadedModel, blocks: BlockPool | None) -> None:
    """One small run of every sampler: first-call costs (allocator, kernels, block threads) are paid before ready."""
    n = MIN_BLOCK_ROWS * blocks.threads if blocks is not None else 64  # big enough to reach every block thread
    for name in SAMPLERS:
        p = plan(model, SampleParams(n=n, sampler=name, seed=0))
        run_plan(model, p, Job(float("inf"), threading.Event(), blocks), record=True)
    if model.fast_path is not None:
        # Compile the fused kernel's tile sizes (triton_chain.block_rows) or capture the common graphs now, not in
        # the first requests.
        for name in SAMPLERS:
            p = plan(model, SampleParams(n=64, sampler=name, seed=0))
            for rows in (64, 20_000, 100_000):
                model.fast_path.sample(p.spec, p.timesteps, p.params, [(torch.Generator(model.device), rows)])


def _with_fast_path(app: FastAPI, model: LoadedModel, settings: Settings) -> LoadedModel:
    """The CUDA fast path for this model (graphs are keyed by model id, so a reloaded model never replays
    another's graphs; `graphs.invalidate(id)` frees them)."""
    if getattr(app.state, "graphs", None) is None:
        budget = settings.cuda_graph_mb << 20
        app.state.graphs = GraphCache(budget, settings.cuda_graph_max_rows, on_evict=torch.cuda.empty_cache)
    if settings.cuda_precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True  # process-wide: every CUDA matmul of this service
    fast = CudaFastPath(model.id, model.denoiser, app.state.graphs, settings.cuda_precision, settings.cuda_kernel)
    return dataclasses.replace(model, fast_path=fast)


def create_app(settings: Settings | None = None, model: LoadedModel | None = None) -> FastAPI:
    """`model`: an already loaded checkpoint; otherwise the lifespan loads settings.checkpoint."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gate: ComputeGate = app.state.gate
        if getattr(app.state, "model", None) is None:
            app.state.model, _ = await gate.run(
                lambda _job: load_model(settings.checkpoint, resolve_device(settings.device))
            )
        if app.state.model.device.type == "cuda":
            app.state.model, _ = await gate.run(lambda _job: _with_fast_path(app, app.state.model, settings))
        if settings.warmup:
            await gate.run(lambda job: _warm_up(app.state.model, job.blocks))
        app.state.ready = True
        model_info = {"model": app.state.model.id[:12], "device": str(app.state.model.device)}
        if app.state.model.fast_path is not None:
            model_info["cuda"] = app.state.model.fast_path.describe()
        log.info(json.dumps({"event": "ready", **model_info, **app.state.threads}))
        yield
        app.state.ready = False

    app = FastAPI(
        title="swissroll-diffusion",
        version="0.1.0",
        description="Diffusion-model sampling of the 2D Swiss roll: points, trajectories and animations.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ready = False
    if model is not None:
        app.state.model = model  # usable at once; ready only after the lifespan's warm-up
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
        # JSON point clouds shrink ~3x. Never the MP4: video is already compressed and Range offsets (206) refer to
        # its bytes; npy floats gain ~10% for the CPU it costs. Level 5: most of level 9's ratio at a third the time.
        app.add_middleware(
            GZipMiddleware,
            minimum_size=settings.gzip_min_bytes,
            compresslevel=GZIP_LEVEL,
            exclude_content_types=GZIP_EXCLUDED,
        )
    app.add_middleware(RequestLog, metrics=app.state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET"],
            expose_headers=[
                *("X-Seed", "X-Model", "X-Elapsed-Ms", "X-Cache", "Content-Range", "ETag"),
                *("X-Sampler", "X-Spacing", "X-Timesteps", "X-Levels"),
            ],
        )
    return app


def _install_error_handlers(app: FastAPI) -> None:
    metrics: Metrics = app.state.metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's errors name the parameter; add what is allowed, so one reply is enough to fix the call.
        errors = []
        for err in exc.errors():
            err = {k: v for k, v in err.items() if k != "url"}
            name = err["loc"][-1] if err.get("loc") else None
            allowed = allowed_values(request.url.path, name) if isinstance(name, str) else None
            if err.get("type") == "extra_forbidden":
                err["msg"] = f"unknown parameter {name!r}; valid parameters: {allowed}"
            elif allowed and err.get("type") not in ("enum", "literal_error"):  # those already list them
                err["msg"] = f"{name}: {err['msg']} (allowed: {allowed})"
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
            sampler = scope.get("state", {}).get("sampler", "")  # set by sampling routes once validated
            self.metrics.requests.labels(endpoint, sampler, str(status)).inc()
            self.metrics.latency.labels(endpoint, sampler).observe(seconds)
            if log.isEnabledFor(logging.INFO):
                query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
                log.info(
                    json.dumps(
                        {"endpoint": scope["path"], "params": query, "status": status, "ms": round(seconds * 1000, 2)}
                    )
                )
