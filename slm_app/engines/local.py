"""The local engine: a backend in this process (TensorFlow, llama.cpp, the fake), driven by the one
scheduler that owns it. It holds the model's logits, so it honours a JSON Schema with an llguidance
token constraint in the decode loop and can score text (perplexity)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from slm_app.backends import load_backend
from slm_app.backends.base import Backend, ModelInfo, SamplingParams
from slm_app.engines.base import Capabilities, Engine, Message, ModelPrompt, Occupancy, PreparedPrompt
from slm_app.scheduler import Completion, Generation, Scheduler
from slm_app.settings import EngineConfig
from slm_app.structured.compile import compile_schema
from slm_app.structured.constraint import TokenConstraintPlan


class LocalEngine(Engine):
    """A backend in this process, driven by one scheduler. It is its own ``LogitsAccess``."""

    def __init__(self, backend: Backend, queue_size: int, prompt_cache: bool = True):
        self.backend = backend
        self.scheduler = Scheduler(backend, queue_size=queue_size, prompt_cache=prompt_cache)
        # LoRA adapters (slm_app.finetune.serving.AdapterRouter), attached when the backend has them.
        self.router: Any = None
        self.capabilities = Capabilities(schema="token constraint", logits=self)

    @classmethod
    def load_from(cls, config: EngineConfig, queue_size: int) -> "LocalEngine":
        return cls(load_backend(config), queue_size, prompt_cache=config.prompt_cache)

    def info(self) -> ModelInfo:
        return self.backend.info()

    def format_prompt(self, prompt: str, use_chat_template: bool) -> ModelPrompt:
        return ModelPrompt(self.backend.format_prompt(prompt, use_chat_template))

    def render_chat(self, messages: list[Message]) -> ModelPrompt | None:
        rendered = self.backend.render_chat(messages)
        return None if rendered is None else ModelPrompt(rendered)

    def prepare(self, prompt: ModelPrompt) -> PreparedPrompt:
        ids = self.backend.tokenize(prompt.text)
        return PreparedPrompt(prompt, len(ids), ids)

    def submit(self, prompt: PreparedPrompt, params: SamplingParams, constraint: Any = None,
               timeout_s: float | None = None, on_done: Callable[[Completion], None] | None = None) -> Generation:
        if self.router is not None:  # requests for different adapters never decode together
            return self.router.submit(params.adapter, lambda done: self.scheduler.submit(
                prompt.ids or [], params, constraint, timeout_s=timeout_s, on_done=done), on_done)
        return self.scheduler.submit(prompt.ids or [], params, constraint, timeout_s=timeout_s, on_done=on_done)

    def schema_plan(self, schema: dict, budget: int, steer: bool = True) -> TokenConstraintPlan:
        compiled = compile_schema(schema, self.backend.llguidance_tokenizer(), budget=budget)
        return TokenConstraintPlan(schema, compiled, self.backend.vocab_width, steer)

    def occupancy(self) -> Occupancy:
        return Occupancy(**self.scheduler.load())

    def use_adapters(self, make_router: Callable[[Any], Any]) -> Any | None:
        if not self.backend.supports_adapters:
            return None
        self.router = make_router(self.scheduler)
        return self.router

    def prompt_cache(self) -> dict[str, Any] | None:
        return self.scheduler.cache_stats()

    def drain(self, timeout_s: float) -> bool:
        return self.scheduler.drain(timeout_s)

    def stop_admitting(self) -> None:
        self.scheduler.stop_admitting()

    def close(self) -> None:
        self.scheduler.close()

    # ---- LogitsAccess: what only a local model offers ---------------------------------------------
    @property
    def vocab_width(self) -> int:
        return self.backend.vocab_width

    def llguidance_tokenizer(self) -> Any:
        return self.backend.llguidance_tokenizer()

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        return self.scheduler.call_exclusive(lambda backend: backend.score(tokens))
