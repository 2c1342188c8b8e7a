"""A client generated from the served spec (openapi-python-client, as a user of the API would) calls every endpoint
of a real uvicorn server: every JSON 200 and every error status comes back as a typed object, binaries as bytes."""

import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.live_server import LiveServer
from tests.utils.checkpoints import write_tiny_checkpoint

pytestmark = pytest.mark.e2e

KEY = "client-key"
PACKAGE = "swissroll_client"
# What a user of the API writes too: openapi-python-client only knows JSON, text and octet-stream bodies; these
# media types are binary (the spec says `format: binary`), so they come back as File (bytes).
CONFIG = {
    "project_name_override": PACKAGE,
    "package_name_override": PACKAGE,
    "content_type_overrides": {
        "application/x-npy": "application/octet-stream",
        "video/mp4": "application/octet-stream",
    },
    "post_hooks": [],  # no ruff formatting of the generated code: not needed to import it
}
MAX_POINTS = 50_000  # /sample?n=100000 is refused at once (503 + Retry-After)
TIMEOUT_S = 3  # a 1080p video of 101 frames takes far longer: 504
BIG_VIDEO = {"n": 20_000, "steps": 100, "size": 1080, "seed": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # T = 100: one request can ask for a long video (the 504 case); the tiny network keeps everything else fast.
    # A second model and a file that fails to load, so /models has all its parts.
    models = tmp_path_factory.mktemp("client-models")
    write_tiny_checkpoint(models / "tiny.pt", num_timesteps=100)
    write_tiny_checkpoint(models / "other.pt", prediction_type="epsilon")
    (models / "broken.pt").write_bytes(b"not a checkpoint")
    env = {
        "SWISSROLL_MODELS_DIR": str(models),
        "SWISSROLL_DEFAULT_MODEL": "tiny",
        "SWISSROLL_API_KEYS": KEY,
        "SWISSROLL_MAX_POINTS_IN_FLIGHT": str(MAX_POINTS),
        "SWISSROLL_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "SWISSROLL_TORCH_THREADS": "1",
    }
    with LiveServer(**env) as s:
        yield s


@pytest.fixture(scope="module")
def api(server, tmp_path_factory):
    """The generated package, imported: generated from the running server's /openapi.json, once."""
    out = tmp_path_factory.mktemp("generated")
    (out / "openapi.json").write_bytes(httpx.get(f"{server.url}/openapi.json").content)
    (out / "config.json").write_text(json.dumps(CONFIG))
    subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", "openapi.json", "--config",
         "config.json", "--meta", "none", "--output-path", PACKAGE],
        cwd=out, check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


CALLED: set[str] = set()  # the generated operations the tests below called (checked by the last test)


def operation(api, tag: str, name: str):
    CALLED.add(name)
    return importlib.import_module(f"{api.__name__}.api.{tag}.{name}").sync_detailed


@pytest.fixture(scope="module")
def client(api, server):
    with api.AuthenticatedClient(base_url=server.url, token=KEY, timeout=httpx.Timeout(60)) as c:
        yield c


@pytest.fixture(scope="module")
def models(api):
    return importlib.import_module(f"{api.__name__}.models")


def test_json_200s_are_typed(api, client, models):
    sample = operation(api, "sampling", "sample")(client=client, n=5, seed=1)
    assert isinstance(sample.parsed, models.SampleResult) and sample.headers["X-Seed"] == "1"
    assert len(sample.parsed.points) == 5 and sample.parsed.model == sample.headers["X-Model"]
    assert sample.parsed.sampler == models.SamplerName.DDPM

    ddim = operation(api, "sampling", "sample")(client=client, n=2, sampler=models.SamplerName.DDIM, eta=0.5, steps=3)
    assert isinstance(ddim.parsed, models.SampleResult) and ddim.parsed.eta == 0.5

    traj = operation(api, "sampling", "trajectory")(client=client, n=3, steps=2, include_x0=True)
    assert isinstance(traj.parsed, models.TrajectoryResult)
    assert len(traj.parsed.frames) == 3 and len(traj.parsed.x0) == 2 and len(traj.parsed.timesteps) == 2

    fwd = operation(api, "explain", "forward")(client=client, n=3, steps=2, seed=0)
    assert isinstance(fwd.parsed, models.ForwardResult) and isinstance(fwd.parsed.data, models.DataRecipe)
    assert len(fwd.parsed.frames) == 3 and fwd.parsed.levels == sorted(fwd.parsed.levels)

    field = operation(api, "explain", "field")(client=client, t=3, grid=3)
    assert isinstance(field.parsed, models.FieldResult) and len(field.parsed.eps) == 9

    samplers = operation(api, "model", "samplers")(client=client)
    assert all(isinstance(s, models.SamplerInfo) for s in samplers.parsed)
    assert {s.name for s in samplers.parsed} == set(models.SamplerName)
    assert all(isinstance(s.steps, models.StepsRange) and s.steps.max_ == 100 for s in samplers.parsed)

    info = operation(api, "model", "model")(client=client)
    assert isinstance(info.parsed, models.ModelDetails) and info.parsed.num_timesteps == 100
    assert isinstance(info.parsed.metadata, models.ServedMetadata) and info.parsed.default
    assert info.parsed.metadata.data.mean == [0.0, 0.0] and info.parsed.threads.threads == 1

    listing = operation(api, "model", "models")(client=client).parsed
    assert isinstance(listing, models.ModelList) and listing.default == "tiny"
    assert {m.name for m in listing.models} == {"tiny", "other"}
    assert all(isinstance(m, models.ModelSummary) for m in listing.models)
    assert [f.name for f in listing.failures] == ["broken"] and isinstance(listing.failures[0], models.LoadFailureInfo)
    other = operation(api, "model", "model_by_name")(client=client, name="other").parsed
    assert isinstance(other, models.ModelDetails) and other.prediction_type == "epsilon" and not other.default
    on_other = operation(api, "sampling", "sample")(client=client, n=2, model="other")
    assert on_other.parsed.model_name == "other" == on_other.headers["X-Model-Name"]
    assert on_other.parsed.model == other.id

    assert isinstance(operation(api, "ops", "healthz")(client=client).parsed, models.Health)
    ready = operation(api, "ops", "readyz")(client=client).parsed
    assert isinstance(ready, models.Readiness) and ready.status == models.ReadinessStatus.READY
    metrics = operation(api, "ops", "metrics")(client=client).parsed
    assert isinstance(metrics, str) and "swissroll_requests_total" in metrics


def test_binary_responses_are_bytes(api, client):
    animation = operation(api, "sampling", "animation")
    whole = animation(client=client, n=10, steps=2, seed=0, size=240)
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
    video = whole.parsed.payload.read()
    assert video[4:8] == b"ftyp" and video == whole.content
    part = animation(client=client, n=10, steps=2, seed=0, size=240, range_="bytes=0-99")
    assert part.status_code == 206 and part.parsed.payload.read() == video[:100]
    same = animation(client=client, n=10, steps=2, seed=0, size=240, if_none_match=whole.headers["ETag"])
    assert same.status_code == 304 and same.parsed is None

    # format=npy shares its operation with the JSON body: openapi-python-client parses one media type per status
    # (the JSON one), so a generated client asks for npy through its own httpx client, with the same base URL, key
    # and parameter names (README, "Generated clients").
    http = client.get_httpx_client()
    for path, params, shape in [
        ("/sample", {"n": 5}, (5, 2)),
        ("/trajectory", {"n": 3, "steps": 2, "dtype": "float16"}, (3, 3, 2)),
        ("/forward", {"n": 3, "steps": 2}, (3, 3, 2)),
    ]:
        r = http.get(path, params={**params, "format": "npy"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
        assert np.load(io.BytesIO(r.content), allow_pickle=False).shape == shape


def issue_names(error) -> list:
    return [issue.loc[-1] for issue in error.detail]


def test_error_statuses_are_typed(api, client, models, server):
    sample = operation(api, "sampling", "sample")
    animation = operation(api, "sampling", "animation")

    bad = sample(client=client, n=0)
    assert bad.status_code == 422 and isinstance(bad.parsed, models.Error)
    assert issue_names(bad.parsed) == ["n"] and isinstance(bad.parsed.detail[0], models.ValidationIssue)
    assert "1..100000" in bad.parsed.detail[0].msg
    eta = sample(client=client, n=2, eta=0.5)  # the sampler's own check: same body
    assert eta.status_code == 422 and issue_names(eta.parsed) == ["eta"]

    with api.Client(base_url=server.url, timeout=httpx.Timeout(60)) as anonymous:
        refused = sample(client=anonymous, n=2)
    assert refused.status_code == 401 and isinstance(refused.parsed, models.Error)
    assert "Bearer" in refused.parsed.detail and refused.headers["WWW-Authenticate"] == "Bearer"

    # A client of its own: with_headers() also changes the httpx client a client has already opened.
    many = {f"x-h{i}": "1" for i in range(101)}
    with api.Client(base_url=server.url, headers=many, timeout=httpx.Timeout(60)) as crowded_client:
        crowded = operation(api, "ops", "healthz")(client=crowded_client)
    assert crowded.status_code == 431 and isinstance(crowded.parsed, models.Error)

    busy = sample(client=client, n=100_000)
    assert busy.status_code == 503 and isinstance(busy.parsed, models.Error)
    assert "points in flight" in busy.parsed.detail and int(busy.headers["Retry-After"]) >= 1

    unsatisfiable = animation(client=client, n=10, steps=2, seed=0, size=240, range_="bytes=99999999-")
    assert unsatisfiable.status_code == 416 and isinstance(unsatisfiable.parsed, models.Error)
    assert unsatisfiable.headers["Content-Range"].startswith("bytes */")

    late = animation(client=client, **BIG_VIDEO)
    assert late.status_code == 504 and isinstance(late.parsed, models.Error)
    assert f"{TIMEOUT_S} s deadline" in late.parsed.detail

    missing = operation(api, "model", "model_by_name")(client=client, name="nope")
    assert missing.status_code == 404 and isinstance(missing.parsed, models.Error) and "nope" in missing.parsed.detail
    unknown = sample(client=client, n=2, model="nope")
    assert unknown.status_code == 422 and issue_names(unknown.parsed) == ["model"]


def test_every_operation_was_called(api):
    """Runs last: the tests above called every operation the generator made (a new route needs a call above)."""
    generated = {p.stem for p in Path(api.__file__).parent.glob("api/*/*.py") if p.stem != "__init__"}
    assert generated == CALLED
