"""The HTTP API through TestClient (the lifespan runs), with a tiny scripted checkpoint made for the test."""

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from diffusion.samplers import SAMPLERS, timesteps
from service.app import create_app
from tests.utils.checkpoints import TINY_T, TINY_TUNED, make_settings


def test_sample_defaults(client, tiny_checkpoint_id):
    r = client.get("/sample")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["n"] == 1000 and body["sampler"] == "ddpm" and body["steps"] == TINY_T
    assert body["model"] == tiny_checkpoint_id
    assert isinstance(body["seed"], int) and r.headers["x-seed"] == str(body["seed"])
    assert np.asarray(body["points"]).shape == (1000, 2)
    assert body["elapsed_ms"] > 0


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_same_seed_same_points(client, sampler):
    a = client.get(f"/sample?n=300&sampler={sampler}&seed=123").json()
    b = client.get(f"/sample?n=300&sampler={sampler}&seed=123").json()
    c = client.get(f"/sample?n=300&sampler={sampler}&seed=124").json()
    assert a["points"] == b["points"]
    assert a["points"] != c["points"]
    assert a["steps"] == SAMPLERS[sampler].steps_default(TINY_T)


def test_omitted_seed_is_returned_and_reproduces(client):
    first = client.get("/sample?n=50&sampler=ddim&eta=0.3").json()
    again = client.get(f"/sample?n=50&sampler=ddim&eta=0.3&seed={first['seed']}").json()
    assert again["points"] == first["points"]
    other = client.get("/sample?n=50&sampler=ddim&eta=0.3").json()
    assert other["seed"] != first["seed"]


def test_npy_format_matches_json(client):
    js = client.get("/sample?n=100&seed=5&sampler=dpmpp_2m").json()
    r = client.get("/sample?n=100&seed=5&sampler=dpmpp_2m&format=npy")
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    arr = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert arr.dtype == np.float32 and arr.shape == (100, 2)
    np.testing.assert_array_equal(arr, np.asarray(js["points"], dtype=np.float32))
    assert r.headers["x-seed"] == "5"


def test_json_points_round_trip_float32_exactly(client):
    js = client.get("/sample?n=20&seed=9").json()
    npy = np.load(io.BytesIO(client.get("/sample?n=20&seed=9&format=npy").content))
    assert np.array_equal(np.asarray(js["points"], dtype=np.float32), npy), "no precision lost in /sample JSON"


@pytest.mark.parametrize(
    "query, param, expect",
    [
        ("n=0", "n", "1..100000"),
        ("n=1000000000", "n", "1..100000"),
        ("n=abc", "n", "1..100000"),
        ("sampler=euler", "sampler", "'ddpm', 'ddpm_x0', 'ddim', 'dpmpp_2m' or 'consistency'"),
        ("steps=0", "steps", "1..1000"),
        (f"steps={TINY_T + 1}", "steps", f"steps must be in 1..{TINY_T}"),
        ("sampler=ddpm&eta=0.5", "eta", "eta is not a parameter of sampler 'ddpm'"),
        ("sampler=ddim&eta=1.5", "eta", "0.0..1.0"),
        ("seed=abc", "seed", "0..9223372036854775807"),
        ("seed=-1", "seed", "0..9223372036854775807"),
        ("format=xml", "format", "'json' or 'npy'"),
        (
            "colour=red",
            "colour",
            "valid parameters: eta, format, guidance, model, n, position, sampler, seed, spacing, steps",
        ),
    ],
)
def test_bad_input_is_422_naming_the_parameter_and_the_allowed_values(client, query, param, expect):
    r = client.get(f"/sample?{query}")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail[0]["loc"] == ["query", param]
    assert expect in detail[0]["msg"]


def test_trajectory_frames(client):
    body = client.get("/trajectory?n=40&sampler=ddim&steps=4&seed=2&include_x0=true").json()
    assert body["timesteps"] == timesteps(TINY_T, 4)
    frames, x0 = np.asarray(body["frames"]), np.asarray(body["x0"])
    assert frames.shape == (5, 40, 2), "initial noise + one frame per step"
    assert x0.shape == (4, 40, 2)
    # The last frame is the sample itself: same code path, same seed.
    points = np.asarray(client.get("/sample?n=40&sampler=ddim&steps=4&seed=2").json()["points"])
    np.testing.assert_allclose(frames[-1], points, atol=5e-4)


def test_tuned_timesteps_are_the_default_where_the_model_has_them(client):
    q = "/trajectory?n=30&sampler=dpmpp_2m&seed=5"
    tuned = client.get(f"{q}&steps=4").json()
    assert tuned["timesteps"] == TINY_TUNED and tuned["spacing"] == "tuned"
    assert client.get(f"{q}&steps=4&spacing=tuned").json()["frames"] == tuned["frames"]
    trailing = client.get(f"{q}&steps=4&spacing=trailing").json()
    assert trailing["timesteps"] == timesteps(TINY_T, 4) != TINY_TUNED and trailing["spacing"] == "trailing"
    assert trailing["frames"][-1] != tuned["frames"][-1]
    # Where the model has no tuned schedule, trailing spacing is the default.
    other = client.get(f"{q}&steps=5").json()
    assert other["timesteps"] == timesteps(TINY_T, 5) and other["spacing"] == "trailing"
    assert client.get("/sample?n=5&sampler=dpmpp_2m&steps=4").json()["spacing"] == "tuned"


@pytest.mark.parametrize(
    "query, message",
    [
        ("sampler=dpmpp_2m&steps=5&spacing=tuned", "tuned timesteps for sampler 'dpmpp_2m' at steps 4, not at 5"),
        ("sampler=ddim&steps=4&spacing=tuned", "no tuned timesteps for sampler 'ddim'"),
        ("spacing=even", "'trailing', 'tuned' or 'distilled'"),
    ],
)
def test_unavailable_spacing_is_422_naming_what_exists(client, query, message):
    r = client.get(f"/sample?n=5&{query}")
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["query", "spacing"] and message in detail["msg"]


def test_trajectory_is_compact(client):
    r = client.get("/trajectory?n=200&seed=1")
    body = r.json()
    assert "x0" not in body
    numbers = [v for frame in body["frames"] for p in frame for v in p]
    assert all(abs(round(v, 3) - v) < 1e-9 for v in numbers), "3 decimals is enough for a canvas"
    assert len(r.content) < 200 * (TINY_T + 1) * 2 * 8, "about 7 bytes per coordinate"


def test_trajectory_bounds(client):
    r = client.get("/trajectory?n=5001")
    assert r.status_code == 422 and "1..5000" in r.json()["detail"][0]["msg"]


def test_samplers_endpoint(client):
    body = client.get("/samplers").json()
    assert [s["name"] for s in body] == list(SAMPLERS)
    by_name = {s["name"]: s for s in body}
    assert by_name["ddpm"]["steps"] == {"min": 1, "max": TINY_T, "default": TINY_T}
    assert by_name["dpmpp_2m"]["steps"]["default"] == min(10, TINY_T)
    assert by_name["ddim"]["params"]["eta"] == {
        "default": 0.0,
        "min": 0.0,
        "max": 1.0,
        "description": by_name["ddim"]["params"]["eta"]["description"],
    }
    assert by_name["ddpm"]["params"] == {}
    assert by_name["dpmpp_2m"]["tuned_timesteps"] == {"4": TINY_TUNED} and by_name["ddpm"]["tuned_timesteps"] == {}
    assert all(s["description"] and s["paper"] for s in body)


def test_model_endpoint(client, tiny_checkpoint, tiny_checkpoint_id):
    body = client.get("/model").json()
    assert body["id"] == tiny_checkpoint_id
    assert body["device"] == "cpu"
    assert body["num_timesteps"] == TINY_T and body["prediction_type"] == "v"
    assert body["metadata"]["model"]["preset"] == "tiny-test"
    assert body["file"] == tiny_checkpoint.name and "path" not in body  # no absolute paths in responses


def test_health_and_readiness(client, tiny_checkpoint):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    # Without the lifespan (no model loaded yet) the app is alive but not ready.
    cold = TestClient(create_app(make_settings(tiny_checkpoint)))
    assert cold.get("/healthz").status_code == 200
    assert cold.get("/readyz").status_code == 503


def test_metrics(client):
    client.get("/sample?n=7&sampler=dpmpp_2m&seed=1")
    client.get("/sample?n=0")
    text = client.get("/metrics").text
    # the model label is the served model's name (the tiny checkpoint's file stem), empty before one was chosen
    assert 'swissroll_requests_total{endpoint="/sample",model="tiny",sampler="dpmpp_2m",status="200"}' in text
    assert 'swissroll_requests_total{endpoint="/sample",model="",sampler="",status="422"}' in text
    assert 'swissroll_request_seconds_bucket{endpoint="/sample"' in text
    assert 'swissroll_points_generated_total{sampler="dpmpp_2m"}' in text
    assert "swissroll_queue_wait_seconds_count" in text
    assert 'swissroll_compute_seconds_count{endpoint="/sample",sampler="dpmpp_2m"}' in text
    assert "swissroll_in_flight_requests" in text


def test_openapi_documents_bounds_and_examples(client):
    spec = client.get("/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"]["/sample"]["get"]["parameters"]}
    assert set(params) == {"model", "sampler", "steps", "spacing", "seed", "eta", "n", "format", "position", "guidance"}
    assert params["n"]["schema"]["maximum"] == 100_000 and params["n"]["schema"]["minimum"] == 1
    assert all(p.get("examples") or p["schema"].get("examples") for p in params.values())
    assert client.get("/docs").status_code == 200


def test_request_log_is_one_json_line(client, caplog):
    caplog.set_level("INFO", logger="swissroll")
    client.get("/sample?n=3&seed=1")
    lines = [json.loads(r.message) for r in caplog.records if r.name == "swissroll"]
    assert lines[-1]["endpoint"] == "/sample" and lines[-1]["status"] == 200
    assert lines[-1]["params"] == {"n": "3", "seed": "1"} and lines[-1]["ms"] > 0


def test_cors_is_explicit(tiny_checkpoint):
    with TestClient(create_app(make_settings(tiny_checkpoint, cors_origins=["https://ok.example"]))) as c:
        allowed = c.get("/healthz", headers={"Origin": "https://ok.example"})
        denied = c.get("/healthz", headers={"Origin": "https://evil.example"})
    assert allowed.headers.get("access-control-allow-origin") == "https://ok.example"
    assert "access-control-allow-origin" not in denied.headers
