"""gzip by ISA-L (service/compression.py): real gzip streams, whole, large (compressed on a worker thread) and
streamed in chunks, inflated by the standard library; what Starlette's middleware decides stays as it was."""

import gzip
import os

from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.compression import IsalGZipMiddleware

SMALL = b'{"points": [[0.125, -1.5]]}' * 100
LARGE = os.urandom(64 * 1024).hex().encode()  # 128 KiB: at Starlette's thread threshold
CHUNKS = [b"[%d, %d]," % (i, i * i) * 50 for i in range(40)]


async def chunks():
    for chunk in CHUNKS:
        yield chunk


def client() -> TestClient:
    routes = [
        Route("/small", lambda r: Response(SMALL, media_type="application/json")),
        Route("/large", lambda r: Response(LARGE, media_type="application/json")),
        Route("/stream", lambda r: StreamingResponse(chunks(), media_type="application/json")),
        Route("/tiny", lambda r: Response(b"{}", media_type="application/json")),
        Route("/npy", lambda r: Response(SMALL, media_type="application/x-npy")),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(
        IsalGZipMiddleware, minimum_size=500, compresslevel=1, exclude_content_types=("application/x-npy",)
    )
    return TestClient(app)


def raw(c: TestClient, path: str, encoding: str = "gzip"):
    with c.stream("GET", path, headers={"Accept-Encoding": encoding}) as r:
        return r.headers, b"".join(r.iter_raw())


def test_bodies_are_real_gzip_whole_large_and_streamed():
    c = client()
    for path, expected in [("/small", SMALL), ("/large", LARGE), ("/stream", b"".join(CHUNKS))]:
        headers, body = raw(c, path)
        assert headers["content-encoding"] == "gzip" and "accept-encoding" in headers["vary"].lower(), path
        assert gzip.decompress(body) == expected, path
        assert len(body) < len(expected), path


def test_what_is_not_compressed_stays_as_it_was():
    c = client()
    for path, encoding, expected in [("/tiny", "gzip", b"{}"), ("/npy", "gzip", SMALL), ("/small", "identity", SMALL)]:
        headers, body = raw(c, path, encoding)
        assert "content-encoding" not in headers and body == expected, path
