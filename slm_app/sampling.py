"""Choosing the next token, and turning tokens into text that only grows while it streams.

Written once for every backend (the scheduler uses both): the same seed picks the same token from
the same logits whatever the backend, and every backend cuts stop strings the same way.
"""

from __future__ import annotations

import codecs
from typing import Sequence

import numpy as np

from slm_app.backends.base import SamplingParams, StepLogits

# Repeat penalty looks at the last N generated tokens, as llama.cpp's penalty sampler does.
PENALTY_LAST_N = 64


class Sampler:
    """Picks the next token: constraint mask, repeat penalty, temperature, top-k, top-p, seeded draw."""

    def __init__(self, params: SamplingParams, seed: int):
        self.params = params
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: StepLogits, i: int, allowed: np.ndarray | None, history: Sequence[int]) -> int:
        p = self.params
        penalise = p.repeat_penalty != 1.0 and len(history) > 0
        if p.greedy and allowed is None and not penalise:
            return logits.argmax(i)  # no full row needed: backends may answer this from their own argmax
        row = np.array(logits.row(i), dtype=np.float32)  # a copy: we write into it
        if allowed is not None:
            width = min(allowed.shape[0], row.shape[0])
            row[:width][~allowed[:width]] = -np.inf
            row[width:] = -np.inf
        if penalise:
            seen = np.unique(np.asarray(history[-PENALTY_LAST_N:], dtype=np.int64))
            vals = row[seen]
            row[seen] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.greedy:
            return int(np.argmax(row))
        row /= p.temperature
        # Work on a candidate set: top-k if set, else everything that is not masked out.
        if 0 < p.top_k < row.shape[0]:
            idx = np.argpartition(-row, p.top_k - 1)[: p.top_k]
            idx = idx[np.isfinite(row[idx])]
        else:
            idx = np.flatnonzero(np.isfinite(row))
        if idx.size == 0:
            return int(np.argmax(row))
        cand = row[idx]
        probs = np.exp(cand - cand.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
            idx, probs = idx[keep], probs[keep] / probs[keep].sum()
        # Inverse-CDF draw: one uniform number, same distribution as rng.choice(p=...) at a
        # fraction of its cost over a 50k-262k candidate set.
        pick = int(np.searchsorted(np.cumsum(probs), self.rng.random() * probs.sum(), side="right"))
        return int(idx[min(pick, idx.size - 1)])


class TextAssembler:
    """Token bytes in, text out: incremental UTF-8, stop strings cut at the earliest position.

    ``visible`` only ever grows while generation runs: a trailing piece of a multi-byte character
    stays in the decoder until its last byte arrives, and a trailing start of a stop string is held
    back until it is decided.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self.stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded (cut at a stop string once one is found)
        self.visible = ""
        self.stopped = False

    def add(self, piece: bytes) -> bool:
        """Append a token's bytes; True if a stop string completed (``text`` is then cut before it)."""
        before = len(self.text)
        self.text += self._decoder.decode(piece)
        if self.stop:
            # Only the new text and the longest-1 characters before it can complete a stop string.
            start = max(0, before - self._longest + 1)
            hits = [pos for s in self.stop if (pos := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.visible = self.text
                self.stopped = True
                return True
        self.visible = self.text[: len(self.text) - self._held_back()]
        return False

    def finish(self) -> str:
        """Generation ended: nothing is held back any more (bytes of a character cut in half are dropped)."""
        self.visible = self.text
        return self.visible

    def _held_back(self) -> int:
        text, held = self.text, 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if s.startswith(text[-n:]):
                    held = n
                    break
        return held
