"""The remote engine: this app in front of an existing OpenAI-compatible server (llama-server, vLLM,
TGI, Ollama, llama-cpp-python's server...), ``SLM_BACKEND=remote``.

It is request-level: no model and no scheduler here. Each request becomes one streamed HTTP request
to the upstream (``/v1/completions`` for a raw prompt, ``/v1/chat/completions`` when the chat
template is asked for), and its server-sent events become the same ``Completion`` snapshots a local
engine publishes, behind the same ``Generation`` handle, so the service, its limits and metrics, and
every surface (Gradio tabs, REST, OpenAI routes, MCP) work unchanged.

* One asyncio loop in one thread owns an ``httpx.AsyncClient`` (a pool of keep-alive connections,
  retries on connect errors only: a request that reached the upstream is never sent twice).
  ``SLM_PARALLEL`` requests run upstream at once, ``SLM_QUEUE_SIZE`` more wait here (FIFO), past that
  callers get "busy" as with a local engine. A batch's prompts run concurrently.
* Cancelling a request (a client that disconnected, a closed Gradio stream, a timeout) cancels its
  task, which closes the upstream response: the upstream sees its client go and stops generating.
* Upstream failures become ``RemoteCompletion`` snapshots that carry an HTTP status: 429 and 503
  pass through with their ``Retry-After``; unreachable is 503; a silent upstream 504; others 502,
  with the upstream's own message.
* Token counting for the tier's limits uses the upstream's tokenizer when it exposes one
  (llama-cpp-python ``POST /extras/tokenize``, llama-server and vLLM ``POST /tokenize``). Otherwise
  (OpenAI-style servers without one: TGI's OpenAI route, Ollama) it counts UTF-8 bytes plus one:
  every tokenizer these servers use (byte-level BPE, SentencePiece with byte fallback) spends at
  least one byte per token, plus at most one BOS, so the count never lets an over-long prompt
  through; it refuses some prompts that would have fit (English is ~4 bytes per token). The same
  bound saves the round trip to the upstream's tokenizer for every prompt it already proves short
  enough (most of them); their exact count, for usage, is fetched while the answer streams.
* Health: a probe (``GET /v1/models``) every ``SLM_REMOTE_HEALTH_INTERVAL_S`` (every second while
  the upstream is down, and not while requests are streaming, which prove it is up) keeps
  reachability, latency and the model id current; while the upstream is down requests are refused
  with 503 and the reason, and serving resumes when it answers again.
* Structured JSON (``generate_structured_remote``): the upstream's ``response_format`` when it takes
  one (OpenAI's ``json_schema``, then llama-cpp-python's ``json_object`` with ``schema``), else plain
  generation; the output is always validated here with ``structured.validate_output``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import httpx
import numpy as np
from httpx_sse import SSEError, aconnect_sse

from slm_app.backends.base import BackendUnavailable, ModelInfo, SamplingParams, TokenConstraint
from slm_app.engines.base import Engine, PreparedPrompt
from slm_app.scheduler import Completion, Generation, Publication, QueueFull, SchedulerClosed
from slm_app.service import RETRY_AFTER_S, RequestError
from slm_app.settings import Settings

log = logging.getLogger(__name__)

# How the tier's prompt limit counts tokens when the upstream has no tokenize endpoint.
ESTIMATE = "estimate: UTF-8 bytes + 1 (an upper bound for byte-level BPE and SentencePiece vocabularies)"
DOWN_PROBE_S = 1.0  # probe interval while the upstream is down: recover quickly


# ---- what requests carry ----------------------------------------------------------------------

class ChatPrompt(str):
    """A prompt the upstream should read as chat ``messages`` (it applies the model's template).

    The string value is a plain rendering, used only to count tokens against the tier's limit
    (the upstream's template adds a few tokens on top). ``render_chat``/``format_prompt`` return
    one, the service keeps it as ``PreparedPrompt.text``, and ``submit`` sends its messages."""

    messages: tuple[dict[str, str], ...]

    def __new__(cls, messages: Sequence[dict[str, str]]) -> "ChatPrompt":
        rendered = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        obj = super().__new__(cls, rendered)
        obj.messages = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        return obj


class ByteBound(list):
    """Token "ids" that are the prompt's UTF-8 bytes after a BOS: their count is an upper bound of the
    real token count (see ``ESTIMATE``). ``tokenize`` returns one instead of asking the upstream when
    the bound already proves the prompt fits the tier's limit, which saves a round trip before the
    first token; the exact count is then fetched while the answer streams (usage numbers)."""


# How a structured request asks the upstream for JSON, best first. "plain" asks for nothing.
RESPONSE_FORMATS = ("json_schema", "json_object+schema", "plain")


@dataclass(frozen=True)
class ResponseFormat:
    """The structured-output "constraint" of a remote request: enforced by the upstream (or not at
    all, for "plain"); the output is validated here either way. Passed as ``submit``'s constraint."""

    schema: dict
    kind: str  # one of RESPONSE_FORMATS

    def payload(self) -> dict[str, Any] | None:
        if self.kind == "json_schema":  # OpenAI's, vLLM, llama-server, TGI, Ollama
            return {"type": "json_schema", "json_schema": {"name": "response", "schema": self.schema, "strict": True}}
        if self.kind == "json_object+schema":  # llama-cpp-python's server dialect
            return {"type": "json_object", "schema": self.schema}
        return None


@dataclass(frozen=True)
class RemoteCompletion(Completion):
    """A ``Completion`` that also says whether the upstream refused the request's ``response_format``
    (failures carry their HTTP status in ``Completion.status``, which the service's ``raise_failure`` reads)."""

    format_rejected: bool = False


class UpstreamFailure(Exception):
    def __init__(self, message: str, status: int, retry_after: int | None = None, format_rejected: bool = False):
        super().__init__(message)
        self.message, self.status, self.retry_after, self.format_rejected = message, status, retry_after, format_rejected


def public_url(url: str) -> str:
    """The URL without user, password, query or fragment: safe for Health and logs."""
    u = httpx.URL(url)
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{u.host}{port}{u.path}".rstrip("/")


# ---- one request ------------------------------------------------------------------------------

@dataclass(eq=False)
class _Call:
    """One request to the upstream. It publishes through a ``scheduler.Publication``, so the same
    ``Generation`` handle serves local and remote requests; ``RemoteEngine._cancel`` ends it."""

    path: str
    payload: dict[str, Any]
    prompt_tokens: int
    params: SamplingParams
    seed: int
    constraint: ResponseFormat | None
    deadline: float | None
    on_done: Callable[[Completion], None] | None
    count_text: str | None = None  # prompt_tokens is a ByteBound: count this text upstream meanwhile
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    text: str = ""
    completion_tokens: int = 0
    upstream_finish: str | None = None  # the stream's finish_reason, once it said one
    finish_reason: str | None = None  # set once, when the call ends (the snapshot is then final)
    failure: UpstreamFailure | None = None
    cancelled: bool = False
    task: asyncio.Task | None = None
    # Nothing published yet (version -1), so a reader's first update is the first token or the
    # failure. An HTTP surface then answers an upstream's refusal with its status instead of a 200
    # stream that carries the error.
    pub: Publication = field(default_factory=lambda: Publication(version=-1))

    def completion(self) -> RemoteCompletion:
        now = time.perf_counter()
        f = self.failure
        return RemoteCompletion(
            text=self.text, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            finish_reason=self.finish_reason, seed=self.seed, queued_s=(self.started or now) - self.submitted,
            ttft_s=None if self.first_token is None else self.first_token - self.submitted,
            elapsed_s=now - self.submitted, error=f.message if f else None, status=f.status if f else None,
            retry_after=f.retry_after if f else None, format_rejected=bool(f and f.format_rejected))

    def publish(self) -> None:
        self.pub.publish(self.completion())


# ---- the engine -------------------------------------------------------------------------------

@dataclass
class _Health:
    reachable: bool = False
    reason: str | None = "not contacted yet"
    latency_ms: float | None = None
    checked: float | None = None  # time.time() of the last probe or request outcome
    models: list[str] = field(default_factory=list)
    n_ctx: int = 0


class RemoteEngine(Engine):
    """Requests forwarded to an OpenAI-compatible server; see the module docstring."""

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
        self.parallel, self.queue_size = parallel, queue_size
        self.health_interval_s = health_interval_s
        self.chat_template = chat_template
        self.prompt_token_limit = prompt_token_limit
        self._on_availability = on_availability
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s,
                                      pool=None)  # waiting for a pooled connection is our own queue's job
        self._probe_timeout = httpx.Timeout(connect=connect_timeout_s, read=max(connect_timeout_s, 10.0),
                                            write=connect_timeout_s, pool=connect_timeout_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx's transport retries connection failures only (refused, DNS, connect timeout).
        transport = httpx.AsyncHTTPTransport(retries=retries, limits=httpx.Limits(
            max_connections=parallel + 4, max_keepalive_connections=parallel + 4))
        self._health = _Health()
        self._health_lock = threading.Lock()
        self.tokenizer: str | None = None  # which tokenize endpoint, once found; ESTIMATE if none
        self._tokenize_path: str | None = None
        self.structured_format: str | None = None  # the best RESPONSE_FORMATS entry the upstream took
        self._admitting = True
        self._closed = False
        self._waiting: deque[_Call] = deque()
        self._running: set[_Call] = set()
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
        start = time.perf_counter()
        try:
            response = await self._client.get(f"{self.url}/models", timeout=self._probe_timeout)
            latency = (time.perf_counter() - start) * 1000
            if response.status_code != 200:
                raise UpstreamFailure(f"GET {self.public_url}/models answered {response.status_code}: "
                                      f"{_upstream_message(response.content)}", 502)
            models = [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
            if not models and not self.pinned_model:
                raise UpstreamFailure(f"{self.public_url}/models lists no model; set SLM_REMOTE_MODEL", 502)
            card = next((m for m in response.json()["data"] if m.get("id") == (self.pinned_model or models[0])), {})
        except httpx.ReadTimeout:
            # Connected, but no answer in time: a server that runs one request at a time (llama-cpp-
            # python's) is busy with someone else's. Busy is not down: keep the last verdict.
            log.info("upstream %s slow to answer the probe (busy?)", self.public_url)
            with self._health_lock:
                return self._health.reachable
        except (httpx.HTTPError, UpstreamFailure, ValueError, KeyError, TypeError, AttributeError) as exc:
            self._set_down(_describe(exc, self.public_url))
            return False
        self.model = self.pinned_model or models[0]
        n_ctx = card.get("max_model_len") or (card.get("meta") or {}).get("n_ctx_train") or 0
        with self._health_lock:
            self._health.models, self._health.latency_ms, self._health.n_ctx = models, latency, int(n_ctx or 0)
        if self.tokenizer is None:
            await self._find_tokenizer()
        self._set_up()
        return True

    def _set_up(self) -> None:
        with self._health_lock:
            was = self._health.reachable
            self._health.reachable, self._health.reason, self._health.checked = True, None, time.time()
        if not was:
            log.info("upstream %s reachable (model %s)", self.public_url, self.model)
            if self._on_availability:
                self._on_availability(True)

    def _set_down(self, reason: str) -> None:
        with self._health_lock:
            was = self._health.reachable or self._health.checked is None
            self._health.reachable, self._health.reason, self._health.checked = False, reason, time.time()
        if was:
            log.warning("upstream unavailable: %s", reason)
            if self._on_availability:
                self._on_availability(False)

    async def _probe_loop(self) -> None:
        while not self._closed:
            with self._health_lock:
                up = self._health.reachable
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
        with self._health_lock:
            return None if self._health.reachable else f"upstream {self.public_url} unavailable: {self._health.reason}"

    def health(self) -> dict[str, Any]:
        with self._health_lock:
            h = self._health
            return {"upstream_url": self.public_url, "upstream_model": self.model, "reachable": h.reachable,
                    "upstream_error": h.reason, "upstream_latency_ms": None if h.latency_ms is None
                    else round(h.latency_ms, 1), "upstream_checked": h.checked, "upstream_models": list(h.models),
                    "token_counting": self.tokenizer or "not determined yet (upstream not reached)",
                    "structured_format": self.structured_format or "not determined yet"}

    # ---- tokens --------------------------------------------------------------------------------
    async def _find_tokenizer(self) -> None:
        """The first tokenize endpoint that answers with token ids, else the byte estimate."""
        for path in ("/extras/tokenize", "/tokenize"):
            try:
                tokens = await self._tokenize(path, "Hello")
            except (httpx.HTTPError, UpstreamFailure, ValueError):
                continue
            if tokens:
                self._tokenize_path, self.tokenizer = path, f"upstream POST {path}"
                log.info("counting tokens with the upstream's %s", path)
                return
        self.tokenizer = ESTIMATE
        log.info("the upstream has no tokenize endpoint; counting tokens by %s", ESTIMATE)

    async def _tokenize(self, path: str, text: str) -> list[int]:
        # One body for every dialect: llama-cpp-python reads "input", llama-server "content", vLLM
        # "model" + "prompt", TGI "inputs"; each ignores the others' fields.
        body = {"input": text, "content": text, "prompt": text, "inputs": text, "model": self.model,
                "add_special": True}
        response = await self._client.post(f"{self.root}{path}", json=body)
        if response.status_code != 200:
            raise UpstreamFailure(f"POST {path} answered {response.status_code}", response.status_code)
        data = response.json()
        if isinstance(data, list):  # TGI: [{"id", "text", "start", "stop"}, ...]
            return [t["id"] for t in data if isinstance(t, dict) and isinstance(t.get("id"), int)]
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ValueError(f"POST {path} did not answer with token ids")
        return tokens

    def tokenize(self, text: str) -> list[int]:
        """Token ids from the upstream's tokenizer; a ``ByteBound`` when there is none, or when the
        bound already fits ``prompt_token_limit`` (no round trip: the exact count comes later)."""
        data = text.encode("utf-8")
        if self._tokenize_path is None or (self.prompt_token_limit is not None
                                           and len(data) + 1 <= self.prompt_token_limit):
            return ByteBound([0, *data])
        try:
            return self._run(self._tokenize(self._tokenize_path, text))
        except httpx.ConnectError as exc:
            self._set_down(_describe(exc, self.public_url))
            raise RequestError(f"upstream {self.public_url} unavailable: {_describe(exc, self.public_url)}",
                               status=503, retry_after=RETRY_AFTER_S) from None
        except (httpx.HTTPError, UpstreamFailure, ValueError) as exc:
            raise RequestError(f"counting the prompt's tokens upstream failed: {_describe(exc, self.public_url)}",
                               status=502) from None

    def format_prompt(self, prompt: str, use_chat_template: bool) -> str:
        if use_chat_template and self.chat_template:
            return ChatPrompt([{"role": "user", "content": prompt}])
        return prompt

    def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        # The upstream applies its model's template to the messages themselves.
        return ChatPrompt(messages) if self.chat_template else None

    def llguidance_tokenizer(self) -> Any:
        raise NotImplementedError("a remote engine has no local tokenizer: structured output goes through "
                                  "slm_app.remote.generate_structured_remote")

    @property
    def vocab_width(self) -> int:
        return 0

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        raise NotImplementedError("perplexity needs logits, which OpenAI-compatible servers do not return")

    def info(self) -> ModelInfo:
        with self._health_lock:
            n_ctx = self._health.n_ctx
        model = self.model or "remote"
        return ModelInfo(backend="remote", model_id=model, name=f"{model} (at {self.public_url})", source="remote",
                         reason=f"SLM_BACKEND=remote: requests go to {self.public_url}", chat_template=self.chat_template,
                         n_ctx=n_ctx, n_slots=self.parallel, details=self.health())

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, prompt: PreparedPrompt, params: SamplingParams, constraint: TokenConstraint | None = None,
               timeout_s: float | None = None, on_done: Callable[[Completion], None] | None = None) -> Generation:
        if constraint is not None and not isinstance(constraint, ResponseFormat):
            raise TypeError("a remote engine takes a ResponseFormat, not a token constraint (no local logits)")
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        path, payload = self._payload(prompt.text, params, seed, isinstance(prompt.text, ChatPrompt), constraint)
        exact_later = isinstance(prompt.ids, ByteBound) and self._tokenize_path is not None
        call = _Call(path, payload, len(prompt.ids), params, seed, constraint,
                     None if timeout_s is None else time.perf_counter() + timeout_s, on_done,
                     count_text=str(prompt.text) if exact_later else None)
        call.pub.snapshot = call.completion()
        with self._lock:
            if not self._admitting or self._closed:
                raise SchedulerClosed("the server is shutting down and admits no new requests")
            if len(self._waiting) + len(self._running) >= self.parallel + self.queue_size:
                raise QueueFull(f"busy: {self.queue_size} requests are already waiting for the upstream")
            self._waiting.append(call)
        asyncio.run_coroutine_threadsafe(self._start(call), self._loop)
        return Generation(self._cancel, call, call.pub)

    def _payload(self, text: str, params: SamplingParams, seed: int, chat: bool,
                 constraint: ResponseFormat | None) -> tuple[str, dict[str, Any]]:
        # include_usage: servers that send several tokens per event still report the exact count.
        body: dict[str, Any] = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                                "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, "seed": seed}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k > 0:  # not OpenAI's, but llama-server, llama-cpp-python, vLLM and Ollama read it
            body["top_k"] = params.top_k
        if params.repeat_penalty != 1.0:  # llama.cpp's name and vLLM's
            body["repeat_penalty"] = body["repetition_penalty"] = params.repeat_penalty
        if constraint is not None and (fmt := constraint.payload()) is not None:
            body["response_format"] = fmt
        if chat:
            messages = list(text.messages) if isinstance(text, ChatPrompt) else [{"role": "user", "content": text}]
            return "/chat/completions", {**body, "messages": messages}
        return "/completions", {**body, "prompt": text}

    async def _start(self, call: _Call) -> None:
        call.task = asyncio.current_task()
        if call.cancelled:  # cancelled before its task existed
            self._finish(call, "cancelled")
            return
        self._wake.set()
        await self._serve(call)

    async def _serve(self, call: _Call) -> None:
        try:
            # FIFO: wait while this call is not at the head or every upstream slot is taken.
            while True:
                with self._lock:
                    if self._waiting and self._waiting[0] is call and len(self._running) < self.parallel:
                        self._waiting.popleft()
                        self._running.add(call)
                        break
                self._wake.clear()
                await self._wait_wake(call)
            call.started = time.perf_counter()
            self._wake.set()  # the next in line may fit too
            remaining = None if call.deadline is None else call.deadline - time.perf_counter()
            async with asyncio.timeout(remaining):
                await self._stream(call)
            self._finish(call, call.upstream_finish or "stop")
        except TimeoutError:
            self._finish(call, "timeout")
        except asyncio.CancelledError:
            self._finish(call, "cancelled")
        except UpstreamFailure as exc:
            call.failure = exc
            self._finish(call, "error")
        except httpx.HTTPError as exc:
            call.failure = _failure(exc, self.public_url)
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                self._set_down(_describe(exc, self.public_url))
            self._finish(call, "error")
        except Exception as exc:  # a bug costs this request, never the engine
            log.exception("remote request failed")
            call.failure = UpstreamFailure(f"{type(exc).__name__}: {exc}", 500)
            self._finish(call, "error")

    async def _wait_wake(self, call: _Call) -> None:
        timeout = None if call.deadline is None else max(0.0, call.deadline - time.perf_counter())
        async with asyncio.timeout(timeout):
            await self._wake.wait()

    async def _stream(self, call: _Call) -> None:
        """POST with ``stream: true`` and fold the server-sent events into the call's text."""
        url = f"{self.url}{call.path}"
        async with aconnect_sse(self._client, "POST", url, json=call.payload) as source:
            response = source.response
            if response.status_code != 200:
                raise _http_failure(response, await response.aread(), call.constraint is not None)
            self._set_up()
            usage_tokens = usage_prompt = count_task = None
            try:
                async for event in source.aiter_sse():
                    if event.data.strip() == "[DONE]":
                        break
                    if not event.data.strip():
                        continue
                    chunk = json.loads(event.data)
                    if not isinstance(chunk, dict):
                        raise UpstreamFailure(f"the upstream sent an event that is not an object: {event.data[:100]}", 502)
                    if chunk.get("error"):
                        error = chunk["error"]
                        message = error.get("message") if isinstance(error, dict) else str(error)
                        raise UpstreamFailure(f"the upstream failed mid-stream: {message}", 502)
                    if isinstance(usage := chunk.get("usage"), dict):
                        if usage.get("completion_tokens") is not None:
                            usage_tokens = int(usage["completion_tokens"])
                        if usage.get("prompt_tokens") is not None:
                            usage_prompt = int(usage["prompt_tokens"])
                    grew = False
                    for choice in chunk.get("choices") or ():
                        piece = choice.get("text")
                        if piece is None:
                            piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            call.text += piece
                            grew = True
                        if choice.get("finish_reason"):
                            call.upstream_finish = "length" if choice["finish_reason"] == "length" else "stop"
                    if grew:
                        # One event is one token on llama.cpp's servers; servers that send several per
                        # event report the exact count in the final usage chunk (stream_options).
                        call.completion_tokens += 1
                        if call.first_token is None:
                            call.first_token = time.perf_counter()
                            if call.count_text is not None:  # now, off the path to the first token
                                count_task = asyncio.create_task(self._tokenize(self._tokenize_path, call.count_text))
                        call.publish()
                if usage_prompt is not None:
                    call.prompt_tokens = usage_prompt
                elif count_task is not None:
                    try:
                        call.prompt_tokens = len(await count_task)
                    except (httpx.HTTPError, UpstreamFailure, ValueError) as exc:  # keep the upper bound
                        log.warning("counting the prompt's tokens upstream failed: %s", exc)
            except SSEError as exc:
                raise UpstreamFailure(f"the upstream did not answer with server-sent events: {exc}", 502) from None
            except json.JSONDecodeError as exc:
                raise UpstreamFailure(f"the upstream sent an event that is not JSON: {exc}", 502) from None
            finally:
                if count_task is not None and not count_task.done():
                    count_task.cancel()
            if usage_tokens is not None:
                call.completion_tokens = usage_tokens
            if call.upstream_finish is None:
                raise UpstreamFailure("the upstream ended the stream without a finish_reason (interrupted by "
                                      "another request? llama-cpp-python's server needs --interrupt_requests False)",
                                      502)

    def _finish(self, call: _Call, reason: str) -> None:
        with self._lock:
            if call.finish_reason is not None:
                return
            call.finish_reason = reason
            self._running.discard(call)
            if call in self._waiting:
                self._waiting.remove(call)
        self._loop.call_soon_threadsafe(self._wake.set)
        call.publish()
        if call.on_done is not None:
            try:
                call.on_done(call.pub.snapshot)
            except Exception:  # bookkeeping must not break serving
                log.exception("on_done callback failed")

    def _cancel(self, call: _Call) -> None:
        """``Generation.cancel()``: ends the call's task, which closes its upstream response."""
        call.cancelled = True
        task = call.task
        if task is not None and not task.done():
            self._loop.call_soon_threadsafe(task.cancel)

    # ---- lifecycle -------------------------------------------------------------------------------
    def load(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": len(self._waiting), "running": len(self._running), "slots": self.parallel}

    def stop_admitting(self) -> None:
        with self._lock:
            self._admitting = False

    def drain(self, timeout_s: float) -> bool:
        self.stop_admitting()
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            with self._lock:
                if not self._waiting and not self._running:
                    return True
            time.sleep(0.02)
        with self._lock:
            calls = list(self._waiting) + list(self._running)
        for call in calls:
            self._cancel(call)
        return False

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


# ---- errors -------------------------------------------------------------------------------------

def _upstream_message(body: bytes) -> str:
    """The upstream's own error message (OpenAI's {"error": {"message"}}, TGI's {"error": str},
    FastAPI's {"detail"}), cut short."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:300] or "(no body)"
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error).strip()[:300]
    return str(data)[:300]


def _retry_after(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after")
    try:
        return max(0, int(float(value))) if value is not None else None
    except ValueError:
        return RETRY_AFTER_S  # an HTTP date: rare; a small fixed wait is a fair reading of it


def _http_failure(response: httpx.Response, body: bytes, asked_format: bool) -> UpstreamFailure:
    status, message = response.status_code, _upstream_message(body)
    where = f"the upstream answered {status}: {message}"
    # A refused response_format: a 4xx about the request, or (llama-cpp-python) a 500 that names it.
    format_rejected = asked_format and (status in (400, 422) or "response_format" in message)
    if status in (429, 503):  # busy or not ready upstream: the caller should retry, as told
        return UpstreamFailure(where, status, _retry_after(response) or RETRY_AFTER_S)
    if status in (401, 403):
        return UpstreamFailure(f"the upstream refused our credentials ({status}): check SLM_REMOTE_API_KEY", 502)
    if status == 404:
        return UpstreamFailure(f"{where} (is SLM_REMOTE_URL the /v1 base and the model served?)", 502)
    if status in (400, 413, 422) and not format_rejected:
        # The request passed our limits but not the upstream's (e.g. its context length): the caller's.
        return UpstreamFailure(where, 413 if status == 413 else 400)
    return UpstreamFailure(where, 502, format_rejected=format_rejected)


def _describe(exc: BaseException, url: str) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection to {url} within the connect timeout"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {url} ({exc or 'connection refused'})"
    if isinstance(exc, httpx.ReadTimeout):
        return f"{url} sent nothing within the read timeout"
    if isinstance(exc, UpstreamFailure):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _failure(exc: httpx.HTTPError, url: str) -> UpstreamFailure:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return UpstreamFailure(f"upstream {url} unavailable: {_describe(exc, url)}", 503, RETRY_AFTER_S)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamFailure(_describe(exc, url), 504)
    return UpstreamFailure(f"the connection to {url} failed: {_describe(exc, url)}", 502)


# ---- structured output --------------------------------------------------------------------------

_PROMPT = "{prompt}\n\nAnswer with one JSON value only, valid against this JSON Schema:\n{schema}\nJSON:\n"
_PROMPT_NO_SCHEMA = "{prompt}\n\nAnswer with one JSON value only.\nJSON:\n"


def _json_candidates(text: str) -> list[str]:
    """The output as is, then the first JSON value inside it (plain generation may wrap the JSON in
    prose or a Markdown fence). Each candidate is still judged by ``validate_output``."""
    out = [text.strip()]
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if starts:
        try:
            _, end = json.JSONDecoder().raw_decode(text, min(starts))
            out.append(text[min(starts):end])
        except ValueError:
            pass
    return out


def generate_structured_remote(service: Any, engine: RemoteEngine, prompt: str, schema_text: str,
                               params: SamplingParams, cancel: threading.Event | None = None,
                               attempts: int = 3, rendered: bool = False) -> dict[str, Any]:
    """``structured.generate_structured`` for a remote engine: the upstream's ``response_format``
    when it takes one (tried best first, the one that worked remembered), else plain generation;
    success only for output ``structured.validate_output`` accepts. Retries like the local engine:
    up to ``attempts`` with the next seed when sampling, once when greedy. Raises
    ``structured.SchemaError`` for a refused schema. ``rendered``: ``prompt`` is final (a conversation
    from ``render_conversation`` that already says what to answer): sent as is, no instruction added."""
    from slm_app.structured import constraint as structured

    start = time.perf_counter()
    schema = structured.parse_schema(schema_text, service.limits)
    shown = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)

    def with_instruction(template: str) -> str:
        if isinstance(prompt, ChatPrompt) and prompt.messages:  # a conversation (OpenAI chat route): keep
            *head, last = prompt.messages                       # its turns, instruct in the last one
            return ChatPrompt([*head, {**last, "content": template.format(prompt=last["content"], schema=shown)}])
        return engine.format_prompt(template.format(prompt=prompt, schema=shown), True)

    text = prompt if rendered else with_instruction(_PROMPT)
    ids = engine.tokenize(text)
    if len(ids) > service.limits.max_prompt_tokens and not rendered:
        text = with_instruction(_PROMPT_NO_SCHEMA)  # the upstream's format (if any) still carries the schema
        ids = engine.tokenize(text)
    prepared = PreparedPrompt(text, ids)
    formats = list(RESPONSE_FORMATS[RESPONSE_FORMATS.index(engine.structured_format or RESPONSE_FORMATS[0]):])
    tries = max(1, attempts) if params.temperature > 0 else 1
    tokens, raw, data, error, attempt = 0, "", None, "no attempt was made", 0
    while attempt < tries:
        kind = formats[0]
        seed = None if params.seed is None else params.seed + attempt
        attempt_params = SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                        top_p=params.top_p, top_k=params.top_k, seed=seed)
        generation = service.start("structured", prepared, attempt_params, ResponseFormat(schema, kind))
        final = generation.snapshot()
        for final in generation.updates():
            if cancel is not None and cancel.is_set():
                generation.cancel()
        if isinstance(final, RemoteCompletion) and final.format_rejected and len(formats) > 1:
            log.info("upstream refused response_format %s (%s); trying %s", kind, final.error, formats[1])
            formats.pop(0)
            continue  # not an attempt: the upstream never generated
        service.raise_failure(final)
        if final.finish_reason == "cancelled":
            raise RequestError("cancelled", status=499)
        engine.structured_format = kind
        attempt += 1
        tokens += final.completion_tokens
        raw = final.text
        for candidate in _json_candidates(raw):
            data, error = structured.validate_output(candidate, schema)
            if error is None:
                break
        if error is not None and final.finish_reason == "length":
            data, error = None, f"truncated at {final.completion_tokens} tokens before the JSON was complete ({error})"
        if error is None:
            break
    return {"success": error is None, "data": data, "error": error,
            # "relaxed": the schema was not enforced as given while generating (only validated after).
            "relaxed": formats[0] != "json_schema", "model_used": engine.info().model_id,
            "inference_time_ms": round((time.perf_counter() - start) * 1000, 1), "tokens": tokens,
            "raw_text": raw, "upstream_format": formats[0]}
