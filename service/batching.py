"""Dynamic batching: concurrent /sample requests for the same model, sampler, timesteps and parameters share each
denoising step's network call, and are split apart afterwards.

Batch-invariant by construction: every request keeps its own generator for its initial noise and for its
rows of every step's noise (diffusion.noise.from_sources), and its rows start on a ROW_ALIGN boundary so the
network computes them exactly as it would alone (see denoiser.ROW_ALIGN): on CPU a seed gives the same points,
bit for bit, batched or alone (on a GPU its GEMMs are not batch-invariant: rows agree to ~3e-7).

One owner per piece of state, as Ray Serve's `_BatchQueue`: a request only puts itself on a queue and waits for its
own result. A single consumer task takes requests off the queue and forms the batches, one open batch per key
(model id + Plan.key(): batches never mix models or computations); for each new batch it starts a runner (its
child task) that waits up to max_wait_ms for company (not at all when nobody else is around) and runs the batch
as one job through the compute gate. The batch keeps taking members while that job waits for a compute slot; its
membership ends on the event loop when the slot is granted (gate.run's on_start), so no member list is ever
touched from a worker thread. A request cancelled or disconnected before then is dropped from its batch; one
gone after that is marked (_Request.leave), and the last member to go stops the job at its next step. No request
leads its batch, so none needs shielding from its own client leaving. A request that finds nobody to batch with
and the compute slot idle goes to the gate straight away; any batch of one runs as an unbatched request would.
"""

import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import numpy as np
import torch
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from diffusion.checkpoint import LoadedModel
from diffusion.denoiser import ROW_ALIGN
from diffusion.noise import from_sources
from service.blocks import run_sampler
from service.compute import Cancelled, ComputeGate, Job, ShuttingDown, Timing
from service.jobs import Plan, computation_key, conditioned, run_plan
from service.metrics import Metrics

_DISCONNECT_POLL_S = 0.1  # how often a waiting request asks whether its client is still there


@dataclass(eq=False)
class _Request:
    """One caller's place in a batch. Its task sets `gone` (leave()); the consumer and the batch's runner the rest."""

    model: LoadedModel
    plan: Plan
    done: anyio.Event = field(default_factory=anyio.Event)
    batch: "_Batch | None" = None  # the batch it joined
    started: bool = False  # its batch's job has its compute slot: its rows are being computed
    gone: bool = False  # its caller stopped waiting (cancelled, or the client disconnected)
    points: np.ndarray | None = None
    timing: Timing | None = None
    error: Exception | None = None

    def resolve(self, points: np.ndarray | None, timing: Timing | None, error: Exception | None = None) -> None:
        self.points, self.timing, self.error = points, timing, error
        self.done.set()

    def leave(self) -> None:
        """Its caller stopped waiting. Before its batch starts it is simply not computed; after, the batch's job
        stops at its next step once no member is waiting for it."""
        self.gone = True
        # started: its batch's job has its slot (close() set batch.job before marking its members started)
        if self.started and all(r.gone for r in self.batch.members):
            self.batch.job.cancelled.set()


@dataclass(eq=False)
class _Batch:
    """Requests with one key, changed only by the consumer until the runner's job gets its slot."""

    key: tuple
    model: LoadedModel
    requests: list[_Request] = field(default_factory=list)
    points: int = 0
    full: anyio.Event = field(default_factory=anyio.Event)
    members: list[_Request] = field(default_factory=list)  # who is computed: set when the job gets its slot
    job: Job | None = None  # that job, to stop it when every member has gone


def run_batch(model: LoadedModel, plans: list[Plan], job: Job) -> list[np.ndarray]:
    """One sampler run over all plans' rows; each plan's block starts on a ROW_ALIGN boundary. A batch of one runs
    as an unbatched request (jobs.run_plan: the same points, without padding rows or per-source noise)."""
    if len(plans) == 1:
        return [run_plan(model, plans[0], job)[0]]
    device = model.device
    sources, starts, rows, conditions = [], [], 0, []
    for p in plans:
        starts.append(rows)
        sources.append((torch.Generator(device=device).manual_seed(p.seed), p.n))
        conditions.append((p.position, p.n))  # each request's rows their own position (guidance is in the key)
        pad = -p.n % ROW_ALIGN
        if pad:
            sources.append((None, pad))
            conditions.append((None, pad))
        rows += p.n + pad
    first = plans[0]
    if model.fast_path is not None and not model.denoiser.conditional:
        out = model.fast_path.sample(first.spec, first.timesteps, first.params, sources)
    else:
        # Each generator's first draw is its request's x_T, exactly as when the request runs alone.
        noise = from_sources(sources)
        _, out, _, _ = run_sampler(
            job.blocks,
            first.spec,
            conditioned(model.denoiser, conditions, first.guidance),
            rows,
            first.timesteps,
            noise,
            job.check,
            **first.params,
        )
    out = out.cpu().numpy()
    return [out[start : start + p.n] for start, p in zip(starts, plans, strict=True)]


class Batcher:
    """`async with batcher.serving():` runs the consumer (the app's lifespan); `await batcher.sample(...)` in it."""

    def __init__(self, gate: ComputeGate, metrics: Metrics, max_batch_points: int, max_wait_ms: float):
        self.gate, self.metrics = gate, metrics
        self.max_batch_points, self.max_wait_s = max_batch_points, max_wait_ms / 1000
        self._open: dict[tuple, _Batch] = {}  # the consumer's: per key, the batch still taking members
        self._active = 0  # requests inside sample(): is anyone around to batch with?
        self._inbox: MemoryObjectSendStream[_Request] | None = None  # requests' way in, while serving

    @asynccontextmanager
    async def serving(self):
        """Runs the consumer for the duration (the app's lifespan). On exit (shutdown) the consumer and every
        batch's runner are cancelled: their requests get 503 (ShuttingDown), and so does any request after."""
        send, receive = anyio.create_memory_object_stream[_Request](math.inf)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._consume, receive)
            self._inbox = send
            try:
                yield self
            finally:
                self._inbox = None
                send.close()
                tg.cancel_scope.cancel()

    async def sample(self, model: LoadedModel, plan: Plan, is_disconnected=None) -> tuple[np.ndarray, Timing]:
        if self._inbox is None:
            raise ShuttingDown
        if self._active == 0 and not self.gate.busy():
            return await self._alone(model, plan, is_disconnected)
        request = _Request(model, plan)
        # This request's points count against the gate's bound while it waits: its batch's job runs with points=0.
        with self.gate.admit(plan.n):
            self._active += 1
            try:
                try:
                    self._inbox.send_nowait(request)
                except anyio.ClosedResourceError:
                    raise ShuttingDown from None
                async with anyio.create_task_group() as tg:
                    if is_disconnected is not None:
                        tg.start_soon(_leave_on_disconnect, request, is_disconnected, tg.cancel_scope)
                    await request.done.wait()
                    tg.cancel_scope.cancel()
            finally:
                self._active -= 1
                if not request.done.is_set():
                    request.leave()  # dropped from its batch if not started; else its job may stop early
        if not request.done.is_set():
            raise Cancelled  # the client left before its batch started
        if request.error is not None:
            raise request.error
        return request.points, request.timing

    async def _alone(self, model: LoadedModel, plan: Plan, is_disconnected) -> tuple[np.ndarray, Timing]:
        """Nobody to batch with and an idle slot: its batch of one would start at once, so it goes straight to the
        gate, without the queue's hops. Whoever arrives meanwhile finds the slot busy and queues as usual."""
        self._active += 1
        try:
            (points,), timing = await self.gate.run(
                lambda job: run_batch(model, [plan], job), is_disconnected, points=plan.n, cost=plan.cost
            )
        finally:
            self._active -= 1
        self.metrics.batch_points.observe(plan.n)
        self.metrics.batch_requests.observe(1)
        return points, timing

    async def _consume(self, inbox: MemoryObjectReceiveStream[_Request]) -> None:
        """The one task that forms batches: each request joins its key's open batch, or opens the next one."""
        async with anyio.create_task_group() as runners:
            try:
                async for request in inbox:
                    if request.gone:
                        continue
                    key = computation_key(request.model, request.plan)
                    batch = self._open.get(key)
                    if batch is not None and batch.points + request.plan.n > self.max_batch_points:
                        batch.full.set()  # no room for this request: that batch should go now; this one opens anew
                        batch = None
                    if batch is None:
                        batch = self._open[key] = _Batch(key, request.model)
                        runners.start_soon(self._run, batch)
                    batch.requests.append(request)
                    request.batch = batch
                    batch.points += request.plan.n
                    if batch.points >= self.max_batch_points:
                        batch.full.set()
            finally:
                # Shutdown: requests still queued never reach a batch.
                for request in _drain(inbox):
                    request.resolve(None, None, ShuttingDown())

    async def _run(self, batch: _Batch) -> None:
        """One batch's job through the gate; every member's result (or error) delivered to it."""
        # A short window for company, unless full, or alone with an idle compute slot: then waiting only adds
        # latency. Under load the slot is busy, and the batch keeps taking members until its job starts.
        if self._active > 1 or self.gate.busy():
            with anyio.move_on_after(self.max_wait_s):
                await batch.full.wait()
        members = batch.members

        def close(job: Job) -> None:
            # On the event loop, as the job gets its slot: membership ends; who left before now is not computed.
            if self._open.get(batch.key) is batch:
                del self._open[batch.key]
            members.extend(r for r in batch.requests if not r.gone)
            if not members:
                raise Cancelled
            batch.job = job
            for r in members:
                r.started = True

        def work(job: Job) -> list[np.ndarray]:
            return run_batch(batch.model, [r.plan for r in members], job)

        cost = batch.points * batch.requests[0].plan.steps  # members joining later ride along uncounted
        try:
            # No disconnect watcher: members leave through _Request.leave(), which stops the job when none is left.
            results, timing = await self.gate.run(work, cost=cost, on_start=close)
        except Exception as e:  # delivered to every member
            for r in batch.requests:
                r.resolve(None, None, e)
            return
        except BaseException:  # cancelled: the server is shutting down
            for r in batch.requests:
                r.resolve(None, None, ShuttingDown())
            raise
        finally:
            if self._open.get(batch.key) is batch:  # refused before it started: later requests open a new batch
                del self._open[batch.key]
        self.metrics.batch_points.observe(sum(r.plan.n for r in members))
        self.metrics.batch_requests.observe(len(members))
        for r, points in zip(members, results, strict=True):
            r.resolve(points, timing)


async def _leave_on_disconnect(request: _Request, is_disconnected, scope: anyio.CancelScope) -> None:
    # Starlette does not cancel a handler when its client leaves: poll. Before its batch starts, the request leaves
    # (and is dropped from the batch); after, it is marked gone and waits, so its points stay counted until done.
    while not await is_disconnected():
        await anyio.sleep(_DISCONNECT_POLL_S)
    request.leave()
    if not request.started:
        scope.cancel()


def _drain(inbox: MemoryObjectReceiveStream[_Request]) -> list[_Request]:
    left = []
    while True:
        try:
            left.append(inbox.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return left
