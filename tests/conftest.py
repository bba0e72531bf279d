"""Shared test set-up: markers, the offline environment, and apps launched on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

# Offline hygiene for every app the tests start in-process (same as app.py).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from slm_app.server import RunningServer, build_app, serve_in_thread  # noqa: E402
from slm_app.settings import Settings  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "llama: pro tier tests on llama.cpp with the embedded Gemma 3 270M GGUF")
    config.addinivalue_line("markers", "browser: drives the UI in headless Chromium through Playwright")
    config.addinivalue_line("markers", "soak: long run on the real model (opt-in with SLM_SOAK=1)")


@contextmanager
def launch_app(settings: Settings, *, expect_loaded: bool = True, timeout: float = 600) -> Iterator[RunningServer]:
    """The whole app (FastAPI + Gradio + model) on a free port, as ``app.py`` would serve it."""
    server = serve_in_thread(build_app(settings))
    try:
        loaded = server.service.wait_until_loaded(timeout=timeout)
        if expect_loaded:
            assert loaded, server.service.load_error
        yield server
    finally:
        server.stop()


@dataclass
class AppProcess:
    url: str
    proc: subprocess.Popen

    def mapped_files(self) -> set[str]:
        """Every file mapped into the process: a Python package's shared libraries appear here once imported."""
        lines = Path(f"/proc/{self.proc.pid}/maps").read_text().splitlines()
        return {line.split()[-1] for line in lines if len(line.split()) >= 6}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def launch_app_process(env: dict[str, str | None], log_dir: Path, *, timeout: float = 600) -> Iterator[AppProcess]:
    """``python app.py`` in its own process, as the README runs it, configured by ``SLM_*`` variables
    (``None`` unsets one): for checks on the serving process itself (what it loads, its memory), which
    pytest's process would blur."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = {**os.environ, "GRADIO_SERVER_PORT": str(port)}
    for name, value in env.items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    log_path = Path(log_dir) / "app.log"
    root = Path(__file__).resolve().parent.parent
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        app = AppProcess(f"http://127.0.0.1:{port}/", proc)
        url = app.url
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the app did not become ready: " + log_path.read_text()[-3000:]
                try:
                    health = httpx.get(url + "health", timeout=5)
                    if health.status_code == 200 and health.json().get("model_loaded", True):
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            yield app
        finally:
            app.stop()


@pytest.fixture(scope="session")
def free_app(tmp_path_factory) -> Iterator[RunningServer]:
    """One free-tier app (tiny-gpt2 on LiteRT, the free tier's default) for the whole session: its first
    start converts the model in a child process (~15-30 s with TensorFlow)."""
    with launch_app(Settings(tier="free", cache_dir=str(tmp_path_factory.mktemp("cache")))) as server:
        yield server
