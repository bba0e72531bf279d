"""Shared test set-up: markers, the offline environment, and apps launched on free ports."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

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


@pytest.fixture(scope="session")
def free_app(tmp_path_factory) -> Iterator[RunningServer]:
    """One free-tier app (tiny-gpt2 on LiteRT, the free tier's default) for the whole session: its first
    start converts the model in a child process (~15-30 s with TensorFlow)."""
    with launch_app(Settings(tier="free", cache_dir=str(tmp_path_factory.mktemp("cache")))) as server:
        yield server
