"""Admission control for sampling work: a bounded queue in front of a fixed number of compute slots.

Sampling runs in worker threads (never on the event loop). At most `max_concurrency` jobs run at once and
at most `max_queue` wait; anything beyond is refused at once (503 + Retry-After) rather than queued without
bound. A job that cannot start before its deadline is refused (503); one that runs past it is abandoned at
the next denoising step (504), as is one whose client went away.

Admission looks ahead: each job declares its cost (points x network evaluations), and the gate keeps the recent
compute time per job and per unit of cost beyond that (learned from finished jobs). A job whose queue ahead
(the rest of the running jobs, then the waiting ones ahead of it) is not estimated to finish before its deadline
is refused at once (503 + Retry-After); a waiting job re-checks this every 0.25 s, so it too is refused as soon as
the estimate says it cannot start in time, instead of waiting its whole deadline for that 503.
On shutdown, `abort()` stops running jobs at their next step and refuses waiting ones (503, ShuttingDown).

The gate is the only owner of its counters (points in flight, waiting and running jobs): `run(work, points=n)`
reserves a job's points and releases them when it returns, and `admit(points=n)` does the same for a request that
rides in a batch (service/batching.py); nothing else reads or writes them.
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


class ShuttingDown(Overloaded):
    def __init__(self):
        super().__init__("server is shutting down", 5)


class DeadlineExceeded(Exception):
    pass


class Cancelled(Exception):
    pass


# Jobs of at least this cost (points x network evaluations) teach the per-unit time; smaller ones the per-job time.
_LARGE_JOB_COST = 100_000
_RECHECK_S = 0.25  # how often a waiting job re-checks whether it can still start before its deadline
_POLL_S = 0.1  # how often a running job's client is asked whether it is still there
_WATCH_AFTER_S = 0.05  # a running job's client is watched (every _POLL_S) from this long after its start on


class _Waiting:
    """A job waiting for a slot. Compared by identity: two waiting jobs of the same cost are different jobs."""

    __slots__ = ("cost",)

    def __init__(self, cost: int):
        self.cost = cost


@dataclass
class Job:
    """Handed to the work function: call check() between steps to honour the deadline and cancellation."""

    deadline: float
    cancelled: threading.Event
    blocks: "BlockPool | None" = None  # CPU sampling splits its rows over these threads; None: one chain here
    aborted: threading.Event | None = None  # the gate's: set when the server's drain time is over

    def check(self, *_args) -> None:
        if self.aborted is not None and self.aborted.is_set():
            raise ShuttingDown
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
        self._points_in_flight = 0
        self._slots = anyio.Semaphore(max_concurrency)
        # All torch work runs on these long-lived threads (and the block threads they hand rows to), never on the
        # event loop's thread: with a second thread launching OpenMP regions, libgomp throttles its spin-waits and
        # CPU sampling on the intra_op path runs ~2x slower (measured).
        self._executor = ThreadPoolExecutor(
            max_concurrency, thread_name_prefix="swissroll-compute", initializer=thread_init
        )
        self._waiting = 0
        self._running = 0
        self._accepting = True
        self.aborted = threading.Event()
        # Recent compute time: per job (small jobs: fixed costs dominate) and per unit of cost (points x network
        # evaluations) beyond that; together they estimate how long the queue ahead of a new job takes.
        self._ewma_job_s = 0.1
        self._ewma_unit_s = 0.0  # unknown until a large job has finished: then only per-job times count
        self._queue: list[_Waiting] = []  # the waiting jobs, in arrival order (the slots are FIFO)
        self._started: dict[object, tuple[float, int]] = {}  # running jobs: (began, cost)

    def call(self, fn: Callable, *args):
        """Run fn on a compute thread and wait (start-up work: loading the model, before the event loop)."""
        return self._executor.submit(fn, *args).result()

    @contextmanager
    def admit(self, points: int):
        """A request's share of the bound on memory, whatever clients send: the points of all admitted requests
        together. Refused (503) beyond it, or when shutting down. `run(points=n)` takes it for its job; a request
        that rides in a batch (whose job runs with points=0) holds it itself while it waits for its rows."""
        if not self._accepting:
            raise ShuttingDown
        if self._points_in_flight + points > self.max_points:
            raise Overloaded(
                f"{self._points_in_flight} points in flight, limit {self.max_points}", self.retry_after_s()
            )
        self._points_in_flight += points
        try:
            yield
        finally:
            self._points_in_flight -= points

    def busy(self) -> bool:
        """A job is running or waiting for a slot (a new one would not start at once, or not alone)."""
        return bool(self._running or self._waiting)

    def estimate_s(self, cost: int) -> float:
        """Recent compute time of a job of this cost."""
        return self._ewma_job_s + cost * self._ewma_unit_s

    def queue_ahead_s(self, waiting_ahead: "list[_Waiting] | None" = None) -> float:
        """Estimated time until a job gets a compute slot: what is left of the running jobs plus the waiting jobs
        ahead of it (all of them for a job submitted now), over the slots."""
        ahead = self._queue if waiting_ahead is None else waiting_ahead
        if len(self._started) + len(ahead) < self.max_concurrency:
            return 0.0
        now = time.monotonic()
        running = sum(max(0.0, self.estimate_s(cost) - (now - began)) for began, cost in self._started.values())
        return (running + sum(self.estimate_s(w.cost) for w in ahead)) / self.max_concurrency

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.queue_ahead_s()))

    def calibrate(self, job_s: float) -> None:
        """Seed the per-job time from a measured small run (the warm-up), before any request has taught it."""
        self._ewma_job_s = job_s

    def stop_accepting(self) -> None:
        """Draining (SIGTERM): new work is refused (503); admitted work goes on."""
        self._accepting = False

    def close(self) -> None:
        """At shutdown (the app's lifespan): refuse new work and let the compute threads end with the process."""
        self._accepting = False
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.blocks is not None:
            self.blocks.close()

    def abort(self) -> None:
        """The drain time is over: running jobs stop at their next step, waiting ones are refused (503)."""
        self._accepting = False
        self.aborted.set()

    def _learn(self, cost: int, compute_s: float) -> None:
        if cost >= _LARGE_JOB_COST:
            per_unit = max(0.0, compute_s - self._ewma_job_s) / cost
            self._ewma_unit_s = per_unit if self._ewma_unit_s == 0 else 0.5 * self._ewma_unit_s + 0.5 * per_unit
        else:
            self._ewma_job_s = 0.8 * self._ewma_job_s + 0.2 * compute_s

    async def run(
        self,
        work: Callable[[Job], object],
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        *,
        points: int = 0,
        cost: int = 0,
        on_start: Callable[[Job], None] | None = None,
    ) -> tuple[object, Timing]:
        """Run work(job) on a compute thread once a slot is free: (its result, queue and compute time).

        points: the points this job holds in memory (reserved here, released when it returns; refused beyond
        max_points). cost: points x network evaluations (0: unknown, counted as a small job). on_start(job): called
        on the event loop when the job has its slot, just before work goes to the thread (a batch ends its
        membership there, and keeps the job to cancel it when all its members have gone); it may raise (e.g.
        Cancelled: nobody is left to run for) and the slot is given back.
        """
        with self.admit(points):
            if self._waiting >= self.max_queue and self._slots.value == 0:
                raise Overloaded(f"queue full ({self.max_queue} waiting)", self.retry_after_s())
            ahead_s = self.queue_ahead_s()
            if ahead_s > self.timeout_s:
                raise Overloaded(
                    f"the queue ahead needs about {ahead_s:.1f} s, beyond the {self.timeout_s:g} s deadline",
                    self.retry_after_s(),
                )
            start = time.monotonic()
            deadline = start + self.timeout_s
            await self._acquire_slot(cost, deadline)
            try:
                if self.aborted.is_set():
                    raise ShuttingDown
                job = Job(deadline, threading.Event(), blocks=self.blocks, aborted=self.aborted)
                if on_start is not None:
                    on_start(job)
                return await self._run_in_slot(work, job, is_disconnected, cost, start)
            finally:
                self._slots.release()

    async def _acquire_slot(self, cost: int, deadline: float) -> None:
        """Wait in FIFO order for a slot; refused (503) when it cannot start before the deadline."""
        if not self._queue:  # nobody waiting: a free slot is this job's at once, with no watcher task to start
            try:
                self._slots.acquire_nowait()
                return
            except anyio.WouldBlock:
                pass
        entry, hopeless, acquired = _Waiting(cost), [], False
        self._waiting += 1
        self._queue.append(entry)
        try:
            with anyio.move_on_after(deadline - time.monotonic()):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._recheck_while_waiting, entry, deadline, tg.cancel_scope, hopeless)
                    await self._slots.acquire()  # not re-entered: the job keeps its place in the FIFO
                    acquired = True
                    tg.cancel_scope.cancel()
        finally:
            self._waiting -= 1
            self._queue.remove(entry)
        if not acquired:
            if hopeless:
                raise Overloaded(
                    f"the queue ahead needs about {hopeless[0]:.1f} s more, beyond this request's deadline",
                    self.retry_after_s(),
                )
            raise Overloaded(f"could not start within {self.timeout_s:g} s", self.retry_after_s())

    async def _recheck_while_waiting(self, entry: "_Waiting", deadline: float, scope, hopeless: list) -> None:
        while True:
            await anyio.sleep(_RECHECK_S)
            if entry not in self._queue:
                return
            ahead = self._queue[: self._queue.index(entry)]
            ahead_s = self.queue_ahead_s(ahead)
            if ahead_s > deadline - time.monotonic():
                hopeless.append(ahead_s)
                scope.cancel()
                return

    async def _run_in_slot(self, work, job: Job, is_disconnected, cost: int, start: float):
        self._running += 1
        began = time.monotonic()
        token = object()
        self._started[token] = (began, cost)
        try:
            if is_disconnected is None:
                result = await self._in_compute_thread(work, job)
            else:
                result = await self._watched(work, job, is_disconnected)
        finally:
            self._running -= 1
            del self._started[token]
        compute_s = time.monotonic() - began
        self._learn(cost, compute_s)
        return result, Timing(began - start, compute_s)

    async def _watched(self, work, job: Job, is_disconnected):
        """work(job), and from _WATCH_AFTER_S on a task polling the client: if it has left, the job stops at its next
        step. Shorter jobs end before a departed client could be noticed: they need no watcher (a task group, a task
        and its cancellation cost ~0.3 ms per request, more than a 2-evaluation student's whole network at n = 100)."""
        loop = asyncio.get_running_loop()
        watcher: list[asyncio.Task] = []
        timer = loop.call_later(
            _WATCH_AFTER_S, lambda: watcher.append(loop.create_task(_watch_disconnect(is_disconnected, job)))
        )
        try:
            return await self._in_compute_thread(work, job)
        finally:
            timer.cancel()
            for task in watcher:
                task.cancel()

    async def _in_compute_thread(self, work, job: Job):
        # The work runs on the gate's own long-lived threads (see __init__); the event loop awaits its future (the
        # worker's completion callback wakes the loop once, with no thread in between), so a cancelled caller returns
        # at once, its job marked cancelled: the worker stops at its next step instead of computing on for nobody
        # (e.g. at shutdown).
        future = asyncio.wrap_future(self._executor.submit(work, job))
        try:
            return await future
        except BaseException:
            job.cancelled.set()
            raise


async def _watch_disconnect(is_disconnected: Callable[[], Awaitable[bool]], job: Job) -> None:
    # Starlette does not cancel a handler when its client leaves; poll, and let the worker stop at its next step.
    while not await is_disconnected():
        await anyio.sleep(_POLL_S)
    job.cancelled.set()
