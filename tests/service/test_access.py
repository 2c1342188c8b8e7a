"""API keys, the points-in-flight bound, and that probes never wait behind sampling."""

import logging

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.utils.checkpoints import make_settings

KEY = "s3cret-key-123"


@pytest.fixture(scope="module")
def locked(tiny_checkpoint):
    with TestClient(create_app(make_settings(tiny_checkpoint, api_keys=f"other-key, {KEY}"))) as c:
        yield c


@pytest.mark.parametrize("path", ["/sample?n=5", "/trajectory?n=5", "/animation?n=5&size=240"])
def test_sampling_endpoints_need_a_key(locked, path):
    assert locked.get(path).status_code == 401
    assert locked.get(path).headers["www-authenticate"] == "Bearer"
    assert locked.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert locked.get(path, headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    assert locked.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert locked.get(path, headers={"Authorization": "Bearer other-key"}).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/samplers", "/"])
def test_probes_and_metadata_stay_open(locked, path):
    assert locked.get(path).status_code == 200


def test_keys_are_never_logged_or_shown(locked, caplog):
    caplog.set_level(logging.DEBUG)
    locked.get("/sample?n=5", headers={"Authorization": f"Bearer {KEY}"})
    assert KEY not in caplog.text
    assert KEY not in repr(locked.app.state.settings)


def test_unauthorized_request_costs_no_compute(locked):
    before = locked.get("/metrics").text.count("swissroll_compute_seconds_count")
    r = locked.get("/sample?n=100000")
    assert r.status_code == 401
    assert locked.get("/metrics").text.count("swissroll_compute_seconds_count") == before


def test_points_in_flight_are_bounded(tiny_checkpoint):
    with TestClient(create_app(make_settings(tiny_checkpoint, max_points_in_flight=1000))) as c:
        r = c.get("/sample?n=2000")
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "points in flight" in r.json()["detail"]
        assert c.get("/sample?n=1000").status_code == 200
