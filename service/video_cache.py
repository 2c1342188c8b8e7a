"""Rendered animations, kept in a bounded LRU by bytes; identical concurrent requests render once."""

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import anyio


def animation_key(model_id: str, process: str, computation, seed: int, n: int, fps: int, size: int) -> str:
    """Names one video: the model (its checkpoint id: another model's video of the same request differs), the
    process and what decides it (Plan.key() for the reverse process, the levels for the forward one), the seed,
    n and the encoding."""
    return f"{model_id}|{process}|{computation}|{seed}|{n}|{fps}|{size}"


def etag(key: str) -> str:
    """The strong ETag of the video `key` names (the key itself may be long, and shows the model id)."""
    return f'"{hashlib.sha256(key.encode()).hexdigest()[:32]}"'


class VideoCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[str, anyio.Event] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def _get(self, key: str) -> bytes | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def _put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return  # larger than the whole cache: serve it, do not keep it
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)

    async def get_or_render(self, key: str, render: Callable[[], Awaitable[bytes]]) -> tuple[bytes, bool]:
        """(data, was_cached). Requests for a key being rendered wait for that render instead of repeating it."""
        while (pending := self._inflight.get(key)) is not None:
            await pending.wait()
        data = self._get(key)
        if data is not None:
            self.hits += 1
            return data, True
        # Not cached (never rendered, evicted, too large to keep, or the render we waited on failed): render.
        self.misses += 1
        event = self._inflight[key] = anyio.Event()
        try:
            data = await render()
            self._put(key, data)
            return data, False
        finally:
            del self._inflight[key]
            event.set()
