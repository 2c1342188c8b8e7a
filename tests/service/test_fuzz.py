"""Schema fuzzing: every endpoint, generated valid and invalid queries and headers (Range, If-None-Match, If-Range
on /animation, Authorization where the Bearer scheme is declared); no 5xx, and every response matches the schema:
its status is declared, its body validates against the declared model (service/responses.py; undeclared fields
fail), its declared headers are present and well-formed."""

import hypothesis
import pytest
import schemathesis
import torch
from schemathesis.specs.openapi.checks import positive_data_acceptance

from diffusion.checkpoint import load_model
from service.app import create_app
from tests.utils.checkpoints import make_settings, write_tiny_checkpoint

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def fuzz_schema(tmp_path_factory):
    # A tiny model keeps cases cheap, and the schema's own bounds keep n, steps and size from asking for huge jobs.
    # Built by a fixture, not at import: collecting the test suite builds no app.
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny.pt")
    # With an API key set: the schema declares the Bearer scheme, and schemathesis checks it is enforced.
    app = create_app(make_settings(checkpoint, api_keys=KEY), model=load_model(checkpoint, torch.device("cpu")))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    # schemathesis' lazy schemas read `node._nodeid`, which pytest 9 no longer has; give it the public node id.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@hypothesis.settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(hypothesis.HealthCheck)
)
def test_no_server_errors_and_schema_conformance(case):
    if case.headers and "Authorization" in case.headers:
        case.headers["Authorization"] = f"Bearer {KEY}"  # a valid key, so the cases reach the routes' own checks
    response = case.call()
    assert response.status_code < 500, f"{case.path}?{case.query} -> {response.status_code}: {response.text[:300]}"
    # Excluded: "schema-valid request rejected". Two rules are deliberately not schema-expressible and answer 422
    # by design (tested in test_api.py): eta only for ddim, and steps up to the loaded model's T.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


def test_the_fuzzer_varies_the_conditional_and_auth_headers(fuzz_schema):
    spec = fuzz_schema.raw_schema
    animation = spec["paths"]["/animation"]["get"]
    headers = {p["name"] for p in animation["parameters"] if p["in"] == "header"}
    assert {"Range", "If-None-Match", "If-Range"} <= headers
    assert any("HTTPBearer" in s for s in animation.get("security", []))
