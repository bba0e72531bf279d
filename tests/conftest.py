"""Shared test set-up: markers, and the environment every test process starts from."""

from __future__ import annotations

import os

# Offline hygiene for every app the tests start in-process (same as app.py).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "llama: pro tier tests on llama.cpp with the embedded Gemma 3 270M GGUF")
    config.addinivalue_line("markers", "browser: drives the UI in headless Chromium through Playwright")
