"""Hostile clients against a real server, loopback only, about 30 s:

    python scripts/limits_check.py CODE_DIR PORT

starts `python -m service` from CODE_DIR (a checkout) on PORT, streams 4 endless header lines of up to 100 MB each
and reports the server's RSS, then opens 1100 silent connections and checks /healthz at once and after 11 s
(default settings: SWISSROLL_MAX_CONNECTIONS 1000, SWISSROLL_HEADER_TIMEOUT_S 10). Results: deploy/README.md.
"""

import os
import socket
import subprocess
import sys
import threading
import time

import httpx

code, port = sys.argv[1], int(sys.argv[2])
env = {**os.environ, "PYTHONPATH": code, "SWISSROLL_PORT": str(port), "SWISSROLL_LOG_LEVEL": "warning"}
p = subprocess.Popen(
    [sys.executable, "-m", "service"], cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
)
url = f"http://127.0.0.1:{port}"
for _ in range(600):
    try:
        if httpx.get(url + "/readyz", timeout=1).status_code == 200:
            break
    except Exception:
        pass
    time.sleep(0.1)


def rss():
    with open(f"/proc/{p.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024


try:
    before = rss()
    peak = [before]
    out = []

    def flood():
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(5)
        sent = 0
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            while sent < 100 << 20:
                s.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass
        try:
            r = s.recv(100).split(b"\r\n")[0]
        except OSError as e:
            r = repr(e)
        out.append((sent >> 20, r))

    ts = [threading.Thread(target=flood) for _ in range(4)]
    [t.start() for t in ts]
    t0 = time.monotonic()
    while any(t.is_alive() for t in ts) and time.monotonic() - t0 < 60:
        peak[0] = max(peak[0], rss())
        time.sleep(0.05)
    print(
        f"header flood 4 x 100 MB: RSS before {before} MB, peak {peak[0]} MB, after {rss()} MB; sent MiB/answer: {out}"
    )
    socks = []
    for i in range(1100):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError as e:
            print("connect failed at", i, e)
            break
    time.sleep(0.5)
    t = time.monotonic()
    try:
        r = httpx.get(url + "/healthz", timeout=5)
        print(
            f"/healthz with {len(socks)} idle connections: {r.status_code} {r.text[:40]!r} "
            f"in {time.monotonic() - t:.3f} s"
        )
    except Exception as e:
        print("/healthz with idle connections:", repr(e))
    time.sleep(11)
    closed = 0
    for s in socks:
        s.settimeout(0.01)
        try:
            if s.recv(10) == b"":
                closed += 1
        except Exception:
            pass
    try:
        r = httpx.get(url + "/healthz", timeout=5)
        print(f"after 11 s: /healthz {r.status_code}; {closed} of {len(socks)} idle connections closed by the server")
    except Exception as e:
        print("after 11 s:", repr(e), closed, "closed")
finally:
    p.terminate()
    p.wait(30)
