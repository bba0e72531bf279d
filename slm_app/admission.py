"""The FIFO admission line in front of an engine's slots, and graceful drain: written once, used by
the scheduler (slots in a local model's cache) and the remote engine (requests running upstream).

The owner keeps its own lock around every call (the scheduler's condition variable, the remote
engine's lock): this class holds state, not a lock, so it fits either owner's locking.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Generic, Iterable, TypeVar

from slm_app.errors import QueueFull, SchedulerClosed

T = TypeVar("T")


class AdmissionQueue(Generic[T]):
    """Requests waiting for a slot, oldest first; ``queue_size`` of them at most beyond free slots."""

    def __init__(self, queue_size: int, waiting_for: str = "a slot"):
        self.queue_size = queue_size
        self.waiting_for = waiting_for
        self.waiting: collections.deque[T] = collections.deque()
        self.admitting = True

    def put(self, item: T, free_slots: int = 0) -> None:
        """Add ``item`` at the end of the line. ``free_slots``: slots that will take a request at once
        (not counted against ``queue_size``). Raises ``SchedulerClosed`` or ``QueueFull``."""
        if not self.admitting:
            raise SchedulerClosed("the server is shutting down and admits no new requests")
        if len(self.waiting) >= self.queue_size + max(0, free_slots):
            raise QueueFull(f"busy: {self.queue_size} requests are already waiting for {self.waiting_for}")
        self.waiting.append(item)

    def stop_admitting(self) -> None:
        self.admitting = False


def drain(timeout_s: float, *, stop_admitting: Callable[[], None], idle: Callable[[], bool],
          in_flight: Callable[[], Iterable[T]], cancel: Callable[[T], None]) -> bool:
    """Graceful shutdown: stop admitting, let running and waiting requests finish for up to
    ``timeout_s``, then cancel what is left. True if everything finished by itself."""
    stop_admitting()
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if idle():
            return True
        time.sleep(0.02)
    for item in list(in_flight()):
        cancel(item)
    return False
