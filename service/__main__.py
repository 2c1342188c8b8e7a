"""swissroll-serve / python -m service: load the checkpoint (failing fast, in one line), then serve it."""

import ctypes
import ctypes.util
import logging
import signal
import sys

import uvicorn
from pydantic import ValidationError

from diffusion.checkpoint import CheckpointError, load_model, resolve_device
from service.app import create_app
from service.settings import Settings

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


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: not ready and refusing new work at once; uvicorn then drains in-flight requests."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig, frame) -> None:
        self.app.state.ready = False
        self.app.state.gate.accepting = False
        super().handle_exit(sig, frame)


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as e:
        first = e.errors()[0]
        sys.exit(f"error: invalid setting SWISSROLL_{str(first['loc'][0]).upper()}: {first['msg']}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s")
    tune_allocator()
    app = create_app(settings)
    try:
        # On the compute thread, like all torch work (see ComputeGate), and before serving: fail fast, in one line.
        app.state.model = app.state.gate.call(load_model, settings.checkpoint, resolve_device(settings.device))
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_s),
    )
    # uvicorn re-raises the signal after a graceful shutdown (exit status -15); a drained server exits 0 instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    DrainingServer(config, app).run()


if __name__ == "__main__":
    main()
