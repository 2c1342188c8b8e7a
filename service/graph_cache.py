"""A bounded LRU of captured CUDA graphs: whole sampling runs, replayed with one launch.

Graphs are captured lazily, one per key (model id, sampler, levels, parameters, precision, row bucket). Rows
are padded up to a bucket size, as vLLM pads batches to its captured sizes, so a handful of graphs serve
every request size. Captured graphs hold their own memory, so the cache keeps their total under a budget,
evicting the least recently used. Whoever gets None runs eager: a key being captured by another thread, a
graph being replayed by another thread (its static buffers are in use), a run larger than the biggest
bucket, or one whose graph would not fit the budget. The capture itself is a callable given by the caller,
so this logic is tested on CPU with a fake backend.
"""

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol


class Captured(Protocol):
    nbytes: int  # device memory the graph keeps (static buffers and its private pool)


def bucket_rows(rows: int, smallest: int = 1024) -> int:
    """The smallest bucket >= rows: 1024, 1280, 1536, 1792, 2048, 2560, ... (four sizes per doubling, so
    padding wastes at most a quarter of a run)."""
    if rows <= smallest:
        return smallest
    size = smallest
    while True:
        for quarter in (5, 6, 7, 8):
            candidate = size * quarter // 4
            if candidate >= rows:
                return candidate
        size *= 2


@dataclass
class _Entry:
    graph: Captured | None = None  # None while being captured
    busy: threading.Lock = field(default_factory=threading.Lock)


class GraphCache:
    def __init__(self, budget_bytes: int, max_rows: int, on_evict: Callable[[], None] | None = None):
        self.budget_bytes, self.max_rows = budget_bytes, max_rows
        self._on_evict = on_evict  # e.g. return freed pool memory to the driver
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._too_big: set[Hashable] = set()
        self._lock = threading.Lock()
        self.captures = self.evictions = self.replays = self.fallbacks = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.graph.nbytes for e in self._entries.values() if e.graph is not None)

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, key: Hashable, rows: int, capture: Callable[[int], Captured]):
        """(graph, release) for `rows` padded to its bucket, capturing it first if need be; None: run eager.
        The caller replays the graph, copies its output out, then calls release()."""
        if rows > self.max_rows:
            return self._fallback()
        key = (key, bucket_rows(rows))
        with self._lock:
            if key in self._too_big:
                return self._fallback()
            entry = self._entries.get(key)
            if entry is not None:
                if entry.graph is None or not entry.busy.acquire(blocking=False):
                    return self._fallback()  # being captured, or replaying for someone else
                self._entries.move_to_end(key)
                self.replays += 1
                return entry.graph, entry.busy.release
            entry = self._entries[key] = _Entry()
            entry.busy.acquire()
        try:
            graph = capture(key[1])
        except BaseException:
            with self._lock:
                del self._entries[key]
            entry.busy.release()
            raise
        with self._lock:
            self.captures += 1
            if graph.nbytes > self.budget_bytes:
                del self._entries[key]
                self._too_big.add(key)
                entry.busy.release()
                evicted = True
                result = None
            else:
                evicted = self._evict_for(graph.nbytes, keep=key)
                entry.graph = graph
                self.replays += 1
                result = (graph, entry.busy.release)
        if evicted and self._on_evict is not None:
            self._on_evict()
        return result if result is not None else self._fallback()

    def _evict_for(self, nbytes: int, keep: Hashable) -> bool:
        """Drops least recently used idle graphs until nbytes more fit. Called with the lock held."""
        used = sum(e.graph.nbytes for e in self._entries.values() if e.graph is not None)
        evicted = False
        for key in list(self._entries):
            if used + nbytes <= self.budget_bytes:
                break
            entry = self._entries[key]
            if key == keep or entry.graph is None or not entry.busy.acquire(blocking=False):
                continue  # in use: it stays, and the budget is exceeded until it is idle
            del self._entries[key]
            entry.busy.release()
            used -= entry.graph.nbytes
            self.evictions += 1
            evicted = True
        return evicted

    def invalidate(self, owner: Hashable) -> int:
        """Forgets every graph whose key starts with `owner` (a model id): its weights are being replaced."""
        with self._lock:
            stale = [k for k in self._entries if isinstance(k[0], tuple) and k[0][:1] == (owner,)]
            for k in stale:
                del self._entries[k]
            self._too_big = {k for k in self._too_big if k[0][:1] != (owner,)}
        if stale and self._on_evict is not None:
            self._on_evict()
        return len(stale)

    def _fallback(self):
        self.fallbacks += 1
        return None

    def stats(self) -> dict:
        return {
            "graphs": len(self._entries),
            "bytes": self.used_bytes,
            "budget_bytes": self.budget_bytes,
            "captures": self.captures,
            "replays": self.replays,
            "evictions": self.evictions,
            "eager_fallbacks": self.fallbacks,
        }
