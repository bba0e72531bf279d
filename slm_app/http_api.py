"""The plain HTTP contract (``POST /generate``, ``GET /health``, ``GET /metrics``) and the pieces every
HTTP surface shares with ``slm_app.openai_api``: bearer auth, error shaping, body limits, per-route
request counts, and running a generation in a worker thread that a disconnecting client cancels.

Routes (all JSON unless said otherwise):

* ``POST /generate`` ``{"prompts": [str, ...] | str, "max_tokens": int, "temperature": float}`` →
  ``{"results": [str, ...]}``, one result per prompt, in order. A single string is one prompt (it is
  not split into lines) and a blank one is refused; ``max_tokens`` defaults to the tier's limit,
  ``temperature`` to 0.8; an unknown field is a 400 (a typo must not fall back to a default).
* ``GET /health`` → ``GenerationService.health()``: 200 while ``status`` is ``"ok"``, 503 with the same
  body (``status`` ``"loading"`` or ``"error"``, ``reason`` says why) otherwise.
* ``GET /metrics`` → Prometheus text of the app's own registry: ``slm_requests_total{endpoint,outcome}``
  (generations: ok / cancelled / busy / error...), ``slm_http_requests_total{route,status}`` (every API
  call, refused ones included), ``slm_generated_tokens_total``, latency and time-to-first-token
  histograms, ``slm_process_rss_bytes``, ``slm_model_loaded``.
* Errors: ``{"error": "<message>", "status": <int>}`` with that HTTP status: 400 bad request (pydantic
  validation errors included), 401 missing/wrong key, 413 too large (a tier limit, or a body over
  1 MiB), 429 busy, 503 model not ready,
  500 unexpected (logged; the server keeps serving).

Authentication: when ``SLM_API_KEY`` is set, ``/generate``, ``/metrics`` and every ``/v1`` route need
``Authorization: Bearer <key>`` (compared in constant time) and answer 401 before anything else, even
before 503 while the model loads. ``/health`` stays open on purpose: liveness probes (a Space, a load
balancer) cannot carry secrets, and it holds no user data. The key does not cover the Gradio UI, its
``/gradio_api`` (gradio_client) or the MCP server: those are the public demo.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException  # FastAPI's is a subclass
from starlette.types import Message

from slm_app.backends.base import SamplingParams
from slm_app.engine import PreparedPrompt
from slm_app.scheduler import Completion
from slm_app.service import GenerationService, RequestError

log = logging.getLogger(__name__)

# Far above any allowed request (prompts are at most 16k characters, schemas 20k): only stops
# a client from making the server buffer megabytes before validation can say no.
MAX_BODY_BYTES = 1 << 20

# The service names its parameters after SamplingParams; the HTTP surfaces call it max_tokens.
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}
# Service messages start with the field they are about ("temperature must be ..."): OpenAI's "param".
_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repeat_penalty", "prompt", "schema",
           "model", "n", "messages", "response_format"}

ErrorRenderer = Callable[[int, str, "str | None"], Response]


def api_error(exc: RequestError) -> tuple[str, str | None]:
    """The message in the HTTP surfaces' vocabulary, and the request field it is about (if it says)."""
    message = exc.message
    for internal, public in _PARAM_NAMES.items():
        message = message.replace(internal, public)
    first = message.split(" ", 1)[0].rstrip(":")  # "temperature", "messages[1].role", "schema:"
    return message, getattr(exc, "param", None) or (first if first.split("[")[0].split(".")[0] in _FIELDS else None)


# Pydantic names the union member that failed ("prompts.list[str].0"); the reader wants "prompts[0]".
_UNION_TAG = re.compile(r"^(str|int|float|bool|.*\[.*\])$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's first complaint as one readable sentence, e.g. ``max_tokens: Input should be ...``."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}", None
    if not loc:
        return ("the request body must be a JSON object (send Content-Type: application/json)"
                if err.get("type") != "missing" else "a JSON request body is required"), None
    field = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc if not _UNION_TAG.match(p)).lstrip(".")
    return f"{field}: {err.get('msg', 'invalid value')}", field


def bearer_ok(request: Request, api_key: str | None) -> bool:
    if not api_key:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest on bytes: constant time whatever the key's characters.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class _BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"request body is larger than {MAX_BODY_BYTES:,} bytes")


def _limit_body(request: Request) -> Request:
    """The request with its body refused past MAX_BODY_BYTES as it arrives (chunked uploads have no
    Content-Length). FastAPI re-raises an HTTPException from reading the body, so the route's error
    shape applies; FastAPI's own ``max_body_size`` would answer in plain text instead."""
    receive, received = request.receive, 0

    async def counting_receive() -> Message:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > MAX_BODY_BYTES:
            raise _BodyTooLarge()
        return message

    return Request(request.scope, counting_receive)


def guarded_route_class(service: GenerationService, render: ErrorRenderer, *, auth: bool) -> type[APIRoute]:
    """An APIRoute that checks the key first, turns every failure into ``render``'s shape, and counts
    requests by route and status. Scoped to our routers rather than app-wide exception handlers, so
    the mounted Gradio app keeps its own error handling."""
    api_key = service.settings.api_key if auth else None
    counter = service.metrics.http_requests

    class GuardedRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()
            path = self.path

            async def guarded(request: Request) -> Response:
                response = await respond(request)
                counter.labels(path, str(response.status_code)).inc()
                return response

            async def respond(request: Request) -> Response:
                if not bearer_ok(request, api_key):
                    return render(401, "missing or wrong API key: send 'Authorization: Bearer <SLM_API_KEY>'", None)
                try:
                    return await handler(_limit_body(request))
                except RequestError as exc:
                    message, param = api_error(exc)
                    response = render(exc.status, message, param)
                    if exc.retry_after is not None:  # busy / not ready (ours, or an upstream's passed through)
                        response.headers["Retry-After"] = str(exc.retry_after)
                    return response
                except RequestValidationError as exc:
                    return render(400, *_validation_message(exc))
                except HTTPException as exc:  # including the body limit's 413
                    return render(exc.status_code, str(exc.detail), None)
                except Exception as exc:  # a bug must cost one request, not the server
                    log.exception("%s %s failed", request.method, path)
                    return render(500, f"internal server error ({type(exc).__name__}); see the server log", None)

            return guarded

    return GuardedRoute


def api_router(service: GenerationService, render: ErrorRenderer, *, auth: bool = True, **kwargs: Any) -> APIRouter:
    return APIRouter(route_class=guarded_route_class(service, render, auth=auth), **kwargs)


def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """A string is one prompt (never split into lines); a list keeps its order, so a blank entry is
    an error rather than silently dropped, which would shift the results against the prompts."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise RequestError("no prompts: give at least one")
    for i, p in enumerate(items):
        if not p.strip():
            raise RequestError("prompt is empty" if len(items) == 1 else f"prompt {i} is empty")
    return items


async def generation_steps(service: GenerationService, endpoint: str, prompts: Sequence[PreparedPrompt],
                           params: SamplingParams, request: Request | None = None
                           ) -> AsyncIterator[list[Completion]]:
    """Submit every prompt to the scheduler and yield all their snapshots whenever one changes.

    Nothing blocks the event loop: the scheduler's thread wakes each reader (``aupdates``). Closing
    this iterator early (a client that disconnected: the response task is cancelled) or a
    disconnect seen between steps cancels every request, which frees their slots at once.
    Errors (``RequestError`` for busy / not loaded included) are raised before the first snapshot.
    """
    generations = service.start_many(endpoint, prompts, params)
    latest = [g.snapshot() for g in generations]
    queue: asyncio.Queue[tuple[int, Completion]] = asyncio.Queue()

    async def follow(i: int, generation: Any) -> None:
        async for snap in generation.aupdates():
            await queue.put((i, snap))

    tasks = [asyncio.create_task(follow(i, g)) for i, g in enumerate(generations)]
    try:
        while not all(s.done for s in latest):
            i, latest[i] = await queue.get()
            while not queue.empty():  # coalesce what arrived meanwhile: one step, one yield
                i, latest[i] = queue.get_nowait()
            for snap in latest:
                GenerationService.raise_failure(snap)
            yield list(latest)
            if request is not None and await request.is_disconnected():
                return
    finally:
        for g in generations:
            g.cancel()
        for t in tasks:
            t.cancel()


# ---- the REST contract --------------------------------------------------------------------------

class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo'd field is an error, not a silent default

    prompts: str | list[str]
    max_tokens: int | None = None
    temperature: float = 0.8


def _rest_error(status: int, message: str, param: str | None) -> Response:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def register_routes(app: FastAPI, service: GenerationService) -> None:
    """Add /generate, /metrics (behind the key when set) and /health (always open) to ``app``."""
    private = api_router(service, _rest_error)
    public = api_router(service, _rest_error, auth=False)

    @private.post("/generate")
    def generate(body: GenerateRequest) -> dict[str, list[str]]:
        """Generate for one prompt or a list of them in one batch; results come back in order."""
        # A plain ``def``: FastAPI runs it in its thread pool, off the event loop.
        max_tokens = body.max_tokens if body.max_tokens is not None else service.limits.max_new_tokens
        seqs = service.batch(prompt_list(body.prompts), max_tokens, body.temperature)
        return {"results": [s.text for s in seqs]}

    @private.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics: requests by endpoint/outcome and by route/status, tokens, latency, TTFT, RSS."""
        return Response(service.metrics.prometheus_text(), media_type=CONTENT_TYPE_LATEST)

    @public.get("/health")
    def health() -> JSONResponse:
        """Always answers (never needs the key): 200 when the model is ready, 503 (same body) otherwise."""
        h = service.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    app.include_router(private)
    app.include_router(public)

