"""A distilled student served beside its teacher (issue 14): model=fast&steps=2 with nothing else, /models and
/samplers list only what it was made for, anything else is a 422 naming that, /trajectory and /animation work."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from diffusion.folded import cpu_has_bf16_units
from service.app import create_app
from service.settings import Settings
from tests.diffusion.test_distilled_contract import distillation
from tests.utils.checkpoints import write_tiny_checkpoint

SUPPORTED = "consistency at steps 1, 2, 4"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(d / "swissroll.pt")
    write_tiny_checkpoint(d / "fast.pt", bf16_hidden=True, distillation=distillation(), tuned_timesteps={})
    settings = Settings(models_dir=d, device="cpu", torch_threads=1, reload_poll_s=0, warmup=True)
    with TestClient(create_app(settings)) as c:
        yield c


def test_steps_alone_use_the_students_sampler_and_levels(client):
    r = client.get("/sample?model=fast&steps=2&n=50&seed=3")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["sampler"], body["steps"], body["spacing"], body["model_name"]) == (
        "consistency",
        2,
        "distilled",
        "fast",
    )
    again = client.get("/sample?model=fast&steps=2&n=50&seed=3").json()
    assert again["points"] == body["points"], "a seed gives the same points"
    assert client.get("/sample?model=fast&n=50&seed=4").json()["points"] != body["points"]


def test_models_say_how_the_network_runs_on_cpu(client):
    # The student's hidden weights are bfloat16 values (as make distill writes them): bf16 GEMMs where the CPU has
    # the units; the teacher's are not, it runs its own module (diffusion/folded.py).
    fast = client.get("/models/fast").json()["cpu_network"]
    assert ("bfloat16" in fast) == cpu_has_bf16_units() and "float32" in client.get("/model").json()["cpu_network"]


@pytest.mark.parametrize("choice, says", [("float32", "fused oneDNN layers in float32"), ("module", "module")])
def test_an_operator_chooses_what_runs_the_network_on_cpu(tmp_path, choice, says):
    write_tiny_checkpoint(tmp_path / "fast.pt", bf16_hidden=True, distillation=distillation(), tuned_timesteps={})
    settings = Settings(models_dir=tmp_path, default_model="fast", device="cpu", torch_threads=1, cpu_network=choice)
    with TestClient(create_app(settings)) as c:
        assert says in c.get("/models/fast").json()["cpu_network"]
        assert c.get("/sample?model=fast&n=10&seed=1").status_code == 200


def test_no_parameters_at_all_give_the_declared_default(client):
    body = client.get("/sample?model=fast&n=10").json()
    assert (body["sampler"], body["steps"]) == ("consistency", 2)
    assert client.get("/sample?n=10").json()["sampler"] == "ddpm", "the default model keeps its default"


@pytest.mark.parametrize(
    "query, param",
    [("sampler=ddpm", "sampler"), ("steps=3", "steps"), ("steps=40", "steps"), ("steps=2&spacing=trailing", "spacing")],
)
def test_what_the_student_was_not_made_for_is_a_422_naming_what_it_supports(client, query, param):
    r = client.get(f"/sample?model=fast&n=10&{query}")
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["query", param]
    assert SUPPORTED in detail["msg"] or "visits only its own levels" in detail["msg"]


def test_models_and_samplers_list_only_what_the_student_serves(client):
    fast = next(m for m in client.get("/models").json()["models"] if m["name"] == "fast")
    assert list(fast["samplers"]) == ["consistency"]
    assert fast["samplers"]["consistency"]["steps"] == {"min": 1, "max": 4, "allowed": [1, 2, 4]}
    assert fast["samplers"]["consistency"]["distilled_timesteps"] == {"1": [9], "2": [9, 4], "4": [9, 6, 3, 1]}
    assert fast["distillation"]["method"] == "consistency" and fast["distillation"]["default"]["steps"] == 2
    samplers = client.get("/samplers?model=fast").json()
    assert [s["name"] for s in samplers] == ["consistency"] and samplers[0]["steps"]["default"] == 2
    assert samplers[0]["quality"]["2"]["sliced_w2"] == 0.015
    plain = next(m for m in client.get("/models").json()["models"] if m["name"] == "swissroll")
    assert plain["distillation"] is None and "ddpm" in plain["samplers"]


def test_trajectory_and_animation(client):
    r = client.get("/trajectory?model=fast&steps=4&n=20&seed=1")
    assert r.status_code == 200
    body = r.json()
    assert body["timesteps"] == [9, 6, 3, 1] and np.asarray(body["frames"]).shape == (5, 20, 2)
    video = client.get("/animation?model=fast&steps=2&n=100&seed=1&size=240")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4" and len(video.content) > 1000
