"""The one place requests meet the model: tier limits, submission to the engine, metrics, memory
and the engine's lifecycle.

Every surface (Gradio tabs, REST, OpenAI routes, MCP) calls this module, so a limit is enforced once
for every caller, and a bad request raises ``errors.RequestError`` with a message that names the
field, and an HTTP status the HTTP surfaces reuse (engines' own errors are mapped by ``errors``).
Every generation, structured output included, goes through ``GenerationService.start``: one path for
metrics, time to first token, timeouts and cancellation. The service runs on any ``Engine`` and asks
its capabilities, never its type.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from prometheus_client import Gauge

from slm_app import memory, structured
from slm_app.memory_fit import check_fit
from slm_app.backends.base import BackendUnavailable, SamplingParams
from slm_app.engines import load_engine
from slm_app.engines.base import Engine, ModelPrompt, PreparedPrompt
from slm_app.errors import (
    RETRY_AFTER_S, EngineError, Failure, QueueFull, RequestError, SchedulerClosed, raise_failure, request_error,
)
from slm_app.metrics import Metrics
from slm_app.scheduler import Completion, Generation
from slm_app.settings import ResolvedTier, Settings, resolve_tier

log = logging.getLogger(__name__)


def as_number(name: str, value: Any, *, integer: bool = False) -> float | int:
    """Coerce an API value (which may arrive as a string or junk) or say what was wrong."""
    if isinstance(value, bool) or value is None or value == "":
        raise RequestError(f"{name} must be a number, got {value!r}", param=name)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"{name} must be a number, got {str(value)[:40]!r}", param=name) from None
    if not math.isfinite(number):
        raise RequestError(f"{name} must be a finite number, got {value!r}", param=name)
    if integer:
        if number != int(number):
            raise RequestError(f"{name} must be a whole number, got {value!r}", param=name)
        return int(number)
    return number


def check_text(name: str, value: str) -> str:
    """Refuse text no tokenizer should see: a NUL character, or a lone UTF-16 surrogate (JSON's
    ``"\\ud800"`` decodes to one; it cannot be encoded as UTF-8, so a tokenizer would fail on it)."""
    if "\x00" in value:
        raise RequestError(f"{name} contains a NUL character (\\x00) at position {value.index(chr(0))}", param=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{name} is not valid Unicode: lone surrogate {value[exc.start]!r} at position "
                           f"{exc.start}", param=name) from None
    return value


def split_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A batch arrives as one prompt per line (Gradio) or a list (REST); blank lines are skipped."""
    if isinstance(prompts, str):
        items = prompts.splitlines()
    elif isinstance(prompts, (list, tuple)):
        items = list(prompts)
    else:
        raise RequestError(f"prompts must be text or a list of strings, got {type(prompts).__name__}", param="prompts")
    if not all(isinstance(p, str) for p in items):
        raise RequestError("every prompt must be a string", param="prompts")
    return [p for p in items if p.strip()]


_OUTCOMES = {"stop": "ok", "length": "ok", "cancelled": "cancelled", "timeout": "timeout", "error": "error"}


class GenerationService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.tier: ResolvedTier = resolve_tier(settings)
        self.limits = self.tier.limits
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.status = "loading"
        self.load_error: str | None = None
        self.load_thread: threading.Thread | None = None
        self.draining = False
        self.memory_fit = check_fit(self.tier, settings)  # raises MemoryDoesNotFit: refuse before loading
        self.memory_guard = memory.MemoryGuard(settings.memory_guard_mb, settings.memory_guard_percent,
                                               usable_mb=self.memory_fit.usable_mb)
        # Called with the engine once it has loaded (before requests see it), and for extra Health
        # fields: how optional parts (slm_app.finetune) join without this module knowing them.
        self.load_hooks: list[Callable[[Engine], None]] = []
        self.health_hooks: list[Callable[[], dict[str, Any]]] = []
        guard = self.memory_guard
        Gauge("slm_memory_guard_refusing", "1 while the memory guard refuses new requests",
              registry=self.metrics.registry).set_function(lambda: float(guard.refusal() is not None))
        self.metrics.watch_prompt_cache(lambda: self.engine.prompt_cache() if self.engine is not None else None)
        if guard.limit_mb is not None:
            Gauge("slm_memory_guard_limit_bytes", "RSS at which the memory guard refuses new requests",
                  registry=self.metrics.registry).set(guard.limit_mb * 1024 * 1024)
        log.info("tier %s (%s), backend %s, model %s, %d slots", self.tier.tier.value, self.tier.reason,
                 self.tier.backend, self.tier.model, self.tier.parallel)

    # ---- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Load the engine. Failures are kept and reported, never raised: the app serves on."""
        try:
            self.engine = load_engine(self.settings, self.tier,
                                      on_availability=lambda up: self.metrics.model_loaded.set(int(up)))
            for hook in self.load_hooks:
                hook(self.engine)
            self.status = "ok"
            self.metrics.model_loaded.set(0 if self.engine.unavailable_reason() else 1)
        except Exception as exc:  # any failure to load is reported on /health, not fatal
            self.load_error = str(exc) if isinstance(exc, BackendUnavailable) else f"{type(exc).__name__}: {exc}"
            self.status = "error"
            log.error("model not loaded: %s", self.load_error)
        finally:
            self.metrics.sample_memory()

    def start_loading(self) -> threading.Thread:
        self.load_thread = threading.Thread(target=self.load, name="model-load", daemon=True)
        self.load_thread.start()
        return self.load_thread

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        if self.load_thread is not None:
            self.load_thread.join(timeout)
        return self.status == "ok"

    def ready(self) -> Engine:
        if self.draining:
            raise RequestError("the server is shutting down and admits no new requests", status=503,
                               retry_after=RETRY_AFTER_S)
        if self.status == "loading":
            raise RequestError("the model is still loading; retry in a few seconds", status=503,
                               retry_after=RETRY_AFTER_S)
        engine = self.engine
        if engine is None:
            raise RequestError(f"model not loaded: {self.load_error}", status=503)
        if (why := engine.unavailable_reason()) is not None:  # a remote upstream that is down
            raise RequestError(f"model not available: {why}", status=503, retry_after=RETRY_AFTER_S)
        return engine

    def drain(self, timeout_s: float) -> bool:
        """Graceful shutdown: refuse new work (503), let running and waiting generations finish for up
        to ``timeout_s``, cancel the rest. True when everything finished by itself."""
        self.draining = True
        engine = self.engine
        finished = engine.drain(timeout_s) if engine is not None else True
        log.info("drained: %s", "every request finished" if finished else f"cancelled what was left after {timeout_s} s")
        return finished

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
        self.status = "closed"
        self.metrics.model_loaded.set(0)

    # ---- validation ------------------------------------------------------------------------
    def check_prompt(self, prompt: Any, use_chat_template: bool = True, *, param: str = "prompt") -> PreparedPrompt:
        """Check a prompt against the tier's limits and tokenize it as the model will see it.

        A ``ModelPrompt`` is already in the model's format (a conversation rendered by
        ``conversation.render``), so it is counted as is, not wrapped again."""
        lim, tier = self.limits, self.tier.tier.value
        formatted = prompt if isinstance(prompt, ModelPrompt) else None
        text = formatted.text if formatted is not None else prompt
        if not isinstance(text, str):
            raise RequestError(f"{param} must be a string, got {type(prompt).__name__}", param=param)
        check_text(param, text)
        if not text.strip():
            raise RequestError(f"{param} is empty: type some text to continue", param=param)
        if len(text) > lim.max_prompt_chars:
            raise RequestError(f"{param} is {len(text):,} characters; the {tier} tier allows at most "
                               f"{lim.max_prompt_chars:,}", status=413, param=param)
        engine = self.ready()
        prepared = self.prepare(formatted or engine.format_prompt(text, use_chat_template))
        if prepared.n_tokens > lim.max_prompt_tokens:
            raise RequestError(f"{param} is {prepared.n_tokens:,} tokens; the {tier} tier allows at most "
                               f"{lim.max_prompt_tokens:,}", status=413, param=param)
        return prepared

    def prepare(self, prompt: ModelPrompt) -> PreparedPrompt:
        """The engine's tokens (or count) for a prompt in its format; engine failures as request errors."""
        try:
            return self.ready().prepare(prompt)
        except EngineError as exc:
            raise request_error(exc) from None

    def check_prompts(self, prompts: str | Sequence[str], use_chat_template: bool = True) -> list[PreparedPrompt]:
        items = split_prompts(prompts)
        if not items:
            raise RequestError("no prompts: give at least one non-blank line", param="prompts")
        if len(items) > self.limits.max_prompts:
            raise RequestError(f"{len(items)} prompts; the {self.tier.tier.value} tier allows at most "
                               f"{self.limits.max_prompts} per request", status=413, param="prompts")
        return [self.check_prompt(p, use_chat_template, param="prompts" if len(items) == 1 else f"prompts[{i}]")
                for i, p in enumerate(items)]

    def sampling(self, max_new_tokens: Any, temperature: Any = 0.8, top_p: Any = 1.0, top_k: Any = 0,
                 seed: Any = None, stop: Sequence[str] | str | None = None, repeat_penalty: Any = 1.0,
                 use_chat_template: bool = True, cap: int | None = None) -> SamplingParams:
        lim = self.limits
        cap = cap or lim.max_new_tokens
        n = as_number("max_new_tokens", max_new_tokens, integer=True)
        if not 1 <= n <= cap:
            raise RequestError(f"max_new_tokens must be between 1 and {cap} on the "
                               f"{self.tier.tier.value} tier, got {n}", param="max_new_tokens")
        t = as_number("temperature", temperature)
        if not lim.min_temperature <= t <= lim.max_temperature:
            raise RequestError(f"temperature must be between {lim.min_temperature} and {lim.max_temperature}, "
                               f"got {t}", param="temperature")
        if 0 < t < 1e-4:
            t = 0.0  # logits / 1e-320 overflow to inf; a temperature this small is greedy decoding anyway
        p = as_number("top_p", top_p)
        if not 0 < p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {p}", param="top_p")
        k = as_number("top_k", top_k, integer=True)
        if k < 0:
            raise RequestError(f"top_k must be 0 (off) or positive, got {k}", param="top_k")
        rp = as_number("repeat_penalty", repeat_penalty)
        if not 0.5 <= rp <= 2.0:
            raise RequestError(f"repeat_penalty must be between 0.5 and 2.0, got {rp}", param="repeat_penalty")
        s = None if seed is None or seed == "" or seed == -1 else as_number("seed", seed, integer=True)
        if s is not None and not 0 <= s < 2**32:
            raise RequestError(f"seed must be between 0 and 2**32-1 (or -1 / empty for random), got {s}",
                               param="seed")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > 4 or any(not isinstance(x, str) or len(x) > 64 for x in stops):
            raise RequestError("stop takes at most 4 strings of at most 64 characters", param="stop")
        for x in stops:
            check_text("stop", x)
        return SamplingParams(max_new_tokens=n, temperature=t, top_p=p, top_k=k, seed=s,
                              stop=tuple(x for x in stops if x), repeat_penalty=rp,
                              use_chat_template=bool(use_chat_template))

    # ---- running requests ------------------------------------------------------------------
    def start(self, endpoint: str, prompt: PreparedPrompt, params: SamplingParams, constraint: Any = None
              ) -> Generation:
        """Submit one generation; every surface's generations go through here (metrics, limits, TTFT)."""
        engine = self.ready()
        if (refusal := self.memory_guard.refusal()) is not None:
            self.metrics.record(endpoint, "memory_guard", 0)
            raise RequestError(refusal, status=503, retry_after=RETRY_AFTER_S)
        try:
            return engine.submit(prompt, params, constraint, timeout_s=self.settings.request_timeout_s,
                                 on_done=lambda final: self._finished(endpoint, final))
        except EngineError as exc:
            if isinstance(exc, (QueueFull, SchedulerClosed)):
                self.metrics.record(endpoint, "busy" if isinstance(exc, QueueFull) else "shutting_down", 0)
            raise request_error(exc) from None

    def start_many(self, endpoint: str, prompts: Sequence[PreparedPrompt], params: SamplingParams
                   ) -> list[Generation]:
        """All or nothing: if the waiting line cannot take every prompt, none of them runs."""
        started: list[Generation] = []
        try:
            for prompt in prompts:
                started.append(self.start(endpoint, prompt, params))
        except RequestError:
            for generation in started:
                generation.cancel()
            raise
        return started

    def _finished(self, endpoint: str, final: Completion) -> None:
        outcome = _OUTCOMES.get(final.finish_reason or "error", "error")
        self.metrics.record(endpoint, outcome, final.elapsed_s, final.completion_tokens, final.ttft_s)
        if final.cached_tokens is not None:
            self.metrics.record_prompt(endpoint, final.prompt_tokens, final.cached_tokens)
        if self.tier.profile.aggressive_gc and self.engine is not None and self.engine.occupancy().running == 0:
            gc.collect()  # free tier: between requests, when nothing is decoding
        self.metrics.sample_memory()

    def generate_stream(self, prompt: Any, max_new_tokens: Any, temperature: Any = 0.8, top_p: Any = 1.0,
                        seed: Any = None, **extra: Any) -> Iterator[str]:
        """Streaming single-prompt generation: yields the text generated so far whenever it grows."""
        params = self.sampling(max_new_tokens, temperature, top_p, seed=seed, **extra)
        prepared = self.check_prompt(prompt, params.use_chat_template)
        yield from self.stream_text("generate", prepared, params)

    def stream_text(self, endpoint: str, prepared: PreparedPrompt, params: SamplingParams, *,
                    answer: bool = False) -> Iterator[str]:
        """Start a generation and yield its text whenever it grows (at least once); a failure raises.
        ``answer``: an assistant's answer, without the space or newline templates and transcripts
        leave before it."""
        last = None
        for snap in self.start(endpoint, prepared, params).updates():
            raise_failure(snap)
            text = snap.text.lstrip() if answer else snap.text
            if text != last:
                last = text
                yield text
        if last is None:
            yield ""

    def batch(self, prompts: str | Sequence[str], max_new_tokens: Any, temperature: Any = 0.8,
              **extra: Any) -> list[Completion]:
        """Each prompt is its own request on the shared slots; results come back in order."""
        params = self.sampling(max_new_tokens, temperature, **extra)
        prepared = self.check_prompts(prompts, params.use_chat_template)
        generations = self.start_many("batch", prepared, params)
        try:
            results = [g.result() for g in generations]
        finally:
            for g in generations:
                g.cancel()  # a no-op for finished ones; frees the slots if we were interrupted
        for final in results:
            raise_failure(final)
        return results

    def structured(self, prompt: str | ModelPrompt, schema_text: Any, max_new_tokens: Any, temperature: Any = 0.0,
                   seed: Any = None, cancel: threading.Event | None = None) -> dict[str, Any]:
        """``structured_result`` as the API's JSON object (the Structured tab, MCP, tests)."""
        return self.structured_result(prompt, schema_text, max_new_tokens, temperature, seed, cancel).to_api()

    def structured_result(self, prompt: str | ModelPrompt, schema_text: Any, max_new_tokens: Any,
                          temperature: Any = 0.0, seed: Any = None, cancel: threading.Event | None = None, *,
                          rendered: bool = False) -> structured.StructuredResult:
        """JSON valid against ``schema_text``, through ``structured.generate_structured`` on this
        service's engine (which decides how the schema is honoured).

        A ``ModelPrompt`` prompt is a conversation in the model's format (``conversation.render``);
        the instruction goes into its last message when it has messages. ``rendered``: the prompt
        already says what to answer (tool calling builds it so): used as is, no instruction added."""
        if not isinstance(schema_text, str):
            raise RequestError("schema must be JSON text", param="schema")
        check_text("schema", schema_text)
        params = self.sampling(max_new_tokens, temperature, seed=seed, cap=self.limits.max_structured_tokens)
        self.check_prompt(prompt)
        base = prompt if isinstance(prompt, ModelPrompt) else None
        text = prompt if base is None else base.text
        if base is not None and base.messages and not rendered:
            text = base.messages[-1]["content"]
        start = time.perf_counter()
        try:
            result = structured.generate_structured(
                ServiceRunner(self, cancel, base=base, rendered=rendered), text, schema_text, limits=self.limits,
                max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=params.seed,
                instruct=not rendered)
        except structured.SchemaError as exc:
            self.metrics.record("structured_result", "bad_schema", time.perf_counter() - start)
            raise RequestError(f"schema: {exc}", param="schema") from None
        self.metrics.record("structured_result", "ok" if result.success else "invalid_output",
                            time.perf_counter() - start)
        return result

    def model_id(self) -> str:
        """The model being served (or, before it loads, the one configured)."""
        engine = self.engine
        return engine.info().model_id if engine is not None else self.tier.model

    # ---- health ----------------------------------------------------------------------------
    def collect_garbage(self) -> dict[str, float]:
        report = memory.collect_garbage()
        self.metrics.sample_memory()
        return report

    def health(self) -> dict[str, Any]:
        self.metrics.sample_memory()
        rss = memory.rss_mb()
        usable = memory.usable_memory_mb(self.settings.memory_limit_mb)
        engine = self.engine
        info = engine.info() if engine is not None else None
        # A remote engine is loaded but may be unable to serve (upstream down): say so, and why.
        unavailable = engine.unavailable_reason() if engine is not None else None
        return {
            "status": "draining" if self.draining else "unavailable" if unavailable else self.status,
            "model_loaded": engine is not None and unavailable is None,
            "reason": self.load_error or unavailable,
            "tier": self.tier.tier.value,
            "tier_reason": self.tier.reason,
            "backend": self.tier.backend,
            "model": info.model_id if info else self.tier.model,
            "model_info": info.to_dict() if info else None,
            "limits": self.limits.model_dump(),
            "slots": engine.occupancy().to_dict() if engine is not None else None,
            "prompt_cache": engine.prompt_cache() if engine is not None else None,
            "memory_usage": {"rss_mb": round(rss, 1), "usable_mb": round(usable, 1),
                             "percent_of_usable": round(100 * rss / usable, 1)},
            "rss_mb": round(rss, 1),
            "memory_guard": self.memory_guard.status(),
            "memory_fit": self.memory_fit.to_dict(),
            "system_memory_mb": memory.system_memory_mb(),
            **self.metrics.summary(),
            **{k: v for hook in self.health_hooks for k, v in hook().items()},
        }


class ServiceRunner:
    """What structured output needs from the engine, through the service's run path
    (``slm_app.structured.StructuredRunner``); ``cancel`` set ends the running attempt.

    Texts from the structured path become prompts in the engine's format: the user turn of the chat
    template; with ``base`` (a conversation with messages), its last message; ``rendered``: ``base``
    itself, as is."""

    def __init__(self, service: GenerationService, cancel: threading.Event | None = None,
                 base: ModelPrompt | None = None, rendered: bool = False):
        self._service, self._cancel, self._base, self._rendered = service, cancel, base, rendered
        self._engine = service.ready()
        info = self._engine.info()
        # 0: a model that does not say (a remote one): its server enforces its own context.
        self.model_id, self.max_sequence_tokens = info.model_id, info.n_ctx or 1 << 30

    def schema_plan(self, schema: dict, budget: int, steer: bool = True) -> structured.SchemaPlan:
        return self._engine.schema_plan(schema, budget, steer)

    def _model_prompt(self, text: str) -> ModelPrompt:
        base = self._base
        if base is not None and self._rendered:
            return base if text == base.text else ModelPrompt(text)
        if base is not None and base.messages:
            return base.with_last_content(text)
        return self._engine.format_prompt(text, True)

    def count_tokens(self, text: str) -> int:
        return self._service.prepare(self._model_prompt(text)).n_tokens

    def generate(self, prompts: Sequence[str], params: SamplingParams, constraints: Sequence[Any]) -> list[Completion]:
        out = []
        for prompt, constraint in zip(prompts, constraints):
            prepared = self._service.prepare(self._model_prompt(prompt))
            generation = self._service.start("structured", prepared, params, constraint)
            final = generation.snapshot()
            for final in generation.updates():
                if self._cancel is not None and self._cancel.is_set():
                    generation.cancel()
            if final.failure is not Failure.FORMAT_REJECTED:  # the plan may ask another way
                raise_failure(final)
            if final.finish_reason == "cancelled":
                raise RequestError("cancelled", status=499)
            out.append(final)
        return out
