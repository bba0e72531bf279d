"""Request metrics: Prometheus series for /metrics, and recent samples for the Health tab.

Each app instance owns its registry (not prometheus_client's global one) so that
several apps can live in one process, as they do in the tests.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from slm_app import memory

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, window: int = 512, memory_points: int = 240):
        self.started = time.time()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slm_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"], registry=r)
        # Every HTTP API call (REST and /v1), refused ones included: 4xx never reach the model.
        self.http_requests = Counter("slm_http_requests", "HTTP API requests by route and status",
                                     ["route", "status"], registry=r)
        self.tokens = Counter("slm_generated_tokens", "Tokens generated", ["endpoint"], registry=r)
        # Prompt tokens by how their KV was had: "cached" (the prompt cache), "computed" (prefilled).
        self.prompt_tokens = Counter("slm_prompt_tokens", "Prompt tokens, reused from the prompt cache or computed",
                                     ["endpoint", "source"], registry=r)
        self.latency = Histogram("slm_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("slm_time_to_first_token_seconds", "Time to first token", ["endpoint"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.rss = Gauge("slm_process_rss_bytes", "Resident memory of the server process", registry=r)
        self.rss.set_function(lambda: memory.rss_mb() * 1024 * 1024)
        self.model_loaded = Gauge("slm_model_loaded", "1 when the model is loaded", registry=r)
        self._lock = threading.Lock()
        self._latencies_ms: deque[float] = deque(maxlen=window)
        self._rates: deque[float] = deque(maxlen=window)
        self._memory: deque[tuple[float, float]] = deque(maxlen=memory_points)
        self.total_requests = 0

    def record(self, endpoint: str, outcome: str, seconds: float, tokens: int = 0,
               ttft_s: float | None = None) -> None:
        self.requests.labels(endpoint, outcome).inc()
        if outcome != "ok":
            return
        self.latency.labels(endpoint).observe(seconds)
        if tokens:
            self.tokens.labels(endpoint).inc(tokens)
        if ttft_s is not None:
            self.ttft.labels(endpoint).observe(ttft_s)
        with self._lock:
            self.total_requests += 1
            self._latencies_ms.append(seconds * 1000)
            if tokens and seconds > 0:
                self._rates.append(tokens / seconds)

    def record_prompt(self, endpoint: str, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.labels(endpoint, "cached").inc(cached_tokens)
        self.prompt_tokens.labels(endpoint, "computed").inc(max(0, prompt_tokens - cached_tokens))

    def sample_memory(self) -> None:
        with self._lock:
            self._memory.append((time.time() - self.started, memory.rss_mb()))

    def memory_timeline(self) -> list[tuple[float, float]]:
        with self._lock:
            return list(self._memory)

    def summary(self) -> dict:
        with self._lock:
            lat = np.array(self._latencies_ms) if self._latencies_ms else None
            rates = list(self._rates)
            total = self.total_requests
        return {
            "requests": total,
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 1) if lat is not None else None,
                "p95": round(float(np.percentile(lat, 95)), 1) if lat is not None else None,
            },
            "tokens_per_second": round(float(np.median(rates)), 2) if rates else None,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def watch_prompt_cache(self, stats: Callable[[], dict | None]) -> None:
        """Export the prompt cache's own counters, read from ``stats()`` (the engine's, None without one)."""
        self.registry.register(_PromptCacheCollector(stats))

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)


class _PromptCacheCollector(Collector):
    """The prompt cache's evictions, copies and cells, as the scheduler counts them, at each scrape."""

    def __init__(self, stats: Callable[[], dict | None]):
        self._stats = stats

    def collect(self) -> Iterator:
        stats = self._stats() or {}
        for name, key, what in (("slm_prompt_cache_evictions", "evictions", "Cached prefixes evicted to make room"),
                                ("slm_prompt_cache_copies", "copies", "Prefixes copied from another slot")):
            family = CounterMetricFamily(name, what)
            if key in stats:
                family.add_metric([], stats[key])
            yield family
        cells = GaugeMetricFamily("slm_prompt_cache_cells", "KV cells holding cached or running tokens")
        if "cells_in_use" in stats:
            cells.add_metric([], stats["cells_in_use"])
        yield cells

    def describe(self) -> Iterator:
        return iter(())  # collected lazily: the engine loads after the registry exists
