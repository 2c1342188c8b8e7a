"""training.distill's distil() as the test suite runs it."""

import os

import torch

from training.distill import distil, parse_args


def distil_on_one_thread(argv: list[str]) -> dict:
    """distil(parse_args(argv)) on one torch thread, as the rest of the suite runs: distil() sets the count from
    SWISSROLL_TORCH_THREADS, and two threads' barriers on tiny batches crawl on a busy machine. The process's
    thread count and the variable are restored after. Returns the exported metadata."""
    threads, saved = torch.get_num_threads(), os.environ.get("SWISSROLL_TORCH_THREADS")
    os.environ["SWISSROLL_TORCH_THREADS"] = "1"
    try:
        return distil(parse_args(argv))
    finally:
        torch.set_num_threads(threads)
        if saved is None:
            del os.environ["SWISSROLL_TORCH_THREADS"]
        else:
            os.environ["SWISSROLL_TORCH_THREADS"] = saved
