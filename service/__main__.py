"""swissroll-serve / python -m service: load the default model (failing fast, in one line), then serve the models."""

import ctypes
import ctypes.util
import logging
import os
import resource
import signal
import sys
import time

import anyio
import uvicorn
from pydantic import ValidationError

from diffusion.checkpoint import CheckpointError
from service.app import create_app, load_configured_model
from service.http_limits import limited_http_protocol
from service.settings import Settings, unknown_env_settings

log = logging.getLogger("swissroll")
# uvicorn's own graceful-shutdown timeout, past the drain: only a job that ignores its abort reaches it.
_DRAIN_BACKSTOP_S = 2.0

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_THRESHOLD = 256 << 20


def tune_allocator() -> bool:
    """Keep sampling's large per-step buffers in the heap instead of mmap/munmap-ing them every step.

    With glibc's defaults, every step's [n, 64] activations are fresh mmaps (page faults, zeroing) and are
    returned to the kernel right after: CPU sampling runs 2-3x slower and bimodal. Same effect as setting
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, but applied by the launcher itself. No-op off glibc.
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _ALLOCATOR_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _ALLOCATOR_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False


def raise_fd_limit(needed: int) -> None:
    """Open files: the soft limit up to the hard one, so max_connections sockets (plus our own files) fit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else needed, hard))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft < needed:
            log.warning(f"warning: open-file limit {soft} is below SWISSROLL_MAX_CONNECTIONS + 64; lower the setting")
    except (ValueError, OSError):
        pass


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: not ready and refusing new work at once; in-flight requests get `drain_s` to finish,
    then their jobs stop at the next step (503 + Retry-After to their clients) and the process exits."""

    def __init__(self, config: uvicorn.Config, app, drain_s: float):
        super().__init__(config)
        self.app, self.drain_s = app, drain_s
        self._exit_at: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._exit_at is None:
            self._exit_at = time.monotonic()
        self.app.state.ready = False
        self.app.state.gate.stop_accepting()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        # The drain counts from the signal; uvicorn's own timeout (which cancels tasks: 500s) is only a backstop.
        exit_at = self._exit_at if self._exit_at is not None else time.monotonic()
        delay = max(0.0, exit_at + self.drain_s - time.monotonic())
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._abort_after, delay)
            try:
                await super().shutdown(sockets)
            finally:
                tg.cancel_scope.cancel()

    async def _abort_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        self.app.state.gate.abort()


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as e:
        first = e.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        sys.exit(f"error: invalid setting SWISSROLL_{str(first['loc'][0]).upper()}: {msg}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s")
    for warning in unknown_env_settings(os.environ):
        log.warning(warning)
    tune_allocator()
    raise_fd_limit(settings.max_connections + 64)
    app = create_app(settings)
    try:
        # The default model, on the compute thread like all torch work (see ComputeGate), before serving: fail fast,
        # in one line. The lifespan warms it up and loads the directory's other models (those may fail: listed).
        app.state.models.add(settings.default_model_name(), app.state.gate.call(load_configured_model, settings))
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_s + _DRAIN_BACKSTOP_S,
        # httptools (a C parser) with the request-head bound, header timeout and connection cap added (http_limits.py).
        http=limited_http_protocol(
            settings.max_header_bytes, settings.header_timeout_s, settings.max_connections, app.state.metrics
        ),
    )
    # uvicorn re-raises the signal after a graceful shutdown (exit status -15); a drained server exits 0 instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = DrainingServer(config, app, settings.drain_s)
    server.run()
    # Drained (or never started). Skip the interpreter's teardown of torch and friends (~0.8 s measured on 2 cores):
    # the drain deadline is the process's, not only the requests'. Compute threads are idle or aborted by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if server.started else 3)


if __name__ == "__main__":
    main()
