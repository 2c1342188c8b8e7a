"""Dynamic batching: concurrent /sample requests with the same sampler, timesteps and parameters share each
denoising step's network call, and are split apart afterwards.

Batch-invariant by construction: every request keeps its own generator for its initial noise and for its
rows of every step's noise (diffusion.noise.from_sources), and its rows start on a ROW_ALIGN boundary so the
network computes them exactly as it would alone (see denoiser.ROW_ALIGN): on CPU a seed gives the same points,
bit for bit, batched or alone (on a GPU its GEMMs are not batch-invariant: rows agree to ~3e-7).

The first request of a batch leads: it waits up to max_wait_ms for company (or until max_batch_points is
reached; not at all when it is the only request around), then runs the batch as one job through the compute
gate on behalf of all its members. Requests keep joining while that job waits for a compute slot.
"""

import threading
from dataclasses import dataclass, field

import anyio
import numpy as np
import torch

from diffusion.checkpoint import LoadedModel
from diffusion.denoiser import ROW_ALIGN
from diffusion.noise import from_sources, initial_noise
from service.blocks import run_sampler
from service.compute import ComputeGate, Job, Timing
from service.jobs import Plan
from service.metrics import Metrics


@dataclass
class _Batch:
    plans: list[Plan] = field(default_factory=list)
    points: int = 0
    # Members may join until the job starts in its worker thread; the lock orders joining against that start.
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    full: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    results: list[np.ndarray] | None = None
    timing: Timing | None = None
    error: Exception | None = None
    disconnect_checks: list = field(default_factory=list)

    def join(self, plan: Plan, max_points: int, is_disconnected) -> int | None:
        """This plan's row block index in the batch, or None if the batch has started or has no room."""
        with self.lock:
            if self.closed or (self.plans and self.points + plan.n > max_points):
                return None
            self.plans.append(plan)
            self.points += plan.n
            if is_disconnected is not None:
                self.disconnect_checks.append(is_disconnected)
            return len(self.plans) - 1

    def close(self) -> list[Plan]:
        with self.lock:
            self.closed = True
            return list(self.plans)


def run_batch(model: LoadedModel, plans: list[Plan], job: Job) -> list[np.ndarray]:
    """One sampler run over all plans' rows; each plan's block starts on a ROW_ALIGN boundary."""
    device = model.device
    sources, starts, rows = [], [], 0
    for p in plans:
        starts.append(rows)
        sources.append((torch.Generator(device=device).manual_seed(p.seed), p.n))
        pad = -p.n % ROW_ALIGN
        if pad:
            sources.append((None, pad))
        rows += p.n + pad
    first = plans[0]
    if model.fast_path is not None:
        out = model.fast_path.sample(first.spec, first.timesteps, first.params, sources)
    else:
        # Each generator's first draw is its request's x_T, exactly as when the request runs alone.
        noise = from_sources(sources)
        x = initial_noise(rows, noise, device)
        out, _, _ = run_sampler(
            job.blocks, first.spec.fn, model.denoiser, x, first.timesteps, noise, job.check, **first.params
        )
    out = out.cpu().numpy()
    return [out[start : start + p.n] for start, p in zip(starts, plans, strict=True)]


class Batcher:
    def __init__(self, gate: ComputeGate, metrics: Metrics, max_batch_points: int, max_wait_ms: float):
        self.gate, self.metrics = gate, metrics
        self.max_batch_points, self.max_wait_s = max_batch_points, max_wait_ms / 1000
        self._open: dict[tuple, _Batch] = {}
        self._active = 0  # requests inside sample(): is anyone around to batch with?

    async def sample(self, model: LoadedModel, plan: Plan, is_disconnected=None) -> tuple[np.ndarray, Timing]:
        self._active += 1
        try:
            return await self._sample(model, plan, is_disconnected)
        finally:
            self._active -= 1

    async def _sample(self, model: LoadedModel, plan: Plan, is_disconnected) -> tuple[np.ndarray, Timing]:
        key = (model.id, plan.key())  # batches never mix models (a reload may serve two ids at once)
        batch = self._open.get(key)
        index = batch.join(plan, self.max_batch_points, is_disconnected) if batch is not None else None
        leader = index is None
        if leader:
            if batch is not None:
                batch.full.set()  # no room for this request: that batch should go now; this one starts anew
            batch = self._open[key] = _Batch()
            index = batch.join(plan, self.max_batch_points, is_disconnected)
        if batch.points >= self.max_batch_points:
            batch.full.set()
        if leader:
            await self._lead(key, batch, model)
        else:
            await batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch.results[index], batch.timing

    async def _lead(self, key: tuple, batch: _Batch, model: LoadedModel) -> None:
        # A short window for company, unless full, or alone with an idle compute slot: then waiting only adds
        # latency. Under load the slot is busy, and the batch keeps taking members until its job starts.
        if self._active > 1 or self.gate.running or self.gate.waiting:
            with anyio.move_on_after(self.max_wait_s):
                await batch.full.wait()

        async def all_gone() -> bool:
            # The batch stops only when every member's client has left.
            return all([await check() for check in batch.disconnect_checks]) if batch.disconnect_checks else False

        def work(job: Job) -> list[np.ndarray]:
            return run_batch(model, batch.close(), job)

        # Shielded: the leader's own client leaving must not cancel the work its batch-mates wait for.
        with anyio.CancelScope(shield=True):
            try:
                cost = batch.points * batch.plans[0].steps  # members joining later ride along uncounted
                batch.results, batch.timing = await self.gate.run(work, all_gone, cost=cost)
                self.metrics.batch_points.observe(batch.points)
                self.metrics.batch_requests.observe(len(batch.plans))
            except Exception as e:  # delivered to every member
                batch.error = e
            finally:
                if self._open.get(key) is batch:
                    del self._open[key]
                batch.done.set()
