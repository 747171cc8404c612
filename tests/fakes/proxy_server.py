"""Run the real gateway on loopback for tests: in-process (uvicorn on a thread) or as a ``bpo serve`` process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from proxy.app import create_app
from proxy.server import uvicorn_options
from proxy.settings import Settings, load_settings
from tests.fakes.upstream import free_port

REPO = Path(__file__).resolve().parents[2]


def make_settings(**values: Any) -> Settings:
    """Settings from keyword flags only: neither the test's environment nor a key store that happens to be in
    the working directory (the default ``sqlite:bpo-keys.db``) leaks in."""
    values.setdefault("key_store", f"sqlite:{tempfile.mkdtemp(prefix='bpo-test-keys-')}/keys.db")
    return load_settings(values, environ={})


class _OnLoopback:
    """A gateway listening on 127.0.0.1 at ``port``."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


class RunningProxy(_OnLoopback):
    """``create_app(settings)`` served on a free port, on a thread of this process, as ``bpo serve`` serves it."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.settings = settings
        self.app: Starlette = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5, **uvicorn_options(settings))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, timeout: float = 60.0) -> RunningProxy:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the proxy failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy did not start in time")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


class ProxyProcess(_OnLoopback):
    """``python -m proxy serve ...`` as a child process, ready once ``/healthz`` answers."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.args = ["--port", str(self.port), *args]
        # Never the repository's own ./bpo-keys.db (the default store): a test that wants a store names one.
        private_store = f"sqlite:{tempfile.mkdtemp(prefix='bpo-test-keys-')}/keys.db"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "BPO_KEY_STORE": private_store, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> ProxyProcess:
        self.process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", *self.args], env=self.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode() if self.process.stdout else ""
                raise RuntimeError(f"bpo serve exited with {self.process.returncode}:\n{output}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("bpo serve did not become healthy in time")

    def stop(self) -> str:
        """Stop gracefully (SIGTERM) and return what the process printed."""
        if self.process is None:
            return ""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.stdout.read().decode() if self.process.stdout else ""
