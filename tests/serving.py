"""A real `wmgen serve` process for the tests: started on a free loopback port, with
its own WMGEN_HOME, waited for until /health answers, and stopped (SIGTERM) after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`wmgen serve --model MODEL ARGS` on 127.0.0.1; `url`, `home`, `stderr()`."""

    def __init__(self, model: Path, home: Path, *args: str, env: dict | None = None, threads: int | None = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.log = home.parent / f"serve-{self.port}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("WMGEN_")} | {"WMGEN_HOME": str(home)} | (env or {})
        if threads is not None:  # the tiny test model runs fastest on one, and leaves the other core to the clients
            environ["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wmgen", "serve", "--model", str(model), "--port", str(self.port), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(self.log, "wb"), env=environ,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"wmgen serve exited {self.process.returncode}:\n{self.stderr()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"wmgen serve did not answer within {timeout} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def wait_idle(self, timeout: float = 20) -> dict:
        """Until no row is running and nothing waits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if h["rows"] == 0 and h["queued"] == 0:
                return h
            time.sleep(0.05)
        raise AssertionError(f"the server is still busy after {timeout} s: {self.health()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
