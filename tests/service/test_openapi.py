"""The OpenAPI contract: it validates, the committed copy is what the app serves, every response is declared with a
schema, and what the routes send (in-process, tiny model) parses into the declared models."""

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from service.app import create_app
from service.openapi_export import COMMITTED, render
from service.responses import (
    Error,
    FieldResult,
    ForwardResult,
    Health,
    ModelDetails,
    ModelList,
    Readiness,
    SampleResult,
    SamplerInfo,
    TrajectoryResult,
)
from service.routes import router
from service.settings import Settings
from tests.utils.checkpoints import write_tiny_checkpoint

KEY = "contract-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPERATIONS = {
    "/sample": "sample",
    "/trajectory": "trajectory",
    "/animation": "animation",
    "/forward": "forward",
    "/field": "field",
    "/samplers": "samplers",
    "/models": "models",
    "/models/{name}": "model_by_name",
    "/model": "model",
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
}
# Responses with a body of their own: everything else that is 4xx/5xx has the shared Error body.
OWN_ERROR_BODIES = {("/readyz", "503")}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    # Two models and a file that fails to load: /models lists both and the failure, all of it declared.
    models = tmp_path_factory.mktemp("contract-models")
    write_tiny_checkpoint(models / "tiny.pt")
    write_tiny_checkpoint(models / "other.pt", prediction_type="epsilon")
    (models / "broken.pt").write_bytes(b"not a checkpoint")
    settings = Settings(models_dir=models, default_model="tiny", device="cpu", torch_threads=1, api_keys=KEY)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def spec(keyed):
    return keyed.get("/openapi.json").json()


def test_the_spec_validates(spec):
    validate(spec)  # raises OpenAPIValidationError with the path of the first problem


def test_the_committed_copy_is_what_the_app_serves(spec):
    committed = json.loads(Path(COMMITTED).read_text())
    assert committed == spec, "the API changed: run `python -m service.openapi_export` and commit docs/openapi.json"
    assert Path(COMMITTED).read_text() == render(spec), "docs/openapi.json is not the exporter's output"


def test_operation_ids_are_the_route_names(spec):
    ids = {path: item["get"]["operationId"] for path, item in spec["paths"].items()}
    assert ids == OPERATIONS
    assert all(item["get"].get("tags") and item["get"].get("summary") for item in spec["paths"].values())


def test_every_response_has_a_schema_and_every_error_the_shared_body(spec):
    for path, item in spec["paths"].items():
        for status, response in item["get"]["responses"].items():
            content = response.get("content", {})
            if status in ("304",):
                assert not content, f"{path} {status} has no body"
                continue
            assert content, f"{path} {status}: no content declared"
            for media, body in content.items():
                schema = body.get("schema")
                assert schema, f"{path} {status} {media}: no schema"
                if media in ("application/x-npy", "video/mp4"):
                    assert schema["type"] == "string" and schema["format"] == "binary"
            if status[0] in "45" and (path, status) not in OWN_ERROR_BODIES:
                assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, (path, status)


def test_declared_headers(spec):
    def headers(path, status="200"):
        return set(spec["paths"][path]["get"]["responses"][status].get("headers", {}))

    assert {"X-Seed", "X-Model", "X-Model-Name", "X-Elapsed-Ms"} <= headers("/sample")
    assert {"X-Seed", "X-Model", "X-Timesteps", "X-Sampler", "X-Spacing"} <= headers("/trajectory")
    assert {"X-Seed", "X-Levels"} <= headers("/forward")
    assert {"X-Seed", "X-Model", "ETag", "Accept-Ranges"} <= headers("/animation")
    assert "Content-Range" in headers("/animation", "206") and "Content-Range" in headers("/animation", "416")
    assert headers("/sample", "503") == {"Retry-After"} and headers("/model", "401") == {"WWW-Authenticate"}


def test_models_carry_examples(spec):
    schemas = spec["components"]["schemas"]
    assert schemas["SampleResult"]["examples"] and schemas["Error"]["examples"]
    SampleResult.model_validate(schemas["SampleResult"]["examples"][0])
    for example in schemas["Error"]["examples"]:
        Error.model_validate(example)


@pytest.mark.parametrize(
    ("url", "model"),
    [
        ("/sample?n=5&seed=1", SampleResult),
        ("/sample?n=5&seed=1&model=other", SampleResult),
        ("/sample?n=5&sampler=ddim&eta=0.5&steps=3", SampleResult),
        ("/trajectory?n=3&steps=2", TrajectoryResult),
        ("/trajectory?n=3&steps=2&include_x0=true", TrajectoryResult),
        ("/forward?n=3&steps=2", ForwardResult),
        ("/field?t=3&grid=3", FieldResult),
        ("/model", ModelDetails),
        ("/models", ModelList),
        ("/models/other", ModelDetails),
        ("/samplers?model=other", None),
        ("/healthz", Health),
        ("/readyz", Readiness),
    ],
)
def test_json_bodies_parse_into_the_declared_models(keyed, url, model):
    r = keyed.get(url, headers=AUTH)
    assert r.status_code == 200, r.text
    if model is None:  # a list: /samplers
        assert [SamplerInfo.model_validate(s) for s in r.json()]
    else:
        model.model_validate_json(r.content)  # extra="forbid": an undeclared field fails here


def test_samplers_parse(keyed):
    body = keyed.get("/samplers").json()
    assert [SamplerInfo.model_validate(s).name for s in body]


@pytest.mark.parametrize(
    ("url", "headers", "status"),
    [
        ("/sample?n=0", AUTH, 422),
        ("/sample?sampler=nope", AUTH, 422),
        ("/sample?eta=0.5", AUTH, 422),  # the sampler's own check (SamplerError)
        ("/sample?n=1&n=2", AUTH, 422),
        ("/sample?n=1", {}, 401),
        ("/nope", {}, 404),
        ("/models/nope", AUTH, 404),
        ("/sample?model=nope", AUTH, 422),
        ("/healthz", {f"x-h{i}": "1" for i in range(101)}, 431),
        ("/animation?n=10&steps=2&seed=0&size=240", {**AUTH, "Range": "bytes=999999999-"}, 416),
    ],
)
def test_error_bodies_parse_into_error(keyed, url, headers, status):
    r = keyed.get(url, headers=headers)
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    Error.model_validate_json(r.content)


def test_point_bodies_are_declared_not_validated_per_request():
    """The schemas are documentation plus these tests: FastAPI neither validates nor re-serializes the big bodies
    (orjson writes the numpy arrays straight into the response, service/encoding.py)."""
    routes = {r.path: r for r in router.routes}
    for path in ("/sample", "/trajectory", "/forward", "/field"):
        assert routes[path].response_model is None and routes[path].response_field is None, path


def test_the_models_listing_checked_above_has_a_failure(keyed):
    listing = ModelList.model_validate_json(keyed.get("/models", headers=AUTH).content)
    assert [f.name for f in listing.failures] == ["broken"] and {m.name for m in listing.models} == {"tiny", "other"}
