"""Soak on a real model under concurrency: 8 clients, at least 1,000 requests across the HTTP surfaces
(REST, OpenAI completions, OpenAI chat streamed); no errors, and RSS after the run within 5% of RSS after
warm-up (no leak per request).

Opt-in (a few minutes): ``SLM_SOAK=1 .venv/bin/python -m pytest tests/test_soak.py -s``. The tier is
``SLM_SOAK_TIER`` (default ``free``: TensorFlow tiny-gpt2; ``pro``: llama.cpp); ``SLM_SOAK_BACKEND=fake``
runs the same harness on the fake model (a check of the harness, not of a model). It prints its figures.
"""

from __future__ import annotations

import collections
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import launch_app
from slm_app.settings import Settings

pytestmark = [pytest.mark.soak,
              pytest.mark.skipif(not os.environ.get("SLM_SOAK"), reason="opt-in: set SLM_SOAK=1 (takes minutes)")]

CLIENTS = 8
REQUESTS = 1_000
WARMUP = 100
MAX_RSS_GROWTH = 0.05


def _one(http: httpx.Client, model: str, i: int) -> int:
    kind = i % 3
    if kind == 0:
        return http.post("/generate", json={"prompts": f"Request {i}:", "max_tokens": 16, "temperature": 0.7}).status_code
    if kind == 1:
        return http.post("/v1/completions", json={"model": model, "prompt": f"Number {i}", "max_tokens": 16}).status_code
    with http.stream("POST", "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 16,
            "stream": True}) as r:
        body = r.read().decode()
        return r.status_code if body.rstrip().endswith("data: [DONE]") and '"error"' not in body else 599


def test_soak_8_clients_1000_requests_no_errors_no_leak(tmp_path_factory):
    tier = os.environ.get("SLM_SOAK_TIER", "free")
    settings = Settings(tier=tier, backend=os.environ.get("SLM_SOAK_BACKEND") or None, queue_size=CLIENTS * 2,
                        cache_dir=str(tmp_path_factory.mktemp("cache")))
    with launch_app(settings, expect_loaded=False) as app:
        if app.service.status != "ok":
            pytest.skip(f"the {tier} tier's model did not load here: {app.service.load_error}")
        model = httpx.get(app.url + "v1/models").json()["data"][0]["id"]
        statuses: collections.Counter[int] = collections.Counter()
        lock = threading.Lock()
        latencies: list[float] = []

        def client(worker: int, count: int, offset: int) -> None:
            with httpx.Client(base_url=app.url, timeout=300) as http:
                for n in range(count):
                    t0 = time.perf_counter()
                    status = _one(http, model, offset + n * CLIENTS + worker)
                    with lock:
                        statuses[status] += 1
                        latencies.append(time.perf_counter() - t0)

        def run(total: int, offset: int) -> None:
            with ThreadPoolExecutor(CLIENTS) as pool:
                list(pool.map(lambda w: client(w, -(-total // CLIENTS), offset), range(CLIENTS)))

        run(WARMUP, 0)
        rss_warm = httpx.get(app.url + "health").json()["rss_mb"]
        started = time.perf_counter()
        run(REQUESTS, WARMUP)
        wall = time.perf_counter() - started
        rss_end = httpx.get(app.url + "health").json()["rss_mb"]
        done = sum(statuses.values())
        growth = (rss_end - rss_warm) / rss_warm
        lat = sorted(latencies[WARMUP:])
        print(f"\nsoak ({tier}, {model}): {done} requests by {CLIENTS} clients in {wall:.0f} s; statuses "
              f"{dict(statuses)}; latency p50 {statistics.median(lat):.2f} s, p95 {lat[int(0.95 * len(lat))]:.2f} s; "
              f"RSS after warm-up {rss_warm:.0f} MB, at the end {rss_end:.0f} MB ({growth:+.1%})")
        assert done >= WARMUP + REQUESTS and set(statuses) == {200}
        assert growth <= MAX_RSS_GROWTH
        assert httpx.get(app.url + "health").json()["slots"]["running"] == 0
