"""training.distill's distil() as the test suite runs it."""

import pytest
import torch

from diffusion.cpus import THREADS_ENV
from training.distill import distil, parse_args
from training.train import TrainConfig, train

# The settings of a seconds-long distillation (a few iterations, tiny evaluations and level search) after a
# one-epoch teacher: the tests check what gets written, not how good it is.
TINY_RUN = [
    "--consistency-iterations", "2", "--batch-size", "64", "--eval-points", "500", "--search-seeds", "2",
    "--search-points", "300", "--no-progress",
]  # fmt: skip


def tiny_teacher(path) -> None:
    """A default-preset teacher trained for one epoch on 2,000 points."""
    config = dict(epochs=1, batch_size=256, n_samples=2000, progress=False, loss_curve=False, evaluate=False)
    train(TrainConfig(**config, preset="default", out=str(path)))


def distil_on_one_thread(argv: list[str]) -> dict:
    """distil(parse_args(argv)) on one torch thread, as the rest of the suite runs: distil() sets the count from
    SWISSROLL_TORCH_THREADS, and two threads' barriers on tiny batches crawl on a busy machine. The process's
    thread count and the variable are restored after. Returns the exported metadata."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as env:
        env.setenv(THREADS_ENV, "1")
        try:
            return distil(parse_args(argv))
        finally:
            torch.set_num_threads(threads)
