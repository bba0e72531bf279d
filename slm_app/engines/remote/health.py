"""The upstream's health: reachable or not (and why), latency, the models it lists, its context.

A probe (``GET /v1/models``) every ``SLM_REMOTE_HEALTH_INTERVAL_S`` (every second while the upstream
is down, and not while requests are streaming, which prove it is up) keeps reachability, latency and
the model id current; while the upstream is down requests are refused, with the reason, and serving
resumes when it answers again. Requests report their own outcome here too (``set_up``/``set_down``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from slm_app.engines.remote.failures import UpstreamFailure, upstream_message
from slm_app.errors import Failure

log = logging.getLogger(__name__)

DOWN_PROBE_S = 1.0  # probe interval while the upstream is down: recover quickly


@dataclass
class HealthState:
    reachable: bool = False
    reason: str | None = "not contacted yet"
    latency_ms: float | None = None
    checked: float | None = None  # time.time() of the last probe or request outcome
    models: list[str] = field(default_factory=list)
    n_ctx: int = 0


class UpstreamHealth:
    """Thread-safe health state; ``on_availability(up)`` runs when reachability flips."""

    def __init__(self, public_url: str, on_availability: Callable[[bool], None] | None = None):
        self.public_url = public_url
        self._state = HealthState()
        self._lock = threading.Lock()
        self._on_availability = on_availability

    @property
    def reachable(self) -> bool:
        with self._lock:
            return self._state.reachable

    @property
    def n_ctx(self) -> int:
        with self._lock:
            return self._state.n_ctx

    def record(self, models: list[str], latency_ms: float, n_ctx: int) -> None:
        with self._lock:
            self._state.models, self._state.latency_ms, self._state.n_ctx = models, latency_ms, n_ctx

    def set_up(self, model: str | None) -> None:
        with self._lock:
            was = self._state.reachable
            self._state.reachable, self._state.reason, self._state.checked = True, None, time.time()
        if not was:
            log.info("upstream %s reachable (model %s)", self.public_url, model)
            if self._on_availability:
                self._on_availability(True)

    def set_down(self, reason: str) -> None:
        with self._lock:
            was = self._state.reachable or self._state.checked is None
            self._state.reachable, self._state.reason, self._state.checked = False, reason, time.time()
        if was:
            log.warning("upstream unavailable: %s", reason)
            if self._on_availability:
                self._on_availability(False)

    def unavailable_reason(self) -> str | None:
        with self._lock:
            return None if self._state.reachable else f"upstream {self.public_url} unavailable: {self._state.reason}"

    def report(self) -> dict[str, Any]:
        with self._lock:
            h = self._state
            return {"reachable": h.reachable, "upstream_error": h.reason,
                    "upstream_latency_ms": None if h.latency_ms is None else round(h.latency_ms, 1),
                    "upstream_checked": h.checked, "upstream_models": list(h.models)}


async def list_models(client: httpx.AsyncClient, url: str, public: str, pinned_model: str | None,
                      timeout: httpx.Timeout) -> tuple[str, list[str], int, float]:
    """``GET /v1/models``: the model to use, those listed, its context (0: not said), latency in ms.
    Raises ``UpstreamFailure`` or httpx's errors."""
    start = time.perf_counter()
    response = await client.get(f"{url}/models", timeout=timeout)
    latency = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise UpstreamFailure(f"GET {public}/models answered {response.status_code}: "
                              f"{upstream_message(response.content)}", Failure.UPSTREAM)
    models = [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
    if not models and not pinned_model:
        raise UpstreamFailure(f"{public}/models lists no model; set SLM_REMOTE_MODEL", Failure.UPSTREAM)
    card = next((m for m in response.json()["data"] if m.get("id") == (pinned_model or models[0])), {})
    n_ctx = card.get("max_model_len") or (card.get("meta") or {}).get("n_ctx_train") or 0
    return pinned_model or models[0], models, int(n_ctx or 0), latency
