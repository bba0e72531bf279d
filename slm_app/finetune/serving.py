"""Serving several LoRA adapters from one llama.cpp context without ever mixing them.

An adapter applies to the whole context (every slot), so requests for different adapters cannot
decode together. ``AdapterRouter`` sits in front of the scheduler (``LocalEngine.submit`` hands
requests to it when one is attached) and keeps one rule: **a request runs entirely on the adapter it
was admitted under.** Requests for the adapter being applied go straight to the scheduler; a request
for another one waits until every request admitted under the current adapter has finished (drain),
then the switch runs through ``Scheduler.call_exclusive`` (on the scheduler's thread, no slot busy),
then it and every waiting request for that adapter go in. Waiters are served in arrival order, so a
steady stream for one adapter cannot starve another: a newcomer for the current adapter queues
behind an earlier request for a different one.

A request names its adapter in ``SamplingParams.adapter``: an adapter id, ``"base"`` for the base
model, or None for the *promoted* adapter. ``promote`` changes what None means; requests already
admitted finish on the adapter they started with, and the swap happens when they have drained.
Measured switch pause (``bench/finetune.py``): the exclusive call itself plus llama.cpp's graph
re-reserve on the next decode.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Callable

from slm_app.backends.base import Backend
from slm_app.scheduler import Completion, Generation, Scheduler

log = logging.getLogger(__name__)

BASE = "base"  # what a request sends to ask for the model without any adapter


class AdapterRouter:
    def __init__(self, scheduler: Scheduler, path_of: Callable[[str], str]):
        """``path_of(adapter_id)`` is the adapter's GGUF file (loaded on first use)."""
        self._scheduler, self._path_of = scheduler, path_of
        self._cond = threading.Condition()
        self._promoted: str | None = None  # what a request without an adapter gets (None: the base model)
        self._active: str | None = scheduler.backend.active_adapter()  # what the context applies now
        self._outstanding = 0  # admitted under _active and not finished
        self._switching = False
        self._tickets = itertools.count()
        self._waiting: dict[int, str | None] = {}  # ticket -> the adapter it waits for
        self._validated: set[str] = set()  # adapters that loaded once (the backend reloads evicted ones)
        self.switches = 0
        self.last_switch_ms: float | None = None

    # ---- state -----------------------------------------------------------------------------------
    @property
    def promoted(self) -> str | None:
        return self._promoted

    @property
    def active(self) -> str | None:
        return self._active

    def promote(self, adapter_id: str | None) -> None:
        """From now on, requests that name no adapter get ``adapter_id`` (None: the base model).
        Nothing stops: running requests finish on theirs, the switch follows when they have drained."""
        with self._cond:
            self._promoted = adapter_id
            self._cond.notify_all()

    def resolve(self, requested: str | None) -> str | None:
        if requested is None:
            return self._promoted
        return None if requested == BASE else requested

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"promoted": self._promoted or BASE, "applied": self._active or BASE,
                    "running": self._outstanding, "waiting_for_switch": len(self._waiting),
                    "switches": self.switches, "last_switch_ms": self.last_switch_ms}

    # ---- admission -------------------------------------------------------------------------------
    def preload(self, adapter_id: str) -> None:
        """Load an adapter into the model ahead of use (a load error surfaces here, not mid-request).
        Once one has loaded, this returns at once: it waits for no running request."""
        if adapter_id in self._validated:
            return
        path = self._path_of(adapter_id)
        self._scheduler.call_exclusive(lambda b: b.load_adapter(adapter_id, path))
        self._validated.add(adapter_id)

    def submit(self, requested: str | None, start: Callable[[Callable[[Completion], None]], Generation],
               on_done: Callable[[Completion], None] | None) -> Generation:
        """Run ``start(on_done)`` (the scheduler's submit) once the context applies the request's adapter."""
        with self._cond:
            want = self.resolve(requested)
            ticket = next(self._tickets)
            self._waiting[ticket] = want
            try:
                while True:
                    earlier_other = any(t < ticket and w != want for t, w in self._waiting.items())
                    if self._active == want and not self._switching and not earlier_other:
                        break
                    first = min(self._waiting) == ticket
                    if self._active != want and first and not self._switching and self._outstanding == 0:
                        self._switch(want)
                        continue
                    self._cond.wait()
            finally:
                del self._waiting[ticket]
                self._cond.notify_all()
            self._outstanding += 1

        def done(final: Completion) -> None:
            with self._cond:
                self._outstanding -= 1
                self._cond.notify_all()
            if on_done is not None:
                on_done(final)

        try:
            return start(done)
        except BaseException:
            with self._cond:
                self._outstanding -= 1
                self._cond.notify_all()
            raise

    def _switch(self, want: str | None) -> None:
        """Apply ``want`` to the context. Caller holds the lock, nothing is outstanding."""
        self._switching = True
        self._cond.release()
        try:
            path = self._path_of(want) if want is not None else None
            t0 = time.perf_counter()

            def apply(backend: Backend) -> None:
                if want is not None:
                    backend.load_adapter(want, path)
                backend.set_adapter(want)

            self._scheduler.call_exclusive(apply)
            elapsed = (time.perf_counter() - t0) * 1000
        finally:
            self._cond.acquire()
            self._switching = False
        self._active = want
        self.switches += 1
        self.last_switch_ms = round(elapsed, 2)
        log.info("adapter switched to %s in %.1f ms", want or BASE, elapsed)

    def with_adapter(self, adapter_id: str | None, fn: Callable[[Backend], Any]) -> Any:
        """Run ``fn(backend)`` on the scheduler's thread with ``adapter_id`` applied, then put back what
        the context applied before (the gate's scoring: one exclusive call, requests wait meanwhile)."""
        path = self._path_of(adapter_id) if adapter_id is not None else None

        def run(backend: Backend) -> Any:
            before = backend.active_adapter()
            if adapter_id is not None:
                backend.load_adapter(adapter_id, path)
            backend.set_adapter(adapter_id)
            try:
                return fn(backend)
            finally:
                backend.set_adapter(before)

        return self._scheduler.call_exclusive(run)
