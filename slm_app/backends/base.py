"""The contract every local backend implements: small primitives over a model with slots.

A backend does not run requests. ``slm_app.scheduler`` owns the backend (one thread calls it) and
writes everything request-shaped once for every backend: admission into slots, chunked prefill,
sampling, constraint masks, incremental UTF-8, stop strings, seeds, finish reasons, cancellation.
What a backend provides is what only it can do:

* text ↔ tokens: ``tokenize``, ``token_bytes``, ``is_end``, ``format_prompt``, ``render_chat``,
  ``llguidance_tokenizer``;
* the model: ``forward`` runs one step over several slots at once (decode rows of one token and
  prefill chunks of several) and returns the logits of the rows that asked for them; ``release``
  frees a finished slot's cache;
* optionally ``native_sampler`` (llama.cpp samples in C), ``score`` (perplexity) and
  ``decode_greedy`` (several greedy steps in one call, no Python between the tokens);
* optionally prompt caching (``slm_app.prefix_cache`` is the policy): ``keep_prefix`` and
  ``copy_prefix`` keep a finished request's KV for the next one or share it with another slot,
  ``cache_namespace`` says what else the KV depends on (a LoRA adapter), ``decode_kv_reusable``
  whether KV written while decoding may stand in for a prefill of the same tokens;
* facts: ``info`` (typed ``ModelInfo``), ``limits`` (``SlotLimits``).

A backend that talks to a remote server instead of holding a model is request-level and does not
implement this contract: it sits behind the service as another ``Engine`` (``slm_app.engines``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from slm_app.settings import EngineConfig


class BackendUnavailable(RuntimeError):
    """The backend or its model could not be loaded; the message says why."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None  # None: the scheduler draws one (and reports it)
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.0
    use_chat_template: bool = True  # only backends whose model has a template use it
    adapter: str | None = None  # a LoRA adapter id, "base", or None: the promoted one (slm_app.finetune.serving)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class TokenConstraint(Protocol):
    """Restricts which token may come next (structured output). One per request."""

    def allowed_tokens(self, remaining: int) -> np.ndarray:
        """Boolean mask over the logits width: True where the token may be sampled now.

        ``remaining`` is how many tokens the request may still generate, this one included, so a
        constraint can steer to a short completion as the budget runs out.
        """

    def consume(self, token_id: int) -> None:
        """Record the token that was sampled."""

    def forced_tokens(self) -> list[int]:
        """Tokens that must come next whatever the model prefers (a key's name, ``":"``...), not yet
        consumed; empty when the model has a choice. The scheduler appends them without sampling and
        feeds them to the model in one step (as a prompt chunk), which is faster than one step each."""

    def is_finished(self) -> bool:
        """True once the constraint is complete and wants generation to stop."""


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model, shown on the Health tab and in ``/health``."""

    backend: str  # "tensorflow" | "llama.cpp" | "fake" | "remote"
    model_id: str  # what the OpenAI routes call the model
    name: str  # human-readable, e.g. "Gemma 3 270M Q4_K_M (embedded)"
    source: str  # "local" | "hub-cache" | "hub" | "offline-fallback" | "embedded" | "built-in" | "remote"
    reason: str  # how it was found
    license: str | None = None  # the licence line the UI shows (Gemma's terms must be shown)
    random_weights: bool = False  # the text is meaningless (tiny-gpt2, test models)
    chat_template: bool = False  # the model has a chat template that ``render_chat`` uses
    vocab_size: int = 0
    n_ctx: int = 0  # tokens one sequence may hold (prompt + generated)
    n_slots: int = 1
    details: dict[str, Any] = field(default_factory=dict)  # backend-specific facts for Health

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_id, "name": self.name, "source": self.source,
                "reason": self.reason, "license": self.license, "random_weights": self.random_weights,
                "chat_template": self.chat_template, "vocab_size": self.vocab_size, "n_ctx": self.n_ctx,
                "n_slots": self.n_slots, **self.details}


@dataclass(frozen=True)
class SlotLimits:
    """What the scheduler may put in the backend's cache at once."""

    n_slots: int  # sequences decoded together
    max_sequence_tokens: int  # prompt + generated tokens of one sequence
    kv_cells: int  # tokens all slots together may hold (a shared KV cache); n_slots * max when not shared
    max_step_tokens: int  # tokens one ``forward`` may carry (llama.cpp's n_batch): bounds a prefill chunk


@dataclass(frozen=True)
class Row:
    """Work for one slot in one ``forward``: ``tokens`` at positions ``pos`` .. ``pos+len-1``.

    A decode row has one token; a prefill chunk has several. ``logits``: return the logits after the
    row's last token (a prefill chunk that does not end the prompt does not need them).
    """

    slot: int
    tokens: Sequence[int]
    pos: int
    logits: bool = True
    prompt: bool = False  # prompt tokens (prefill), however few: a backend may compute them another way


def check_row(row: Row, n_slots: int, n_ctx: int, vocab_width: int) -> None:
    """Refuse a row the model cannot run (``ValueError`` naming the slot): a slot that does not exist,
    no tokens, positions past the slot's cells, a token id outside the vocabulary."""
    if not 0 <= row.slot < n_slots:
        raise ValueError(f"slot {row.slot} does not exist (this model has {n_slots})")
    if not row.tokens:
        raise ValueError(f"slot {row.slot}: a row needs at least one token")
    if row.pos < 0 or row.pos + len(row.tokens) > n_ctx:
        raise ValueError(f"slot {row.slot}: positions {row.pos}..{row.pos + len(row.tokens) - 1} do not fit "
                         f"its {n_ctx} cells")
    if any(not 0 <= t < vocab_width for t in row.tokens):
        raise ValueError(f"slot {row.slot}: token id outside the vocabulary (0..{vocab_width - 1})")


class StepLogits(ABC):
    """What ``forward`` returns: the logits of the rows that asked, in their order."""

    @abstractmethod
    def row(self, i: int) -> np.ndarray:
        """Logits of output row ``i`` as float32 over the logits width (may be a view: read, don't keep)."""

    def argmax(self, i: int) -> int:
        """Greedy pick of row ``i``; backends may compute it without handing the full row to Python."""
        return int(np.argmax(self.row(i)))


class ArrayLogits(StepLogits):
    """StepLogits over a numpy array of shape (rows, vocab)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def row(self, i: int) -> np.ndarray:
        return self.array[i]


class NativeSampler(ABC):
    """A backend's own sampler for one request (llama.cpp's C sampler chain)."""

    @abstractmethod
    def sample(self, logits: StepLogits, i: int, allowed: np.ndarray | None) -> int:
        """Pick the next token from output row ``i``; ``allowed`` masks the row first when given."""

    def close(self) -> None:
        """Free native memory."""


class Backend(ABC):
    """A loaded model with ``limits().n_slots`` cache slots. Only the scheduler's thread calls
    ``forward``/``release``/``score``/``native_sampler``; the text methods may be called from any
    thread (they only read the vocabulary)."""

    @classmethod
    @abstractmethod
    def load(cls, config: EngineConfig) -> "Backend":
        """Find, check and load the model ``config`` names; ``BackendUnavailable`` says why not."""

    # ---- facts -----------------------------------------------------------------------------------
    @abstractmethod
    def info(self) -> ModelInfo:
        """Facts for Health and the OpenAI model list."""

    @abstractmethod
    def limits(self) -> SlotLimits:
        """Slots and cache capacity."""

    @property
    @abstractmethod
    def vocab_width(self) -> int:
        """Width of the logits rows (the mask width for constraints)."""

    # ---- text and tokens ---------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """The tokens the model sees for ``text`` (with BOS where the model wants one; never empty)."""

    @abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a piece of a UTF-8 character is possible)."""

    @abstractmethod
    def is_end(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, end of turn)."""

    def format_prompt(self, prompt: str, use_chat_template: bool = True) -> str:
        """The text the model sees for a plain prompt: one user turn of the chat template when the
        model has one and ``use_chat_template``, else the prompt as is."""
        if use_chat_template and (rendered := self.render_chat([{"role": "user", "content": prompt}])) is not None:
            return rendered
        return prompt

    def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        """A conversation through the model's chat template, ready for the assistant's turn;
        None when the model has none (the caller writes a transcript)."""
        return None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    @abstractmethod
    def llguidance_tokenizer(self) -> Any:
        """An ``llguidance.LLTokenizer`` for this vocabulary (cached)."""

    # ---- the model (scheduler thread only) ------------------------------------------------------------
    @abstractmethod
    def forward(self, rows: Sequence[Row]) -> StepLogits:
        """Run one step over ``rows`` (each slot at most once). Returns logits for rows with ``logits``."""

    def max_greedy_steps(self) -> int:
        """How many greedy steps one ``decode_greedy`` call may run; below 2: it is not offered."""
        return 0

    def decode_greedy(self, rows: Sequence[Row], steps: int) -> np.ndarray:
        """Run ``steps`` decode steps over one-token ``rows`` (each slot at most once), feeding each row
        its own argmax after every step, with no Python in between. Row ``i`` writes positions
        ``pos .. pos+steps-1`` of its slot. Returns the argmax of every step, int array
        ``[len(rows), steps]``: token ``j`` of row ``i`` is what ``forward`` then ``StepLogits.argmax``
        would have picked at step ``j``, bit for bit (the scheduler mixes both paths in one request).
        Only offered when ``max_greedy_steps() >= 2``."""
        raise NotImplementedError(f"{type(self).__name__} decodes one step per call")

    @abstractmethod
    def release(self, slot: int) -> None:
        """Forget the slot's cache: its next ``forward`` starts at position 0."""

    # ---- prompt caching (optional: the defaults reuse nothing) -----------------------------------
    # True when KV that decode rows wrote may stand in for a prefill of the same tokens. False
    # (TensorFlow) reuses only what prefill wrote, so a cached answer is bit for bit a cold one.
    decode_kv_reusable: bool = True

    def keep_prefix(self, slot: int, n: int) -> bool:
        """Keep positions ``0..n-1`` of the slot's cache and drop the rest, so the next ``forward``
        continues at ``n``. False: this backend cannot (the scheduler then releases the slot)."""
        return False

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """Make ``dst``'s cache positions ``0..n-1`` those of ``src`` (dropping what ``dst`` held);
        ``src`` may be running. False: this backend cannot."""
        return False

    def cache_namespace(self, params: SamplingParams) -> str:
        """What else than the tokens the KV of a request depends on: cached KV is reused only within
        one namespace. With LoRA adapters, the active adapter's id (the adapter router applies a
        request's adapter before the scheduler admits it); "base" without one."""
        return self.active_adapter() or "base"

    def native_sampler(self, params: SamplingParams, seed: int) -> NativeSampler | None:
        """A sampler in the backend's own code, or None to sample in numpy (``slm_app.sampling``)."""
        return None

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Log-probabilities of ``tokens[1:]`` given what precedes each, in one pass of at most
        ``limits().max_sequence_tokens`` tokens (perplexity). Uses and then releases slot 0's cache:
        the scheduler runs it only when no slot is busy."""
        raise NotImplementedError(f"{type(self).__name__} cannot score text")

    # ---- LoRA adapters (optional; scheduler thread only, with no slot busy) -----------------------
    supports_adapters = False
    # What fine-tuning trains for this backend (slm_app.finetune picks the trainer by it): "gguf-lora"
    # (llama.cpp), "gpt2-lora-npz" (TensorFlow GPT-2, slm_app.backends.tf_lora), None: nothing.
    adapter_kind: str | None = None

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Load an adapter file beside the base weights (``ValueError`` saying why it does not fit)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load LoRA adapters")

    def set_adapter(self, adapter_id: str | None) -> None:
        """Apply a loaded adapter to every sequence from the next ``forward`` on (None: the base model)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load LoRA adapters")

    def active_adapter(self) -> str | None:
        return None

    def end_of_turn_token(self) -> int | None:
        """The token that ends an answer (end of turn, else end of text), for training examples."""
        return None

    def close(self) -> None:
        """Free the model's memory."""
