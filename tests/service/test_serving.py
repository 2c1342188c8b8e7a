"""Serving under load against a real uvicorn process: overload, graceful shutdown; and memory over many requests."""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from bench.live_server import LiveServer
from service.app import create_app
from tests.utils.checkpoints import make_settings

pytestmark = pytest.mark.e2e


def test_burst_over_the_queue_gets_only_200s_and_503s(tiny_checkpoint):
    env = {
        "SWISSROLL_CHECKPOINT": str(tiny_checkpoint),
        "SWISSROLL_MAX_QUEUE": "2",
        "SWISSROLL_MAX_CONCURRENCY": "1",
        "SWISSROLL_BATCHING": "false",
    }
    with LiveServer(**env) as server, httpx.Client(timeout=60) as client:

        def one(i):
            return client.get(f"{server.url}/sample?n=100000&seed={i}")

        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(one, range(24)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= 10 and statuses.count(200) >= 3, statuses
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1 and "overloaded" in r.json()["detail"]
        # Still up, and serving normally.
        assert client.get(f"{server.url}/healthz").status_code == 200
        assert client.get(f"{server.url}/sample?n=10").status_code == 200
        assert server.proc.poll() is None
        metrics = client.get(f"{server.url}/metrics").text
        assert 'swissroll_rejected_total{reason="overloaded"}' in metrics


def test_sigterm_lets_the_in_flight_request_finish_then_exits_zero():
    # A drain long enough for the request even on a loaded machine: this test is about finishing in-flight work;
    # cutting it at the drain deadline is test_hardening.py::test_05_sigterm_cancels_work_past_a_fractional_drain.
    server = LiveServer(SWISSROLL_CHECKPOINT="checkpoints/swissroll.pt", SWISSROLL_DRAIN_S="120").wait_ready()
    result = {}

    def slow_request():
        # Seconds of work: 40 steps of 20,000 points rendered to 1080 px frames and encoded.
        result["r"] = httpx.get(f"{server.url}/animation?n=20000&size=1080&seed=1", timeout=120)
        result["done_at"] = time.monotonic()

    try:
        worker = threading.Thread(target=slow_request)
        worker.start()
        server.wait_until_busy(requests=1, cpu_s=0.2)  # the request is in flight, computing
        signalled_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        refused_by = time.monotonic() + 5  # as soon as the server has handled the signal
        while True:
            try:
                httpx.get(f"{server.url}/readyz", timeout=2)
            except httpx.TransportError:
                break  # no new connections once draining
            assert time.monotonic() < refused_by, "still accepting connections 5 s after SIGTERM"
            time.sleep(0.02)
        worker.join(120)
        assert result["done_at"] > signalled_at, "the request was still running when SIGTERM arrived"
        assert result["r"].status_code == 200 and result["r"].headers["content-type"] == "video/mp4"
        assert server.proc.wait(60) == 0
    finally:
        server.terminate()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_memory_stays_flat_over_2000_mixed_requests(tiny_checkpoint):
    with TestClient(create_app(make_settings(tiny_checkpoint, animation_cache_mb=2))) as client:
        urls = [
            "/sample?n=500&seed={i}",
            "/sample?n=50&sampler=dpmpp_2m&seed={i}&format=npy",
            "/trajectory?n=100&sampler=ddim&eta=0.5&seed={i}",
            "/sample?n=0",
            "/samplers",
            "/metrics",
            "/animation?n=100&steps=2&size=240&fps=2&seed={i}",
            "/sample?n=2000&sampler=ddpm_x0&seed={i}",
        ]
        for i in range(400):  # warm-up: allocator pools, caches and lazy imports settle
            client.get(urls[i % len(urls)].format(i=i))
        before = _rss_mb()
        for i in range(2000):
            r = client.get(urls[i % len(urls)].format(i=i))
            assert r.status_code in (200, 422)
        growth = _rss_mb() - before
    print(f"RSS growth over 2000 requests: {growth:.1f} MB")
    assert growth < 40, f"resident memory grew {growth:.1f} MB"


@pytest.mark.parametrize("enabled", [False, True])
def test_opentelemetry_is_looked_up_per_request_only_when_enabled(tiny_checkpoint, monkeypatch, enabled):
    # FastAPI's native telemetry asks OpenTelemetry for its providers on every request unless told not to.
    from opentelemetry import trace

    lookups = []
    real = trace.get_tracer_provider
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: lookups.append(1) or real())
    with TestClient(create_app(make_settings(tiny_checkpoint, opentelemetry=enabled))) as client:
        before = len(lookups)
        assert client.get("/sample?n=10&seed=1").status_code == 200
        assert (len(lookups) > before) == enabled
