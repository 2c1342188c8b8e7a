"""Reload latency: from an atomic file replace to the first /sample response carrying the new model id.

Two triggers, against a real `python -m service` on CPU serving the committed checkpoints: SIGHUP sent right after
the replace, and polling alone (SWISSROLL_RELOAD_POLL_S, default 2 s; the expected latency is about half the
interval plus the load). The replaced model alternates between the committed default and seed checkpoints, so each
swap loads, checks and warms up a real network. A client requests /sample continuously throughout; the table also
counts its responses that were not 200 (there should be none).

    python -m bench.reload            # writes bench/results/reload.md and reload.json
"""

import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.live_server import REPO, LiveServer

RESULTS = REPO / "bench" / "results"
VERSIONS = [REPO / "checkpoints" / "swissroll.pt", REPO / "checkpoints" / "swissroll-seed.pt"]
REPEATS = 8
POLL_S = 2.0


class Watcher:
    """One client requesting /sample?model=live continuously, noting when each model id is first seen."""

    def __init__(self, url: str):
        self.url, self.stop, self.first_seen, self.failures, self.count = url, threading.Event(), {}, 0, 0
        self.thread = threading.Thread(target=self._loop)

    def _loop(self):
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                r = client.get("/sample", params={"n": 1000, "model": "live", "format": "npy"})
                now = time.perf_counter()
                self.count += 1
                if r.status_code != 200:
                    self.failures += 1
                    continue
                self.first_seen.setdefault(r.headers["X-Model"], now)


def swap_and_time(server: LiveServer, watcher: Watcher, directory: Path, source: Path, signal_it: bool) -> float:
    tmp = directory / ".incoming.tmp"
    shutil.copyfile(source, tmp)
    new_id = hashlib.sha256(tmp.read_bytes()).hexdigest()
    watcher.first_seen.pop(new_id, None)
    began = time.perf_counter()
    os.replace(tmp, directory / "live.pt")
    if signal_it:
        server.proc.send_signal(signal.SIGHUP)
    while new_id not in watcher.first_seen:
        if time.perf_counter() - began > 60:
            raise TimeoutError("the new model was not served within 60 s")
        time.sleep(0.005)
    return watcher.first_seen[new_id] - began


def measure() -> dict:
    rows, pauses = {}, random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        directory = Path(d)
        shutil.copyfile(VERSIONS[0], directory / "swissroll.pt")
        shutil.copyfile(VERSIONS[1], directory / "live.pt")
        env = dict(
            SWISSROLL_MODELS_DIR=str(directory),
            SWISSROLL_DEVICE="cpu",
            SWISSROLL_LOG_LEVEL="warning",
            SWISSROLL_RELOAD_POLL_S=str(POLL_S),
        )
        with LiveServer(**env) as server:
            watcher = Watcher(server.url)
            watcher.thread.start()
            try:
                for trigger in ("sighup", "poll"):
                    times = []
                    for k in range(REPEATS):
                        source = VERSIONS[k % 2]
                        times.append(swap_and_time(server, watcher, directory, source, trigger == "sighup"))
                        # A random pause: the next replace lands anywhere in the poll cycle, not in step with it.
                        time.sleep(0.5 + pauses.uniform(0, POLL_S))
                    rows[trigger] = times
                listing = httpx.get(f"{server.url}/models", timeout=10).json()
            finally:
                watcher.stop.set()
                watcher.thread.join()
    load_s = next(m["load_s"] for m in listing["models"] if m["name"] == "live")
    return {
        "repeats": REPEATS,
        "poll_s": POLL_S,
        "seconds": {k: [round(t, 4) for t in v] for k, v in rows.items()},
        "median_s": {k: round(statistics.median(v), 4) for k, v in rows.items()},
        "last_load_s": load_s,
        "responses": watcher.count,
        "non_200": watcher.failures,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    }


def markdown(r: dict) -> str:
    lines = [
        "# Reload latency (`python -m bench.reload`)",
        "",
        "Time from an atomic replace (`os.replace`) of a served model's file to the first `/sample` response that",
        "carries the new id, seen by a client requesting `/sample?n=1000` continuously. Each swap alternates between",
        "the committed `swissroll.pt` and `swissroll-seed.pt`, so every reload loads, checks and warms up a real",
        "network on CPU; replaces are spaced randomly, so they land anywhere in the poll cycle (expected polling",
        f"latency: half the interval plus the load). {r['repeats']} swaps per trigger; machine: {r['machine']}.",
        "",
        "| trigger | median | min | max |",
        "|---|---:|---:|---:|",
    ]
    names = {"sighup": "SIGHUP right after the replace", "poll": f"polling only (every {r['poll_s']:g} s)"}
    for k, v in r["seconds"].items():
        ms = [r["median_s"][k] * 1000, min(v) * 1000, max(v) * 1000]
        lines.append(f"| {names[k]} | {ms[0]:.0f} ms | {ms[1]:.0f} ms | {ms[2]:.0f} ms |")
    lines += [
        "",
        f"The last reload's own load + check + warm-up time (`load_s` in `/models`): {r['last_load_s'] * 1000:.0f} ms.",
        f"The client's responses during all swaps: {r['responses']}, of which not 200: {r['non_200']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    result = measure()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reload.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "reload.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
