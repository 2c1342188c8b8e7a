"""Admission control for sampling work: a bounded queue in front of a fixed number of compute slots.

Sampling runs in worker threads (never on the event loop). At most `max_concurrency` jobs run at once and
at most `max_queue` wait; anything beyond is refused at once (503 + Retry-After) rather than queued without
bound. A job that cannot start before its deadline is refused (503); one that runs past it is abandoned at
the next denoising step (504), as is one whose client went away.
"""

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from service.blocks import BlockPool


class Overloaded(Exception):
    def __init__(self, reason: str, retry_after_s: int):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    pass


class Cancelled(Exception):
    pass


@dataclass
class Job:
    """Handed to the work function: call check() between steps to honour the deadline and cancellation."""

    deadline: float
    cancelled: threading.Event
    blocks: "BlockPool | None" = None  # CPU sampling splits its rows over these threads; None: one chain here

    def check(self, *_args) -> None:
        if self.cancelled.is_set():
            raise Cancelled
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded


@dataclass(frozen=True)
class Timing:
    queue_s: float
    compute_s: float


class ComputeGate:
    def __init__(
        self,
        max_concurrency: int,
        max_queue: int,
        timeout_s: float,
        max_points: int = 2_000_000,
        thread_init: Callable[[], None] | None = None,
        blocks: "BlockPool | None" = None,
    ):
        self.max_concurrency, self.max_queue, self.timeout_s = max_concurrency, max_queue, timeout_s
        self.max_points = max_points
        self.blocks = blocks
        self.points_in_flight = 0
        self._slots = anyio.Semaphore(max_concurrency)
        # All torch work runs on these long-lived threads (and the block threads they hand rows to), never on the
        # event loop's thread: with a second thread launching OpenMP regions, libgomp throttles its spin-waits and
        # CPU sampling on the intra_op path runs ~2x slower (measured).
        self._executor = ThreadPoolExecutor(
            max_concurrency, thread_name_prefix="swissroll-compute", initializer=thread_init
        )
        self.waiting = 0
        self.running = 0
        self.accepting = True
        self._ewma_job_s = 0.1  # recent job duration, for an honest Retry-After

    def call(self, fn: Callable, *args):
        """Run fn on a compute thread and wait (start-up work: loading the model, before the event loop)."""
        return self._executor.submit(fn, *args).result()

    @contextmanager
    def reserve_points(self, n: int):
        """Bounds memory whatever clients send: the points of all admitted requests together."""
        if self.points_in_flight + n > self.max_points:
            raise Overloaded(f"{self.points_in_flight} points in flight, limit {self.max_points}", self.retry_after_s())
        self.points_in_flight += n
        try:
            yield
        finally:
            self.points_in_flight -= n

    def retry_after_s(self) -> int:
        backlog = (self.waiting + self.running) / self.max_concurrency
        return max(1, math.ceil(backlog * self._ewma_job_s))

    async def run(
        self, work: Callable[[Job], object], is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> tuple[object, Timing]:
        if not self.accepting:
            raise Overloaded("server is shutting down", 5)
        if self.waiting >= self.max_queue and self._slots.value == 0:
            raise Overloaded(f"queue full ({self.max_queue} waiting)", self.retry_after_s())
        start = time.monotonic()
        deadline = start + self.timeout_s
        self.waiting += 1
        try:
            with anyio.move_on_after(self.timeout_s) as scope:
                await self._slots.acquire()
        finally:
            self.waiting -= 1
        if scope.cancelled_caught:
            raise Overloaded(f"could not start within {self.timeout_s:g} s", self.retry_after_s())
        job = Job(deadline, threading.Event(), self.blocks)
        self.running += 1
        began = time.monotonic()
        try:
            error: Exception | None = None
            async with anyio.create_task_group() as tg:
                if is_disconnected is not None:
                    tg.start_soon(_watch_disconnect, is_disconnected, job)
                try:
                    result = await asyncio.get_running_loop().run_in_executor(self._executor, work, job)
                except Exception as e:  # kept out of the task group, which would wrap it in an ExceptionGroup
                    error = e
                tg.cancel_scope.cancel()
            if error is not None:
                raise error
        finally:
            self.running -= 1
            self._slots.release()
        compute_s = time.monotonic() - began
        self._ewma_job_s = 0.8 * self._ewma_job_s + 0.2 * compute_s
        return result, Timing(began - start, compute_s)


async def _watch_disconnect(is_disconnected: Callable[[], Awaitable[bool]], job: Job) -> None:
    # Starlette does not cancel a handler when its client leaves; poll, and let the worker stop at its next step.
    while not await is_disconnected():
        await anyio.sleep(0.1)
    job.cancelled.set()
