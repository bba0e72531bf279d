"""One process, one model: FastAPI serving the Gradio UI (and its API) plus the HTTP routes."""

from __future__ import annotations

import os

# Offline hygiene, before gradio / huggingface_hub are imported: no analytics, no telemetry.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import gradio as gr  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from slm_app import feedback_api, http_api, openai_api  # noqa: E402
from slm_app.service import GenerationService  # noqa: E402
from slm_app.settings import Settings, load_settings  # noqa: E402
from slm_app.ui import build_ui, gradio_concurrency  # noqa: E402


# Gradio's own clients (MCP tool calls, open browser tabs) keep heartbeat streams open that never end
# by themselves; without a bound, uvicorn's graceful shutdown waits on them forever.
GRACEFUL_SHUTDOWN_S = 5


def build_app(settings: Settings | None = None, load_model: bool = True) -> FastAPI:
    """The ASGI app: HTTP routes first, then Gradio mounted at "/". The model loads in the background
    so the page and /health answer at once (health says "loading" until it is ready)."""
    settings = settings or load_settings()
    service = GenerationService(settings)
    demo = build_ui(service)
    demo.queue(max_size=settings.queue_size + service.tier.parallel,
               default_concurrency_limit=gradio_concurrency(service))
    app = FastAPI(title="slm-space")
    app.state.service = service
    # Our routes before the mount: Gradio at "/" would otherwise answer every path.
    http_api.register_routes(app, service)
    openai_api.register_routes(app, service)
    feedback_api.register_routes(app, service)
    # mcp_server: each named Gradio endpoint is also an MCP tool, at /gradio_api/mcp (streamable HTTP).
    app = gr.mount_gradio_app(app, demo, path="/", footer_links=["api", "settings"], mcp_server=True)
    if load_model:
        service.start_loading()
    return app


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
