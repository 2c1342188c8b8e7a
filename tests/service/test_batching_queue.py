"""The batcher's queue and its one consumer, driven directly: keys, leaving before the start, shutdown."""

import threading
from dataclasses import replace

import anyio
import numpy as np
import pytest
import torch

from diffusion.checkpoint import load_model
from diffusion.samplers import sample
from service.batching import Batcher
from service.compute import Cancelled, ComputeGate, ShuttingDown
from service.jobs import plan
from service.metrics import Metrics
from service.schemas import SampleParams


class RecordingNet:
    """The network, optionally scaled (a different model), recording how many rows each call evaluates."""

    def __init__(self, net, scale: float = 1.0):
        self.net, self.scale, self.rows = net, scale, []

    def __call__(self, x, t):
        self.rows.append(x.shape[0])
        out = self.net(x, t)
        return out if self.scale == 1.0 else out * self.scale


def recording_model(checkpoint, model_id=None, scale=1.0):
    loaded = load_model(checkpoint, torch.device("cpu"))
    net = RecordingNet(loaded.denoiser.net, scale)
    model = replace(loaded, denoiser=replace(loaded.denoiser, net=net))
    return (replace(model, id=model_id) if model_id else model), net


def points_alone(model, p):
    return sample(model.denoiser, p.spec.name, p.n, torch.Generator().manual_seed(p.seed), p.steps).numpy()


def holding_the_only_slot(gate: ComputeGate, release: threading.Event):
    """A job that keeps the gate's single slot until `release`: batches queue behind it and keep taking members."""
    return gate.run(lambda job: release.wait(10))


def test_requests_for_different_models_are_never_batched_together(tiny_checkpoint):
    # Same sampler, steps, seed spacing and n: only the model differs. A shared batch would give one model's rows
    # the other's network; each request must get exactly what its own model gives alone.
    model_a, net_a = recording_model(tiny_checkpoint)
    model_b, net_b = recording_model(tiny_checkpoint, model_id="another-checkpoint", scale=0.5)
    gate = ComputeGate(1, 16, 30)
    batcher = Batcher(gate, Metrics(), 100_000, max_wait_ms=50)
    requests = [(model_a, 1), (model_b, 2), (model_a, 3), (model_b, 4)]
    plans = [plan(m, SampleParams(n=20, sampler="ddim", seed=seed)) for m, seed in requests]
    results = {}

    async def submit(i):
        results[i], _ = await batcher.sample(requests[i][0], plans[i])

    async def main():
        release = threading.Event()
        async with batcher.serving(), anyio.create_task_group() as tg:
            tg.start_soon(holding_the_only_slot, gate, release)
            await anyio.wait_all_tasks_blocked()
            for i in range(len(requests)):
                tg.start_soon(submit, i)
            await anyio.wait_all_tasks_blocked()  # all four queued in their batches, behind the held slot
            release.set()

    anyio.run(main)
    rows_a, rows_b = list(net_a.rows), list(net_b.rows)  # before the references below call the networks again
    for i, (model, _) in enumerate(requests):
        assert np.array_equal(results[i], points_alone(model, plans[i])), f"request {i} differs from its model alone"
    # One batch per model: two requests of 20 rows, each on a 16-row boundary (32 + 32), in every network call.
    assert set(rows_a) == {64} and set(rows_b) == {64}, (rows_a, rows_b)
    assert len(rows_a) == len(rows_b) == plans[0].steps


def test_a_request_that_leaves_before_its_batch_starts_is_not_computed(tiny_checkpoint):
    model, net = recording_model(tiny_checkpoint)
    gate = ComputeGate(1, 16, 30)
    batcher = Batcher(gate, Metrics(), 100_000, max_wait_ms=50)
    stays, cancelled, disconnected = (plan(model, SampleParams(n=n, seed=s)) for n, s in [(20, 1), (50, 2), (70, 3)])
    outcome = {}

    async def client_gone() -> bool:
        return True

    async def submit(name, p, is_disconnected=None):
        try:
            outcome[name], _ = await batcher.sample(model, p, is_disconnected)
        except Cancelled:
            outcome[name] = "cancelled"

    async def main():
        release = threading.Event()
        async with batcher.serving(), anyio.create_task_group() as tg:
            tg.start_soon(holding_the_only_slot, gate, release)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(submit, "stays", stays)
            tg.start_soon(submit, "disconnected", disconnected, client_gone)
            async with anyio.create_task_group() as leaving:
                leaving.start_soon(submit, "cancelled", cancelled)
                await anyio.wait_all_tasks_blocked()  # all three in one batch, waiting behind the held slot
                leaving.cancel_scope.cancel()  # e.g. the server cancelling the handler
            await anyio.wait_all_tasks_blocked()
            release.set()

    anyio.run(main)
    # Only the 20 rows that stayed (padded to 32) were evaluated, at every step.
    assert set(net.rows) == {32} and len(net.rows) == stays.steps, net.rows
    assert outcome["disconnected"] == "cancelled" and "cancelled" not in outcome
    assert np.array_equal(outcome["stays"], points_alone(model, stays))
    assert not gate.busy()


def test_shutdown_answers_queued_requests_instead_of_leaving_them_waiting(tiny_checkpoint):
    model, net = recording_model(tiny_checkpoint)
    gate = ComputeGate(1, 16, 30)
    batcher = Batcher(gate, Metrics(), 100_000, max_wait_ms=50)
    outcome = []

    async def submit():
        try:
            await batcher.sample(model, plan(model, SampleParams(n=10, seed=0)))
            outcome.append("ran")
        except ShuttingDown:
            outcome.append("503")

    async def main():
        release = threading.Event()
        async with anyio.create_task_group() as tg:
            async with batcher.serving():
                tg.start_soon(holding_the_only_slot, gate, release)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(submit)
                await anyio.wait_all_tasks_blocked()  # queued in a batch behind the held slot
            # The lifespan ended: the batch's runner is cancelled and its request answered.
            with anyio.fail_after(5):
                while not outcome:
                    await anyio.sleep(0)
            release.set()
        with pytest.raises(ShuttingDown):
            await batcher.sample(model, plan(model, SampleParams(n=10, seed=0)))

    anyio.run(main)
    assert outcome == ["503"] and net.rows == []


class PausingNet(RecordingNet):
    """Each call waits for `go` after evaluating: a test can act while the batch's job is mid-run."""

    def __init__(self, net):
        super().__init__(net)
        self.entered, self.go = threading.Event(), threading.Event()

    def __call__(self, x, t):
        out = super().__call__(x, t)
        self.entered.set()
        self.go.wait(10)
        return out


def test_a_started_batch_stops_at_its_next_step_once_every_member_has_left(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint, torch.device("cpu"))
    net = PausingNet(loaded.denoiser.net)
    model = replace(loaded, denoiser=replace(loaded.denoiser, net=net))
    gate = ComputeGate(1, 16, 30)
    batcher = Batcher(gate, Metrics(), 100_000, max_wait_ms=50)
    plans = [plan(model, SampleParams(n=20, sampler="ddim", seed=s)) for s in (1, 2)]

    async def main():
        release = threading.Event()
        async with batcher.serving(), anyio.create_task_group() as tg:
            tg.start_soon(holding_the_only_slot, gate, release)
            await anyio.wait_all_tasks_blocked()
            async with anyio.create_task_group() as leaving:
                for p in plans:
                    leaving.start_soon(batcher.sample, model, p)
                await anyio.wait_all_tasks_blocked()  # both in one batch, behind the held slot
                release.set()
                await anyio.to_thread.run_sync(net.entered.wait, 10)  # the batch's job is computing its first step
                leaving.cancel_scope.cancel()  # both callers go (e.g. their clients disconnected)
            net.go.set()
            with anyio.fail_after(10):
                while gate.busy():  # the job ends at its next step boundary, not after all of them
                    await anyio.sleep(0.01)

    anyio.run(main)
    assert set(net.rows) == {64}, net.rows  # both requests were in the one job
    assert len(net.rows) < plans[0].steps, f"ran {len(net.rows)} of {plans[0].steps} steps for nobody"
