"""One process, one model: FastAPI serving the Gradio UI (and its API) plus the HTTP routes."""

from __future__ import annotations

import os

# Offline hygiene, before gradio / huggingface_hub are imported: no analytics, no telemetry.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import hmac  # noqa: E402
import secrets  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any, AsyncIterator  # noqa: E402

import gradio as gr  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.routing import Mount  # noqa: E402
from starlette.types import ASGIApp, Receive, Scope, Send  # noqa: E402

from slm_app.api import feedback, fine_tuning, rest  # noqa: E402
from slm_app.api.openai import routes as openai  # noqa: E402
from slm_app.api.common import bearer_ok, rate_limit_for, rate_limited_message, truthful_openapi  # noqa: E402
from slm_app.service import GenerationService  # noqa: E402
from slm_app.settings import Settings, load_settings  # noqa: E402
from slm_app.ui.app import build_ui, gradio_concurrency  # noqa: E402


# Gradio's own clients (MCP tool calls, open browser tabs) keep heartbeat streams open that never end
# by themselves; without a bound, uvicorn's graceful shutdown waits on them forever.
GRACEFUL_SHUTDOWN_S = 5

log = logging.getLogger(__name__)

# Gradio's routes that start work (its queue, its REST-style calls): rate limited like the HTTP API.
_GRADIO_WORK = ("/gradio_api/queue/join", "/gradio_api/call/", "/gradio_api/run/", "/gradio_api/api/")
_MCP = "/gradio_api/mcp"


def build_app(settings: Settings | None = None, load_model: bool = True) -> FastAPI:
    """The ASGI app: HTTP routes first, then Gradio mounted at "/". The model loads in the background
    so the page and /health answer at once (health says "loading" until it is ready)."""
    settings = settings or load_settings()
    service = GenerationService(settings)
    demo = build_ui(service)
    demo.queue(max_size=settings.queue_size + service.tier.parallel,
               default_concurrency_limit=gradio_concurrency(service))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn's shutdown: after a SIGTERM, DrainingServer has drained already; otherwise (a test's
        # stop(), a second signal) whatever still runs is cancelled here. Then the model is freed.
        service.drain(0)
        service.close()

    app = FastAPI(title="slm-space", version="1", lifespan=lifespan,
                  description="Small language models on CPU: a REST contract and OpenAI-compatible routes. "
                              "The Gradio app (page, gradio_client API, MCP) is mounted at /.")
    app.state.service = service
    protect_ui = bool(settings.protect_ui and settings.api_key)
    _guard_gradio(app, service, protect_mcp=protect_ui)
    # Our routes before the mount: Gradio at "/" would otherwise answer every path.
    rest.register_routes(app, service)
    openai.register_routes(app, service)
    feedback.register_routes(app, service)
    fine_tuning.register_routes(app, service)
    truthful_openapi(app)
    # SLM_PROTECT_UI: Gradio's own login for the page and its API (any user name, the key as password).
    auth = (lambda _user, password: hmac.compare_digest(password.encode(), settings.api_key.encode())
            ) if protect_ui else None
    # mcp_server: each named Gradio endpoint is also an MCP tool, at /gradio_api/mcp (streamable HTTP).
    app = gr.mount_gradio_app(app, demo, path="/", footer_links=["api", "settings"], mcp_server=True, auth=auth,
                              auth_message="Enter any user name and the server's API key (SLM_API_KEY)."
                              if protect_ui else None)
    if protect_ui:
        gradio_app = next(r.app for r in app.routes if isinstance(r, Mount))
        app.add_middleware(_KeyAsGradioLogin, gradio_app=gradio_app, api_key=settings.api_key)
    if load_model:
        service.start_loading()
    return app


def _guard_gradio(app: FastAPI, service: GenerationService, *, protect_mcp: bool) -> None:
    """The rate limit for Gradio's routes that start work, and (SLM_PROTECT_UI) the bearer key for MCP,
    whose clients cannot use Gradio's cookie login. Our own routes apply both in their route class."""
    limiter = rate_limit_for(service)
    api_key = service.settings.api_key
    if limiter is None and not protect_mcp:
        return

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        path = request.url.path
        if protect_mcp and path.startswith(_MCP) and not bearer_ok(request, api_key):
            return JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <SLM_API_KEY>'"},
                                status_code=401)
        if limiter is not None and request.method == "POST" and path.startswith(_GRADIO_WORK):
            if (wait := limiter.retry_after(request)) is not None:
                return JSONResponse({"error": rate_limited_message(wait, service.settings.rate_limit or 0)},
                                    status_code=429, headers={"Retry-After": str(wait)})
        return await call_next(request)


class _KeyAsGradioLogin:
    """SLM_PROTECT_UI: a request to the Gradio app that carries the bearer key is let in as if it had
    logged in (Gradio's login is a cookie, which scripts and MCP clients do not have).

    Gradio's MCP server runs queued tools through a gradio_client of its own that sends neither: its
    start-up reads (``/config``, ``/info``: the app's layout and API, the same for everyone) and its
    result stream (``/queue/data``, keyed by a random session) are let in on its ``x-gradio-user: mcp``
    header; the call that starts work (``/queue/join``) carries the MCP request's own headers, so it
    needs the key like everything else (and ``/gradio_api/mcp`` itself needs it: ``_guard_gradio``).
    The session token is minted here and never leaves the process."""

    _MCP_READS = ("/config", "/info", "/queue/data")

    def __init__(self, app: ASGIApp, gradio_app: Any, api_key: str):
        self.app, self.api_key = app, api_key
        self.cookie = f"access-token-{gradio_app.cookie_id}"
        self.token = secrets.token_urlsafe(32)
        gradio_app.tokens[self.token] = "api-key"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            key = request.headers.get("authorization") and bearer_ok(request, self.api_key)
            mcp_read = (request.headers.get("x-gradio-user") == "mcp"
                        and request.url.path.rstrip("/").endswith(self._MCP_READS))
            if key or mcp_read:
                headers = [(k, v) for k, v in scope["headers"] if k != b"cookie"]
                cookies = [v.decode("latin-1") for k, v in scope["headers"] if k == b"cookie"]
                cookies.append(f"{self.cookie}={self.token}")
                scope = {**scope, "headers": headers + [(b"cookie", "; ".join(cookies).encode("latin-1"))]}
        await self.app(scope, receive, send)


class DrainingServer(uvicorn.Server):
    """uvicorn, with Kubernetes-style graceful shutdown: on SIGTERM (or Ctrl-C) the app keeps listening
    but admits no new generation (503 with Retry-After; /health says "draining"), running ones finish
    for up to SLM_DRAIN_S seconds, the rest are cancelled; then uvicorn shuts down as usual and the
    process exits 0. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, service: GenerationService, drain_s: float):
        super().__init__(config)
        self._service, self._drain_s = service, drain_s
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None:  # the second signal: stop now
            self.should_exit = self.force_exit = True
            return
        log.info("%s: draining for up to %s s", signal.Signals(sig).name, self._drain_s)

        def drain() -> None:
            self._service.drain(self._drain_s)
            self.should_exit = True

        # Not appended to uvicorn's captured signals: it would re-raise SIGTERM once shut down, and the
        # default handler would end the process with 143 instead of 0 after a clean drain.
        self._drain = threading.Thread(target=drain, name="drain", daemon=True)
        self._drain.start()


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run ``app`` in this (main) thread until SIGTERM/SIGINT, draining first (``DrainingServer``)."""
    service: GenerationService = app.state.service
    config = uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    DrainingServer(config, service, service.settings.drain_s).run()


@dataclass
class RunningServer:
    """A server started in a thread (tests, benchmarks): ``url``, ``service``, ``stop()``."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str

    @property
    def service(self) -> GenerationService:
        return self.server.config.app.state.service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Start uvicorn in a daemon thread on ``port`` (0 = a free one) and wait until it listens."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server thread died during start-up")
        threading.Event().wait(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server, thread, f"http://{host}:{bound}/")
