"""The model repository in-process: a directory of tiny checkpoints, routing by model=, listings, reloads."""

import hashlib
import io
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from diffusion.samplers import sample
from service.app import create_app
from service.model_repository import DefaultModelError
from service.settings import Settings
from tests.utils.checkpoints import write_tiny_checkpoint


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replace_atomically(src, dest):
    """As `make train` writes: a temporary file in the same directory, then a rename over the old one."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def settings_for(directory, **overrides) -> Settings:
    base = dict(models_dir=directory, default_model="a", device="cpu", torch_threads=1, reload_poll_s=0, warmup=False)
    return Settings(**{**base, **overrides})


@pytest.fixture
def models_dir(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    write_tiny_checkpoint(d / "a.pt")
    write_tiny_checkpoint(d / "b.pt")
    (d / "garbage.pt").write_bytes(b"not a checkpoint")
    (d / "notes.txt").write_text("not a model: only *.pt files are")
    return d


@pytest.fixture
def client(models_dir):
    with TestClient(create_app(settings_for(models_dir))) as c:
        yield c


def refresh(client) -> dict:
    return client.portal.call(client.app.state.models.refresh)


def test_every_pt_file_is_a_model_named_by_its_stem(client, models_dir):
    listing = client.get("/models").json()
    assert listing["default"] == "a"
    assert [m["name"] for m in listing["models"]] == ["a", "b"]
    a, b = listing["models"]
    assert a["default"] is True and b["default"] is False
    assert a["id"] == sha(models_dir / "a.pt") and b["id"] == sha(models_dir / "b.pt")
    assert a["file"] == "a.pt" and a["device"] == "cpu" and a["load_s"] >= 0 and a["loaded_at"]
    assert a["preset"] == "tiny-test" and a["prediction_type"] == "v" and a["num_timesteps"] == 10
    assert a["samplers"]["dpmpp_2m"]["tuned_steps"] == [4] and a["samplers"]["ddpm"]["steps"] == {"min": 1, "max": 10}
    # the file that failed is listed with its one-line reason, and is not served
    [failure] = listing["failures"]
    assert failure["name"] == "garbage" and failure["file"] == "garbage.pt"
    assert "not a readable TorchScript archive" in failure["reason"] and "\n" not in failure["reason"]
    assert failure["reason"].startswith("checkpoint garbage.pt: ") and str(models_dir) not in failure["reason"]
    assert failure["still_serving"] is None


def test_model_parameter_routes_each_request(client, models_dir):
    ids = {name: sha(models_dir / f"{name}.pt") for name in "ab"}
    assert client.get("/sample?n=5&seed=1").headers["X-Model"] == ids["a"]  # no model=: the default
    for name in "ab":
        r = client.get(f"/sample?n=5&seed=1&model={name}")
        assert r.status_code == 200 and r.headers["X-Model"] == ids[name] and r.json()["model"] == ids[name]
        assert r.headers["X-Model-Name"] == name and r.json()["model_name"] == name
        for route in (f"/trajectory?n=5&seed=1&model={name}", f"/forward?n=5&seed=1&model={name}"):
            r = client.get(route)
            assert (r.json()["model"], r.json()["model_name"], r.headers["X-Model-Name"]) == (ids[name], name, name)
        r = client.get(f"/trajectory?n=5&seed=1&model={name}&format=npy")
        assert (r.headers["X-Model"], r.headers["X-Model-Name"]) == (ids[name], name)
        assert client.get(f"/field?t=3&model={name}").json()["model_name"] == name
        assert client.get(f"/samplers?model={name}").status_code == 200
    a = client.get("/sample?n=50&seed=3&model=a&format=npy").content
    b = client.get("/sample?n=50&seed=3&model=b&format=npy").content
    assert a != b  # different networks, same seed: different points


def test_animation_with_model(client, models_dir):
    r = client.get("/animation?n=20&steps=2&seed=1&model=b&size=240&fps=2")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert r.headers["X-Model"] == sha(models_dir / "b.pt") and r.headers["X-Model-Name"] == "b"
    etag_b = r.headers["ETag"]
    assert client.get("/animation?n=20&steps=2&seed=1&model=a&size=240&fps=2").headers["ETag"] != etag_b


@pytest.mark.parametrize("route", ["/sample?n=5", "/trajectory?n=5", "/animation?n=5", "/forward?n=5", "/field?t=1"])
def test_unknown_model_is_422_listing_the_served_ones(client, route):
    r = client.get(f"{route}&model=garbage")  # a file that failed to load is not served
    assert r.status_code == 422
    [err] = r.json()["detail"]
    assert err["loc"] == ["query", "model"]
    assert "unknown model 'garbage'" in err["msg"] and "served models: a, b" in err["msg"]


def test_model_name_outside_the_pattern_is_422(client):
    for bad in ["../a", "a" * 65, "", "a b"]:
        r = client.get("/sample", params={"n": 5, "model": bad})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "model"]


def test_one_model_in_full_and_the_default_as_before(client, models_dir):
    b = client.get("/models/b").json()
    assert b["name"] == "b" and b["id"] == sha(models_dir / "b.pt") and b["default"] is False
    assert b["metadata"]["model"]["preset"] == "tiny-test"
    assert {s["name"] for s in b["sampler_details"]} == {"ddpm", "ddpm_x0", "ddim", "dpmpp_2m"}
    assert "threads" in b and "cuda_fast_path" in b
    r = client.get("/models/nope")
    assert r.status_code == 404 and "served models: a, b" in r.json()["detail"]
    default = client.get("/model").json()
    assert default["id"] == sha(models_dir / "a.pt") and default["file"] == "a.pt"
    assert {"threads", "num_timesteps", "prediction_type", "cuda_fast_path", "metadata"} <= set(default)


def test_replaced_file_reloads_and_a_bad_replacement_keeps_the_old_one(client, models_dir, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "other.pt")
    replace_atomically(other, models_dir / "b.pt")
    assert refresh(client) == {"b": "reloaded"}
    assert client.get("/sample?n=5&model=b").headers["X-Model"] == sha(other)
    good_id = sha(other)
    # truncated: the previous version keeps serving, the failure is listed with the id still served
    (tmp_path / "truncated.pt").write_bytes(other.read_bytes()[:1000])
    replace_atomically(tmp_path / "truncated.pt", models_dir / "b.pt")
    assert refresh(client) == {"b": "failed"}
    assert client.get("/sample?n=5&model=b").headers["X-Model"] == good_id
    failures = {f["name"]: f for f in client.get("/models").json()["failures"]}
    assert failures["b"]["still_serving"] == good_id and "truncated or corrupt" in failures["b"]["reason"]
    assert refresh(client) == {}  # the same bad file is not retried on every poll
    # fixed later: loaded, the failure gone
    fixed = write_tiny_checkpoint(tmp_path / "fixed.pt")
    replace_atomically(fixed, models_dir / "b.pt")
    assert refresh(client) == {"b": "reloaded"}
    assert client.get("/sample?n=5&model=b").headers["X-Model"] == sha(fixed)
    assert "b" not in {f["name"] for f in client.get("/models").json()["failures"]}
    metrics = client.get("/metrics").text
    assert 'swissroll_model_reloads_total{result="reloaded"} 2.0' in metrics
    assert 'swissroll_model_reloads_total{result="failed"} 2.0' in metrics  # garbage.pt at start, then b


def test_new_file_is_added_and_removed_file_unloaded_but_never_the_default(client, models_dir, tmp_path):
    write_tiny_checkpoint(tmp_path / "c.pt")
    replace_atomically(tmp_path / "c.pt", models_dir / "c.pt")
    (models_dir / "garbage.pt").unlink()
    assert refresh(client) == {"c": "loaded"}
    assert [m["name"] for m in client.get("/models").json()["models"]] == ["a", "b", "c"]
    assert client.get("/models").json()["failures"] == []  # a removed file's failure goes with it
    (models_dir / "c.pt").unlink()
    (models_dir / "a.pt").unlink()
    assert refresh(client) == {"c": "unloaded"}
    assert client.get("/sample?n=5&model=c").status_code == 422
    assert client.get("/sample?n=5").status_code == 200  # the default stays until replaced


def test_touched_file_with_the_same_bytes_keeps_the_loaded_model(client, models_dir):
    before = client.app.state.models.get("b")
    os.utime(models_dir / "b.pt", ns=(1, 1))
    assert refresh(client) == {"b": "unchanged"}
    assert client.app.state.models.get("b") is before


def test_a_request_keeps_the_model_it_started_with(client, models_dir, tmp_path):
    models = client.app.state.models
    old = models.get("b")
    write_tiny_checkpoint(tmp_path / "new.pt")
    replace_atomically(tmp_path / "new.pt", models_dir / "b.pt")
    refresh(client)
    assert models.get("b") is not old and old.denoiser.num_timesteps == 10  # the old object is intact for its holder


def test_invalid_file_name_is_listed_not_served(models_dir):
    write_tiny_checkpoint(models_dir / "has space.pt")
    with TestClient(create_app(settings_for(models_dir))) as c:
        failures = {f["name"]: f["reason"] for f in c.get("/models").json()["failures"]}
    assert "not a valid model name" in failures["has space"]


def test_default_must_load(models_dir):
    app = create_app(settings_for(models_dir, default_model="garbage"))
    with pytest.raises(DefaultModelError, match="garbage.pt: not a readable TorchScript archive"), TestClient(app):
        pass
    app = create_app(settings_for(models_dir, default_model="zzz"))
    with pytest.raises(DefaultModelError, match=r"file not found .*models found in .*: a, b, garbage"), TestClient(app):
        pass


def test_checkpoint_setting_serves_one_file(models_dir):
    with TestClient(create_app(Settings(checkpoint=models_dir / "b.pt", device="cpu", warmup=False))) as c:
        listing = c.get("/models").json()
        assert listing["default"] == "b" and [m["name"] for m in listing["models"]] == ["b"]
        assert c.get("/sample?n=5&model=a").status_code == 422


def fetch(client, query):
    r = client.get(f"/sample?{query}&format=npy")
    assert r.status_code == 200, r.text
    return r.headers["X-Model"], np.load(io.BytesIO(r.content))


def test_batches_never_mix_models(models_dir):
    # Same sampler, steps and seeds on two models, all waiting for batch-mates at once: a batch that mixed them
    # would run some rows through the other network, and those points would differ from the model's own.
    settings = settings_for(models_dir, max_wait_ms=200, max_concurrency=1)
    queries = [f"model={m}&n={n}&seed={seed}&sampler=ddpm" for m in "ab" for n, seed in [(5, 1), (40, 2), (17, 3)]]
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(len(queries)) as pool:
        results = list(pool.map(lambda q: fetch(client, q), queries))
        models = client.app.state.models
        for q, (model_id, points) in zip(queries, results, strict=True):
            name, n, seed = q[6], int(q.split("n=")[1].split("&")[0]), int(q.split("seed=")[1].split("&")[0])
            model = models.get(name)
            assert model_id == model.id
            direct = sample(model.denoiser, "ddpm", n, torch.Generator().manual_seed(seed)).numpy()
            assert np.array_equal(points, direct), q
