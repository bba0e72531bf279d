"""Prompt (prefix) caching: which slot a request goes to, what it reuses, what is evicted.

A finished request leaves its tokens and their KV in its slot. A new request goes to the free slot
whose cached tokens share the longest prefix with its prompt and prefills only the rest, as
llama-server's ``cache_prompt`` does. Beyond that, slots share: when another slot (busy or not)
holds a longer common prefix, its KV is copied into the new request's slot (``Backend.copy_prefix``;
llama.cpp's unified cache shares the cells, nothing is recomputed or duplicated), and when a
request still prefilling will hold one soon, the new request waits for that prefix instead of
computing it a second time: several users sending one long system prompt at once compute it once.
The slots' token lists form the prefix tree SGLang's RadixAttention keeps; with a handful of slots
a linear scan over them is all the tree needs.

This module is the policy; the scheduler applies it and the backends offer two primitives
(``keep_prefix``, ``copy_prefix``). Cache entries are keyed by ``Backend.cache_namespace`` as well
as tokens: KV computed under one LoRA adapter is never reused under another.

Cells: on a backend whose slots share one KV pool (llama.cpp, ``kv_cells`` below
``n_slots * max_sequence_tokens``) cached prefixes hold cells that running requests may need. Each
slot's cells are tracked as runs of (origin, start, end): a copy shares its source's origin, so cells
shared between slots count once, as in llama.cpp. A request is admitted when the distinct cells in
use plus what every running request may still grow to fit; if not, idle slots' prefixes are evicted,
least recently used first, before the request is made to wait.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from slm_app.backends.base import SlotLimits

# Copy another slot's prefix only when it saves at least this many tokens (a copy is cheap, not free).
SHARE_MIN_TOKENS = 16
# Wait for a request still prefilling a common prefix only when that saves at least this many tokens.
WAIT_MIN_TOKENS = 64
# A free slot is taken for the prefix it shares with a request only when that is at least this share of
# what it holds (llama-server's slot_prompt_similarity): otherwise a chat template's first few tokens
# would make a new conversation overwrite another's cached one while empty slots wait.
SIMILARITY_MIN = 0.1


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Entry:
    """What one slot's cache holds: KV positions 0..len(tokens)-1 are exactly ``tokens``."""

    tokens: list[int] = field(default_factory=list)
    reusable: int = 0  # leading tokens whose KV a new request may reuse
    namespace: str = "base"
    last_used: int = 0
    runs: list[list[int]] = field(default_factory=list)  # [origin, start, end): physical cells
    own: int = -1  # origin id of cells this slot computes itself (changes when cells are dropped or copied)
    busy: bool = False
    target: list[int] | None = None  # the prompt of the request running here
    reserve: int = 0  # cells the running request may come to hold


@dataclass(frozen=True)
class Plan:
    """Where a request goes and what it reuses."""

    slot: int
    reuse: int  # prompt tokens whose KV it starts with (kept in the slot or copied)
    copy_from: int | None = None  # copy ``reuse`` tokens from this slot (else: keep the slot's own)
    wait_for: tuple[int, int] | None = None  # (slot, tokens): wait for that request's prefill, then copy
    evict: tuple[int, ...] = ()  # idle slots to clear first


@dataclass
class Stats:
    requests: int = 0
    hits: int = 0  # requests that reused at least one token
    cached_tokens: int = 0
    computed_tokens: int = 0
    copies: int = 0
    evictions: int = 0


class PrefixCache:
    """Per-slot cached tokens and the admission policy over them. Not thread-safe: the scheduler
    calls it under its lock."""

    def __init__(self, limits: SlotLimits, enabled: bool = True, decode_kv_reusable: bool = True):
        self.limits = limits
        self.enabled = enabled
        # False when KV written by decode rows differs in its bits from what prefill writes (TensorFlow):
        # then only prompt-prefilled tokens are reused, so a cached answer equals a cold one exactly.
        self.decode_kv_reusable = decode_kv_reusable
        self.entries = [_Entry() for _ in range(limits.n_slots)]
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self.stats = Stats()

    # ---- what the scheduler reports --------------------------------------------------------------
    def clear(self, slot: int) -> None:
        """The slot's cache was released (error, exclusive call, eviction)."""
        e = self.entries[slot]
        e.tokens, e.reusable, e.runs, e.own = [], 0, [], next(self._ids)

    def kept(self, slot: int, n: int, namespace: str) -> None:
        """The slot keeps its first ``n`` tokens (the backend dropped the rest)."""
        e = self.entries[slot]
        if n <= 0 or e.namespace != namespace:
            self.clear(slot)
        else:
            e.tokens, e.reusable = e.tokens[:n], min(e.reusable, n)
            e.runs = _cut(e.runs, n)
            e.own = next(self._ids)
        e.namespace = namespace

    def copied(self, src: int, dst: int, n: int) -> None:
        """The backend copied ``src``'s first ``n`` tokens into ``dst`` (replacing what it held)."""
        s, d = self.entries[src], self.entries[dst]
        d.tokens, d.reusable, d.namespace = s.tokens[:n], min(s.reusable, n), s.namespace
        d.runs, d.own = _cut(s.runs, n), next(self._ids)
        s.last_used = next(self._clock)
        self.stats.copies += 1

    def assign(self, slot: int, prompt: list[int], reserve: int) -> None:
        """A request (``prompt``, growing to ``reserve`` cells) runs in ``slot`` from now on."""
        e = self.entries[slot]
        e.busy, e.target, e.reserve, e.last_used = True, prompt, reserve, next(self._clock)

    def count(self, prompt_tokens: int, reused: int) -> None:
        """A request starts prefilling, ``reused`` of its prompt tokens taken from the cache."""
        self.stats.requests += 1
        self.stats.hits += reused > 0
        self.stats.cached_tokens += reused
        self.stats.computed_tokens += prompt_tokens - reused

    def fed(self, slot: int, pos: int, tokens: list[int], prompt: bool) -> None:
        """A forward wrote ``tokens`` at ``pos..``: prompt tokens (prefill) or generated ones."""
        e = self.entries[slot]
        if pos > len(e.tokens):  # a hole: nothing we know past it is reliable
            pos = len(e.tokens)
            tokens = []
        e.tokens = e.tokens[:pos] + list(tokens)
        e.reusable = min(e.reusable, pos)
        if (prompt or self.decode_kv_reusable) and e.reusable == pos:
            e.reusable = pos + len(tokens)
        runs = _cut(e.runs, pos)
        if runs and runs[-1][0] == e.own and runs[-1][2] == pos:
            runs[-1][2] = pos + len(tokens)
        elif tokens:
            runs.append([e.own, pos, pos + len(tokens)])
        e.runs = runs

    def finish(self, slot: int) -> None:
        e = self.entries[slot]
        e.busy, e.target, e.reserve, e.last_used = False, None, 0, next(self._clock)

    # ---- the policy ----------------------------------------------------------------------------
    def usable(self, slot: int, prompt: list[int], namespace: str) -> int:
        """Prompt tokens slot ``slot`` could give: its reusable common prefix, leaving at least the
        prompt's last token to compute (its logits start the answer)."""
        e = self.entries[slot]
        if not self.enabled or e.namespace != namespace:
            return 0
        return min(common_prefix(prompt, e.tokens[:e.reusable]), len(prompt) - 1)

    def plan(self, prompt: list[int], namespace: str, reserve: int, waiting_slots: set[int]) -> Plan | None:
        """Where a request with ``prompt`` (that may grow to ``reserve`` cells) goes, or None: it
        must wait for a running request to end. ``waiting_slots``: slots whose requests wait for a
        prefix themselves (never waited on: no chains)."""
        free = [i for i, e in enumerate(self.entries) if not e.busy]
        if not free:
            return None
        gain = {i: self.usable(i, prompt, namespace) for i in range(len(self.entries))}

        def worth(i: int) -> int:
            return gain[i] if gain[i] >= SIMILARITY_MIN * len(self.entries[i].tokens) else 0

        # The free slot to use: the longest reuse worth keeping; else the least valuable (empty, then
        # least recently used).
        slot = max(free, key=lambda i: (worth(i), not self.entries[i].tokens, -self.entries[i].last_used))
        reuse, copy_from, wait_for = gain[slot], None, None
        donor = max((i for i in gain if i != slot), key=lambda i: gain[i], default=None)
        if donor is not None and gain[donor] >= reuse + SHARE_MIN_TOKENS:
            reuse, copy_from = gain[donor], donor
        if self.enabled:
            for i, e in enumerate(self.entries):
                if e.busy and e.target is not None and i not in waiting_slots and e.namespace == namespace:
                    soon = min(common_prefix(prompt, e.target), len(prompt) - 1)
                    if soon >= max(reuse, gain[i]) + WAIT_MIN_TOKENS and len(e.tokens) < soon:
                        wait_for = (i, soon)
                        break
        evict = self._evictions(slot, reuse, copy_from, reserve, keep={slot} | ({copy_from} - {None}))
        if evict is None:
            return None
        return Plan(slot, reuse, copy_from, wait_for, tuple(evict))

    def _evictions(self, slot: int, reuse: int, copy_from: int | None, reserve: int,
                   keep: set[int]) -> list[int] | None:
        """Idle slots to clear so that the request fits the cells, LRU first; None: wait."""
        lim = self.limits
        runs = {i: e.runs for i, e in enumerate(self.entries)}
        src = self.entries[copy_from] if copy_from is not None else self.entries[slot]
        runs[slot] = _cut(src.runs, reuse)
        growth = sum(max(0, e.reserve - len(e.tokens)) for e in self.entries if e.busy) + max(0, reserve - reuse)
        busy = any(e.busy for e in self.entries)
        victims = sorted((i for i, e in enumerate(self.entries) if not e.busy and i not in keep and e.tokens),
                         key=lambda i: self.entries[i].last_used)
        evict: list[int] = []
        while _cells(runs.values()) + growth > lim.kv_cells:
            if not victims:
                # Nothing left to evict: wait for a running request, unless none runs (then the request
                # runs alone, as it always could: its prompt fits one sequence).
                return None if busy else evict
            victim = victims.pop(0)
            evict.append(victim)
            runs[victim] = []
        return evict

    def evicted(self, slots: tuple[int, ...]) -> None:
        for slot in slots:
            self.clear(slot)
        self.stats.evictions += len(slots)

    def snapshot(self) -> dict:
        """Numbers for Health and metrics."""
        s = self.stats
        prompt = s.cached_tokens + s.computed_tokens
        return {"enabled": self.enabled, "requests": s.requests, "hits": s.hits,
                "cached_tokens": s.cached_tokens, "computed_tokens": s.computed_tokens,
                "hit_rate": round(s.cached_tokens / prompt, 4) if prompt else None,
                "copies": s.copies, "evictions": s.evictions,
                "cells_in_use": _cells(e.runs for e in self.entries), "kv_cells": self.limits.kv_cells,
                "slots": [{"slot": i, "tokens": len(e.tokens), "reusable": e.reusable, "namespace": e.namespace,
                           "busy": e.busy} for i, e in enumerate(self.entries)]}


def _cut(runs: list[list[int]], n: int) -> list[list[int]]:
    """The runs covering positions < n."""
    out = []
    for origin, start, end in runs:
        if start >= n:
            break
        out.append([origin, start, min(end, n)])
    return out


def _cells(all_runs) -> int:
    """Distinct physical cells over every slot's runs (a copied run shares its source's cells)."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for runs in all_runs:
        for origin, start, end in runs:
            spans.setdefault(origin, []).append((start, end))
    total = 0
    for intervals in spans.values():
        intervals.sort()
        hi = -1
        for start, end in intervals:
            if end > hi:
                total += end - max(start, hi)
                hi = end
    return total
