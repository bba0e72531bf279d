"""The one place requests meet the model: validation against tier limits, admission,
metrics, garbage collection, and the backend's lifecycle.

Every surface (Gradio tabs, REST, OpenAI routes) calls this module, so a limit is
enforced once for every caller, and a bad request raises ``RequestError`` with a
message that names the limit and an HTTP status the HTTP surfaces reuse.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from slm_app import memory
from slm_app.backends.base import Backend, BackendUnavailable, GeneratedSequence, SamplingParams, TokenConstraint
from slm_app.metrics import Metrics
from slm_app.settings import ResolvedTier, Settings, llama_cpp_installed, resolve_tier

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status the REST surfaces answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def as_number(name: str, value: Any, *, integer: bool = False) -> float | int:
    """Coerce an API value (which may arrive as a string or junk) or say what was wrong."""
    if isinstance(value, bool) or value is None or value == "":
        raise RequestError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    if integer:
        if number != int(number):
            raise RequestError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return number


def split_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A batch arrives as one prompt per line (Gradio) or a list (REST); blank lines are skipped."""
    if isinstance(prompts, str):
        items = prompts.splitlines()
    elif isinstance(prompts, (list, tuple)):
        items = list(prompts)
    else:
        raise RequestError(f"prompts must be text or a list of strings, got {type(prompts).__name__}")
    if not all(isinstance(p, str) for p in items):
        raise RequestError("every prompt must be a string")
    return [p for p in items if p.strip()]


class GenerationService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.tier: ResolvedTier = resolve_tier(settings)
        self.limits = self.tier.limits
        self.metrics = Metrics()
        self.backend: Backend | None = None
        self.status = "loading"
        self.load_error: str | None = None
        self.load_thread: threading.Thread | None = None
        self._admission = threading.Semaphore(settings.queue_size)
        log.info("tier %s (%s), model %s", self.tier.tier.value, self.tier.reason, self.tier.model)

    # ---- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Load the tier's backend. Failures are kept and reported, never raised: the app serves on."""
        profile = self.tier.profile
        try:
            if profile.backend == "llama.cpp":
                if not llama_cpp_installed():
                    raise BackendUnavailable(
                        "the pro tier needs llama-cpp-python, which is not installed here "
                        "(./setup.sh builds it; setup_lightweight.sh and a Space's requirements.txt do not)")
                from slm_app.backends.llama_cpp_backend import LlamaCppBackend as backend_cls
            else:
                from slm_app.backends.tf_gpt2 import TFGPT2Backend as backend_cls
            self.backend = backend_cls.load(profile, self.settings, self.tier.model)
            self.status = "ok"
            self.metrics.model_loaded.set(1)
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

    def ready_backend(self) -> Backend:
        if self.status == "loading":
            raise RequestError("the model is still loading; retry in a few seconds", status=503)
        if self.backend is None:
            raise RequestError(f"model not loaded: {self.load_error}", status=503)
        return self.backend

    # ---- validation ------------------------------------------------------------------------
    def check_prompt(self, prompt: Any, backend: Backend) -> str:
        lim = self.limits
        if not isinstance(prompt, str):
            raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise RequestError("prompt is empty: type some text to continue")
        if len(prompt) > lim.max_prompt_chars:
            raise RequestError(f"prompt is {len(prompt):,} characters; the {self.tier.tier.value} tier allows "
                               f"at most {lim.max_prompt_chars:,}", status=413)
        n = backend.count_tokens(prompt)
        if n > lim.max_prompt_tokens:
            raise RequestError(f"prompt is {n:,} tokens; the {self.tier.tier.value} tier allows at most "
                               f"{lim.max_prompt_tokens:,}", status=413)
        return prompt

    def check_prompts(self, prompts: str | Sequence[str], backend: Backend) -> list[str]:
        items = split_prompts(prompts)
        if not items:
            raise RequestError("no prompts: give at least one non-blank line")
        if len(items) > self.limits.max_prompts:
            raise RequestError(f"{len(items)} prompts; the {self.tier.tier.value} tier allows at most "
                               f"{self.limits.max_prompts} per request", status=413)
        return [self.check_prompt(p, backend) for p in items]

    def sampling(self, max_new_tokens: Any, temperature: Any = 0.8, top_p: Any = 1.0, top_k: Any = 0,
                 seed: Any = None, stop: Sequence[str] | str | None = None, repeat_penalty: Any = 1.0,
                 use_chat_template: bool = True, cap: int | None = None) -> SamplingParams:
        lim = self.limits
        cap = cap or lim.max_new_tokens
        n = as_number("max_new_tokens", max_new_tokens, integer=True)
        if not 1 <= n <= cap:
            raise RequestError(f"max_new_tokens must be between 1 and {cap} on the "
                               f"{self.tier.tier.value} tier, got {n}")
        t = as_number("temperature", temperature)
        if not lim.min_temperature <= t <= lim.max_temperature:
            raise RequestError(f"temperature must be between {lim.min_temperature} and {lim.max_temperature}, got {t}")
        p = as_number("top_p", top_p)
        if not 0 < p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {p}")
        k = as_number("top_k", top_k, integer=True)
        if k < 0:
            raise RequestError(f"top_k must be 0 (off) or positive, got {k}")
        rp = as_number("repeat_penalty", repeat_penalty)
        if not 0.5 <= rp <= 2.0:
            raise RequestError(f"repeat_penalty must be between 0.5 and 2.0, got {rp}")
        s = None if seed is None or seed == "" or seed == -1 else as_number("seed", seed, integer=True)
        if s is not None and not 0 <= s < 2**32:
            raise RequestError(f"seed must be between 0 and 2**32-1 (or -1 / empty for random), got {s}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > 4 or any(not isinstance(x, str) or len(x) > 64 for x in stops):
            raise RequestError("stop takes at most 4 strings of at most 64 characters")
        return SamplingParams(max_new_tokens=n, temperature=t, top_p=p, top_k=k, seed=s,
                              stop=tuple(x for x in stops if x), repeat_penalty=rp,
                              use_chat_template=bool(use_chat_template))

    # ---- running requests ------------------------------------------------------------------
    @contextmanager
    def admitted(self, endpoint: str) -> Iterator[None]:
        """Bound the requests waiting for the model; past the bound, a clear busy error."""
        if not self._admission.acquire(blocking=False):
            self.metrics.record(endpoint, "busy", 0)
            raise RequestError(f"busy: {self.settings.queue_size} requests are already waiting; retry shortly",
                               status=429)
        try:
            yield
        finally:
            self._admission.release()

    def run(self, endpoint: str, prompts: Sequence[str], params: SamplingParams,
            constraints: Sequence[TokenConstraint] | None = None,
            cancel: threading.Event | None = None) -> Iterator[list[GeneratedSequence]]:
        """The backend's decode loop, instrumented: every generation goes through here."""
        backend = self.ready_backend()
        start = time.perf_counter()
        ttft = None
        outcome = "error"
        seqs: list[GeneratedSequence] = []
        with self.admitted(endpoint):
            steps = backend.decode(prompts, params, constraints=constraints, cancel=cancel)
            try:
                for seqs in steps:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    yield seqs
                outcome = "cancelled" if cancel is not None and cancel.is_set() else "ok"
            except GeneratorExit:
                outcome = "cancelled"
                raise
            finally:
                steps.close()  # releases the backend's lock even when the caller stopped early
                tokens = sum(s.completion_tokens for s in seqs)
                self.metrics.record(endpoint, outcome, time.perf_counter() - start, tokens, ttft)
                self.after_request()

    def after_request(self) -> None:
        if self.tier.profile.aggressive_gc:
            gc.collect()
        self.metrics.sample_memory()

    def generate_stream(self, prompt: Any, max_new_tokens: Any, temperature: Any = 0.8, top_p: Any = 1.0,
                        seed: Any = None, **extra: Any) -> Iterator[str]:
        """Streaming single-prompt generation: yields the text generated so far after each token."""
        backend = self.ready_backend()
        prompt = self.check_prompt(prompt, backend)
        params = self.sampling(max_new_tokens, temperature, top_p, seed=seed, **extra)
        last = None
        for seqs in self.run("generate", [prompt], params):
            if seqs[0].text != last:
                last = seqs[0].text
                yield last
        if last is None:
            yield ""

    def batch(self, prompts: str | Sequence[str], max_new_tokens: Any, temperature: Any = 0.8,
              **extra: Any) -> list[GeneratedSequence]:
        """All prompts in one call to the backend's decode (one padded batch where it batches)."""
        backend = self.ready_backend()
        items = self.check_prompts(prompts, backend)
        params = self.sampling(max_new_tokens, temperature, **extra)
        seqs: list[GeneratedSequence] = []
        for seqs in self.run("batch", items, params):
            pass
        return seqs

    def structured(self, prompt: Any, schema_text: Any, max_new_tokens: Any, temperature: Any = 0.0,
                   seed: Any = None) -> dict[str, Any]:
        from slm_app import structured

        backend = self.ready_backend()
        prompt = self.check_prompt(prompt, backend)
        if not isinstance(schema_text, str):
            raise RequestError("schema must be JSON text")
        cap = self.limits.max_structured_tokens
        params = self.sampling(max_new_tokens, temperature, seed=seed, cap=cap)
        start = time.perf_counter()
        with self.admitted("structured"):
            try:
                result = structured.generate_structured(
                    backend, prompt, schema_text, limits=self.limits, max_new_tokens=params.max_new_tokens,
                    temperature=params.temperature, seed=params.seed)
            except structured.SchemaError as exc:
                self.metrics.record("structured", "bad_schema", time.perf_counter() - start)
                raise RequestError(f"schema: {exc}") from None
            finally:
                self.after_request()
        self.metrics.record("structured", "ok" if result.success else "invalid_output",
                            time.perf_counter() - start, result.tokens)
        return result.to_api()

    # ---- health ----------------------------------------------------------------------------
    def collect_garbage(self) -> dict[str, float]:
        report = memory.collect_garbage()
        self.metrics.sample_memory()
        return report

    def health(self) -> dict[str, Any]:
        self.metrics.sample_memory()
        rss = memory.rss_mb()
        usable = memory.usable_memory_mb()
        backend = self.backend
        return {
            "status": self.status,
            "model_loaded": backend is not None,
            "reason": self.load_error,
            "tier": self.tier.tier.value,
            "tier_reason": self.tier.reason,
            "backend": self.tier.profile.backend,
            "model": backend.model_id if backend else self.tier.model,
            "model_info": backend.info() if backend else None,
            "limits": self.limits.model_dump(),
            "memory_usage": {"rss_mb": round(rss, 1), "usable_mb": round(usable, 1),
                             "percent_of_usable": round(100 * rss / usable, 1)},
            "rss_mb": round(rss, 1),
            "system_memory_mb": memory.system_memory_mb(),
            **self.metrics.summary(),
        }
