"""/forward (the noising process on real data), /field (the learned field), /animation?process=forward, and the
compact wire formats: /trajectory?format=npy and gzip."""

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from diffusion.samplers import timesteps
from service.app import create_app
from service.forward import forward_levels
from tests.utils.checkpoints import TINY_T, make_settings
from training.distances import sliced_w2
from training.evaluate import fresh_real

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def real_client():
    """The committed checkpoint: its schedule ends at alpha_bar ~ 1.5e-6 and its metadata has the data recipe."""
    with TestClient(create_app(make_settings(ROOT / "checkpoints/swissroll.pt", warmup=False))) as c:
        yield c


def _npy(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    return np.load(io.BytesIO(r.content), allow_pickle=False)


# ------------------------------------------------------------------ /forward


def test_forward_frames_levels_and_shapes(client):
    body = client.get("/forward?n=64&seed=3").json()
    assert body["steps"] == TINY_T and body["levels"] == list(range(TINY_T))  # default: every level
    assert np.asarray(body["frames"]).shape == (TINY_T + 1, 64, 2)
    assert len(body["alphas_cumprod"]) == TINY_T and body["seed"] == 3
    body = client.get("/forward?n=10&steps=4&seed=3").json()
    assert body["levels"] == sorted(timesteps(TINY_T, 4)) and body["levels"][-1] == TINY_T - 1
    assert np.asarray(body["frames"]).shape == (5, 10, 2)


def test_forward_levels_mirror_the_trailing_reverse_run():
    for T, steps in [(40, 40), (40, 10), (40, 1), (10, 3)]:
        levels = forward_levels(T, steps)
        assert levels == sorted(timesteps(T, steps)) and levels[-1] == T - 1 and len(set(levels)) == steps


def test_forward_npy_matches_json_and_is_the_closed_form(real_client):
    js = real_client.get("/forward?n=200&steps=8&seed=11").json()
    r = real_client.get("/forward?n=200&steps=8&seed=11&format=npy")
    frames = _npy(r)
    assert frames.dtype == np.float32 and frames.shape == (9, 200, 2)
    assert r.headers["x-levels"] == ",".join(map(str, js["levels"])) and r.headers["x-seed"] == "11"
    np.testing.assert_allclose(frames, np.asarray(js["frames"]), atol=6e-4)  # JSON keeps 3 decimals
    # x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps with one eps per point at every level
    ab = np.asarray(real_client.app.state.models.get().denoiser.alphas_cumprod)[js["levels"]]
    eps = (frames[1:] - np.sqrt(ab)[:, None, None] * frames[:1]) / np.sqrt(1 - ab)[:, None, None]
    np.testing.assert_allclose(eps, np.broadcast_to(eps[-1], eps.shape), atol=2e-4)
    half = _npy(real_client.get("/forward?n=200&steps=8&seed=11&format=npy&dtype=float16"))
    assert half.dtype == np.float16 and np.abs(half.astype(np.float32) - frames).max() < 4e-3


def test_forward_first_frame_is_the_real_data(real_client):
    n = 5000
    data = real_client.app.state.models.get().metadata["data"]
    real = lambda seed: fresh_real(n, data["noise"], seed, data["mean"], data["std"])  # noqa: E731
    seeds = range(4)
    first = [_npy(real_client.get(f"/forward?n={n}&steps=1&seed={s}&format=npy"))[0] for s in seeds]
    ours = np.mean([sliced_w2(f, real(100 + s)) for s, f in zip(seeds, first, strict=True)])
    floor = np.mean([sliced_w2(real(200 + s), real(100 + s)) for s in seeds])
    assert ours < 1.5 * floor, (ours, floor)


def test_forward_last_frame_is_standard_normal(real_client):
    n = 5000
    x = _npy(real_client.get(f"/forward?n={n}&steps=2&seed=5&format=npy"))[-1].astype(np.float64)
    # mean: standard error 1/sqrt(n); covariance entries of N(0, I): standard error <= sqrt(2/n). 5 of each.
    assert np.all(np.abs(x.mean(0)) < 5 / np.sqrt(n)), x.mean(0)
    assert np.all(np.abs(np.cov(x.T) - np.eye(2)) < 5 * np.sqrt(2 / n)), np.cov(x.T)


def test_forward_seeds_reproduce_and_an_omitted_seed_is_returned(client):
    a = client.get("/forward?n=30&steps=3&seed=9")
    assert a.headers["x-seed"] == "9"
    assert a.json()["frames"] == client.get("/forward?n=30&steps=3&seed=9").json()["frames"]
    assert a.json()["frames"] != client.get("/forward?n=30&steps=3&seed=10").json()["frames"]
    drawn = client.get("/forward?n=30&steps=3")
    seed = drawn.json()["seed"]
    assert drawn.headers["x-seed"] == str(seed)
    assert client.get(f"/forward?n=30&steps=3&seed={seed}").json()["frames"] == drawn.json()["frames"]


@pytest.mark.parametrize(
    "query, param",
    [
        ("n=0", "n"),
        ("n=5001", "n"),
        ("steps=0", "steps"),
        (f"steps={TINY_T + 1}", "steps"),  # beyond this model's T
        ("seed=-1", "seed"),
        ("format=csv", "format"),
        ("dtype=int8", "dtype"),
        ("sampler=ddpm", "sampler"),  # unknown here
    ],
)
def test_forward_bounds_are_422_naming_the_parameter(client, query, param):
    r = client.get(f"/forward?{query}")
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == param


# ------------------------------------------------------------------ /field


@pytest.mark.parametrize("t, grid, extent", [(0, 2, 1.0), (TINY_T // 2, 7, 2.5), (TINY_T - 1, 16, 4.0)])
def test_field_is_the_models_own_prediction_on_the_grid(client, t, grid, extent):
    body = client.get(f"/field?t={t}&grid={grid}&extent={extent}").json()
    points = np.asarray(body["points"], dtype=np.float32)
    axis = np.linspace(-extent, extent, grid)
    assert points.shape == (grid * grid, 2)
    np.testing.assert_allclose(points[:grid, 0], axis, atol=1e-6)  # first row: x varies, y = -extent
    np.testing.assert_allclose(points[::grid, 1], axis, atol=1e-6)  # first column: y varies
    denoiser = client.app.state.models.get().denoiser
    with torch.inference_mode():
        eps, x0 = denoiser.predict(torch.from_numpy(points), t)
    np.testing.assert_allclose(np.asarray(body["eps"]), eps.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(body["x0"]), x0.numpy(), rtol=1e-6, atol=1e-6)
    assert body["alpha_bar"] == pytest.approx(denoiser.alphas_cumprod[t])
    assert body["sigma"] == pytest.approx((1 - denoiser.alphas_cumprod[t]) ** 0.5)


def test_field_of_the_real_model_points_towards_the_data(real_client):
    # A sanity check on the committed model: at a mid level, x0 predicted from far-away points is nearer the data.
    body = real_client.get("/field?t=20&grid=9&extent=4").json()
    points, x0 = np.asarray(body["points"]), np.asarray(body["x0"])
    assert np.mean(np.linalg.norm(x0, axis=1)) < np.mean(np.linalg.norm(points, axis=1))


@pytest.mark.parametrize(
    "query, param, allowed",
    [
        ("", "t", "0..999"),
        (f"t={TINY_T}", "t", f"0..{TINY_T - 1}"),
        ("t=-1", "t", "0..999"),
        ("t=1&grid=1", "grid", "2..64"),
        ("t=1&grid=65", "grid", "2..64"),
        ("t=1&extent=0", "extent", "0.1..10"),
        ("t=1&extent=11", "extent", "0.1..10"),
        ("t=1&n=5", "n", "extent, grid, model, t"),
    ],
)
def test_field_bounds_are_422_naming_the_parameter_and_range(client, query, param, allowed):
    r = client.get(f"/field?{query}")
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][-1] == param and allowed in detail["msg"]


# ------------------------------------------------------------------ /animation?process=forward


def test_forward_animation_is_an_mp4_with_its_own_cache_key(client):
    q = "n=50&steps=3&seed=1&fps=5&size=240"
    fwd = client.get(f"/animation?{q}&process=forward")
    rev = client.get(f"/animation?{q}")
    assert fwd.status_code == rev.status_code == 200
    assert fwd.headers["content-type"] == "video/mp4" and fwd.content[4:8] == b"ftyp"
    assert fwd.headers["etag"] != rev.headers["etag"] and fwd.content != rev.content
    assert client.get(f"/animation?{q}&process=reverse").headers["etag"] == rev.headers["etag"]  # the default
    again = client.get(f"/animation?{q}&process=forward")
    assert again.headers["x-cache"] == "hit" and again.content == fwd.content
    assert client.get(f"/animation?{q}&process=sideways").status_code == 422
    assert client.get(f"/animation?n=5&steps={TINY_T + 1}&process=forward").status_code == 422
    for extra, name in [("sampler=ddim", "sampler"), ("eta=0.5", "eta"), ("spacing=trailing", "spacing")]:
        r = client.get(f"/animation?{q}&process=forward&{extra}")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == name


def test_forward_animation_frame_count():
    av = pytest.importorskip("av")
    app = create_app(make_settings(ROOT / "checkpoints/swissroll.pt", warmup=False))
    with TestClient(app) as c:
        data = c.get("/animation?n=100&steps=4&seed=0&fps=5&size=240&process=forward").content
    with av.open(io.BytesIO(data)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 4 + 1 + 5  # data, 4 levels, then a 1 s hold at 5 fps


# ------------------------------------------------------------------ compact wire formats


def test_trajectory_npy_matches_json(client):
    q = "n=40&sampler=ddim&steps=4&seed=2"
    js = client.get(f"/trajectory?{q}").json()
    r = client.get(f"/trajectory?{q}&format=npy")
    frames = _npy(r)
    assert frames.shape == (5, 40, 2) and frames.dtype == np.float32
    np.testing.assert_allclose(frames, np.asarray(js["frames"]), atol=6e-4)
    assert r.headers["x-timesteps"] == ",".join(map(str, js["timesteps"]))
    assert r.headers["x-seed"] == "2" and r.headers["x-sampler"] == "ddim" and r.headers["x-spacing"] == js["spacing"]


def test_trajectory_npy_with_x0(client):
    q = "n=40&steps=3&seed=2&include_x0=true"
    js = client.get(f"/trajectory?{q}").json()
    both = _npy(client.get(f"/trajectory?{q}&format=npy&dtype=float16"))
    assert both.shape == (2, 4, 40, 2) and both.dtype == np.float16
    np.testing.assert_allclose(both[1, :-1], np.asarray(js["x0"]), atol=5e-3)
    assert np.isnan(both[1, -1]).all()  # no prediction is made from the final samples


def test_json_is_gzipped_when_accepted_and_video_and_npy_are_not(client):
    q = "/trajectory?n=2000&steps=4&seed=1"
    plain = client.get(q, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    zipped = client.get(q, headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip" and "accept-encoding" in zipped.headers["vary"].lower()
    assert zipped.json()["frames"] == plain.json()["frames"]  # httpx decodes; the wire size is in the header
    assert int(zipped.headers["content-length"]) < len(plain.content) / 2
    small = client.get("/healthz", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers  # below the minimum size
    npy = client.get(q + "&format=npy", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in npy.headers
    mp4 = "/animation?n=50&steps=3&seed=1&fps=5&size=240"
    full = client.get(mp4, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in full.headers
    part = client.get(mp4, headers={"Accept-Encoding": "gzip", "Range": "bytes=10-109"})
    assert part.status_code == 206 and "content-encoding" not in part.headers
    assert part.content == full.content[10:110]


def test_gzip_can_be_turned_off(tiny_checkpoint):
    with TestClient(create_app(make_settings(tiny_checkpoint, gzip_min_bytes=0))) as c:
        r = c.get("/trajectory?n=2000&steps=4&seed=1", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and "content-encoding" not in r.headers


def test_gzip_body_is_real_gzip(client):
    # What a browser receives: the raw stream, decompressed by hand.
    with client.stream("GET", "/forward?n=1000&steps=2&seed=0", headers={"Accept-Encoding": "gzip"}) as r:
        raw = b"".join(r.iter_raw())
    assert r.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw).startswith(b'{"n":1000')
