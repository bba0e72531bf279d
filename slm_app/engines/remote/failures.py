"""Upstream failures in the engine's terms: what went wrong talking to the upstream, as a
``slm_app.errors.Failure`` kind (the API layer maps kinds to statuses) and the upstream's own words."""

from __future__ import annotations

import json

import httpx

from slm_app.errors import RETRY_AFTER_S, Failure


class UpstreamFailure(Exception):
    def __init__(self, message: str, failure: Failure, retry_after: int | None = None):
        super().__init__(message)
        self.message, self.failure, self.retry_after = message, failure, retry_after


def public_url(url: str) -> str:
    """The URL without user, password, query or fragment: safe for Health and logs."""
    u = httpx.URL(url)
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{u.host}{port}{u.path}".rstrip("/")


def upstream_message(body: bytes) -> str:
    """The upstream's own error message (OpenAI's {"error": {"message"}}, TGI's {"error": str},
    FastAPI's {"detail"}), cut short."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:300] or "(no body)"
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error).strip()[:300]
    return str(data)[:300]


def _retry_after(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after")
    try:
        return max(0, int(float(value))) if value is not None else None
    except ValueError:
        return RETRY_AFTER_S  # an HTTP date: rare; a small fixed wait is a fair reading of it


def http_failure(response: httpx.Response, body: bytes, asked_format: bool) -> UpstreamFailure:
    status, message = response.status_code, upstream_message(body)
    where = f"the upstream answered {status}: {message}"
    # A refused response_format: a 4xx about the request, or (llama-cpp-python) a 500 that names it.
    format_rejected = asked_format and (status in (400, 422) or "response_format" in message)
    if status in (429, 503):  # busy or not ready upstream: the caller should retry, as told
        kind = Failure.RATE_LIMITED if status == 429 else Failure.UNAVAILABLE
        return UpstreamFailure(where, kind, _retry_after(response) or RETRY_AFTER_S)
    if status in (401, 403):
        return UpstreamFailure(f"the upstream refused our credentials ({status}): check SLM_REMOTE_API_KEY",
                               Failure.UPSTREAM)
    if status == 404:
        return UpstreamFailure(f"{where} (is SLM_REMOTE_URL the /v1 base and the model served?)", Failure.UPSTREAM)
    if status in (400, 413, 422) and not format_rejected:
        # The request passed our limits but not the upstream's (e.g. its context length): the caller's.
        return UpstreamFailure(where, Failure.TOO_LARGE if status == 413 else Failure.REFUSED)
    return UpstreamFailure(where, Failure.FORMAT_REJECTED if format_rejected else Failure.UPSTREAM)


def describe(exc: BaseException, url: str) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection to {url} within the connect timeout"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {url} ({exc or 'connection refused'})"
    if isinstance(exc, httpx.ReadTimeout):
        return f"{url} sent nothing within the read timeout"
    if isinstance(exc, UpstreamFailure):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def transport_failure(exc: httpx.HTTPError, url: str) -> UpstreamFailure:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return UpstreamFailure(f"upstream {url} unavailable: {describe(exc, url)}", Failure.UNAVAILABLE, RETRY_AFTER_S)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamFailure(describe(exc, url), Failure.TIMEOUT)
    return UpstreamFailure(f"the connection to {url} failed: {describe(exc, url)}", Failure.UPSTREAM)
