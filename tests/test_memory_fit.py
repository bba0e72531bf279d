"""Memory that fits: a tier too big for the host is refused at start-up, naming the tier that fits;
liveness (/healthz) answers while readiness (/health) waits for the model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import launch_app
from slm_app.memory_fit import FOOTPRINT_MB, MemoryDoesNotFit, check_fit
from slm_app.settings import Settings, Tier, resolve_tier
from slm_app.ui.health import memory_frame

ROOT = Path(__file__).resolve().parent.parent


def test_app_refuses_a_tier_that_does_not_fit_and_names_the_one_that_does(tmp_path: Path) -> None:
    env = {**os.environ, "SLM_TIER": "standard", "SLM_MEMORY_LIMIT_MB": "512", "SLM_CACHE_DIR": str(tmp_path),
           "GRADIO_SERVER_PORT": "0"}
    done = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert "not starting" in message and "SLM_TIER=standard on tensorflow needs about" in message
    assert "may use 512 MB (SLM_MEMORY_LIMIT_MB)" in message and "SLM_TIER=free SLM_BACKEND=litert fits" in message


def test_free_tier_on_litert_fits_512_mb_and_tensorflow_does_not() -> None:
    ok = check_fit(resolve_tier(s := Settings(tier=Tier.free, memory_limit_mb=512)), s)
    assert ok.fits and ok.needed_mb == FOOTPRINT_MB[(Tier.free, "litert")] <= 512 and ok.source == "SLM_MEMORY_LIMIT_MB"
    with pytest.raises(MemoryDoesNotFit, match="SLM_TIER=free on tensorflow needs about 1,300 MB"):
        check_fit(resolve_tier(s := Settings(tier=Tier.free, backend="tensorflow", memory_limit_mb=512)), s)
    with pytest.raises(MemoryDoesNotFit, match="no tier fits"):
        check_fit(resolve_tier(s := Settings(tier=Tier.free, memory_limit_mb=100)), s)
    # Off: the report says it does not fit, and the app would start anyway.
    report = check_fit(resolve_tier(s := Settings(tier=Tier.standard, memory_limit_mb=512, memory_fit_check=False)), s)
    assert not report.fits and "SLM_TIER=free SLM_BACKEND=litert fits" in report.message


def test_auto_tier_and_guard_follow_the_memory_limit_setting(tmp_path: Path) -> None:
    settings = Settings(tier=Tier.auto, memory_limit_mb=512, cache_dir=str(tmp_path), backend="fake")
    assert resolve_tier(settings).tier is Tier.free
    with launch_app(settings) as app:
        health = httpx.get(app.url + "health", timeout=30).json()
        assert health["memory_fit"]["usable_mb"] == 512 and health["memory_usage"]["usable_mb"] == 512
        assert health["memory_guard"]["limit_mb"] == pytest.approx(512 * 0.9)
        # The Health dashboard plots the RSS against that limit (it is within reach of the process).
        frame = memory_frame(app.service, app.service.health())
        assert {"RSS", "guard limit", "usable"} <= set(frame["series"])
        assert frame[frame["series"] == "guard limit"]["MB"].tolist() == [pytest.approx(512 * 0.9)] * 2


def test_healthz_is_liveness_and_health_is_readiness(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with launch_app(Settings(tier="standard", model=missing, cache_dir=str(tmp_path)), expect_loaded=False) as app:
        live = httpx.get(app.url + "healthz", timeout=30)
        ready = httpx.get(app.url + "health", timeout=30)
        assert live.status_code == 200 and live.json()["status"] == "alive"
        assert live.json()["model_status"] == "error"
        assert ready.status_code == 503 and ready.json()["model_loaded"] is False
