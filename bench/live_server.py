"""A real `python -m service` process on a free loopback port, for end-to-end tests."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, cwd: Path = REPO, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "SWISSROLL_HOST": "127.0.0.1", "SWISSROLL_PORT": str(self.port), **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=cwd,  # another checkout (bench.load --baseline) runs its own code with this interpreter
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # The server logs a line per request: read its output as it comes, or the pipe fills (64 KiB, a few hundred
        # requests) and the server blocks on its next log write, its event loop with it.
        self._lines: deque[str] = deque(maxlen=20_000)
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        for line in self.proc.stdout:
            self._lines.append(line)

    def output(self) -> str:
        """What the server has printed so far (its last 20,000 lines); all of it once the process has exited."""
        if self.proc.poll() is not None:
            self._reader.join(5)
        return "".join(self._lines)

    def wait_ready(self, timeout: float = 60.0) -> "LiveServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s")

    def wait_until_busy(self, requests: int = 1, cpu_s: float = 0.0, timeout: float = 30.0) -> None:
        """A barrier for tests, instead of a pause: returns once `requests` requests are being handled (besides the
        /metrics poll itself) and, with cpu_s, once the server has then used that much more CPU time (the only thing
        burning it is a sampling or rendering job: the request has passed admission and is computing)."""
        deadline = time.monotonic() + timeout
        while self._in_flight() < requests + 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {requests} requests in flight after {timeout} s")
            time.sleep(0.01)
        began = self.cpu_seconds()
        while self.cpu_seconds() - began < cpu_s:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server used under {cpu_s} s of CPU in {timeout} s")
            time.sleep(0.01)

    def _in_flight(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        line = next(line for line in text.splitlines() if line.startswith("swissroll_in_flight_requests "))
        return float(line.split()[1])

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "LiveServer":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.terminate()
