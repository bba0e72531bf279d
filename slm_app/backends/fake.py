"""A fast in-process model for tests of the layers above the model (API, UI, scheduler).

It is a real backend behind the real contract: GPT-2's real tokenizer and vocabulary (so structured
output, UTF-8 pieces and token counts behave as on a real model), slots with their own caches,
and logits that are a pure function of what a slot holds. So its greedy answer to a prompt is the
same alone or beside other requests, exactly, and a seed decides a sampled answer.

What it "says": a fixed script, from its start, after any prompt. Each step's logits put the next
script token far above seeded noise that depends on the slot's recent tokens: greedy decoding
recites the script, sampling strays from it now and then (more at higher temperature). The script
has multi-byte characters whose bytes GPT-2 splits across tokens. ``SLM_FAKE_STEP_MS`` adds a delay
per step, to make concurrency visible in tests.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Sequence

import numpy as np

from slm_app.backends.base import ArrayLogits, Backend, ModelInfo, Row, SlotLimits, StepLogits
from slm_app.backends.gpt2_vocab import gpt2_tokenizer, token_byte_table
from slm_app.settings import EngineConfig

SCRIPT = ("Hello from the fake model. It speaks in complete sentences, with Ünïcödé like café, naïve "
          "and ✓ marks, and an emoji 🙂 now and then. ")
SCRIPT_BONUS = 15.0  # logit margin of the script's next token over unit-variance noise


class FakeBackend(Backend):
    """GPT-2 vocabulary, scripted logits, ``n_slots`` slots of ``n_ctx`` tokens."""

    def __init__(self, n_slots: int = 4, n_ctx: int = 1024, step_ms: float = 0.0, max_step_tokens: int = 256,
                 script: str = SCRIPT, end_after_script: bool = False):
        self._tokenizer = gpt2_tokenizer()
        self._eos = int(self._tokenizer.eos_token_id)
        self._width = len(self._tokenizer)
        self._bytes = token_byte_table(self._tokenizer, self._width)
        self._script = self._tokenizer.encode(script)
        self._end_after_script = end_after_script
        self._n_slots, self._n_ctx, self._step_s, self._max_step = n_slots, n_ctx, step_ms / 1000, max_step_tokens
        self._cache: list[list[int]] = [[] for _ in range(n_slots)]
        self._prompt_len: list[int | None] = [None] * n_slots
        self._llg: Any = None
        self.forward_calls = 0

    @classmethod
    def load(cls, config: EngineConfig) -> "FakeBackend":
        return cls(n_slots=config.n_slots, n_ctx=min(config.n_ctx, 1024), step_ms=config.fake_step_ms,
                   max_step_tokens=min(config.n_batch, 256))

    # ---- facts
    def info(self) -> ModelInfo:
        return ModelInfo(backend="fake", model_id="fake-gpt2-script", name="fake model (scripted, for tests)",
                         source="built-in", reason="SLM_BACKEND=fake", license=None, random_weights=True,
                         chat_template=False, vocab_size=self._width, n_ctx=self._n_ctx, n_slots=self._n_slots,
                         details={"step_ms": self._step_s * 1000, "script_tokens": len(self._script)})

    def limits(self) -> SlotLimits:
        return SlotLimits(n_slots=self._n_slots, max_sequence_tokens=self._n_ctx,
                          kv_cells=self._n_slots * self._n_ctx, max_step_tokens=self._max_step)

    @property
    def vocab_width(self) -> int:
        return self._width

    # ---- text
    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text) or [self._eos]

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token] if 0 <= token < self._width else b""

    def is_end(self, token: int) -> bool:
        return token == self._eos

    def llguidance_tokenizer(self) -> Any:
        if self._llg is None:
            import llguidance.hf

            self._llg = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._width, eos_token=self._eos)
        return self._llg

    # ---- the "model"
    def _logits(self, slot: int) -> np.ndarray:
        context = self._cache[slot]
        digest = hashlib.blake2b(np.asarray(context[-8:] + [len(context)], np.int64).tobytes(), digest_size=8)
        row = np.random.default_rng(int.from_bytes(digest.digest(), "little")).standard_normal(
            self._width, dtype=np.float32)
        generated = len(context) - (self._prompt_len[slot] or len(context))
        if self._end_after_script and generated >= len(self._script):
            row[self._eos] += SCRIPT_BONUS
        else:
            row[self._script[generated % len(self._script)]] += SCRIPT_BONUS
        return row

    def forward(self, rows: Sequence[Row]) -> StepLogits:
        self.forward_calls += 1
        out = []
        for row in rows:
            cache = self._cache[row.slot]
            if row.pos > len(cache):
                raise ValueError(f"slot {row.slot}: position {row.pos} past its {len(cache)} cached tokens")
            del cache[row.pos:]
            cache.extend(int(t) for t in row.tokens)
            if len(cache) > self._n_ctx:
                raise ValueError(f"slot {row.slot}: {len(cache)} tokens exceed the context of {self._n_ctx}")
            if row.logits:
                if self._prompt_len[row.slot] is None:  # the first logits a slot asks for end its prompt
                    self._prompt_len[row.slot] = len(cache)
                out.append(self._logits(row.slot))
        if self._step_s:
            time.sleep(self._step_s)
        return ArrayLogits(np.stack(out) if out else np.zeros((0, self._width), np.float32))

    def release(self, slot: int) -> None:
        self._cache[slot] = []
        self._prompt_len[slot] = None

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = list(tokens)[: self._n_ctx]
        slot = 0
        self.release(slot)
        logprobs = []
        try:
            for pos, token in enumerate(tokens[:-1]):
                self._cache[slot].append(int(token))
                if self._prompt_len[slot] is None:
                    self._prompt_len[slot] = 1
                row = self._logits(slot).astype(np.float64)
                row -= row.max()
                logprobs.append(row[tokens[pos + 1]] - np.log(np.exp(row).sum()))
        finally:
            self.release(slot)
        return np.asarray(logprobs)
