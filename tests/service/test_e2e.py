"""End to end: a real uvicorn process serving the committed checkpoint over loopback."""

import httpx
import numpy as np
import pytest

from bench.live_server import LiveServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    with LiveServer(SWISSROLL_CHECKPOINT="checkpoints/swissroll.pt") as s:
        yield s


def test_sample_10000_ddpm(server):
    r = httpx.get(f"{server.url}/sample?n=10000&sampler=ddpm", timeout=60)
    assert r.status_code == 200
    body = r.json()
    points = np.asarray(body["points"])
    assert points.shape == (10000, 2) and np.isfinite(points).all()
    assert body["steps"] == 40 and body["sampler"] == "ddpm"
    # A trained model: the cloud is a normalized Swiss roll, not noise (mean ~0, std ~1 per axis).
    assert np.abs(points.mean(0)).max() < 0.1 and np.abs(points.std(0) - 1).max() < 0.1


def test_model_reports_device(server):
    assert httpx.get(f"{server.url}/model").json()["device"] == "cpu"


def test_sigterm_exits_zero():
    with LiveServer(SWISSROLL_CHECKPOINT="checkpoints/swissroll.pt") as s:
        pass
    assert s.proc.returncode == 0
