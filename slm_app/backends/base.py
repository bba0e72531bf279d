"""The one small interface every backend implements, and the sampling they share.

A backend knows how to turn prompts into token logits, step by step. Its single
decode loop (``Backend.decode``) serves plain, streaming, batched and
token-constrained generation: callers that want the whole text simply drain it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend or its model could not be loaded; the message says why."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.0
    use_chat_template: bool = True  # only backends whose model has a template use it


class TokenConstraint(Protocol):
    """Restricts which token may come next (structured output). One per sequence."""

    def allowed_tokens(self) -> np.ndarray:
        """Boolean mask over the logits width: True where the token may be sampled now."""

    def consume(self, token_id: int) -> None:
        """Record the token that was sampled."""

    def is_finished(self) -> bool:
        """True once the constraint is complete and wants generation to stop."""


@dataclass
class GeneratedSequence:
    """One prompt's generation, updated in place by the decode loop after every step."""

    prompt: str
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"; None while running

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Backend(ABC):
    """A loaded model. Each backend holds its own lock for a decode's whole life, so callers queue."""

    name: str  # "tensorflow" | "llama.cpp"
    model_id: str

    @abstractmethod
    def decode(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        constraints: Sequence[TokenConstraint] | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[GeneratedSequence]]:
        """Generate for all prompts at once, yielding the sequences after each token step.

        Sequences stop on end-of-text, a stop string (which is cut from ``text``),
        ``max_new_tokens``, a finished constraint, or ``cancel`` being set.
        """

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens the prompt will take (as the model will see it)."""

    @abstractmethod
    def llguidance_tokenizer(self) -> Any:
        """An ``llguidance.LLTokenizer`` for this model's vocabulary (cached)."""

    @property
    @abstractmethod
    def vocab_width(self) -> int:
        """Width of the logits the sampler sees (the mask width for constraints)."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """Facts for the Health tab: model, source, sizes, load time..."""

    def generate(self, prompts: Sequence[str], params: SamplingParams, **kwargs: Any) -> list[GeneratedSequence]:
        sequences: list[GeneratedSequence] = []
        for sequences in self.decode(prompts, params, **kwargs):
            pass
        return sequences

    def close(self) -> None:
        """Free the model's memory."""


class Sampler:
    """Picks the next token from logits: constraint mask, penalty, temperature, top-k, top-p.

    Shared by the backends that sample in Python so the same seed gives the same
    choice for the same logits whatever the backend.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = (), allowed: np.ndarray | None = None) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32).copy()
        if allowed is not None:
            logits[: allowed.shape[0]][~allowed] = -np.inf
            logits[allowed.shape[0] :] = -np.inf
        if p.repeat_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits / p.temperature
        # Work on a candidate set: top-k if set, else everything that is not masked out.
        if p.top_k > 0 and p.top_k < logits.shape[0]:
            idx = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
        else:
            idx = np.flatnonzero(np.isfinite(logits))
        if idx.size == 0:
            return int(np.argmax(logits))
        cand = logits[idx]
        cand = cand - cand.max()
        probs = np.exp(cand)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
            idx, probs = idx[keep], probs[keep] / probs[keep].sum()
        # Inverse-CDF draw: one uniform number, same distribution as rng.choice(p=...) at a
        # fraction of its cost over a 50k-262k candidate set.
        pick = int(np.searchsorted(np.cumsum(probs), self.rng.random() * probs.sum(), side="right"))
        return int(idx[min(pick, idx.size - 1)])


def apply_stop(seq: GeneratedSequence, stop: Sequence[str]) -> bool:
    """Cut ``seq.text`` at the first stop string; True if one was found."""
    for s in stop:
        if s and (pos := seq.text.find(s)) >= 0:
            seq.text = seq.text[:pos]
            return True
    return False
