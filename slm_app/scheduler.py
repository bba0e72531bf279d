"""Continuous batching: one thread owns the model and its slots; every request is a sequence in a slot.

Between decode steps the loop admits waiting requests into free slots (FIFO), then runs one
``Backend.forward`` holding the next token of every decoding slot plus, within the step's token
budget, a chunk of the prompt of a slot still prefilling, so a long prompt never freezes the slots
that are decoding. Each row is sampled with its own request's parameters, seed and constraint, and
each request's text is published to its caller after every step. A finished or cancelled request
frees its slot at once, and leaves its tokens' KV there for the next request that starts the same
way (``slm_app.prefix_cache`` decides which slot a request takes, what it reuses or copies from
another slot, and which cached prefixes are evicted). llama.cpp's ``llama-server`` works the same way.

When every running request decodes greedily with nothing to do between its tokens (no constraint,
no repeat penalty) and nobody waits for a free slot, a backend that offers ``decode_greedy`` runs
several steps in one call; stop strings, end of text and limits are applied to its tokens
afterwards, and the text is published once per call.

Callers get a ``Generation`` handle: ``updates()`` (blocking) or ``aupdates()`` (asyncio) yield the
latest ``Completion`` snapshot whenever it changed (a slow reader skips intermediate snapshots rather
than queueing them: text only grows, so the latest says everything), ``cancel()`` ends it whether it
is waiting or running.

Size: over 500 lines on purpose: admission, the step, greedy multi-step decoding and publication all
read and write the slots under one lock; their invariants are easier to keep in one file.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import numpy as np

from slm_app import admission
from slm_app.backends.base import Backend, NativeSampler, Row, SamplingParams, TokenConstraint
from slm_app.errors import Failure, PromptTooLong, SchedulerClosed
from slm_app.prefix_cache import Plan, PrefixCache
from slm_app.sampling import PENALTY_LAST_N, Sampler, TextAssembler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """A request's state as its caller sees it: text so far, or the final answer."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None  # None while running; "stop" | "length" | "cancelled" | "timeout" | "error"
    seed: int  # the seed the request's sampler used (drawn when the request gave none)
    queued_s: float = 0.0  # waiting for a slot
    ttft_s: float | None = None  # submit to first token
    elapsed_s: float = 0.0  # submit to this snapshot
    error: str | None = None  # what failed when finish_reason is "error"
    # What kind of failure, when an engine says (a remote upstream's); None: a failure in the model here.
    failure: Failure | None = None
    retry_after: int | None = None
    # Prompt tokens whose KV came from the prompt cache (not computed); None where nobody counted (remote).
    cached_tokens: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


_WAITING, _PREFILL, _DECODE, _DONE = "waiting", "prefill", "decode", "done"


@dataclass(eq=False)
class Publication:
    """A request's latest snapshot and who waits for the next one (threads and event loops).

    Shared by local jobs and a remote engine's calls, so one ``Generation`` handle serves both.
    ``version`` -1 means nothing is published yet (a reader's first update is then the first real one).
    """

    version: int = 0
    snapshot: Completion | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)
    async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)

    def publish(self, snap: Completion) -> None:
        with self.cond:
            self.snapshot = snap
            self.version += 1
            self.cond.notify_all()
            waiters = list(self.async_waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed: its reader is gone
                pass

    def finish(self, snap: Completion, on_done: Callable[[Completion], None] | None) -> None:
        """Publish the final snapshot, then run the request's ``on_done`` (metrics) once."""
        self.publish(snap)
        if on_done is not None:
            try:
                on_done(snap)
            except Exception:  # bookkeeping must not break serving
                log.exception("on_done callback failed")


@dataclass(eq=False)
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    constraint: TokenConstraint | None
    seed: int
    deadline: float | None
    on_done: Callable[[Completion], None] | None = None
    submitted: float = field(default_factory=time.perf_counter)
    state: str = _WAITING
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the slot's cache
    cached: int = 0  # of which reused from the prompt cache
    namespace: str = "base"  # what the KV depends on besides tokens (Backend.cache_namespace)
    share: tuple["_Job", int] | None = None  # waiting for that request to prefill this many shared tokens
    token_ids: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # sampled or forced, not yet fed to the model
    sampler: Sampler | NativeSampler | None = None
    text: TextAssembler | None = None
    started: float | None = None
    first_token: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    pub: Publication = field(default_factory=Publication)  # what the caller sees

    @property
    def reserved(self) -> int:
        """Cache cells this request may come to hold."""
        return len(self.prompt_ids) + self.params.max_new_tokens


class Generation:
    """The caller's handle on one request: ``cancel(job)`` ends it, ``pub`` is what it publishes."""

    def __init__(self, cancel: Callable[[Any], None], job: Any, pub: Publication):
        self._cancel_job, self._job, self._pub = cancel, job, pub

    def snapshot(self) -> Completion:
        with self._pub.cond:
            return self._pub.snapshot  # type: ignore[return-value]

    def cancel(self) -> None:
        """End the request (waiting or running); its slot is freed before the next step."""
        self._cancel_job(self._job)

    def updates(self, timeout: float | None = None) -> Iterator[Completion]:
        """Every new snapshot until the final one (blocking). Closing the iterator early cancels."""
        pub, seen, done = self._pub, -1, False
        try:
            while True:
                with pub.cond:
                    if not pub.cond.wait_for(lambda: pub.version > seen, timeout):
                        raise TimeoutError("no progress from the scheduler")
                    seen, snap = pub.version, pub.snapshot
                yield snap
                if snap.done:
                    done = True
                    return
        finally:
            if not done:
                self.cancel()

    def result(self, timeout: float | None = None) -> Completion:
        snap = self.snapshot()
        for snap in self.updates(timeout):
            pass
        return snap

    async def aupdates(self) -> AsyncIterator[Completion]:
        """``updates`` for asyncio: waits without a thread. Closing it early cancels the request."""
        pub, seen, done = self._pub, -1, False
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with pub.cond:
            pub.async_waiters.append((loop, event))
        try:
            while True:
                with pub.cond:
                    version, snap = pub.version, pub.snapshot
                    event.clear()
                if version > seen:
                    seen = version
                    yield snap
                    if snap.done:
                        done = True
                        return
                    continue
                await event.wait()
        finally:
            with pub.cond:
                pub.async_waiters.remove((loop, event))
            if not done:
                self.cancel()


class Scheduler:
    """Owns ``backend``: only this object's thread calls its model primitives."""

    def __init__(self, backend: Backend, queue_size: int = 16, prompt_cache: bool = True):
        self.backend = backend
        self.limits = backend.limits()
        self.cache = PrefixCache(self.limits, enabled=prompt_cache, decode_kv_reusable=backend.decode_kv_reusable)
        self.queue_size = queue_size
        self._lock = threading.Condition()
        self._queue: admission.AdmissionQueue[_Job] = admission.AdmissionQueue(queue_size)
        self._waiting = self._queue.waiting
        self._exclusive: collections.deque[tuple[Callable[[Backend], Any], "_Future"]] = collections.deque()
        self._slots: list[_Job | None] = [None] * self.limits.n_slots
        self._closed = False
        self.steps = 0
        self._max_greedy_steps = backend.max_greedy_steps()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    # ---- public entry points -----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, constraint: TokenConstraint | None = None,
               timeout_s: float | None = None, on_done: Callable[[Completion], None] | None = None) -> Generation:
        """Queue one request. Raises ``QueueFull``, ``SchedulerClosed`` or ``PromptTooLong``.

        ``timeout_s`` bounds waiting plus generating (finish reason "timeout", with what was produced);
        ``on_done(final)`` runs once when the request ends, however it ends (metrics)."""
        lim = self.limits
        if not prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if len(prompt_ids) >= lim.max_sequence_tokens:
            raise PromptTooLong(f"the prompt is {len(prompt_ids):,} tokens; one sequence of this model holds "
                                f"{lim.max_sequence_tokens:,} (prompt and answer together)")
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        job = _Job(list(prompt_ids), params, constraint, seed,
                   None if timeout_s is None else time.perf_counter() + timeout_s, on_done)
        job.pub.snapshot = self._completion(job)
        with self._lock:
            self._queue.put(job)  # raises SchedulerClosed or QueueFull
            self._lock.notify()
        return Generation(self._cancel, job, job.pub)

    def call_exclusive(self, fn: Callable[[Backend], Any], timeout: float | None = None) -> Any:
        """Run ``fn(backend)`` on the scheduler's thread while no slot is busy (perplexity scoring).
        Admission pauses until it has run; requests already running finish first."""
        future = _Future()
        with self._lock:
            if self._closed:
                raise SchedulerClosed("the scheduler is closed")
            self._exclusive.append((fn, future))
            self._lock.notify()
        return future.result(timeout)

    def load(self) -> dict[str, int]:
        """Waiting and running requests, for Health and metrics."""
        with self._lock:
            return {"waiting": len(self._waiting), "running": sum(j is not None for j in self._slots),
                    "slots": len(self._slots)}

    def cache_stats(self) -> dict[str, Any]:
        """The prompt cache's numbers (tokens reused and computed, slots' cached prefixes), for Health."""
        with self._lock:
            return self.cache.snapshot()

    def stop_admitting(self) -> None:
        with self._lock:
            self._queue.stop_admitting()

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and all(j is None for j in self._slots) and not self._exclusive

    def drain(self, timeout_s: float) -> bool:
        """Stop admitting, let running and waiting requests finish for up to ``timeout_s``, cancel the
        rest. True if everything finished by itself."""
        return admission.drain(timeout_s, stop_admitting=self.stop_admitting, idle=self.idle,
                               in_flight=self._in_flight, cancel=self._cancel)

    def _in_flight(self) -> list[_Job]:
        with self._lock:
            return list(self._waiting) + [j for j in self._slots if j is not None]

    def close(self, timeout_s: float = 30) -> None:
        """Cancel everything, stop the thread and free the model."""
        with self._lock:
            self._queue.stop_admitting()
            self._closed = True
        for job in self._in_flight():
            self._cancel(job)
        with self._lock:
            self._lock.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("scheduler thread still busy after %s s; not freeing the model", timeout_s)
            return
        self.backend.close()

    # ---- the loop -------------------------------------------------------------------------------
    def _cancel(self, job: _Job) -> None:
        with self._lock:
            job.cancelled = True
            if job.state == _WAITING and job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled")
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._work_ready():
                    self._lock.wait(0.5)
                    self._expire_waiting()
                if self._closed and all(j is None for j in self._slots):
                    return
                if self._exclusive and all(j is None for j in self._slots):
                    fn, future = self._exclusive.popleft()
                else:
                    fn = future = None
                    self._admit()
            if future is not None:
                self._drop_cache()  # the call may use any cell (score fills slot 0 up to n_ctx)
                future.run(fn, self.backend)
                continue
            try:
                self._step()
            except Exception as exc:  # a failed step costs the running requests, never the server
                log.exception("decode step failed")
                self._fail_running(f"{type(exc).__name__}: {exc}")

    def _work_ready(self) -> bool:
        return bool(any(j is not None for j in self._slots) or self._exclusive or self._waiting)

    def _expire_waiting(self) -> None:
        now = time.perf_counter()
        for job in [j for j in self._waiting if j.deadline is not None and now >= j.deadline]:
            self._waiting.remove(job)
            self._finish(job, "timeout")

    def _admit(self) -> None:
        """FIFO into free slots while the cache can hold what each request may grow to. Caller holds the lock."""
        # A waiting request's timeout runs out while every slot is busy too, not only when idle.
        self._expire_waiting()
        if self._exclusive:
            return  # let running requests end so the exclusive call can run
        lim = self.limits
        while self._waiting:
            job = self._waiting[0]
            job.namespace = self.backend.cache_namespace(job.params)
            waiting_on_share = {j.slot for j in self._slots if j is not None and j.share is not None}
            plan = self.cache.plan(job.prompt_ids, job.namespace, min(job.reserved, lim.max_sequence_tokens),
                                   waiting_on_share)
            if plan is None:
                return  # the head waits for room; nobody overtakes it
            self._waiting.popleft()
            job.state, job.slot, job.started = _PREFILL, plan.slot, time.perf_counter()
            self._slots[plan.slot] = job
            self._place(job, plan)
            job.text = TextAssembler(job.params.stop)
            job.sampler = self.backend.native_sampler(job.params, job.seed) or Sampler(job.params, job.seed)

    def _place(self, job: _Job, plan: Plan) -> None:
        """Put ``job`` in its slot with what it reuses: evict, keep or copy, as the plan says."""
        cache, backend, slot = self.cache, self.backend, plan.slot
        for victim in plan.evict:
            backend.release(victim)
        cache.evicted(plan.evict)
        reuse = plan.reuse
        if plan.copy_from is not None and backend.copy_prefix(plan.copy_from, slot, reuse):
            cache.copied(plan.copy_from, slot, reuse)
        elif plan.copy_from is None and reuse > 0 and backend.keep_prefix(slot, reuse):
            cache.kept(slot, reuse, job.namespace)
        else:
            reuse = 0
            backend.release(slot)
            cache.kept(slot, 0, job.namespace)
        job.prefilled = job.cached = reuse
        cache.assign(slot, job.prompt_ids, min(job.reserved, self.limits.max_sequence_tokens))
        if plan.wait_for is not None and self._slots[plan.wait_for[0]] is not None:
            job.share = (self._slots[plan.wait_for[0]], plan.wait_for[1])
        else:
            cache.count(len(job.prompt_ids), reuse)

    def _take_shared(self, job: _Job) -> bool:
        """For a request waiting for another's prefill of a common prefix: False while it should wait;
        else copy the longest prefix any slot now holds and let it prefill the rest."""
        donor, n = job.share  # type: ignore[misc]
        if (donor.state == _PREFILL and not donor.cancelled and self._slots[donor.slot] is donor
                and len(self.cache.entries[donor.slot].tokens) < n):
            return False
        job.share = None
        gain, src = max((self.cache.usable(i, job.prompt_ids, job.namespace), i)
                        for i in range(len(self._slots)) if i != job.slot)
        if gain > job.prefilled and self.backend.copy_prefix(src, job.slot, gain):
            with self._lock:
                self.cache.copied(src, job.slot, gain)
            job.prefilled = job.cached = gain
        with self._lock:
            self.cache.count(len(job.prompt_ids), job.cached)
        return True

    def _drop_cache(self) -> None:
        """Forget every cached prefix (no request runs)."""
        for slot, entry in enumerate(self.cache.entries):
            if entry.tokens:
                self.backend.release(slot)
            with self._lock:
                self.cache.clear(slot)

    def _step(self) -> None:
        lim = self.limits
        now = time.perf_counter()
        rows: list[Row] = []
        owners: list[_Job] = []
        active = [j for j in self._slots if j is not None]
        for job in active:
            if job.cancelled:
                self._end(job, "cancelled")
            elif job.deadline is not None and now >= job.deadline:
                self._end(job, "timeout")
        if self._greedy_steps():
            return
        budget = lim.max_step_tokens
        for job in self._slots:
            if job is not None and job.state == _DECODE and job.pending:
                pos = len(job.prompt_ids) + len(job.token_ids) - len(job.pending)
                rows.append(Row(job.slot, tuple(job.pending), pos, True))
                owners.append(job)
                budget -= len(job.pending)
                job.pending = []
        # Prefill chunks, oldest request first, within what is left of the step's token budget.
        for job in sorted((j for j in self._slots if j is not None and j.state == _PREFILL), key=lambda j: j.submitted):
            if budget <= 0:
                break
            if job.share is not None and not self._take_shared(job):
                continue
            chunk = job.prompt_ids[job.prefilled: job.prefilled + budget]
            last = job.prefilled + len(chunk) == len(job.prompt_ids)
            rows.append(Row(job.slot, tuple(chunk), job.prefilled, last, prompt=True))
            owners.append(job if last else None)  # type: ignore[arg-type]
            job.prefilled += len(chunk)
            budget -= len(chunk)
        if not rows:
            return
        logits = self.backend.forward(rows)
        self.steps += 1
        with self._lock:
            for row in rows:
                self.cache.fed(row.slot, row.pos, list(row.tokens), row.prompt)
        out = 0
        for row, job in zip(rows, owners):
            if not row.logits:
                continue
            i, out = out, out + 1
            if job is None:
                continue
            job.state = _DECODE
            self._sample(job, logits, i)

    def _greedy_steps(self) -> bool:
        """Several decode steps in one backend call, when every running request is decoding greedily
        with nothing between its tokens that needs Python (no constraint, no repeat penalty) and no
        waiting request could take a free slot. Stop strings, end of text and limits are checked on
        the tokens afterwards; tokens past a request's end are dropped (their cache cells are never
        read: attention looks no further than a query's own position). False: run one step instead."""
        if self._max_greedy_steps < 2:
            return False
        jobs = [j for j in self._slots if j is not None]
        if not jobs or (self._waiting and len(jobs) < len(self._slots)):
            return False
        for job in jobs:
            if (job.state != _DECODE or len(job.pending) != 1 or job.constraint is not None
                    or not isinstance(job.sampler, Sampler) or not job.params.greedy
                    or job.params.repeat_penalty != 1.0):
                return False
        # Never past a request's limit: a call ends exactly where the first request's length runs out.
        steps = min(self._max_greedy_steps, *(self._remaining(j) for j in jobs))
        if steps < 2:
            return False
        rows = [Row(j.slot, tuple(j.pending), len(j.prompt_ids) + len(j.token_ids) - 1) for j in jobs]
        for job in jobs:
            job.pending = []
        picks = self.backend.decode_greedy(rows, steps)
        self.steps += 1
        with self._lock:
            for row, tokens in zip(rows, picks.tolist()):  # the call fed each row's token and all picks but the last
                self.cache.fed(row.slot, row.pos, [*row.tokens, *tokens[:-1]], False)
        for job, tokens in zip(jobs, picks.tolist()):
            if all(self._accept(job, token) for token in tokens):
                job.pending = job.pending[-1:]  # the call fed every token but its last one
                self._publish(job)
        return True

    def _sample(self, job: _Job, logits: Any, i: int) -> None:
        p = job.params
        remaining = p.max_new_tokens - len(job.token_ids)
        allowed = None
        if job.constraint is not None:
            allowed = np.asarray(job.constraint.allowed_tokens(remaining), dtype=bool)
            if not allowed.any():
                log.warning("constraint allows no token; ending the request")
                self._end(job, "stop")
                return
        if isinstance(job.sampler, Sampler):
            token = job.sampler.sample(logits, i, allowed, job.token_ids[-PENALTY_LAST_N:])
        else:
            token = job.sampler.sample(logits, i, allowed)
        if not self._accept(job, token):
            return
        if job.constraint is not None:
            # Forced tokens need no sampling: they are fed with this one in the next step, at most a
            # quarter of a step's tokens, so decoding rows stay within the step's budget.
            forced = job.constraint.forced_tokens()[: min(self._remaining(job), self.limits.max_step_tokens // 4)]
            for token in forced:
                if not self._accept(job, token):
                    return
        self._publish(job)

    def _accept(self, job: _Job, token: int) -> bool:
        """Record a sampled token: end the job if it is the last one. True while the job runs on."""
        if job.first_token is None:
            job.first_token = time.perf_counter()
        if job.constraint is not None:
            job.constraint.consume(token)  # end-of-text too: the constraint may want to see it
        if self.backend.is_end(token):
            self._end(job, "stop")
            return False
        job.token_ids.append(token)
        job.pending.append(token)
        if job.text.add(self.backend.token_bytes(token)):
            self._end(job, "stop", cut=True)
        elif job.constraint is not None and job.constraint.is_finished():
            self._end(job, "stop")
        elif self._remaining(job) <= 0:
            self._end(job, "length")
        else:
            return True
        return False

    def _remaining(self, job: _Job) -> int:
        """Tokens the job may still generate (its own limit and the sequence's)."""
        return min(job.params.max_new_tokens - len(job.token_ids),
                   self.limits.max_sequence_tokens - len(job.prompt_ids) - len(job.token_ids))

    def _end(self, job: _Job, reason: str, cut: bool = False, error: str | None = None) -> None:
        """Finish a job that holds a slot, and free the slot for the next request."""
        if job.text is not None and not cut:
            job.text.finish()
        if isinstance(job.sampler, NativeSampler):
            job.sampler.close()
        job.sampler = None
        try:
            # The slot keeps its tokens' KV for the next request (prompt cache), unless the step failed.
            if error is not None or not self.cache.enabled:
                self.backend.release(job.slot)
                with self._lock:
                    self.cache.clear(job.slot)
        finally:
            with self._lock:
                if 0 <= job.slot < len(self._slots):
                    self.cache.finish(job.slot)
                if 0 <= job.slot < len(self._slots) and self._slots[job.slot] is job:
                    self._slots[job.slot] = None
                job.error = error
                self._finish(job, reason)

    def _fail_running(self, error: str) -> None:
        for job in [j for j in self._slots if j is not None]:
            try:
                self._end(job, "error", error=error)
            except Exception:  # releasing failed too: drop the slot anyway
                log.exception("releasing slot %d failed", job.slot)
                with self._lock:
                    self.cache.clear(job.slot)
                    self._slots[job.slot] = None
                    self._finish(job, "error")

    def _finish(self, job: _Job, reason: str) -> None:
        if job.state == _DONE:
            return
        job.state, job.finish_reason = _DONE, reason
        job.pub.finish(self._completion(job), job.on_done)

    # ---- publication ------------------------------------------------------------------------------
    def _completion(self, job: _Job) -> Completion:
        now = time.perf_counter()
        return Completion(
            text=job.text.visible if job.text is not None else "",
            prompt_tokens=len(job.prompt_ids), completion_tokens=len(job.token_ids),
            finish_reason=job.finish_reason, seed=job.seed,
            queued_s=((job.started or now) - job.submitted),
            ttft_s=None if job.first_token is None else job.first_token - job.submitted,
            elapsed_s=now - job.submitted, error=job.error, cached_tokens=job.cached)

    def _publish(self, job: _Job) -> None:
        job.pub.publish(self._completion(job))


class _Future:
    """A result handed from the scheduler thread to a waiting caller."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self, fn: Callable[[Backend], Any], backend: Backend) -> None:
        try:
            self._value = fn(backend)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._error = exc
        finally:
            self._done.set()

    def result(self, timeout: float | None) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError("the scheduler did not run the call in time")
        if self._error is not None:
            raise self._error
        return self._value

