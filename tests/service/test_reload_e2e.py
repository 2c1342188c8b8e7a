"""Reloading models under load, against a real uvicorn process: SIGHUP and polling, good and bad replacements.

No wall-clock assertions: every wait below is for a condition (with a generous cap so a broken build fails
instead of hanging).
"""

import hashlib
import os
import signal
import threading
import time

import httpx
import pytest

from bench.live_server import LiveServer
from tests.utils.checkpoints import write_tiny_checkpoint

pytestmark = pytest.mark.timeout(180)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replace_atomically(data: bytes, dest):
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def wait_for(condition, what: str, cap_s: float = 60.0):
    deadline = time.monotonic() + cap_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


class Clients:
    """Threads requesting /sample continuously; every response is recorded (status, X-Model)."""

    def __init__(self, url: str, count: int = 4):
        self.url, self.stop, self.seen, self.lock = url, threading.Event(), [], threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(count)]

    def _loop(self, i: int):
        with httpx.Client(base_url=self.url, timeout=30) as client:
            k = 0
            while not self.stop.is_set():
                r = client.get("/sample", params={"n": 40 + i, "seed": k, "format": "npy"})
                with self.lock:
                    self.seen.append((r.status_code, r.headers.get("X-Model")))
                k += 1

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def served_id(url: str, name: str = "a") -> str | None:
    models = httpx.get(f"{url}/models", timeout=10).json()["models"]
    return next((m["id"] for m in models if m["name"] == name), None)


def failure_of(url: str, name: str = "a") -> dict | None:
    return next((f for f in httpx.get(f"{url}/models", timeout=10).json()["failures"] if f["name"] == name), None)


def test_replacing_the_default_under_load_never_fails_a_request(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    versions = [write_tiny_checkpoint(tmp_path / f"v{k}.pt").read_bytes() for k in range(4)]
    ids = [hashlib.sha256(v).hexdigest() for v in versions]
    replace_atomically(versions[0], models / "a.pt")
    env = dict(
        SWISSROLL_MODELS_DIR=str(models),
        SWISSROLL_DEFAULT_MODEL="a",
        SWISSROLL_RELOAD_POLL_S="0",  # SIGHUP only: each swap below happens when this test says so
        SWISSROLL_DEVICE="cpu",
        SWISSROLL_LOG_LEVEL="warning",
        SWISSROLL_MAX_WAIT_MS="5",
    )
    with LiveServer(**env) as server, Clients(server.url) as clients:
        wait_for(lambda: clients.count() >= 20, "the clients' first responses")
        for k in (1, 2):  # good replacements
            replace_atomically(versions[k], models / "a.pt")
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda k=k: served_id(server.url) == ids[k], f"version {k} after SIGHUP")
            seen_before = clients.count()
            wait_for(lambda n=seen_before: clients.count() >= n + 10, "responses from the new version")
        # a truncated file: the previous version keeps serving, the failure is listed
        replace_atomically(versions[3][: len(versions[3]) // 2], models / "a.pt")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: failure_of(server.url) is not None, "the truncated file's failure")
        assert failure_of(server.url)["still_serving"] == ids[2]
        seen_before = clients.count()
        wait_for(lambda: clients.count() >= seen_before + 20, "responses after the bad replacement")
        with clients.lock:
            after_bad = clients.seen[seen_before:]
        assert {model for _, model in after_bad} == {ids[2]}
        # fixed: served after the next SIGHUP
        replace_atomically(versions[3], models / "a.pt")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: served_id(server.url) == ids[3], "the fixed file after SIGHUP")
        assert failure_of(server.url) is None
        seen_before = clients.count()
        wait_for(lambda: clients.count() >= seen_before + 10, "responses from the fixed file")
        assert server.proc.poll() is None
    statuses = {status for status, _ in clients.seen}
    assert statuses == {200}, f"responses other than 200 during reloads: {statuses}"
    assert {model for _, model in clients.seen} <= set(ids) and ids[3] in {model for _, model in clients.seen}
    assert len(clients.seen) >= 50


def test_polling_picks_up_a_new_and_a_replaced_file_without_a_signal(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_checkpoint(models / "a.pt")
    env = dict(
        SWISSROLL_MODELS_DIR=str(models),
        SWISSROLL_DEFAULT_MODEL="a",
        SWISSROLL_RELOAD_POLL_S="0.2",
        SWISSROLL_DEVICE="cpu",
        SWISSROLL_LOG_LEVEL="warning",
    )
    with LiveServer(**env) as server:
        replace_atomically(write_tiny_checkpoint(tmp_path / "b.pt").read_bytes(), models / "b.pt")
        wait_for(lambda: served_id(server.url, "b") == sha(models / "b.pt"), "the new file b")
        r = httpx.get(f"{server.url}/sample", params={"n": 5, "model": "b"}, timeout=30)
        assert r.status_code == 200 and r.headers["X-Model"] == sha(models / "b.pt")
        replace_atomically(write_tiny_checkpoint(tmp_path / "b2.pt").read_bytes(), models / "b.pt")
        wait_for(lambda: served_id(server.url, "b") == sha(models / "b.pt"), "the replaced file b")
        (models / "b.pt").unlink()
        wait_for(lambda: served_id(server.url, "b") is None, "b unloaded")
        assert httpx.get(f"{server.url}/sample", params={"n": 5, "model": "b"}, timeout=30).status_code == 422
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'swissroll_model_reloads_total{result="loaded"}' in metrics
        assert 'swissroll_model_reloads_total{result="unloaded"} 1.0' in metrics
