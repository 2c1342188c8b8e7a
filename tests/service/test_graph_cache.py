"""The CUDA graph cache's logic against a fake capture backend: buckets, LRU within the budget, keys,
fallback to eager, invalidation when a model is reloaded."""

import threading
from dataclasses import dataclass

import pytest

from service.graph_cache import GraphCache, bucket_rows


@dataclass
class FakeGraph:
    bucket: int
    nbytes: int


class Backend:
    """Captures 'graphs' costing bytes_per_row per padded row, and counts captures."""

    def __init__(self, bytes_per_row: int = 1):
        self.bytes_per_row, self.captured = bytes_per_row, []

    def __call__(self, bucket: int) -> FakeGraph:
        self.captured.append(bucket)
        return FakeGraph(bucket, bucket * self.bytes_per_row)


def run(cache: GraphCache, key, rows: int, backend: Backend):
    acquired = cache.acquire(key, rows, backend)
    if acquired is None:
        return None
    graph, release = acquired
    release()
    return graph


def test_buckets_pad_by_at_most_a_quarter_and_are_monotone():
    assert bucket_rows(1) == bucket_rows(1024) == 1024
    assert [bucket_rows(r) for r in (1025, 1281, 1537, 1793, 2049)] == [1280, 1536, 1792, 2048, 2560]
    previous = 0
    for rows in range(1, 300_000, 997):
        b = bucket_rows(rows)
        assert b >= rows and b >= previous
        assert rows <= 1024 or b <= 1.25 * rows
        previous = b


def test_one_capture_per_key_and_bucket_then_replays():
    cache, backend = GraphCache(10**9, 1 << 20), Backend()
    key = ("model-a", "ddpm", (39, 38), (), "fp32")
    g1 = run(cache, key, 10_000, backend)
    g2 = run(cache, key, 9_000, backend)  # same bucket (10240)
    assert g1 is g2 and backend.captured == [10240]
    run(cache, key, 20_000, backend)  # another bucket
    run(cache, ("model-a", "ddim", (39, 38), (), "fp32"), 10_000, backend)  # another sampler
    run(cache, ("model-a", "ddpm", (39, 38), (), "bf16"), 10_000, backend)  # another precision
    assert backend.captured == [10240, 20480, 10240, 10240]
    assert cache.stats()["captures"] == 4 and cache.stats()["replays"] == 5


def test_lru_eviction_keeps_the_total_within_the_budget():
    cache, backend = GraphCache(budget_bytes=3 * 1024, max_rows=1 << 20), Backend()
    for name in "abc":
        run(cache, (name,), 100, backend)  # 1024 bytes each: fills the budget
    run(cache, ("a",), 100, backend)  # a is now the most recently used
    run(cache, ("d",), 100, backend)  # evicts b, the least recently used
    assert cache.used_bytes <= 3 * 1024 and cache.evictions == 1
    run(cache, ("a",), 100, backend)
    run(cache, ("c",), 100, backend)
    assert backend.captured.count(1024) == 4  # a, c, d still cached: no re-capture
    run(cache, ("b",), 100, backend)
    assert backend.captured.count(1024) == 5


def test_a_graph_larger_than_the_budget_runs_eager_and_is_not_captured_again():
    cache, backend = GraphCache(budget_bytes=1000, max_rows=1 << 20), Backend()
    assert run(cache, ("k",), 10, backend) is None  # 1024 bytes > 1000
    assert run(cache, ("k",), 10, backend) is None
    assert backend.captured == [1024] and cache.stats()["eager_fallbacks"] == 2


def test_runs_beyond_the_largest_bucket_run_eager():
    cache, backend = GraphCache(10**9, max_rows=5000), Backend()
    assert run(cache, ("k",), 5001, backend) is None and backend.captured == []
    assert run(cache, ("k",), 5000, backend) is not None


def test_busy_or_capturing_graphs_send_other_callers_to_eager():
    cache, backend = GraphCache(10**9, 1 << 20), Backend()
    graph, release = cache.acquire(("k",), 100, backend)
    assert cache.acquire(("k",), 100, backend) is None  # being replayed: its static buffers are in use
    release()
    assert run(cache, ("k",), 100, backend) is graph

    capturing, proceed = threading.Event(), threading.Event()

    def slow_capture(bucket):
        capturing.set()
        proceed.wait(5)
        return FakeGraph(bucket, 1)

    worker = threading.Thread(target=lambda: run(cache, ("slow",), 100, slow_capture))
    worker.start()
    assert capturing.wait(5)
    assert cache.acquire(("slow",), 100, backend) is None  # capture in progress: eager meanwhile
    proceed.set()
    worker.join(5)
    assert run(cache, ("slow",), 100, backend) is not None


def test_a_busy_graph_is_not_evicted():
    cache, backend = GraphCache(budget_bytes=1024, max_rows=1 << 20), Backend()
    graph, release = cache.acquire(("a",), 100, backend)
    run(cache, ("b",), 100, backend)  # over budget while a replays: a stays
    release()
    assert cache.acquire(("a",), 100, backend) is not None


def test_failed_capture_leaves_no_entry():
    cache = GraphCache(10**9, 1 << 20)

    def broken(_bucket):
        raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError):
        cache.acquire(("k",), 100, broken)
    assert len(cache) == 0 and run(cache, ("k",), 100, Backend()) is not None


def test_invalidate_drops_exactly_the_reloaded_models_graphs():
    evicted = []
    cache, backend = GraphCache(10**9, 1 << 20, on_evict=lambda: evicted.append(1)), Backend()
    run(cache, ("model-a", "ddpm"), 100, backend)
    run(cache, ("model-a", "ddim"), 5000, backend)
    run(cache, ("model-b", "ddpm"), 100, backend)
    assert cache.invalidate("model-a") == 2 and evicted
    assert len(cache) == 1
    run(cache, ("model-a", "ddpm"), 100, backend)  # re-captured for the new weights
    assert len(backend.captured) == 4
