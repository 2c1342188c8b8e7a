"""Block-parallel CPU sampling: a seed's points are the same bits whatever the split, thread count or batch."""

import threading
import time
from contextlib import contextmanager

import pytest
import torch
from fastapi.testclient import TestClient

from bench.live_server import REPO
from diffusion.checkpoint import load_model
from diffusion.denoiser import ROW_ALIGN
from diffusion.noise import from_generator, from_sources
from diffusion.samplers import get_sampler, sample
from service.app import create_app
from service.batching import run_batch
from service.blocks import MIN_BLOCK_ROWS, PAIR_MIN_ROWS, BlockNoise, BlockPool, SharedDraws, split_rows
from service.compute import DeadlineExceeded, Job
from service.jobs import plan, run_plan
from service.schemas import SampleParams
from service.settings import Settings

SMALL_BLOCK = 256  # rows per block in these tests; the service uses MIN_BLOCK_ROWS

CHECKPOINT = REPO / "checkpoints" / "swissroll.pt"


@pytest.fixture(scope="module")
def model():
    return load_model(CHECKPOINT, torch.device("cpu"))


@pytest.fixture(scope="module")
def pools():
    # Small blocks (the service's minimum is larger), so the splits below stay cheap to test.
    return {k: BlockPool(k, min_block_rows=SMALL_BLOCK) for k in (2, 3, 5)}


@contextmanager
def intra_op_threads(k: int):
    before = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    # The unsplit reference runs with one intra-op thread: alone, single-threaded.
    with intra_op_threads(1):
        yield


def job(blocks=None, deadline=float("inf")) -> Job:
    return Job(deadline, threading.Event(), blocks=blocks)


@pytest.mark.parametrize("rows", [1, 15, 16, 255, 512, 1000, 4097, 100_000])
@pytest.mark.parametrize("blocks", [1, 2, 3, 8])
def test_split_covers_the_rows_on_row_align_boundaries(rows, blocks):
    ranges = split_rows(rows, blocks)
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a == prev_b for (a, _), (_, prev_b) in zip(ranges[1:], ranges, strict=False))
    assert all(a % ROW_ALIGN == 0 for a, _ in ranges)
    if rows >= 2 * MIN_BLOCK_ROWS:  # as many blocks of at least MIN_BLOCK_ROWS as there are threads for
        assert len(ranges) == min(blocks, rows // MIN_BLOCK_ROWS)
        assert all(b - a >= MIN_BLOCK_ROWS - ROW_ALIGN for a, b in ranges)
    else:  # too small for that: two blocks (cheap on the GIL) from 2 x PAIR_MIN_ROWS rows, else one
        assert len(ranges) == (min(blocks, 2) if rows >= 2 * PAIR_MIN_ROWS else 1)
    small = split_rows(rows, blocks, SMALL_BLOCK)
    assert len(small) == max(1, min(blocks, rows // SMALL_BLOCK)) and small[-1][1] == rows


@pytest.mark.parametrize(
    ("name", "params"), [("ddpm", {}), ("dpmpp_2m", {}), ("ddpm_x0", {}), ("ddim", {"eta": 1.0}), ("ddim", {})]
)
@pytest.mark.parametrize("reference_threads", [1, 2])
def test_split_is_bit_identical_to_the_unsplit_run(model, pools, name, params, reference_threads):
    # n = 1000 over 2, 3 and 5 blocks (1000 / 5 = 200 rows < SMALL_BLOCK: 3 blocks), frames and x0 included,
    # against one unsplit chain alone with 1 intra-op thread and with 2 (the old intra_op path).
    p = plan(model, SampleParams(n=1000, sampler=name, seed=11, **params))
    with intra_op_threads(reference_threads):
        alone = run_plan(model, p, job(), record=True, record_x0=True)
    assert torch.equal(
        torch.from_numpy(alone[0]), sample(model.denoiser, name, 1000, torch.Generator().manual_seed(11), **params)
    )
    for k, pool in pools.items():
        split = run_plan(model, p, job(pool), record=True, record_x0=True)
        for a, b in zip(alone, split, strict=True):
            assert a.shape == b.shape and (a == b).all(), f"{name} differs split over {k} threads"


def test_batched_and_split_equals_each_request_alone(model, pools, one_thread):
    # Requests straddle block boundaries and carry alignment padding between them.
    sizes = [(3, 1), (700, 2), (17, 3), (1000, 4), (250, 5)]
    spec = get_sampler("ddpm")
    plans = [plan(model, SampleParams(n=n, sampler="ddpm", seed=seed)) for n, seed in sizes]
    for pool in pools.values():
        batched = run_batch(model, plans, job(pool))
        for (n, seed), got in zip(sizes, batched, strict=True):
            expected = sample(model.denoiser, spec.name, n, torch.Generator().manual_seed(seed)).numpy()
            assert (got == expected).all(), f"n={n} seed={seed} differs batched and split over {pool.threads}"


def test_blocks_run_single_threaded_and_leave_the_caller_alone(model, pools):
    seen = []

    def probe(denoiser, x, ts, noise, callback=None):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return x

    before = torch.get_num_threads()
    pools[3].run(probe, model.denoiser, 3 * SMALL_BLOCK, [0], from_generator(torch.Generator()), lambda: None)
    workers = [threads for name, threads in seen if name.startswith("swissroll-block")]
    assert len(seen) == 3 and len(workers) == 2 and workers == [1, 1]
    assert torch.get_num_threads() == before  # set_num_threads in the workers did not reach this thread


def test_deadline_in_one_block_stops_the_job_and_the_pool_stays_usable(model, pools):
    p = plan(model, SampleParams(n=2000, sampler="ddpm", seed=0))
    steps = []

    class Expiring(Job):
        def check(self, *_args):
            steps.append(threading.current_thread().name)
            if len(steps) > 6:
                raise DeadlineExceeded

    with pytest.raises(DeadlineExceeded):
        run_plan(model, p, Expiring(float("inf"), threading.Event(), blocks=pools[2]))
    assert len(steps) < p.steps * 2  # the other block stopped too, at its next step
    out, _, _ = run_plan(model, p, job(pools[2]))
    assert out.shape == (2000, 2)


@pytest.mark.parametrize("declared", [None, 2])
def test_shared_draws_hand_every_block_its_rows_of_one_draw_and_free_it(declared):
    sources = [(torch.Generator().manual_seed(1), 40), (None, 8), (torch.Generator().manual_seed(2), 32)]
    made = []
    noise = from_sources(sources)
    tape = SharedDraws(lambda like: made.append(1) or noise(like), rows=80, blocks=2, draws=declared)
    first, second = BlockNoise(tape, 0, 48), BlockNoise(tape, 48, 80)
    like = torch.empty(1, 2)
    head = first(like)
    assert len(made) == (2 if declared else 1)  # told the count, the first taker of draw 0 made draw 1 too
    draws = [torch.cat([head, second(like)]), torch.cat([first(like), second(like)])]
    assert not tape._entries and len(made) == 2  # both blocks took both draws: nothing kept, nothing drawn in vain
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for draw in draws:
        assert torch.equal(draw[:40], torch.randn(40, 2, generator=g1)) and not draw[40:48].any()
        assert torch.equal(draw[48:], torch.randn(32, 2, generator=g2))


def test_draws_made_ahead_stay_in_order_whatever_the_threads_timing():
    # Three blocks on threads, each pausing at random between draws: every block's rows of draw k are the unsplit
    # run's draw k, however the first takers (who draw ahead) alternate.
    rows, blocks, draws = 96, 3, 12
    reference = torch.randn(draws, rows, 2, generator=torch.Generator().manual_seed(7))
    for trial in range(20):
        tape = SharedDraws(from_generator(torch.Generator().manual_seed(7)), rows, blocks, draws)
        pause = torch.rand(blocks, draws, generator=torch.Generator().manual_seed(trial)) * 1e-3
        got = {}

        def block(j, tape, pause, got):
            noise = BlockNoise(tape, 32 * j, 32 * (j + 1))
            for k in range(draws):
                time.sleep(float(pause[j, k]))
                got[j, k] = noise(torch.empty(32, 2))

        threads = [threading.Thread(target=block, args=(j, tape, pause, got)) for j in range(blocks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (j, k), value in got.items():
            assert torch.equal(value, reference[k, 32 * j : 32 * (j + 1)])
        assert not tape._entries


def test_served_points_with_two_block_threads_equal_the_sampler_alone(tiny_checkpoint, one_thread):
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", torch_threads=2)
    app = create_app(settings)
    with TestClient(app) as client:
        assert app.state.gate.blocks is not None and app.state.gate.blocks.threads == 2
        for name in ("ddpm", "dpmpp_2m"):
            body = client.get(f"/sample?n=1000&sampler={name}&seed=5").json()
            direct = sample(app.state.models.get().denoiser, name, 1000, torch.Generator().manual_seed(5))
            assert torch.equal(torch.tensor(body["points"], dtype=torch.float32), direct)
