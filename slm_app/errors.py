"""Errors, below every other module: what a request can fail with, and how that maps to a status.

Two kinds live here:

* ``RequestError``: a request the server refuses, with the HTTP status the HTTP surfaces answer
  with. The service, conversation, tools and API layers raise it; Gradio shows its message.
* Engine errors (``EngineError`` and its subclasses, and ``Failure`` on a finished ``Completion``):
  what an engine (scheduler + backend, or a remote upstream) reports in its own terms. Engines never
  name HTTP statuses; ``request_error`` and ``raise_failure`` map them, in one table, for every caller.
"""

from __future__ import annotations

import enum
from typing import Protocol

# Seconds a refused client is told to wait (Retry-After) when every slot and the waiting line are full.
RETRY_AFTER_S = 2


class RequestError(ValueError):
    """A request the server refuses. ``status`` is the HTTP status the REST surfaces answer with,
    ``param`` the request field it is about (when one is), ``retry_after`` seconds for 429/503."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.retry_after = retry_after


class Failure(enum.Enum):
    """Why an engine could not serve a request, in the engine's terms (the API layer picks the status)."""

    RATE_LIMITED = "rate_limited"  # the upstream asks us to slow down (its 429)
    UNAVAILABLE = "unavailable"  # cannot serve now: upstream down or not ready; retry later
    TIMEOUT = "timeout"  # the upstream sent nothing in time
    UPSTREAM = "upstream"  # the upstream failed or answered something we cannot read
    FORMAT_REJECTED = "format_rejected"  # the upstream refused the request's response_format
    REFUSED = "refused"  # the request passed our limits but not the upstream's
    TOO_LARGE = "too_large"  # the upstream found the request too large
    INTERNAL = "internal"  # a bug or a model failure here


# The one map from engine failures to HTTP statuses.
FAILURE_STATUS = {Failure.RATE_LIMITED: 429, Failure.UNAVAILABLE: 503, Failure.TIMEOUT: 504, Failure.UPSTREAM: 502,
                  Failure.FORMAT_REJECTED: 502, Failure.REFUSED: 400, Failure.TOO_LARGE: 413, Failure.INTERNAL: 500}


class EngineError(RuntimeError):
    """An engine refused or failed a request. ``retry_after``: seconds after which retrying makes sense."""

    failure = Failure.INTERNAL

    def __init__(self, message: str, failure: Failure | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if failure is not None:
            self.failure = failure
        self.retry_after = retry_after


class QueueFull(EngineError):
    """The waiting line is full; retry later."""

    failure = Failure.UNAVAILABLE


class SchedulerClosed(EngineError):
    """The engine is shutting down or closed and admits nothing new."""

    failure = Failure.UNAVAILABLE


class PromptTooLong(EngineError, ValueError):
    """The prompt does not fit one sequence of the model's context."""

    failure = Failure.TOO_LARGE


def request_error(exc: EngineError) -> RequestError:
    """An engine's refusal as the request error its caller answers with."""
    status = FAILURE_STATUS[exc.failure]
    retry_after = exc.retry_after
    if retry_after is None and status in (429, 503) and not isinstance(exc, PromptTooLong):
        retry_after = RETRY_AFTER_S
    if isinstance(exc, QueueFull):
        return RequestError(f"{exc}; retry in a few seconds", status=status, retry_after=retry_after)
    return RequestError(str(exc), status=status, param="prompt" if isinstance(exc, PromptTooLong) else None,
                        retry_after=retry_after)


class FinishedRequest(Protocol):
    """What ``raise_failure`` reads of a finished request (``scheduler.Completion``)."""

    finish_reason: str | None
    error: str | None
    failure: Failure | None
    retry_after: int | None
    completion_tokens: int
    elapsed_s: float


def raise_failure(final: FinishedRequest) -> None:
    """A generation that failed is an error for its caller (the server keeps serving): a failure in
    the model here is a 500, an upstream's keeps its meaning (busy 429/503 pass through with their
    Retry-After); a timeout before the first token is a 504."""
    if final.finish_reason == "error":
        if final.failure is None:
            raise RequestError(f"generation failed: {final.error}", status=500)
        raise RequestError(final.error or "the upstream failed", status=FAILURE_STATUS[final.failure],
                           retry_after=final.retry_after)
    if final.finish_reason == "timeout" and final.completion_tokens == 0:
        raise RequestError(f"timed out after {final.elapsed_s:.1f} s before the first token "
                           "(the server's SLM_REQUEST_TIMEOUT_S)", status=504)
