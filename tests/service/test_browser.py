"""The web page in a real browser: Playwright driving Debian's chromium against a real uvicorn process.

Skips with a reason when chromium or the playwright package is missing, except under CI=true, where a
missing browser is a failure. Screenshots go to test-artifacts/.
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PIXELS_MIN = 1500  # pixels that differ from the background on a drawn frame (a 500-point frame has ~10k)


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser test must run in CI)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def sync_playwright():
    if not Path(CHROMIUM).exists() or not shutil.which(CHROMIUM):
        _missing(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install playwright; no browser download needed)")
    return sync_playwright


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "SWISSROLL_PORT": str(port), "SWISSROLL_HOST": "127.0.0.1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if _get(f"{base}/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready within 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def browser(sync_playwright):
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, reduced_motion="reduce")
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# Pixels of the canvas that differ from its top-left corner (the background).
COUNT_DRAWN = """() => {
  const c = document.getElementById('canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let drawn = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.abs(d[i] - d[0]) + Math.abs(d[i + 1] - d[1]) + Math.abs(d[i + 2] - d[2]) > 24) drawn++;
  }
  return drawn;
}"""

SET_FRAME = """(k) => {
  const s = document.getElementById('slider');
  s.value = String(k);
  s.dispatchEvent(new Event('input', {bubbles: true}));
}"""


def _npy(response) -> np.ndarray:
    assert response.headers["content-type"] == "application/x-npy"
    return np.load(io.BytesIO(response.body()), allow_pickle=False)


def _open(page, server):
    with page.expect_response(lambda r: "/trajectory?" in r.url) as first:
        page.goto(server + "/")
    assert first.value.status == 200
    page.wait_for_function("document.getElementById('canvas').dataset.frames > 0")
    return first.value


def test_page_animates_trajectory_and_reports_errors(page, server):
    response = _open(page, server)
    frames = _npy(response).shape[0]  # the page asks for format=npy&dtype=float16
    assert int(page.get_attribute("#canvas", "data-frames")) == frames
    assert page.locator("#sampler option").count() == len(json.loads(_get(server + "/samplers")[1]))

    # non-empty frames, and different ones: the initial noise and the final samples
    page.evaluate(SET_FRAME, 0)
    noise_pixels = page.evaluate(COUNT_DRAWN)
    noise_image = page.locator("#canvas").screenshot()
    page.evaluate(SET_FRAME, frames - 1)
    final_pixels = page.evaluate(COUNT_DRAWN)
    assert noise_pixels > PIXELS_MIN and final_pixels > PIXELS_MIN, (noise_pixels, final_pixels)
    assert page.locator("#canvas").screenshot() != noise_image
    assert page.get_attribute("#canvas", "data-frame") == str(frames - 1)

    # latency and the returned seed are shown
    latency = page.inner_text("#latency")
    assert "round trip" in latency and "server compute" in latency
    assert response.headers["x-seed"] in latency

    # playback: play advances frames
    page.evaluate(SET_FRAME, 0)
    page.click("#play")
    page.wait_for_function("Number(document.getElementById('canvas').dataset.frame) > 0")

    # changing the sampler triggers a new /trajectory request with that sampler; eta only for ddim
    assert not page.is_visible("#eta")
    with page.expect_request(lambda r: "/trajectory?" in r.url and "sampler=ddim" in r.url) as req:
        page.select_option("#sampler", "ddim")
    assert "eta=" in req.value.url
    assert page.is_visible("#eta")
    with page.expect_response(lambda r: "/trajectory?" in r.url and "sampler=dpmpp_2m" in r.url) as resp:
        page.select_option("#sampler", "dpmpp_2m")
    assert resp.value.status == 200 and "eta=" not in resp.value.url
    assert not page.is_visible("#eta")
    default_steps = next(s for s in json.loads(_get(server + "/samplers")[1]) if s["name"] == "dpmpp_2m")
    assert page.input_value("#steps") == str(default_steps["steps"]["default"])
    page.wait_for_function("document.getElementById('canvas').dataset.sampler === 'dpmpp_2m'")

    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate(SET_FRAME, default_steps["steps"]["default"])
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)

    # a bad value: the API's own 422 message is shown in the alert area
    expected = json.loads(_get(server + "/trajectory?n=999999")[1])["detail"][0]["msg"]
    assert not page.is_visible("#error")
    page.fill("#n", "999999")
    with page.expect_response(lambda r: "/trajectory?" in r.url and "n=999999" in r.url) as bad:
        page.click("#run")
    assert bad.value.status == 422
    page.wait_for_selector("#error", state="visible")
    assert expected in page.inner_text("#error")
    assert page.get_attribute("#error", "role") == "alert"
    page.screenshot(path=str(ARTIFACTS / "page-error.png"), full_page=True)

    # a good value clears it
    page.fill("#n", "300")
    with page.expect_response(lambda r: "/trajectory?" in r.url and "n=300" in r.url) as good:
        page.click("#run")
    assert good.value.status == 200
    page.wait_for_selector("#error", state="hidden")

    # 503 (with its Retry-After) and network failures are shown too, not swallowed
    busy = {"detail": "server overloaded: queue full; retry later"}
    page.route(
        "**/trajectory?*",
        lambda route: route.fulfill(status=503, json=busy, headers={"Retry-After": "2"}),
    )
    page.click("#run")
    page.wait_for_function("document.getElementById('error').textContent.includes('queue full')")
    assert "503" in page.inner_text("#error") and "retry in 2 s" in page.inner_text("#error")
    page.unroute("**/trajectory?*")
    page.route("**/trajectory?*", lambda route: route.abort("connectionrefused"))
    page.click("#run")
    page.wait_for_function("document.getElementById('error').textContent.includes('Network error')")
    page.unroute("**/trajectory?*")


def test_model_selector_switches_model_and_legend(page, server):
    listing = json.loads(_get(server + "/models")[1])
    _open(page, server)
    names = [m["name"] for m in listing["models"]]
    assert page.eval_on_selector_all("#model option", "opts => opts.map(o => o.value)") == names
    assert page.input_value("#model") == listing["default"]
    assert page.inner_text("#pts-label") == f"samples · {listing['default']}"
    other = next(name for name in names if name != listing["default"])  # the committed seed model at least
    samplers_request = page.expect_request(lambda r: f"/samplers?model={other}" in r.url)
    trajectory = page.expect_response(lambda r: "/trajectory?" in r.url and f"model={other}" in r.url)
    with samplers_request, trajectory as resp:
        page.select_option("#model", other)
    assert resp.value.status == 200
    assert resp.value.headers["x-model"] == next(m["id"] for m in listing["models"] if m["name"] == other)
    page.wait_for_function(f"document.getElementById('pts-label').textContent === 'samples · {other}'")
    assert f"model={other}" in page.url  # the shared URL keeps the model
    # the field overlay asks the chosen model too
    with page.expect_request(lambda r: "/field?" in r.url and f"model={other}" in r.url):
        page.check("#show-field")


def test_page_at_phone_width(page, server):
    page.set_viewport_size({"width": 375, "height": 740})
    _open(page, server)
    page.evaluate(SET_FRAME, 10_000)  # clamped to the last frame
    assert page.evaluate(COUNT_DRAWN) > PIXELS_MIN
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-phone.png"), full_page=True)
    scroll_width = page.evaluate("document.documentElement.scrollWidth")
    assert scroll_width <= 375 + 1, f"horizontal overflow at 375 px: scrollWidth {scroll_width}"
    box = page.locator("#canvas").bounding_box()
    assert box and box["width"] >= 300 and box["x"] >= 0 and box["x"] + box["width"] <= 375


def test_video_plays_mp4_from_animation(page, server):
    status, _ = _get(server + "/animation?n=50&steps=2&seed=0&fps=5&size=240", timeout=60)
    if status == 404:
        pytest.skip("GET /animation answers 404: the endpoint is not in this build yet")
    _open(page, server)
    with page.expect_response(lambda r: "/animation?" in r.url, timeout=60_000) as mp4:
        page.click("#load-mp4")
    assert mp4.value.status in (200, 206)
    assert mp4.value.headers["content-type"].startswith("video/mp4")
    seed = page.inner_text("#latency .chip")
    assert f"seed={seed}" in mp4.value.url  # the same run as on the canvas
    page.wait_for_function(
        "(() => { const v = document.getElementById('video');"
        " return v.readyState >= 2 && v.duration > 0 && !v.error; })()",
        timeout=60_000,
    )
    assert page.is_visible("#video")
    assert not page.is_visible("#error")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-video.png"), full_page=True)


def _drawn_at(page, k: int) -> int:
    page.evaluate(SET_FRAME, k)
    return page.evaluate(COUNT_DRAWN)


def test_forward_and_reverse_field_x0_and_real_data(page, server):
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    response = _open(page, server)
    assert "format=npy" in response.url and "dtype=float16" in response.url
    frames = _npy(response).shape[0]
    page.wait_for_function("document.getElementById('canvas').dataset.forwardFrames > 0")
    assert int(page.get_attribute("#canvas", "data-forward-frames")) == frames  # same n, steps and seed
    assert int(page.get_attribute("#canvas", "data-ttff")) > 0
    reverse_noise = _drawn_at(page, 0)
    reverse_noise_image = page.locator("#canvas").screenshot()
    assert reverse_noise > PIXELS_MIN and _drawn_at(page, frames - 1) > PIXELS_MIN

    # every new control is reachable from the keyboard: radios (arrow keys), checkboxes (space), select
    page.focus("#process-reverse")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("document.getElementById('canvas').dataset.mode === 'forward'")
    assert page.is_checked("#process-forward")
    assert page.get_attribute("#slider", "aria-label") == "Noising level"
    data_pixels = _drawn_at(page, 0)
    data_image = page.locator("#canvas").screenshot()
    assert data_pixels > PIXELS_MIN and data_image != reverse_noise_image
    assert "real data" in page.inner_text("#frame-label")
    assert _drawn_at(page, frames - 1) > PIXELS_MIN
    assert "t = " in page.inner_text("#frame-label")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "show-field"
    without_field = _drawn_at(page, frames // 2)
    page.keyboard.press("Space")
    page.wait_for_function("document.getElementById('canvas').dataset.fieldDrawn !== ''")
    assert page.evaluate(COUNT_DRAWN) > without_field + 200  # the arrows add pixels
    assert page.is_visible("#field-item")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-forward.png"), full_page=True)

    # back to the reverse run at the same position; the overlay follows the frame's level while it plays
    page.click("label[for=process-reverse]")
    page.wait_for_function("document.getElementById('canvas').dataset.mode === 'reverse'")
    page.evaluate(SET_FRAME, 0)
    page.wait_for_function("document.getElementById('canvas').dataset.fieldDrawn !== ''")
    first_level = page.get_attribute("#canvas", "data-field-drawn")
    page.click("#play")
    page.wait_for_function(
        "(l) => { const c = document.getElementById('canvas');"
        " return Number(c.dataset.frame) > 3 && c.dataset.fieldDrawn !== '' && c.dataset.fieldDrawn !== l; }",
        arg=first_level,
    )

    # predicted x0: the same run again (same seed), now with x0
    seed = page.inner_text("#latency .chip")
    page.focus("#show-x0")
    with page.expect_response(lambda r: "/trajectory?" in r.url and "include_x0=true" in r.url) as with_x0:
        page.keyboard.press("Space")
    assert f"seed={seed}" in with_x0.value.url and _npy(with_x0.value).shape[:2] == (2, frames)
    page.wait_for_function("document.getElementById('canvas').dataset.hasX0 === 'true'")
    pause = "(() => { const b = document.getElementById('play'); if (b.textContent.includes('❚')) b.click(); })()"
    page.evaluate(pause)
    page.evaluate(SET_FRAME, frames // 2)
    assert page.get_attribute("#canvas", "data-x0-drawn") == str(frames // 2)

    # original vs generated: real data side by side, with the sliced-W2 figure
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "compare"
    page.select_option("#compare", "side")
    page.wait_for_function("document.getElementById('quality').textContent.includes('sliced W2')")
    assert page.is_visible("#canvas-real")
    assert page.get_attribute("#canvas", "data-frame") == str(frames - 1)  # the end of the run
    ratio = float(page.get_attribute("#quality", "data-ratio"))
    assert 0.2 < ratio < 5, ratio  # the committed model is near the floor; a broken page is far from it
    page.screenshot(path=str(ARTIFACTS / "page-views.png"), full_page=True)
    page.select_option("#compare", "overlay")
    assert not page.is_visible("#canvas-real") and page.is_visible("#real-item")

    # the MP4 follows the process on screen
    page.click("label[for=process-forward]")
    with page.expect_response(lambda r: "/animation?" in r.url, timeout=60_000) as mp4:
        page.click("#load-mp4")
    assert "process=forward" in mp4.value.url and mp4.value.status in (200, 206)

    assert not console_errors, console_errors

    # API errors of the new endpoints are shown in the page (a fresh page: fields already fetched are cached)
    page.route("**/field?*", lambda route: route.fulfill(status=503, json={"detail": "field queue full"}))
    _open(page, server)
    page.wait_for_function("document.getElementById('canvas').dataset.forwardFrames > 0")
    # click, not check(): the page unchecks the box as soon as the 503 arrives, which can be before check() looks
    page.click("#show-field")
    page.wait_for_function("document.getElementById('error').textContent.includes('field queue full')")
    assert not page.is_checked("#show-field")
    page.unroute("**/field?*")
    page.route("**/forward?*", lambda route: route.fulfill(status=422, json={"detail": [{"msg": "bad forward"}]}))
    page.click("#run")
    page.wait_for_function("document.getElementById('error').textContent.includes('bad forward')")
    page.unroute("**/forward?*")
    unexpected = [e for e in console_errors if not ("503" in e or "422" in e)]  # the browser logs failed loads
    assert not unexpected, unexpected


def test_new_controls_at_phone_width(page, server):
    page.set_viewport_size({"width": 375, "height": 740})
    _open(page, server)
    page.wait_for_function("document.getElementById('canvas').dataset.forwardFrames > 0")
    page.click("label[for=process-forward]")
    page.check("#show-field")
    page.select_option("#compare", "side")
    page.wait_for_function("document.getElementById('canvas').dataset.fieldDrawn !== ''")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-views-phone.png"), full_page=True)
    scroll_width = page.evaluate("document.documentElement.scrollWidth")
    assert scroll_width <= 375 + 1, f"horizontal overflow at 375 px: scrollWidth {scroll_width}"
    for selector in ("#canvas", "#canvas-real"):
        box = page.locator(selector).bounding_box()
        assert box and box["width"] >= 300 and box["x"] >= 0 and box["x"] + box["width"] <= 375
