"""Block-parallel CPU sampling: a job's rows split into independent blocks, each running the whole sampler chain
on one thread with one torch intra-op thread.

Why not torch's own intra-op threads: every tensor op of a sampling job (hundreds per request) is an OpenMP
parallel region ending in a barrier. When another process holds one of the cores, the thread that lost it
arrives late at every barrier and the other spins or sleeps waiting: /sample?n=10000 went from ~110 ms to
3-12 s beside a single busy process on a 2-core machine (bench/results/contention.md). Rows of a sampling job
never interact, so blocks need no synchronization until the end: a descheduled block thread delays the job
by its own share only, once.

Bit-exact by construction, so a seed's points do not depend on the split, the thread count or the batch:
- block boundaries fall on ROW_ALIGN, so each row meets the network at the same position modulo the vector
  width as in one unsplit call (denoiser.ROW_ALIGN);
- noise is drawn whole, per request, in the order the unsplit run draws it (x_T, then each step's noise, from
  each request's own generator; SharedDraws), and every block takes its rows of each draw;
- everything else is element-wise.
"""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from diffusion.denoiser import ROW_ALIGN
from diffusion.guidance import GuidedDenoiser
from diffusion.noise import Noise, initial_noise
from diffusion.samplers import SamplerSpec, Step
from diffusion.step_coefficients import run_draws

# Rows per block, at least. Every block thread holds the GIL for each op's Python and dispatch overhead, so
# many small blocks queue on the GIL instead of computing: on a 16-core host (in-process ddpm@40, ms for
# n = 1k / 10k / 100k) intra-op threads took 28 / 130 / 744, blocks of >= 256 rows 26 / 207 / 360, of >= 1024
# rows 21 / 116 / 363, of >= 2048 rows 23 / 79 / 343, of >= 4096 rows 33 / 133 / 348. On 2 cores a 1,000-row job
# is ~3 ms faster in two blocks than in one, but a single block needs no other core at all, whoever holds it.
MIN_BLOCK_ROWS = 2048
# Two blocks cost the GIL little, so jobs too small for two MIN_BLOCK_ROWS blocks still split in two from this many
# rows each. With the fused CPU layers (diffusion/folded.py; ~15 us of oneDNN per call), in-process ddpm@40 on 2 cores
# took 10.5 ms in two blocks and 8.8 in one at n = 600, 11.6 in either at 1,000, 14.2 vs 18.6 at 2,000.
PAIR_MIN_ROWS = 512


class SharedDraws:
    """Every noise draw a sampler makes, drawn in full from the run's noise, shared by the blocks: draw k of a split
    run equals draw k of the unsplit run.

    Told how many draws the run makes (`draws`, x_T included), the first block to take draw k also makes draw k + 1
    right after it, so the other blocks find each draw ready instead of waiting for one block to draw it, and then
    for their thread to be woken (in-process on 2 cores, n = 10,000: ddpm@40 43.1 -> 42.5 ms, the student's 2 steps
    2.03 -> 2.00 ms). Draws stay in order: draw k + 1 is made by a block that has draw k. Without `draws`, each draw
    is made on first demand (nothing drawn in vain)."""

    def __init__(self, noise: Noise, rows: int, blocks: int, draws: int | None = None):
        self.noise, self.rows, self.blocks, self.draws = noise, rows, blocks, draws
        self._lock = threading.Lock()
        self._entries: dict[int, _Draw] = {}

    def take(self, k: int, like: torch.Tensor) -> torch.Tensor:
        with self._lock:
            entry = self._entries.setdefault(k, _Draw())
            ahead = None
            if self.draws is not None and k + 1 < self.draws and k + 1 not in self._entries:
                ahead = self._entries[k + 1] = _Draw()
        draw = self._drawn(entry, like)
        if ahead is not None:
            self._drawn(ahead, like)
        with self._lock:
            entry.taken += 1
            if entry.taken == self.blocks:  # the last taker frees it
                del self._entries[k]
        return draw

    def _drawn(self, entry: "_Draw", like: torch.Tensor) -> torch.Tensor:
        with entry.lock:
            if entry.value is None:
                entry.value = self.noise(like.new_empty((self.rows, *like.shape[1:])))
            return entry.value


class _Draw:
    __slots__ = ("lock", "value", "taken")

    def __init__(self):
        self.lock, self.value, self.taken = threading.Lock(), None, 0


class BlockNoise:
    """One block's noise: its rows of each shared draw, in order."""

    def __init__(self, tape: SharedDraws, start: int, stop: int):
        self.tape, self.start, self.stop = tape, start, stop
        self._k = 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        draw = self.tape.take(self._k, like)
        self._k += 1
        return draw[self.start : self.stop]


def block_count(rows: int, threads: int, min_rows: int = MIN_BLOCK_ROWS) -> int:
    """Blocks of at least min_rows, one per thread at most; two from 2 x PAIR_MIN_ROWS rows where threads allow."""
    pair = 2 if rows >= 2 * min(PAIR_MIN_ROWS, min_rows) else 1
    return max(1, min(threads, max(rows // min_rows, pair)))


def split_rows(rows: int, blocks: int, min_rows: int = MIN_BLOCK_ROWS) -> list[tuple[int, int]]:
    """Near-equal [start, stop) ranges for block_count(rows, blocks, min_rows) blocks, starts on ROW_ALIGN."""
    blocks = block_count(rows, blocks, min_rows)
    units = -(-rows // ROW_ALIGN)
    bounds = [min(rows, round(units * j / blocks) * ROW_ALIGN) for j in range(blocks + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


class BlockPool:
    """Threads that run sampler chains on blocks of rows, each with one torch intra-op thread. The calling thread
    runs the first block itself, so `threads` compute threads in all need threads - 1 here."""

    def __init__(self, threads: int, min_block_rows: int = MIN_BLOCK_ROWS):
        self.threads, self.min_block_rows = threads, min_block_rows
        # torch.set_num_threads is per thread (OpenMP ICV, MKL's local setting): it must run in each worker.
        self._executor = ThreadPoolExecutor(
            max(1, threads - 1), "swissroll-block", initializer=torch.set_num_threads, initargs=(1,)
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def run(
        self,
        fn: Callable,
        denoiser,
        rows: int,
        ts,
        noise: Noise,
        check: Callable[[], None],
        record: bool = False,
        record_x0: bool = False,
        draws: int | None = None,
        **params,
    ) -> tuple[torch.Tensor | None, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """fn over `rows` rows in blocks, x_T being the first draw of `noise`; (x_T, x_0, states after each step, x0
        per step); x_T only when recording (its first frame), else None. The blocks are handed out before x_T is
        drawn: a block thread wakes while it is drawn (on 2 cores the wake-up took as long as the draw, ~50 us of each
        request) instead of after."""
        ranges = split_rows(rows, self.threads, self.min_block_rows)
        tape = SharedDraws(noise, rows, len(ranges), draws)
        failed = threading.Event()

        def check_block() -> None:
            if failed.is_set():  # another block failed: its error is the job's answer, stop here
                raise _Abandoned
            check()

        def block(start: int, stop: int):
            steps = _Recorder(check_block, record, record_x0)
            try:
                # A guided denoiser carries one condition per row: the block takes its rows of them.
                block_denoiser = denoiser.rows(start, stop) if isinstance(denoiser, GuidedDenoiser) else denoiser
                block_noise = BlockNoise(tape, start, stop)
                x = initial_noise(stop - start, block_noise, "cpu")  # its rows of draw 0, x_T
                out = fn(block_denoiser, x, ts, block_noise, steps, **params)
            except BaseException:
                failed.set()
                raise
            return x, out, steps.frames, steps.x0s

        futures = [self._executor.submit(block, a, b) for a, b in ranges[1:]]
        results, error = [], None
        for run_here in [lambda: block(*ranges[0])] + [f.result for f in futures]:
            try:
                results.append(run_here())
            except _Abandoned:
                pass
            except BaseException as e:  # every block has stopped before the job's error is raised
                error = error or e
        if error is not None:
            raise error
        starts, outs, frames, x0s = zip(*results, strict=True)
        per_step = [[torch.cat(f) for f in zip(*block, strict=True)] for block in (frames, x0s)]
        return (torch.cat(starts) if record else None), torch.cat(outs), per_step[0], per_step[1]


class _Abandoned(Exception):
    pass


class _Recorder:
    """The sampler callback of a service run: check() after every step, and the states asked for kept."""

    def __init__(self, check: Callable[[], None], record: bool, record_x0: bool):
        self.check, self.record, self.record_x0 = check, record, record_x0
        self.frames: list[torch.Tensor] = []
        self.x0s: list[torch.Tensor] = []

    def __call__(self, step: Step) -> None:
        self.check()
        if self.record:
            self.frames.append(step.x)
        if self.record_x0:
            self.x0s.append(step.x0)


def run_sampler(
    pool: BlockPool | None,
    spec: SamplerSpec,
    denoiser,
    rows: int,
    ts,
    noise: Noise,
    check: Callable[[], None],
    record: bool = False,
    record_x0: bool = False,
    **params,
) -> tuple[torch.Tensor | None, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A run of `spec`'s sampler for the service over `rows` rows, x_T being the first draw of `noise`: split over
    `pool` on CPU (told how many draws the run makes, see SharedDraws), else one chain on this thread (on a GPU the
    device parallelizes each op; blocks would only add launches). check() runs after every step.
    Returns (x_T when recording else None, x_0, states after each step, x0 per step)."""
    if pool is not None and denoiser.device.type == "cpu":
        draws = run_draws(denoiser, spec.name, ts, params)
        return pool.run(spec.fn, denoiser, rows, ts, noise, check, record, record_x0, draws, **params)
    steps = _Recorder(check, record, record_x0)
    x = initial_noise(rows, noise, denoiser.device)
    return (x if record else None), spec.fn(denoiser, x, ts, noise, steps, **params), steps.frames, steps.x0s
