"""HTTP plumbing every API surface shares (the REST contract in ``rest``, the OpenAI routes in
``openai``): the route class (key, rate limit, body limit, strict JSON, one error shape per surface,
request counts), validation messages that name the field, and running generations for a request.

What a request passes through, in order, before a route sees it:

1. **Key**: with ``SLM_API_KEY`` set, ``Authorization: Bearer <key>`` (constant-time compare) or 401,
   before anything else, even before 503 while the model loads.
2. **Rate limit**: with ``SLM_RATE_LIMIT=N``, at most N requests a minute per client (the bearer key
   when one is sent, else the client's address), counted by the ``limits`` library's moving window;
   over it, 429 with ``Retry-After`` (seconds until the oldest counted request leaves the window).
3. **Body**: at most ``MAX_BODY_BYTES`` (413), counted as it arrives, so chunked uploads are bounded too.
4. **Strict JSON**: the body must be JSON as RFC 8259 defines it: ``NaN`` / ``Infinity`` (which Python's
   parser accepts) and numbers too large for a float are refused, and so is any string (key or value)
   holding a NUL character or a lone UTF-16 surrogate (``"\\ud800"``), each with the path of the field.
   So nothing that cannot be encoded as UTF-8 ever reaches a tokenizer, a log line or an error body.
5. **The model** (pydantic) checks types; the service checks limits and sampling ranges.

Every refusal is rendered by the surface's ``ErrorRenderer`` with its status; 429 and 503 also carry
``Retry-After`` when the service says how long to wait (busy, loading, shutting down, memory guard).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
import weakref
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException  # FastAPI's is a subclass
from starlette.types import Message

from slm_app.backends.base import SamplingParams
from slm_app.engines.base import PreparedPrompt
from slm_app.scheduler import Completion
from slm_app.errors import RequestError, raise_failure
from slm_app.service import GenerationService

log = logging.getLogger(__name__)

# Far above any allowed request (prompts are at most 16k characters, schemas 20k): only stops
# a client from making the server buffer megabytes before validation can say no.
MAX_BODY_BYTES = 1 << 20

# The service names its parameters after SamplingParams; the HTTP surfaces call it max_tokens.
_PUBLIC_NAMES = {"max_new_tokens": "max_tokens"}

ErrorRenderer = Callable[[int, str, "str | None"], Response]


def public_error(exc: RequestError) -> tuple[str, str | None]:
    """The service's message and parameter in the HTTP surfaces' vocabulary."""
    message, param = exc.message, exc.param
    for internal, public in _PUBLIC_NAMES.items():
        message = message.replace(internal, public)
        param = public if param == internal else param
    return message, param


def printable(text: str) -> str:
    """Text safe to put in a UTF-8 response whatever a client sent (lone surrogates escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ---- validation messages --------------------------------------------------------------------------

def field_path(loc: Sequence[Any]) -> str:
    """("body", "messages", 0, "content") -> "messages[0].content". Pydantic also names the union
    member that failed ("prompts", "list[str]", 0): those tags are dropped."""
    parts = []
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif "[" in str(p) or str(p) in ("str", "int", "float", "bool") or str(p).startswith("function-"):
            continue
        else:
            parts.append(f".{p}")
    return "".join(parts).lstrip(".")


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's first complaint as one readable sentence, e.g. ``max_tokens: Input should be ...``."""
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}", None
    field = field_path(err.get("loc", ()))
    if not field:
        return ("the request body must be a JSON object (send Content-Type: application/json)"
                if err.get("type") != "missing" else "a JSON request body is required"), None
    return f"{field}: {err.get('msg', 'invalid value')}", field


class BadBody(HTTPException):
    """A body refused before validation (too large, not strict JSON, bad text), with its field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(status, message)
        self.param = param


def _check_json(value: Any, path: str) -> None:
    """Refuse, with the field's path, what RFC 8259 JSON cannot hold or a tokenizer must not see."""
    if isinstance(value, str):
        if "\x00" in value:
            raise BadBody(400, f"{path or 'body'}: contains a NUL character (\\u0000)", path or None)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadBody(400, f"{path or 'body'}: is not valid Unicode (lone surrogate "
                               f"{value[exc.start]!r} at position {exc.start})", path or None) from None
    elif isinstance(value, float) and not math.isfinite(value):
        raise BadBody(400, f"{path or 'body'}: must be a finite number (got {value}; JSON has no NaN or "
                           "Infinity, and numbers beyond ±1.8e308 overflow)", path or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, f"{path}.<key>" if path else "<key>")
            _check_json(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]")


class CheckedRequest(Request):
    """A request whose body is bounded as it arrives and whose JSON is parsed strictly (see the module
    docstring). FastAPI re-raises an HTTPException from reading or parsing the body, so the route's
    error shape applies; its own ``max_body_size`` would answer in plain text instead."""

    def __init__(self, request: Request):
        receive, received = request.receive, 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise BadBody(413, f"request body is larger than {MAX_BODY_BYTES:,} bytes")
            return message

        super().__init__(request.scope, counting_receive)

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadBody(400, f"request body is not UTF-8 (byte {exc.start})") from None
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise  # FastAPI turns it into its json_invalid validation error (line and column)
            except ValueError as exc:  # e.g. an integer of more than 4,300 digits
                raise BadBody(400, f"request body is not valid JSON: {exc}") from None
            _check_json(value, "")
            self._json = value
        return self._json


# ---- rate limit -----------------------------------------------------------------------------------

class RateLimit:
    """``SLM_RATE_LIMIT`` requests per minute per client, one moving window per client, in memory
    (one process serves the model, so there is nothing to share)."""

    def __init__(self, per_minute: int):
        self.item = RateLimitItemPerMinute(per_minute)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    @staticmethod
    def client_key(request: Request) -> str:
        """The bearer token when one is sent (hashed: keys are not kept in memory), else the address
        (behind a proxy, uvicorn's ``FORWARDED_ALLOW_IPS`` makes that the client's, not the proxy's)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return "key:" + hashlib.sha256(token.strip().encode("utf-8", "replace")).hexdigest()[:32]
        return "addr:" + (request.client.host if request.client else "unknown")

    def retry_after(self, request: Request) -> int | None:
        """None when the request may go ahead (and is counted), else seconds to wait."""
        key = self.client_key(request)
        if self.limiter.hit(self.item, key):
            return None
        reset = self.limiter.get_window_stats(self.item, key).reset_time
        return max(1, math.ceil(reset - time.time()))


_RATE_LIMITS: "weakref.WeakKeyDictionary[GenerationService, RateLimit]" = weakref.WeakKeyDictionary()


def rate_limit_for(service: GenerationService) -> RateLimit | None:
    """The app's one limiter (shared by every router and by Gradio's queue), or None when off."""
    per_minute = service.settings.rate_limit
    if not per_minute:
        return None
    if service not in _RATE_LIMITS:
        _RATE_LIMITS[service] = RateLimit(per_minute)
    return _RATE_LIMITS[service]


def rate_limited_message(retry_after: int, per_minute: int) -> str:
    return f"rate limit: at most {per_minute} requests a minute per client (SLM_RATE_LIMIT); retry in {retry_after} s"


# ---- the route class ------------------------------------------------------------------------------

def bearer_ok(request: Request, api_key: str | None) -> bool:
    if not api_key:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest on bytes: constant time whatever the key's characters.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                              api_key.encode())


def guarded_route_class(service: GenerationService, render: ErrorRenderer, *, auth: bool,
                        rate_limited: bool = True) -> type[APIRoute]:
    """An APIRoute that checks the key and the rate limit first, bounds and strictly parses the body,
    turns every failure into ``render``'s shape (plus ``Retry-After`` when there is a wait to say), and
    counts requests by route and status. Scoped to our routers rather than app-wide exception
    handlers, so the mounted Gradio app keeps its own error handling."""
    api_key = service.settings.api_key if auth else None
    limiter = rate_limit_for(service) if rate_limited else None
    counter = service.metrics.http_requests

    def refuse(status: int, message: str, param: str | None, retry_after: int | None = None) -> Response:
        response = render(status, printable(message), param)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

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
                    return refuse(401, "missing or wrong API key: send 'Authorization: Bearer <SLM_API_KEY>'", None)
                if limiter is not None and (wait := limiter.retry_after(request)) is not None:
                    return refuse(429, rate_limited_message(wait, service.settings.rate_limit or 0), None, wait)
                try:
                    return await handler(CheckedRequest(request))
                except RequestError as exc:
                    return refuse(exc.status, *public_error(exc), exc.retry_after)
                except RequestValidationError as exc:
                    return refuse(400, *validation_message(exc))
                except HTTPException as exc:  # the body checks' 400/413, a 404...
                    return refuse(exc.status_code, str(exc.detail), getattr(exc, "param", None))
                except Exception as exc:  # a bug must cost one request, not the server
                    log.exception("%s %s failed", request.method, path)
                    return refuse(500, f"internal server error ({type(exc).__name__}); see the server log", None)

            return guarded

    return GuardedRoute


class ErrorResponse(BaseModel):
    """The REST routes' error body (the OpenAI routes answer in OpenAI's error shape instead)."""

    error: str = Field(description="What was wrong; names the field when one is at fault")
    status: int = Field(description="The HTTP status, repeated")


def rest_error(status: int, message: str, param: str | None) -> Response:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def api_router(service: GenerationService, render: ErrorRenderer, *, auth: bool = True, rate_limited: bool = True,
               **kwargs: Any) -> APIRouter:
    """A router whose routes go through ``guarded_route_class`` (``kwargs``: APIRouter's, e.g. prefix)."""
    return APIRouter(route_class=guarded_route_class(service, render, auth=auth, rate_limited=rate_limited),
                     **kwargs)


def error_responses(model: type[BaseModel], statuses: Sequence[int], retry: Sequence[int] = (429, 503)
                    ) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's refusals, so /openapi.json lists them with their body."""
    described = {400: "Bad request: the message names the field", 401: "Missing or wrong API key",
                 404: "Unknown model", 413: "Too large: the body, a prompt or a batch over the tier's limits",
                 422: "No valid structured output", 429: "Rate limit (SLM_RATE_LIMIT); see Retry-After",
                 500: "A bug (logged); the server keeps serving",
                 503: "Busy, loading, shutting down or memory guard; see Retry-After",
                 504: "Request timeout (SLM_REQUEST_TIMEOUT_S) before the first token"}
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": model, "description": described.get(status, "Error")}
        if status in retry:
            entry["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying",
                                                "schema": {"type": "integer"}}}
        out[status] = entry
    return out


def truthful_openapi(app: FastAPI) -> None:
    """/openapi.json without FastAPI's automatic "422 Validation Error" on every route with a body or
    parameters: these routes answer 400 for that (``validation_message``), as the other statuses say."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                        del responses["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---- running generations for a request ------------------------------------------------------------

def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """A string is one prompt (never split into lines); a list keeps its order, so a blank entry is
    an error rather than silently dropped, which would shift the results against the prompts."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise RequestError("no prompts: give at least one", param="prompts")
    for i, p in enumerate(items):
        if not p.strip():
            raise RequestError("prompt is empty" if len(items) == 1 else f"prompt {i} is empty",
                               param="prompts" if len(items) == 1 else f"prompts[{i}]")
    return items


async def generation_steps(service: GenerationService, endpoint: str, prompts: Sequence[PreparedPrompt],
                           params: SamplingParams, request: Request | None = None
                           ) -> AsyncIterator[list[Completion]]:
    """Submit every prompt to the scheduler and yield all their snapshots whenever one changes.

    Nothing blocks the event loop: the scheduler's thread wakes each reader (``aupdates``). Closing
    this iterator early (a client that disconnected: the response task is cancelled) or a
    disconnect seen between steps cancels every request, which frees their slots at once.
    Errors (``RequestError`` for busy / not loaded / timed out before any token) are raised before
    the snapshot that shows them.
    """
    # In a thread: a request for another LoRA adapter than the one applied waits there for the switch.
    generations = await run_in_threadpool(service.start_many, endpoint, prompts, params)
    latest = [g.snapshot() for g in generations]
    queue: asyncio.Queue[tuple[int, Completion]] = asyncio.Queue()

    async def follow(i: int, generation: Any) -> None:
        async for snap in generation.aupdates():
            await queue.put((i, snap))

    def check() -> None:
        if all(s.finish_reason == "timeout" and s.completion_tokens == 0 for s in latest):
            raise_failure(latest[0])  # 504: the timeout left nothing at all to give
        for snap in latest:
            if snap.finish_reason == "error":
                raise_failure(snap)

    tasks = [asyncio.create_task(follow(i, g)) for i, g in enumerate(generations)]
    try:
        if all(s.done for s in latest):  # over before anyone listened (a remote upstream's instant 429)
            check()
            yield list(latest)
        while not all(s.done for s in latest):
            i, latest[i] = await queue.get()
            while not queue.empty():  # coalesce what arrived meanwhile: one step, one yield
                i, latest[i] = queue.get_nowait()
            check()
            yield list(latest)
            if request is not None and await request.is_disconnected():
                return
    finally:
        for g in generations:
            g.cancel()
        for t in tasks:
            t.cancel()
