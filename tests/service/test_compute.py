"""Admission control: bounded queue, deadlines, cancellation."""

import threading
import time

import anyio
import pytest

from service.compute import Cancelled, ComputeGate, DeadlineExceeded, Overloaded


def test_queue_full_is_refused_at_once_with_retry_after():
    async def main():
        gate = ComputeGate(max_concurrency=1, max_queue=1, timeout_s=10)
        release = threading.Event()
        outcomes = []

        async def submit():
            try:
                await gate.run(lambda job: release.wait(5))
                outcomes.append("ok")
            except Overloaded as e:
                outcomes.append(("503", e.retry_after_s))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(submit)
                # A barrier, not a pause: this submission has run, or is blocked in the gate, before the next one.
                await anyio.wait_all_tasks_blocked()
            # The first runs, the second waits: the third and fourth were refused at once, before any release.
            assert len(outcomes) == 2 and all(o[0] == "503" for o in outcomes), outcomes
            release.set()
        return outcomes

    outcomes = anyio.run(main)
    assert outcomes.count("ok") == 2, "one running + one queued"
    refused = [o for o in outcomes if o != "ok"]
    assert len(refused) == 2 and all(r[1] >= 1 for r in refused)


def test_cannot_start_before_deadline_is_503():
    async def main():
        gate = ComputeGate(max_concurrency=1, max_queue=10, timeout_s=0.2)
        release = threading.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.run, lambda job: release.wait(2))
            await anyio.wait_all_tasks_blocked()  # the first job has the only slot
            with pytest.raises(Overloaded, match="could not start within"):
                await gate.run(lambda job: None)
            release.set()

    anyio.run(main)


def stepping_job(steps: int, steps_done: list[int]):
    """A job shaped like sampling: `steps` steps of 10 ms, checking its deadline/cancellation at each boundary."""

    def work(job):
        for i in range(steps):
            job.check()
            steps_done.append(i)
            time.sleep(0.01)

    return work


def test_running_past_deadline_is_abandoned_at_a_step_boundary():
    steps_done = []
    work = stepping_job(100, steps_done)

    async def main():
        gate = ComputeGate(max_concurrency=1, max_queue=0, timeout_s=0.1)
        with pytest.raises(DeadlineExceeded):
            await gate.run(work)
        assert not gate.busy(), "nothing left running or waiting"
        # The slot was freed: the next job runs.
        result, timing = await gate.run(lambda job: 42)
        assert result == 42 and timing.queue_s < 0.05

    anyio.run(main)
    assert 3 < len(steps_done) < 30


def test_client_disconnect_stops_the_work():
    steps_done = []
    work = stepping_job(500, steps_done)

    async def main():
        gate = ComputeGate(max_concurrency=1, max_queue=0, timeout_s=60)
        start = time.monotonic()

        async def disconnected():
            return time.monotonic() - start > 0.15

        with pytest.raises(Cancelled):
            await gate.run(work, disconnected)

    anyio.run(main)
    assert len(steps_done) < 60


def test_only_a_job_still_running_after_a_moment_watches_its_client():
    """The watcher costs a task per request: jobs done within _WATCH_AFTER_S never poll their client."""
    polls = []

    async def disconnected():
        polls.append(time.monotonic())
        return False

    async def main():
        gate = ComputeGate(max_concurrency=1, max_queue=0, timeout_s=60)
        assert (await gate.run(lambda job: "quick", disconnected))[0] == "quick"
        assert polls == []
        assert (await gate.run(lambda job: time.sleep(0.3) or "slow", disconnected))[0] == "slow"
        await anyio.sleep(0.15)  # a cancelled watcher polls no more
        return len(polls)

    assert 2 <= anyio.run(main) <= 4  # after 0.05 s, then every 0.1 s until the job ends at 0.3 s


def test_a_cancelled_caller_stops_its_worker_at_the_next_step():
    """The awaiting task is cancelled (e.g. shutdown): the job is marked, so the worker's next check() raises."""
    gate = ComputeGate(1, 4, 30)
    started, finished, outcome = threading.Event(), threading.Event(), []

    def work(job):
        started.set()
        try:
            for step in range(500):  # 5 s if nobody stops it
                time.sleep(0.01)
                try:
                    job.check()
                except Cancelled:
                    outcome.append(step)
                    return
            outcome.append("ran to the end")
        finally:
            finished.set()

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.run, work)
            await anyio.to_thread.run_sync(started.wait, 5)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert finished.wait(10)
    assert outcome != ["ran to the end"] and outcome[0] < 100


def test_run_reserves_the_points_of_its_job_and_releases_them_however_it_ends():
    async def main():
        gate = ComputeGate(max_concurrency=2, max_queue=4, timeout_s=10, max_points=100)
        release = threading.Event()

        def fail(job):
            raise ValueError("the work failed")

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: gate.run(lambda job: release.wait(5), points=60))
            await anyio.wait_all_tasks_blocked()  # the first job holds its 60 points
            with pytest.raises(Overloaded, match="60 points in flight, limit 100"):
                await gate.run(lambda job: None, points=41)
            assert (await gate.run(lambda job: "fits", points=40))[0] == "fits"
            release.set()
        with pytest.raises(ValueError):
            await gate.run(fail, points=100)
        # Everything was given back: the whole budget is free again.
        assert (await gate.run(lambda job: "all", points=100))[0] == "all"
        with gate.admit(100), pytest.raises(Overloaded), gate.admit(1):
            pass  # a batched request's own share (Batcher.sample) counts against the same bound
        assert not gate.busy()

    anyio.run(main)
