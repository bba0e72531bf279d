"""What the service runs requests on: one ``Engine`` interface, with declared capabilities.

An engine takes prompts in the model's format and returns a streamed ``Generation``. Two kinds sit
behind it as siblings in this package: ``local.LocalEngine`` (a backend in this process under the
scheduler that owns it) and ``remote.RemoteEngine`` (whole requests forwarded to an OpenAI-compatible
server). The service and every surface above it ask an engine's ``capabilities``, never its type
(as simonw/llm's models declare ``can_stream`` / ``supports_schema`` and vLLM's serving layer takes
one ``EngineClient``).

Engines raise ``slm_app.errors.EngineError`` subclasses, never HTTP statuses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from slm_app.backends.base import ModelInfo, SamplingParams
from slm_app.scheduler import Completion, Generation

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


@dataclass(frozen=True)
class ModelPrompt:
    """A prompt in the engine's own format, ready to tokenize and submit.

    ``text`` is what the model reads (chat template applied, or not). An engine that sends chat
    messages to a server that applies the model's template itself (a remote one) sets ``messages``;
    ``text`` is then a plain rendering of them, used to count tokens against the tier's limits."""

    text: str
    messages: tuple[Message, ...] | None = None

    def with_last_content(self, content: str) -> "ModelPrompt":
        """The same conversation with the last message's content replaced (structured output puts its
        instruction there). Only for a prompt with ``messages``."""
        if not self.messages:
            raise ValueError("a prompt without messages has no last message")
        *head, last = self.messages
        return chat_prompt([*head, {**last, "content": content}])


def chat_prompt(messages: Sequence[Message]) -> ModelPrompt:
    """A conversation sent as messages (the server applies the template)."""
    kept = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return ModelPrompt("\n".join(f"{m['role']}: {m['content']}" for m in kept), kept)


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt as the model will see it (``prompt``), and its token count.

    ``ids``: its tokens, for an engine that runs the model here; None for one that only counts (a
    remote engine sends text). ``exact`` False: ``n_tokens`` is an upper bound of the real count (a
    remote engine's byte estimate); the engine then counts exactly while the answer streams."""

    prompt: ModelPrompt
    n_tokens: int
    ids: list[int] | None = None
    exact: bool = True

    @property
    def text(self) -> str:
        return self.prompt.text


@dataclass(frozen=True)
class Occupancy:
    """Requests waiting for a slot, running, and the slots there are (Health and metrics)."""

    waiting: int
    running: int
    slots: int

    def to_dict(self) -> dict[str, int]:
        return {"waiting": self.waiting, "running": self.running, "slots": self.slots}


class LogitsAccess(Protocol):
    """What only an engine holding the model's logits offers: llguidance token masks, perplexity."""

    @property
    def vocab_width(self) -> int:
        """Width of the logits rows (a token mask's width)."""

    def llguidance_tokenizer(self) -> Any:
        """An ``llguidance.LLTokenizer`` for the model's vocabulary."""

    def tokenize(self, text: str) -> list[int]:
        """The model's token ids for ``text``."""

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Log-probabilities of ``tokens[1:]`` (perplexity)."""


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, declared rather than discovered by its type.

    ``schema``: how the engine honours a JSON Schema while generating ("token constraint": an
    llguidance mask in the decode loop; "response format": the upstream's ``response_format``).
    ``logits``: the local model's logits (None when the engine has none, as a remote one)."""

    schema: str
    logits: LogitsAccess | None = None


class Engine(ABC):
    """Prompts in, a streamed ``Generation`` out; plus what the limits and structured output need."""

    capabilities: Capabilities

    @abstractmethod
    def info(self) -> ModelInfo: ...

    @abstractmethod
    def format_prompt(self, prompt: str, use_chat_template: bool) -> ModelPrompt:
        """A plain prompt in the engine's format (one user turn of the chat template, or as is)."""

    @abstractmethod
    def render_chat(self, messages: list[Message]) -> ModelPrompt | None:
        """A conversation through the model's chat template; None when the model has none."""

    @abstractmethod
    def prepare(self, prompt: ModelPrompt) -> PreparedPrompt:
        """Tokenize (or count) a prompt as the limits see it. Raises ``EngineError``."""

    @abstractmethod
    def submit(self, prompt: PreparedPrompt, params: SamplingParams, constraint: Any = None,
               timeout_s: float | None = None, on_done: Callable[[Completion], None] | None = None) -> Generation:
        """Queue a generation; ``constraint`` comes from this engine's ``schema_plan``.
        Raises ``QueueFull``, ``SchedulerClosed``, ``PromptTooLong``."""

    @abstractmethod
    def schema_plan(self, schema: dict, budget: int, steer: bool = True) -> Any:
        """How this engine honours ``schema`` (a ``structured.generation.SchemaPlan``). Raises
        ``structured.SchemaError`` for a schema it cannot honour within ``budget`` tokens."""

    @abstractmethod
    def occupancy(self) -> Occupancy: ...

    @abstractmethod
    def drain(self, timeout_s: float) -> bool: ...

    @abstractmethod
    def stop_admitting(self) -> None:
        """Refuse new requests from now on (shutdown)."""

    def unavailable_reason(self) -> str | None:
        """Why the engine cannot serve right now (a remote upstream that is down), or None.
        A local engine that loaded is always available."""
        return None

    def use_adapters(self, make_router: Callable[[Any], Any]) -> Any | None:
        """Serve LoRA adapters: put the router ``make_router(scheduler)`` builds in front of this
        engine's admissions and return it; None when this engine cannot (no local weights, or a
        backend without adapters). ``slm_app.finetune.serving.AdapterRouter`` is the router."""
        return None

    def prompt_cache(self) -> dict[str, Any] | None:
        """The prompt cache's numbers (``slm_app.prefix_cache``), or None when this engine has none."""
        return None

    @abstractmethod
    def close(self) -> None: ...
