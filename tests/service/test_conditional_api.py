"""position and guidance on the sampling routes (issue 15): 422s, the unconditional path, batching across positions."""

import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from diffusion.checkpoint import load_model
from diffusion.guidance import guided
from diffusion.noise import from_generator, initial_noise
from diffusion.samplers import SAMPLERS, timesteps
from service.app import create_app
from service.batching import run_batch
from service.blocks import BlockPool
from service.compute import Job
from service.jobs import plan, run_plan
from service.schemas import SampleParams
from service.settings import Settings
from tests.utils.checkpoints import write_tiny_checkpoint, write_tiny_conditional_checkpoint


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(d / "a.pt")
    write_tiny_conditional_checkpoint(d / "c.pt")
    return d


@pytest.fixture(scope="module")
def client(models_dir):
    settings = Settings(
        models_dir=models_dir, default_model="a", device="cpu", torch_threads=1, reload_poll_s=0, warmup=False
    )
    with TestClient(create_app(settings)) as c:
        yield c


def points(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["points"], dtype=np.float32)


@pytest.mark.parametrize("route", ["/sample?n=5", "/trajectory?n=5", "/animation?n=5"])
@pytest.mark.parametrize("query", ["position=0.3", "guidance=2"])
def test_a_model_without_a_condition_is_a_422_naming_those_with_one(client, route, query):
    r = client.get(f"{route}&{query}")  # the default, "a", is unconditional
    assert r.status_code == 422
    [err] = r.json()["detail"]
    assert err["loc"] == ["query", query.split("=")[0]]
    assert "needs a conditional model" in err["msg"] and "Conditional models: c" in err["msg"]


@pytest.mark.parametrize(
    "query",
    ["position=nan", "position=inf", "position=-0.01", "position=1.5", "guidance=nan", "guidance=-1", "guidance=11"],
)
def test_bad_position_or_guidance_is_a_422(client, query):
    r = client.get(f"/sample?n=5&model=c&position=0.5&{query}")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", query.split("=")[0]]


def test_position_omitted_is_unconditional(client, models_dir):
    model = load_model(models_dir / "c.pt", torch.device("cpu"))
    got = points(client.get("/sample?n=40&model=c&seed=3&sampler=ddim"))
    # The null condition on every row: what the denoiser gives with no condition at all (Denoiser.predict).
    noise = from_generator(torch.Generator().manual_seed(3))
    x = initial_noise(40, noise, "cpu")
    expected = SAMPLERS["ddim"].fn(model.denoiser, x, timesteps(10, 10), noise).numpy()
    assert np.array_equal(got, expected)
    # guidance without a position changes nothing (the rows are unconditional), and a position does.
    assert np.array_equal(got, points(client.get("/sample?n=40&model=c&seed=3&sampler=ddim&guidance=3")))
    assert not np.array_equal(got, points(client.get("/sample?n=40&model=c&seed=3&sampler=ddim&position=0.2")))


def test_the_response_names_position_and_guidance(client):
    body = client.get("/sample?n=4&model=c&seed=1&position=0.25&guidance=2").json()
    assert body["position"] == 0.25 and body["guidance"] == 2.0
    assert "position" not in client.get("/sample?n=4&model=c&seed=1").json()


def test_guided_sample_matches_the_offline_guided_run(client, models_dir):
    model = load_model(models_dir / "c.pt", torch.device("cpu"))
    got = points(client.get("/sample?n=30&model=c&seed=5&position=0.7&guidance=2.5&sampler=ddpm"))
    noise = from_generator(torch.Generator().manual_seed(5))
    x = initial_noise(30, noise, "cpu")
    den = guided(model.denoiser, torch.full((30,), 0.7), 2.5)
    assert np.array_equal(got, SAMPLERS["ddpm"].fn(den, x, timesteps(10, 10), noise).numpy())


def test_trajectory_and_animation_take_a_position(client):
    r = client.get("/trajectory?n=20&model=c&seed=2&position=0.4&guidance=3&format=json")
    assert r.status_code == 200 and len(r.json()["frames"]) == 11
    a = client.get("/animation?n=50&model=c&seed=2&position=0.4&size=240")
    b = client.get("/animation?n=50&model=c&seed=2&position=0.6&size=240")
    assert a.status_code == b.status_code == 200 and a.headers["etag"] != b.headers["etag"]
    assert client.get("/animation?n=5&model=c&process=forward&position=0.4").status_code == 422


def test_requests_at_different_positions_batch_and_each_equals_its_run_alone(models_dir):
    # Positions are per-row inputs: one batch, split over blocks, each request bitwise what it gives alone.
    model = load_model(models_dir / "c.pt", torch.device("cpu"))
    # At w = 1 an unconditional request (its rows the null value) shares the batch; at w != 1 it would not (its
    # plan has w = 1: guidance does not change unconditional rows), so there all rows have a position.
    for guidance, middle in ((1.0, None), (2.0, 0.3)):
        requests = [(3, 1, 0.1), (700, 2, middle), (17, 3, 0.9), (300, 4, 0.5)]
        plans = [
            plan(model, SampleParams(n=n, seed=s, position=w, guidance=guidance, model="c")) for n, s, w in requests
        ]
        assert len({p.key() for p in plans}) == 1  # one computation: they may share a batch
        alone = [run_plan(model, p, Job(float("inf"), threading.Event()))[0] for p in plans]
        for threads in (1, 3):
            pool = BlockPool(threads, min_block_rows=256)
            try:
                batched = run_batch(model, plans, Job(float("inf"), threading.Event(), blocks=pool))
            finally:
                pool.close()
            for a, b in zip(alone, batched, strict=True):
                assert np.array_equal(a, b)


def test_guidance_is_part_of_the_batching_key(models_dir):
    model = load_model(models_dir / "c.pt", torch.device("cpu"))
    one, two = (plan(model, SampleParams(n=5, seed=1, position=0.5, guidance=g, model="c")) for g in (1.0, 2.0))
    assert one.key() != two.key()


def test_models_say_which_take_a_condition(client):
    by_name = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert by_name["a"]["condition"] is None
    assert by_name["c"]["condition"]["name"] == "position" and by_name["c"]["condition"]["range"] == [0.0, 1.0]
