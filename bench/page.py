"""What the web page downloads and how soon it shows the first frame, n = 5,000 (the /trajectory maximum), before and
after the compact wire formats: the page as it was (JSON, no compression), the same page with gzip on the server,
and the current page (.npy float16 + gzip for the JSON it still fetches). Chromium (Debian's) drives the real page
against a real server, unthrottled (loopback) and throttled to 10 Mbit/s with 20 ms latency (DevTools emulation).

    python -m bench.page     # writes bench/results/page_payload.md, page_payload.json and page_views.png

Time to first frame = from the moment the page issues its /trajectory request to the moment it sets the canvas's
data-frames attribute, which both pages do right before drawing frame 0 (a MutationObserver records it). It includes
the server's sampling (ddpm, 40 steps), the same in every row.
"""

import io
import json
import statistics
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
from PIL import Image

from bench.live_server import REPO, LiveServer

RESULTS = Path(__file__).parent / "results"
BEFORE_COMMIT = "559b674"  # the page before the compact formats (this branch's starting point)
N, SEED, REPS = 5000, 0, 7
THROTTLE = {"offline": False, "latency": 20, "downloadThroughput": 10e6 / 8, "uploadThroughput": 5e6 / 8}
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]

FIRST_FRAME_OBSERVER = """
new MutationObserver((records, observer) => {
  if (records.some((r) => r.target.id === 'canvas' && r.target.dataset.frames)) {
    window.__firstFrame = performance.now();
    observer.disconnect();
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-frames'] });
"""

TIMING = """() => {
  const api = /\\/(trajectory|forward|field)\\?|\\/(model|samplers)$/;
  const all = performance.getEntriesByType('resource').filter((e) => api.test(e.name));
  const t = all.find((e) => e.name.includes('/trajectory?'));
  return {
    ttff: window.__firstFrame - t.startTime,
    server_wait: t.responseStart - t.requestStart,
    client_side: window.__firstFrame - t.startTime - (t.responseStart - t.requestStart),
    download: t.responseEnd - t.responseStart,
    parse_and_draw: window.__firstFrame - t.responseEnd,
    trajectory_wire_bytes: t.encodedBodySize,
    trajectory_body_bytes: t.decodedBodySize,
    api_wire_bytes: all.reduce((s, e) => s + e.encodedBodySize, 0),
    requests: all.map((e) => e.name.replace(location.origin, '')),
  };
}"""


def old_page() -> dict[str, bytes]:
    files = {}
    for name in ("index.html", "app.js", "style.css"):
        files[name] = subprocess.run(
            ["git", "show", f"{BEFORE_COMMIT}:service/static/{name}"], cwd=REPO, check=True, capture_output=True
        ).stdout
    return files


def serve_old_page(page, files: dict[str, bytes]) -> None:
    types = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}

    def handler(route):
        path = urlparse(route.request.url).path.lstrip("/") or "index.html"
        route.fulfill(status=200, body=files[path], content_type=types[path])

    page.route(lambda url: (urlparse(url).path.lstrip("/") or "index.html") in files, handler)


def measure(browser, base: str, old: dict | None, throttled: bool) -> dict:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, reduced_motion="reduce")
    page = context.new_page()
    page.add_init_script(FIRST_FRAME_OBSERVER)
    if old:
        serve_old_page(page, old)
    if throttled:
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", THROTTLE)
    page.goto(f"{base}/?n={N}&seed={SEED}")
    page.wait_for_function("window.__firstFrame !== undefined", timeout=120_000)
    if not old:  # the current page then fetches /forward twice (the noising, and a second real sample)
        page.wait_for_function("document.getElementById('quality').textContent.length > 0", timeout=120_000)
    out = page.evaluate(TIMING)
    context.close()
    return out


def payload_sizes(base: str) -> list[dict]:
    rows = []
    for label, query in [
        ("/trajectory JSON", f"/trajectory?n={N}&seed={SEED}"),
        ("/trajectory npy float32", f"/trajectory?n={N}&seed={SEED}&format=npy"),
        ("/trajectory npy float16", f"/trajectory?n={N}&seed={SEED}&format=npy&dtype=float16"),
        ("/forward JSON", f"/forward?n={N}&steps=40&seed={SEED}"),
        ("/forward npy float16", f"/forward?n={N}&steps=40&seed={SEED}&format=npy&dtype=float16"),
        ("/field JSON (grid 19)", "/field?t=20&grid=19&extent=2.3"),
    ]:
        sizes = {}
        for encoding in ("identity", "gzip"):
            with httpx.stream("GET", base + query, headers={"Accept-Encoding": encoding}, timeout=60) as r:
                wire = sum(len(chunk) for chunk in r.iter_raw())
                sizes[encoding] = {"bytes": wire, "content_encoding": r.headers.get("content-encoding", "")}
        rows.append({"what": label, "query": query, **sizes})
    return rows


def views_screenshot(browser, base: str, path: Path) -> None:
    """Two states of the viewer side by side: forward at a middle level with the field, and the end of the reverse
    run next to real data with the quality figure."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, reduced_motion="reduce")
    page = context.new_page()
    page.goto(f"{base}/?n=3000&seed=1")
    page.wait_for_function("document.getElementById('quality').textContent.length > 0", timeout=120_000)
    page.click("label[for=process-forward]")
    page.check("#show-field")
    page.evaluate(
        "() => { const s = document.getElementById('slider'); s.value = '14';"
        " s.dispatchEvent(new Event('input', {bubbles: true})); }"
    )
    page.wait_for_function("document.getElementById('canvas').dataset.fieldDrawn !== ''")
    left = Image.open(io.BytesIO(page.locator("section.viewer").screenshot()))
    page.click("label[for=process-reverse]")
    page.select_option("#compare", "side")
    page.wait_for_function("document.getElementById('canvas').dataset.fieldDrawn !== ''")
    right = Image.open(io.BytesIO(page.locator("section.viewer").screenshot()))
    context.close()
    gap = 16
    out = Image.new("RGB", (left.width + right.width + gap, max(left.height, right.height)), (244, 245, 247))
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    out.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)  # ~3x smaller, same look


def main() -> None:
    from playwright.sync_api import sync_playwright

    RESULTS.mkdir(exist_ok=True)
    old = old_page()
    rows = {}
    with (
        LiveServer(SWISSROLL_GZIP_MIN_BYTES="0") as plain,
        LiveServer() as zipped,
        sync_playwright() as p,
    ):
        sizes = payload_sizes(zipped.url)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        variants = {
            "before: JSON, no compression": (plain.url, old),
            "JSON + gzip (same page)": (zipped.url, old),
            "after: npy float16 (+ gzip)": (zipped.url, None),
        }
        for throttled in (False, True):
            for name, (base, files) in variants.items():
                runs = [measure(browser, base, files, throttled) for _ in range(REPS)]
                key = f"{name} | {'10 Mbit/s, 20 ms' if throttled else 'loopback'}"
                rows[key] = {
                    **{k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0] if k != "requests"},
                    "ttff_runs": [round(r["ttff"]) for r in runs],
                    "requests": runs[0]["requests"],
                }
                print(key, rows[key]["ttff"], rows[key]["trajectory_wire_bytes"], flush=True)
        views_screenshot(browser, zipped.url, RESULTS / "page_views.png")
        browser.close()
    (RESULTS / "page_payload.json").write_text(
        json.dumps({"n": N, "seed": SEED, "sizes": sizes, "pages": rows}, indent=2)
    )
    write_markdown(sizes, rows)


def write_markdown(sizes, rows) -> None:
    kb = lambda b: f"{b / 1e3:,.0f} kB"  # noqa: E731
    lines = [
        f"# Page payload and time to first frame, n = {N:,}",
        "",
        f"`python -m bench.page` on a 2-core x86_64 machine (torch CPU), Debian chromium {chromium_version()}, "
        f"median of {REPS} loads. Sampler ddpm, 40 steps, seed {SEED}: 41 frames of {N:,} points.",
        "",
        "## Bytes on the wire per response",
        "",
        "| response | identity | gzip (Accept-Encoding) |",
        "|---|---:|---:|",
    ]
    for s in sizes:
        gz = s["gzip"]
        note = "" if gz["content_encoding"] else " (not compressed: excluded type or below the minimum)"
        lines.append(f"| {s['what']} | {kb(s['identity']['bytes'])} | {kb(gz['bytes'])}{note} |")
    lines += [
        "",
        "## The page: time to first frame (ms) and what it downloads",
        "",
        "| page | network | time to first frame | of which server wait | **time to first frame less server wait** "
        "| download | parse + draw | /trajectory on the wire | all API bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in rows.items():
        page, network = key.split(" | ")
        lines.append(
            f"| {page} | {network} | {r['ttff']:.0f} | {r['server_wait']:.0f} | **{r['client_side']:.0f}** | "
            f"{r['download']:.0f} | {r['parse_and_draw']:.0f} | {kb(r['trajectory_wire_bytes'])} | "
            f"{kb(r['api_wire_bytes'])} |"
        )
    lines += [
        "",
        "Server wait (request sent to first byte) is mostly the sampling itself: the same work in every row, but on a "
        "shared 2-core machine it varies by seconds from load to load, so the column that isolates what the wire "
        "format changes is the time to first frame less the server wait (median of the per-load differences): "
        "transfer, decoding and the first draw. gzip also adds ~0.1-0.15 s of server CPU to a 3 MB JSON body "
        "(level 5), inside the server wait; the npy body is not compressed (gzip saves 8% of float16 for that CPU).",
        "The current page also fetches `/forward` (the noising of real data, same n, steps and seed) and a second real "
        "sample for the quality figure *after* the first frame: they are in 'all API bytes', not in the time to first "
        "frame. JSON stays the default for curl users; `format=npy&dtype=float16` is what the page asks for.",
        "",
    ]
    (RESULTS / "page_payload.md").write_text("\n".join(lines))


def chromium_version() -> str:
    try:
        return subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.split()[1]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
