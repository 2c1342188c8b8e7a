"""/animation: a real MP4 (decoded back), Range and conditional requests, the bounded single-flight cache."""

import io

import anyio
import av
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.render import HOLD_SECONDS
from service.video_cache import VideoCache, animation_key, etag
from tests.utils.checkpoints import TINY_T, make_settings, write_tiny_checkpoint

URL = "/animation?n=300&steps=5&seed=3&fps=8&size=241"


@pytest.fixture(scope="module")
def video(client):
    r = client.get(URL)
    assert r.status_code == 200
    return r


def test_is_a_faststart_h264_mp4_with_one_frame_per_step_and_a_hold(video):
    assert video.headers["content-type"] == "video/mp4"
    data = video.content
    assert data.find(b"moov") < data.find(b"mdat"), "moov before mdat: playable before fully downloaded"
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (240, 240), "size rounded down to even"
        frames = list(container.decode(video=0))
    assert len(frames) == 5 + 1 + round(HOLD_SECONDS * 8)
    # Frames differ as the noise is denoised, and the hold repeats the final one.
    first, last, held = (f.to_ndarray(format="rgb24") for f in (frames[0], frames[5], frames[-1]))
    assert abs(first.astype(int) - last.astype(int)).sum() > 0
    assert abs(last.astype(int) - held.astype(int)).mean() < 2


def test_range_request_gets_206_with_the_right_bytes(client, video):
    whole = video.content
    r = client.get(URL, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206
    assert r.content == whole[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(whole)}"
    assert r.headers["accept-ranges"] == "bytes"
    tail = client.get(URL, headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == whole[-50:]
    open_ended = client.get(URL, headers={"Range": f"bytes={len(whole) - 10}-"})
    assert open_ended.content == whole[-10:]
    bad = client.get(URL, headers={"Range": f"bytes={len(whole)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(whole)}"


def test_etag_and_if_none_match(client, video):
    etag = video.headers["etag"]
    assert etag.startswith('"') and video.headers["cache-control"].startswith("public")
    r = client.get(URL, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""
    other = client.get(URL.replace("seed=3", "seed=4"))
    assert other.headers["etag"] != etag


def test_repeat_is_served_from_cache(client, video):
    again = client.get(URL)
    assert again.headers["x-cache"] == "hit"
    assert again.content == video.content


def test_omitted_seed_is_returned_and_reproduces(client):
    r = client.get("/animation?n=50&steps=2&size=240&fps=4")
    seed = r.headers["x-seed"]
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-location"].endswith(f"&seed={seed}")
    again = client.get(f"/animation?n=50&steps=2&size=240&fps=4&seed={seed}")
    assert again.content == r.content


@pytest.mark.parametrize(
    "query, param",
    [
        ("n=20001", "n"),
        ("fps=0", "fps"),
        ("fps=61", "fps"),
        ("size=100", "size"),
        ("size=5000", "size"),
        ("sampler=nope", "sampler"),
        (f"steps={TINY_T + 1}", "steps"),
        ("eta=0.5", "eta"),
    ],
)
def test_bad_parameters_are_422(client, query, param):
    r = client.get(f"/animation?{query}")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", param]


def test_concurrent_identical_requests_render_once(tiny_checkpoint):
    app = create_app(make_settings(tiny_checkpoint, max_concurrency=2))
    with TestClient(app) as c:
        url = "/animation?n=200&steps=10&seed=77&size=240"

        async def burst():
            results = []

            async def one():
                results.append(await anyio.to_thread.run_sync(c.get, url))

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(one)
            return results

        results = anyio.run(burst)
        assert all(r.status_code == 200 for r in results)
        assert len({r.content for r in results}) == 1
        assert app.state.video_cache.misses == 1, "one render, three waiters"


def test_cache_is_bounded_lru():
    cache = VideoCache(max_bytes=250)

    async def fill():
        for key in "abc":
            await cache.get_or_render(key, lambda k=key: _bytes(k))
        await cache.get_or_render("b", lambda: _bytes("b"))  # touch b: a is now the oldest
        await cache.get_or_render("d", lambda: _bytes("d"))

    anyio.run(fill)
    assert cache.size_bytes <= 250
    assert list(cache._items) == ["b", "d"], "least recently used out first"


async def _bytes(key):
    return key.encode() * 100


def test_another_model_gives_another_etag_for_the_same_url(video, tmp_path):
    # The same request to a server holding another checkpoint is another video: neither its cache entry nor its
    # ETag may be the first model's (a client's If-None-Match must not get a 304 for the other model's video).
    other = write_tiny_checkpoint(tmp_path / "other.pt", model={"preset": "tiny-other"})
    with TestClient(create_app(make_settings(other, warmup=False))) as c:
        r = c.get(URL, headers={"If-None-Match": video.headers["etag"]})
        assert r.status_code == 200 and r.headers["etag"] != video.headers["etag"]
    for process, computation in [("reverse", ("ddpm", (9, 5), ())), ("forward", (3, 9))]:
        keys = {animation_key(model, process, computation, 3, 300, 8, 240) for model in ("id-a", "id-b")}
        assert len(keys) == 2 and len({etag(k) for k in keys}) == 2
