"""What the service runs requests on: an ``Engine``.

``LocalEngine`` is a local backend (TensorFlow, llama.cpp, the fake) under the scheduler that owns
it. A request-level engine, one that forwards whole requests to a remote OpenAI-compatible server,
implements the same small interface and sits behind the same service, limits and surfaces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from slm_app.backends import load_backend
from slm_app.backends.base import Backend, ModelInfo, SamplingParams, TokenConstraint
from slm_app.scheduler import Completion, Generation, Scheduler
from slm_app.settings import EngineConfig


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt as the model will see it (chat template applied or not), and its tokens."""

    text: str
    ids: list[int]


class Engine(ABC):
    """Text in, a streamed ``Generation`` out; plus what the limits and structured output need."""

    @abstractmethod
    def info(self) -> ModelInfo: ...

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Tokens as the model will see them (limits count these)."""

    @abstractmethod
    def format_prompt(self, prompt: str, use_chat_template: bool) -> str: ...

    @abstractmethod
    def render_chat(self, messages: list[dict[str, str]]) -> str | None: ...

    @abstractmethod
    def submit(self, prompt: PreparedPrompt, params: SamplingParams, constraint: TokenConstraint | None = None,
               timeout_s: float | None = None, on_done: Callable[[Completion], None] | None = None) -> Generation:
        """Queue a generation. Raises ``QueueFull``, ``SchedulerClosed``, ``PromptTooLong``."""

    @abstractmethod
    def llguidance_tokenizer(self) -> Any: ...

    @property
    @abstractmethod
    def vocab_width(self) -> int: ...

    @abstractmethod
    def load(self) -> dict[str, int]:
        """Waiting and running requests."""

    @abstractmethod
    def drain(self, timeout_s: float) -> bool: ...

    def stop_admitting(self) -> None:
        """Refuse new requests from now on (shutdown)."""

    def unavailable_reason(self) -> str | None:
        """Why the engine cannot serve right now (a remote upstream that is down), or None.
        A local engine that loaded is always available."""
        return None

    @abstractmethod
    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Log-probabilities of ``tokens[1:]`` (perplexity)."""

    @abstractmethod
    def close(self) -> None: ...


class LocalEngine(Engine):
    """A backend in this process, driven by one scheduler."""

    def __init__(self, backend: Backend, queue_size: int):
        self.backend = backend
        self.scheduler = Scheduler(backend, queue_size=queue_size)
        # LoRA adapters (slm_app.finetune.serving.AdapterRouter), attached when the backend has them.
        self.router: Any = None

    @classmethod
    def load_from(cls, config: EngineConfig, queue_size: int) -> "LocalEngine":
        return cls(load_backend(config), queue_size)

    def info(self) -> ModelInfo:
        return self.backend.info()

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text)

    def format_prompt(self, prompt: str, use_chat_template: bool) -> str:
        return self.backend.format_prompt(prompt, use_chat_template)

    def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        return self.backend.render_chat(messages)

    def submit(self, prompt: PreparedPrompt, params: SamplingParams, constraint: TokenConstraint | None = None,
               timeout_s: float | None = None, on_done: Callable[[Completion], None] | None = None) -> Generation:
        if self.router is not None:  # requests for different adapters never decode together
            return self.router.submit(params.adapter, lambda done: self.scheduler.submit(
                prompt.ids, params, constraint, timeout_s=timeout_s, on_done=done), on_done)
        return self.scheduler.submit(prompt.ids, params, constraint, timeout_s=timeout_s, on_done=on_done)

    def llguidance_tokenizer(self) -> Any:
        return self.backend.llguidance_tokenizer()

    @property
    def vocab_width(self) -> int:
        return self.backend.vocab_width

    def load(self) -> dict[str, int]:
        return self.scheduler.load()

    def drain(self, timeout_s: float) -> bool:
        return self.scheduler.drain(timeout_s)

    def stop_admitting(self) -> None:
        self.scheduler.stop_admitting()

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        return self.scheduler.call_exclusive(lambda backend: backend.score(tokens))

    def close(self) -> None:
        self.scheduler.close()
