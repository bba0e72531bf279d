"""The plain HTTP contract: ``POST /generate``, ``GET /health``, ``GET /metrics``.

* ``POST /generate`` ``{"prompts": [str, ...] | str, "max_tokens": int, "temperature": float}`` →
  ``{"results": [str, ...], "finish_reasons": [...]}``, one per prompt, in order. A single string is
  one prompt (it is not split into lines) and a blank one is refused; ``max_tokens`` defaults to the
  tier's limit, ``temperature`` to 0.8; an unknown field is a 400 (a typo must not fall back to a
  default). ``finish_reasons``: ``"stop"``, ``"length"`` or ``"timeout"`` (``SLM_REQUEST_TIMEOUT_S``
  passed: the result is what was produced by then; 504 when no prompt got a single token).
* ``GET /health`` → ``GenerationService.health()``: 200 while ``status`` is ``"ok"``, 503 with the same
  body otherwise (``"loading"``, ``"error"``, ``"draining"`` during shutdown; ``reason`` says why).
  ``memory_guard`` says whether new work is being refused for memory.
* ``GET /healthz`` → liveness: 200 ``{"status": "alive"}`` as soon as the process answers HTTP, while
  the model loads too (a platform restarts a process whose liveness fails; readiness is ``/health``).
* ``GET /metrics`` → Prometheus text of the app's own registry (requests by endpoint and outcome, HTTP
  requests by route and status, tokens, latency and TTFT histograms, RSS, memory guard).
* Errors: ``{"error": "<message>", "status": <int>}`` with that HTTP status (see ``common``), and
  ``Retry-After`` on 429 and 503.

``/health`` and ``/healthz`` stay open even with ``SLM_API_KEY`` set, and is never rate limited: liveness probes (a
Space, a load balancer) cannot carry secrets, and it holds no user data.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from slm_app.api.common import ErrorResponse, api_router, error_responses, generation_steps, prompt_list, rest_error
from slm_app.service import GenerationService


class GenerateRequest(BaseModel):
    # A typo'd field is an error, not a silent default; strict: "5" is not an integer, as the schema says.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompts: str | list[str] = Field(description="One prompt (a string, never split into lines) or a list of "
                                                 "prompts, at most the tier's prompts per request")
    max_tokens: int | None = Field(default=None, description="New tokens per prompt, 1 to the tier's limit "
                                                             "(default: the limit)")
    temperature: float = Field(default=0.8, description="0 is greedy; up to the tier's maximum (2)")


FinishReason = Literal["stop", "length", "timeout"]


class GenerateResponse(BaseModel):
    results: list[str] = Field(description="The generated text for each prompt, in the order given")
    finish_reasons: list[FinishReason] = Field(
        description="Why each generation ended: a stop (end of text or a stop string), the token limit, or "
                    "the server's request timeout (SLM_REQUEST_TIMEOUT_S; the text is what was produced)")


class HealthResponse(BaseModel):
    """The main fields; the body carries more (limits, slots, memory, latency...), as listed by /health."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "loading", "error", "draining", "closed", "unavailable"] = Field(
        description="ok: serving; loading; error: the model failed to load (see reason); draining: shutting "
                    "down; unavailable: a remote upstream cannot be reached (see reason)")
    model_loaded: bool = Field(description="Whether the model is loaded")
    reason: str | None = Field(description="Why the model is not loaded, when it is not")
    tier: str = Field(description="The tier in force: free, standard or pro")
    tier_reason: str = Field(description="Why this tier was picked")
    backend: str = Field(description="The backend serving the model")
    model: str = Field(description="The model's id")
    memory_guard: dict[str, Any] = Field(
        description="limit_mb, source, refusing (true while new requests are refused for memory) and reason")
    prompt_cache: dict[str, Any] | None = Field(
        default=None, description="Local backends: prompt tokens reused (cached_tokens) and computed, hit_rate, "
                                  "copies, evictions, KV cells in use and what each slot holds (docs/prompt-cache.md)")


def register_routes(app: FastAPI, service: GenerationService) -> None:
    """Add /generate and /metrics (behind the key when set) and /health (always open) to ``app``."""
    private = api_router(service, rest_error)
    metrics_router = api_router(service, rest_error, rate_limited=False)  # scrapers poll it
    public = api_router(service, rest_error, auth=False, rate_limited=False)

    @private.post("/generate", response_model=GenerateResponse,
                  responses=error_responses(ErrorResponse, (400, 401, 413, 429, 503, 504)))
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Generate for one prompt or a list of them, decoded together; results come back in order."""
        def prepare() -> Any:  # tokenising is CPU work: off the event loop
            max_tokens = body.max_tokens if body.max_tokens is not None else service.limits.max_new_tokens
            params = service.sampling(max_tokens, body.temperature)
            return service.check_prompts(prompt_list(body.prompts)), params

        prompts, params = await run_in_threadpool(prepare)
        final = []
        async for final in generation_steps(service, "batch", prompts, params, request):
            pass
        return GenerateResponse(results=[s.text for s in final],
                                finish_reasons=[s.finish_reason for s in final])  # type: ignore[misc]

    @metrics_router.get("/metrics", response_class=PlainTextResponse,
                        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                                         "description": "Prometheus text format"},
                                   **error_responses(ErrorResponse, (401,))})
    def metrics() -> Response:
        """Prometheus metrics: requests by endpoint/outcome and by route/status, tokens, latency, TTFT, RSS."""
        return Response(service.metrics.prometheus_text(), media_type=CONTENT_TYPE_LATEST)

    @public.get("/health", response_model=HealthResponse,
                responses={503: {"model": HealthResponse, "description": "Not serving: loading, failed or draining"}})
    def health() -> JSONResponse:
        """Always answers (never needs the key): 200 when the model is ready, 503 (same body) otherwise."""
        h = service.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @public.get("/healthz", responses={200: {"description": "The process answers"}})
    def healthz() -> dict[str, Any]:
        """Liveness: 200 as soon as the process serves HTTP, loading or not (readiness is /health)."""
        return {"status": "alive", "model_status": service.status, "uptime_s": round(time.time() - service.metrics.started, 1)}

    app.include_router(private)
    app.include_router(metrics_router)
    app.include_router(public)
