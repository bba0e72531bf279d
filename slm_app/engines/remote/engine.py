"""The remote engine: this app in front of an existing OpenAI-compatible server (llama-server, vLLM,
TGI, Ollama, llama-cpp-python's server...), ``SLM_BACKEND=remote``.

It is request-level: no model and no scheduler here. Each request becomes one streamed HTTP request
to the upstream (``/v1/completions`` for a raw prompt, ``/v1/chat/completions`` when the chat
template is asked for), and its server-sent events become the same ``Completion`` snapshots a local
engine publishes, behind the same ``Generation`` handle, so the service, its limits and metrics, and
every surface (Gradio tabs, REST, OpenAI routes, MCP) work unchanged. The parts:

* ``client``: one request's payload and its event stream; ``failures``: upstream errors as
  ``errors.Failure`` kinds (429 and 503 pass through with their ``Retry-After``; unreachable is
  unavailable; a silent upstream a timeout; others an upstream failure, with the upstream's message);
  ``health``: the probe and reachability; ``tokens``: token counting (the upstream's tokenizer or a
  byte bound); ``structured``: the schema as the upstream's ``response_format``.
* One asyncio loop in one thread owns an ``httpx.AsyncClient`` (a pool of keep-alive connections,
  retries on connect errors only: a request that reached the upstream is never sent twice).
  ``SLM_PARALLEL`` requests run upstream at once, ``SLM_QUEUE_SIZE`` more wait here in the shared
  FIFO ``admission`` line; past that callers get "busy" as with a local engine. A batch's prompts run
  concurrently.
* Cancelling a request (a client that disconnected, a closed Gradio stream, a timeout) cancels its
  task, which closes the upstream response: the upstream sees its client go and stops generating.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from typing import Any, Callable

import httpx

from slm_app import admission
from slm_app.backends.base import BackendUnavailable, ModelInfo, SamplingParams
from slm_app.engines.base import Capabilities, Engine, Message, ModelPrompt, Occupancy, PreparedPrompt, chat_prompt
from slm_app.engines.remote import tokens
from slm_app.engines.remote.client import UpstreamCall, request_payload, stream_call
from slm_app.engines.remote.failures import UpstreamFailure, describe, public_url, transport_failure
from slm_app.engines.remote.health import DOWN_PROBE_S, UpstreamHealth, list_models
from slm_app.engines.remote.structured import ResponseFormat, ResponseFormatPlan
from slm_app.errors import RETRY_AFTER_S, EngineError, Failure
from slm_app.scheduler import Completion, Generation
from slm_app.settings import Settings

log = logging.getLogger(__name__)


class RemoteEngine(Engine):
    """Requests forwarded to an OpenAI-compatible server; see the module docstring."""

    capabilities = Capabilities(schema="response format", logits=None)

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None, parallel: int = 4,
                 queue_size: int = 16, connect_timeout_s: float = 5.0, read_timeout_s: float = 120.0,
                 retries: int = 2, health_interval_s: float = 5.0, chat_template: bool = True,
                 prompt_token_limit: int | None = None, on_availability: Callable[[bool], None] | None = None):
        url = url.strip().rstrip("/")
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise BackendUnavailable(f"SLM_REMOTE_URL must be an http(s) URL such as http://127.0.0.1:8080/v1, "
                                     f"got {public_url(url) if parsed.host else url[:80]!r}")
        self.url = url
        self.public_url = public_url(url)
        # Extra endpoints (tokenize) live beside /v1, at the server's root.
        self.root = url[: -len("/v1")] if url.endswith("/v1") else url
        self.pinned_model = model
        self.model = model
        self.parallel = parallel
        self.health_interval_s = health_interval_s
        self.chat_template = chat_template
        self.prompt_token_limit = prompt_token_limit
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s,
                                      pool=None)  # waiting for a pooled connection is our own queue's job
        self._probe_timeout = httpx.Timeout(connect=connect_timeout_s, read=max(connect_timeout_s, 10.0),
                                            write=connect_timeout_s, pool=connect_timeout_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx's transport retries connection failures only (refused, DNS, connect timeout).
        transport = httpx.AsyncHTTPTransport(retries=retries, limits=httpx.Limits(
            max_connections=parallel + 4, max_keepalive_connections=parallel + 4))
        self.health_state = UpstreamHealth(self.public_url, on_availability)
        self.tokenizer: str | None = None  # which tokenize endpoint, once found; tokens.ESTIMATE if none
        self._tokenize_path: str | None = None
        self.structured_format: str | None = None  # the best RESPONSE_FORMATS entry the upstream took
        self._closed = False
        self._queue: admission.AdmissionQueue[UpstreamCall] = admission.AdmissionQueue(queue_size, "the upstream")
        self._running: set[UpstreamCall] = set()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="remote-engine", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient = self._run(self._make_client(headers, transport))
        self._wake = self._run(self._make_event())
        self._run(self.probe())  # first contact now: Health is right from the start
        self._prober = asyncio.run_coroutine_threadsafe(self._probe_loop(), self._loop)

    @classmethod
    def from_settings(cls, settings: Settings, parallel: int, prompt_token_limit: int | None = None,
                      on_availability: Callable[[bool], None] | None = None) -> "RemoteEngine":
        if not settings.remote_url:
            raise BackendUnavailable("SLM_BACKEND=remote needs SLM_REMOTE_URL (the base URL of an "
                                     "OpenAI-compatible /v1, e.g. http://127.0.0.1:8080/v1)")
        key = settings.remote_api_key.get_secret_value() if settings.remote_api_key else None
        return cls(settings.remote_url, api_key=key, model=settings.remote_model, parallel=parallel,
                   queue_size=settings.queue_size, connect_timeout_s=settings.remote_connect_timeout_s,
                   read_timeout_s=settings.remote_read_timeout_s, retries=settings.remote_retries,
                   health_interval_s=settings.remote_health_interval_s, chat_template=settings.chat_template,
                   prompt_token_limit=prompt_token_limit, on_availability=on_availability)

    async def _make_client(self, headers: dict[str, str], transport: httpx.AsyncHTTPTransport) -> httpx.AsyncClient:
        return httpx.AsyncClient(headers=headers, transport=transport, timeout=self._timeout)

    @staticmethod
    async def _make_event() -> asyncio.Event:
        return asyncio.Event()

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the engine's loop from another thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ---- health ------------------------------------------------------------------------------
    async def probe(self) -> bool:
        """``GET /v1/models``: reachability, latency, the model id; the tokenizer on first success."""
        try:
            model, models, n_ctx, latency = await list_models(self._client, self.url, self.public_url,
                                                              self.pinned_model, self._probe_timeout)
        except httpx.ReadTimeout:
            # Connected, but no answer in time: a server that runs one request at a time (llama-cpp-
            # python's) is busy with someone else's. Busy is not down: keep the last verdict.
            log.info("upstream %s slow to answer the probe (busy?)", self.public_url)
            return self.health_state.reachable
        except (httpx.HTTPError, UpstreamFailure, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.health_state.set_down(describe(exc, self.public_url))
            return False
        self.model = model
        self.health_state.record(models, latency, n_ctx)
        if self.tokenizer is None:
            self._tokenize_path = await tokens.find_tokenizer(self._client, self.root, self.model)
            self.tokenizer = f"upstream POST {self._tokenize_path}" if self._tokenize_path else tokens.ESTIMATE
        self.health_state.set_up(self.model)
        return True

    async def _probe_loop(self) -> None:
        while not self._closed:
            up = self.health_state.reachable
            await asyncio.sleep(self.health_interval_s if up else min(DOWN_PROBE_S, self.health_interval_s))
            # Streaming requests prove the upstream is up, and a busy single-model server (llama-cpp-
            # python's holds a lock over a whole generation) might not answer a probe in time.
            if self._running and up:
                continue
            try:
                await self.probe()
            except Exception:  # the prober must survive anything
                log.exception("upstream probe failed")

    def unavailable_reason(self) -> str | None:
        return self.health_state.unavailable_reason()

    def health(self) -> dict[str, Any]:
        return {"upstream_url": self.public_url, "upstream_model": self.model, **self.health_state.report(),
                "token_counting": self.tokenizer or "not determined yet (upstream not reached)",
                "structured_format": self.structured_format or "not determined yet"}

    # ---- prompts and tokens --------------------------------------------------------------------
    def format_prompt(self, prompt: str, use_chat_template: bool) -> ModelPrompt:
        if use_chat_template and self.chat_template:
            return chat_prompt([{"role": "user", "content": prompt}])
        return ModelPrompt(prompt)

    def render_chat(self, messages: list[Message]) -> ModelPrompt | None:
        # The upstream applies its model's template to the messages themselves.
        return chat_prompt(messages) if self.chat_template else None

    def prepare(self, prompt: ModelPrompt) -> PreparedPrompt:
        """The upstream's token count; the byte bound when it has no tokenizer, or when the bound
        already fits ``prompt_token_limit`` (no round trip: the exact count comes while streaming)."""
        bound = tokens.byte_bound(prompt.text)
        if self._tokenize_path is None or (self.prompt_token_limit is not None and bound <= self.prompt_token_limit):
            return PreparedPrompt(prompt, bound, exact=False)
        try:
            ids = self._run(tokens.upstream_tokenize(self._client, self.root, self._tokenize_path, prompt.text,
                                                     self.model))
        except httpx.ConnectError as exc:
            self.health_state.set_down(describe(exc, self.public_url))
            raise EngineError(f"upstream {self.public_url} unavailable: {describe(exc, self.public_url)}",
                              Failure.UNAVAILABLE, RETRY_AFTER_S) from None
        except (httpx.HTTPError, UpstreamFailure, ValueError) as exc:
            raise EngineError(f"counting the prompt's tokens upstream failed: {describe(exc, self.public_url)}",
                              Failure.UPSTREAM) from None
        return PreparedPrompt(prompt, len(ids))

    def schema_plan(self, schema: dict, budget: int, steer: bool = True) -> ResponseFormatPlan:
        return ResponseFormatPlan(schema, self.structured_format, self._remember_format)

    def _remember_format(self, kind: str) -> None:
        self.structured_format = kind

    def info(self) -> ModelInfo:
        model = self.model or "remote"
        return ModelInfo(backend="remote", model_id=model, name=f"{model} (at {self.public_url})", source="remote",
                         reason=f"SLM_BACKEND=remote: requests go to {self.public_url}", chat_template=self.chat_template,
                         n_ctx=self.health_state.n_ctx, n_slots=self.parallel, details=self.health())

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, prompt: PreparedPrompt, params: SamplingParams, constraint: Any = None,
               timeout_s: float | None = None, on_done: Callable[[Completion], None] | None = None) -> Generation:
        if constraint is not None and not isinstance(constraint, ResponseFormat):
            raise TypeError("a remote engine takes a ResponseFormat (from its schema_plan), not a token constraint")
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        path, payload = request_payload(self.model, prompt.prompt, params, seed,
                                        constraint.payload() if constraint is not None else None)
        exact_later = not prompt.exact and self._tokenize_path is not None
        call = UpstreamCall(path, payload, prompt.n_tokens, params, seed, constraint is not None,
                            None if timeout_s is None else time.perf_counter() + timeout_s, on_done,
                            count_text=prompt.text if exact_later else None)
        call.pub.snapshot = call.completion()
        with self._lock:
            if self._closed:
                self._queue.stop_admitting()
            self._queue.put(call, free_slots=self.parallel - len(self._running))
        asyncio.run_coroutine_threadsafe(self._start(call), self._loop)
        return Generation(self._cancel, call, call.pub)

    async def _start(self, call: UpstreamCall) -> None:
        call.task = asyncio.current_task()
        if call.cancelled:  # cancelled before its task existed
            self._finish(call, "cancelled")
            return
        self._wake.set()
        await self._serve(call)

    async def _serve(self, call: UpstreamCall) -> None:
        waiting = self._queue.waiting
        try:
            # FIFO: wait while this call is not at the head or every upstream slot is taken.
            while True:
                with self._lock:
                    if waiting and waiting[0] is call and len(self._running) < self.parallel:
                        waiting.popleft()
                        self._running.add(call)
                        break
                self._wake.clear()
                await self._wait_wake(call)
            call.started = time.perf_counter()
            self._wake.set()  # the next in line may fit too
            remaining = None if call.deadline is None else call.deadline - time.perf_counter()
            path = self._tokenize_path
            count = None if path is None else (
                lambda text: tokens.upstream_tokenize(self._client, self.root, path, text, self.model))
            async with asyncio.timeout(remaining):
                await stream_call(self._client, self.url, call, count_tokens=count,
                                  on_connected=lambda: self.health_state.set_up(self.model))
            self._finish(call, call.upstream_finish or "stop")
        except TimeoutError:
            self._finish(call, "timeout")
        except asyncio.CancelledError:
            self._finish(call, "cancelled")
        except UpstreamFailure as exc:
            call.failure = exc
            self._finish(call, "error")
        except httpx.HTTPError as exc:
            call.failure = transport_failure(exc, self.public_url)
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                self.health_state.set_down(describe(exc, self.public_url))
            self._finish(call, "error")
        except Exception as exc:  # a bug costs this request, never the engine
            log.exception("remote request failed")
            call.failure = UpstreamFailure(f"{type(exc).__name__}: {exc}", Failure.INTERNAL)
            self._finish(call, "error")

    async def _wait_wake(self, call: UpstreamCall) -> None:
        timeout = None if call.deadline is None else max(0.0, call.deadline - time.perf_counter())
        async with asyncio.timeout(timeout):
            await self._wake.wait()

    def _finish(self, call: UpstreamCall, reason: str) -> None:
        with self._lock:
            if call.finish_reason is not None:
                return
            call.finish_reason = reason
            self._running.discard(call)
            if call in self._queue.waiting:
                self._queue.waiting.remove(call)
        self._loop.call_soon_threadsafe(self._wake.set)
        call.pub.finish(call.completion(), call.on_done)

    def _cancel(self, call: UpstreamCall) -> None:
        """``Generation.cancel()``: ends the call's task, which closes its upstream response."""
        call.cancelled = True
        task = call.task
        if task is not None and not task.done():
            self._loop.call_soon_threadsafe(task.cancel)

    # ---- lifecycle -------------------------------------------------------------------------------
    def occupancy(self) -> Occupancy:
        with self._lock:
            return Occupancy(waiting=len(self._queue.waiting), running=len(self._running), slots=self.parallel)

    def stop_admitting(self) -> None:
        with self._lock:
            self._queue.stop_admitting()

    def _idle(self) -> bool:
        with self._lock:
            return not self._queue.waiting and not self._running

    def _in_flight(self) -> list[UpstreamCall]:
        with self._lock:
            return list(self._queue.waiting) + list(self._running)

    def drain(self, timeout_s: float) -> bool:
        return admission.drain(timeout_s, stop_admitting=self.stop_admitting, idle=self._idle,
                               in_flight=self._in_flight, cancel=self._cancel)

    def close(self) -> None:
        if self._closed:
            return
        self.drain(0)
        self._closed = True
        self._prober.cancel()
        try:
            self._run(self._client.aclose(), timeout=5)
        except Exception:  # closing is best effort
            log.exception("closing the upstream client failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
