"""One request to the upstream: its payload, and its server-sent events folded into ``Completion``
snapshots published through a ``scheduler.Publication`` (so one ``Generation`` handle serves local
and remote requests alike)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import httpx
from httpx_sse import SSEError, aconnect_sse

from slm_app.backends.base import SamplingParams
from slm_app.engines.base import ModelPrompt
from slm_app.engines.remote.failures import UpstreamFailure, http_failure
from slm_app.errors import Failure
from slm_app.scheduler import Completion, Publication

log = logging.getLogger(__name__)


@dataclass(eq=False)
class UpstreamCall:
    """One request to the upstream; ``RemoteEngine._cancel`` ends it."""

    path: str
    payload: dict[str, Any]
    prompt_tokens: int
    params: SamplingParams
    seed: int
    asked_format: bool  # the payload carries a response_format (a refusal of it is recognised)
    deadline: float | None
    on_done: Callable[[Completion], None] | None
    count_text: str | None = None  # prompt_tokens is an upper bound: count this text upstream meanwhile
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    text: str = ""
    completion_tokens: int = 0
    upstream_finish: str | None = None  # the stream's finish_reason, once it said one
    finish_reason: str | None = None  # set once, when the call ends (the snapshot is then final)
    failure: UpstreamFailure | None = None
    cancelled: bool = False
    task: asyncio.Task | None = None
    # Nothing published yet (version -1), so a reader's first update is the first token or the
    # failure. An HTTP surface then answers an upstream's refusal with its status instead of a 200
    # stream that carries the error.
    pub: Publication = field(default_factory=lambda: Publication(version=-1))

    def completion(self) -> Completion:
        now = time.perf_counter()
        f = self.failure
        return Completion(
            text=self.text, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            finish_reason=self.finish_reason, seed=self.seed, queued_s=(self.started or now) - self.submitted,
            ttft_s=None if self.first_token is None else self.first_token - self.submitted,
            elapsed_s=now - self.submitted, error=f.message if f else None, failure=f.failure if f else None,
            retry_after=f.retry_after if f else None)

    def publish(self) -> None:
        self.pub.publish(self.completion())


def request_payload(model: str | None, prompt: ModelPrompt, params: SamplingParams, seed: int,
                    response_format: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The path and body of a streamed completion: chat messages when the prompt has them (the
    upstream applies its template), else a raw prompt."""
    # include_usage: servers that send several tokens per event still report the exact count.
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": params.max_new_tokens,
                            "temperature": params.temperature, "top_p": params.top_p, "seed": seed}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.top_k > 0:  # not OpenAI's, but llama-server, llama-cpp-python, vLLM and Ollama read it
        body["top_k"] = params.top_k
    if params.repeat_penalty != 1.0:  # llama.cpp's name and vLLM's
        body["repeat_penalty"] = body["repetition_penalty"] = params.repeat_penalty
    if response_format is not None:
        body["response_format"] = response_format
    if prompt.messages is not None:
        return "/chat/completions", {**body, "messages": list(prompt.messages)}
    return "/completions", {**body, "prompt": prompt.text}


async def stream_call(client: httpx.AsyncClient, url: str, call: UpstreamCall, *, on_connected: Callable[[], None],
                      count_tokens: Callable[[str], Awaitable[list[int]]] | None) -> None:
    """POST with ``stream: true`` and fold the server-sent events into the call's text.
    ``count_tokens``: the upstream's tokenizer, for the exact prompt count once the first token came."""
    async with aconnect_sse(client, "POST", f"{url}{call.path}", json=call.payload) as source:
        response = source.response
        if response.status_code != 200:
            raise http_failure(response, await response.aread(), call.asked_format)
        on_connected()
        usage_tokens = usage_prompt = count_task = None
        try:
            async for event in source.aiter_sse():
                if event.data.strip() == "[DONE]":
                    break
                if not event.data.strip():
                    continue
                chunk = json.loads(event.data)
                if not isinstance(chunk, dict):
                    raise UpstreamFailure(f"the upstream sent an event that is not an object: {event.data[:100]}",
                                          Failure.UPSTREAM)
                if chunk.get("error"):
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else str(error)
                    raise UpstreamFailure(f"the upstream failed mid-stream: {message}", Failure.UPSTREAM)
                if isinstance(usage := chunk.get("usage"), dict):
                    if usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        usage_prompt = int(usage["prompt_tokens"])
                grew = False
                for choice in chunk.get("choices") or ():
                    piece = choice.get("text")
                    if piece is None:
                        piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        call.text += piece
                        grew = True
                    if choice.get("finish_reason"):
                        call.upstream_finish = "length" if choice["finish_reason"] == "length" else "stop"
                if grew:
                    # One event is one token on llama.cpp's servers; servers that send several per
                    # event report the exact count in the final usage chunk (stream_options).
                    call.completion_tokens += 1
                    if call.first_token is None:
                        call.first_token = time.perf_counter()
                        if call.count_text is not None and count_tokens is not None:  # off the path to the first token
                            count_task = asyncio.create_task(count_tokens(call.count_text))
                    call.publish()
            if usage_prompt is not None:
                call.prompt_tokens = usage_prompt
            elif count_task is not None:
                try:
                    call.prompt_tokens = len(await count_task)
                except (httpx.HTTPError, UpstreamFailure, ValueError) as exc:  # keep the upper bound
                    log.warning("counting the prompt's tokens upstream failed: %s", exc)
        except SSEError as exc:
            raise UpstreamFailure(f"the upstream did not answer with server-sent events: {exc}",
                                  Failure.UPSTREAM) from None
        except json.JSONDecodeError as exc:
            raise UpstreamFailure(f"the upstream sent an event that is not JSON: {exc}", Failure.UPSTREAM) from None
        finally:
            if count_task is not None and not count_task.done():
                count_task.cancel()
        if usage_tokens is not None:
            call.completion_tokens = usage_tokens
        if call.upstream_finish is None:
            raise UpstreamFailure("the upstream ended the stream without a finish_reason (interrupted by "
                                  "another request? llama-cpp-python's server needs --interrupt_requests False)",
                                  Failure.UPSTREAM)
