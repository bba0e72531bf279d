"""The logic behind the OpenAI routes: chat messages to turns, requests to the service's generations,
and results to OpenAI's answer shapes (whole, streamed as server-sent events, tool calls).
``routes`` only maps HTTP to ``OpenAIServing``; ``protocol`` holds the wire models."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi.responses import Response, StreamingResponse

from slm_app import conversation, tools
from slm_app.finetune import manager as fine_tuning
from slm_app.api.common import printable, prompt_list, public_error
from slm_app.api.openai.protocol import ChatMessage, ChatRequest, CompletionRequest, _Sampling, error_body
from slm_app.backends.base import SamplingParams
from slm_app.engines.base import PreparedPrompt
from slm_app.errors import RequestError
from slm_app.scheduler import Completion
from slm_app.service import GenerationService
from slm_app.structured import Outcome


def _message_text(i: int, m: ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"messages[{i}].content: only text parts are supported, got {part.get('type')!r}",
                               param=f"messages[{i}].content")
        parts.append(part["text"])
    return "".join(parts)


def chat_turns(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as system/user/assistant turns (earlier tool calls and results included)."""
    return tools.conversation_turns([{**m.model_dump(exclude={"content"}), "content": _message_text(i, m)}
                                     for i, m in enumerate(messages)])


@dataclasses.dataclass(frozen=True)

class _Kind:
    """What differs between /v1/completions and /v1/chat/completions answers."""

    endpoint: str  # the metrics label
    object: str
    chunk_object: str
    id_prefix: str
    chat: bool

    def visible(self, text: str) -> str:
        return text.lstrip() if self.chat else text

    def choice(self, index: int, text: str, finish: str) -> dict[str, Any]:
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": index, **body, "logprobs": None, "finish_reason": finish}

    def chunk_choice(self, index: int, delta: str, finish: str | None) -> dict[str, Any]:
        body = {"delta": {"content": delta} if delta else {}} if self.chat else {"text": delta}
        return {"index": index, **body, "logprobs": None, "finish_reason": finish}


_COMPLETION = _Kind("completions", "text_completion", "text_completion", "cmpl-", chat=False)

_CHAT = _Kind("chat", "chat.completion", "chat.completion.chunk", "chatcmpl-", chat=True)


def _finish_reason(seq: Completion, params: SamplingParams) -> str:
    """OpenAI's reason; the request timeout is "length" (see the module docstring)."""
    if seq.finish_reason in ("length", "timeout") or (
            seq.finish_reason is None and seq.completion_tokens >= params.max_new_tokens):
        return "length"
    return "stop"


def _cached(cached: int | None, prompt_tokens: int) -> int | None:
    """Cached tokens of a structured prompt (the conversation plus the schema instruction), within the
    conversation's tokens that usage reports as the prompt."""
    return None if cached is None else min(cached, prompt_tokens)


def _usage(seqs: list[Completion]) -> dict[str, Any]:
    prompt = sum(s.prompt_tokens for s in seqs)
    completion = sum(s.completion_tokens for s in seqs)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if seqs and all(s.cached_tokens is not None for s in seqs):  # counted by the local scheduler
        usage["prompt_tokens_details"] = {"cached_tokens": sum(s.cached_tokens or 0 for s in seqs)}
    return usage


@dataclasses.dataclass

class OpenAIAnswer:
    """A validated request's answer: what it runs (``steps``) and how it is answered (plain or streamed)."""

    kind: _Kind
    model: str
    params: SamplingParams
    include_usage: bool
    steps: AsyncIterator[list[Completion]]
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.kind.id_prefix + self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    async def answer(self, stream: bool) -> dict[str, Any] | Response:
        if not stream:
            seqs: list[Completion] = []
            async with aclosing(self.steps):
                async for seqs in self.steps:
                    pass
            choices = [self.kind.choice(i, self.kind.visible(s.text), _finish_reason(s, self.params))
                       for i, s in enumerate(seqs)]
            return self.envelope(self.kind.object, choices, usage=_usage(seqs))  # checked by the response_model
        # Wait for the first step before answering 200, so busy / not loaded still get their status.
        first = await anext(self.steps, None)
        return StreamingResponse(self._events(first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def answer_calls(self, answer: tools.ToolAnswer, stream: bool) -> dict[str, Any] | Response:
        """The model's tool calls as OpenAI returns them (``finish_reason: "tool_calls"``)."""
        usage: dict[str, Any] = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                                 "total_tokens": answer.prompt_tokens + answer.completion_tokens}
        if answer.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": answer.cached_tokens}
        if not stream:
            message = {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in answer.calls]}
            return self.envelope(self.kind.object, [{"index": 0, "message": message, "logprobs": None,
                                                     "finish_reason": "tool_calls"}], usage=usage)
        return StreamingResponse(self._call_events(answer.calls, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _call_events(self, calls: tuple[tools.ToolCall, ...], usage: dict[str, Any]) -> AsyncIterator[str]:
        def delta(body: dict[str, Any], finish: str | None = None) -> str:
            return self._chunk([{"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}])

        yield delta({"role": "assistant", "content": None})
        for i, call in enumerate(calls):
            yield delta({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                         "function": {"name": call.name, "arguments": ""}}]})
            text = call.arguments_json
            for start in range(0, len(text), _ARGUMENT_PIECE):
                piece = text[start:start + _ARGUMENT_PIECE]
                yield delta({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        yield delta({}, "tool_calls")
        if self.include_usage:
            yield self._chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps(self.envelope(self.kind.chunk_object, choices, **extra))}\n\n"

    async def _events(self, first: list[Completion] | None) -> AsyncIterator[str]:
        kind = self.kind
        sent: dict[int, str] = {}
        finished: set[int] = set()
        seqs: list[Completion] = []
        if kind.chat:  # OpenAI opens a chat stream with the role
            yield self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
        try:
            async with aclosing(self.steps):
                step = first
                while step is not None:
                    seqs = step
                    choices = []
                    for i, s in enumerate(seqs):
                        if i in finished:
                            continue
                        # Backends hold back text that may still become a stop string, so it only
                        # grows; should it ever change behind us, we cannot unsend: send nothing.
                        text, before = kind.visible(s.text), sent.get(i, "")
                        delta = text[len(before):] if text.startswith(before) else ""
                        sent[i] = before + delta
                        if s.done:
                            finished.add(i)
                        if delta or s.done:
                            choices.append(kind.chunk_choice(i, delta, _finish_reason(s, self.params) if s.done
                                                             else None))
                    if choices:
                        yield self._chunk(choices)
                    step = await anext(self.steps, None)
            # A backend that ended without marking a sequence done: close it here, with the rest of its text.
            tail = [kind.chunk_choice(i, kind.visible(s.text)[len(sent.get(i, "")):], _finish_reason(s, self.params))
                    for i, s in enumerate(seqs) if i not in finished]
            if tail:
                yield self._chunk(tail)
            if self.include_usage:
                yield self._chunk([], usage=_usage(seqs))
        except RequestError as exc:
            message, param = public_error(exc)
            yield f"data: {json.dumps(error_body(exc.status, printable(message), param))}\n\n"
        except Exception as exc:  # the 200 is sent: all that is left is to say so in the stream
            yield f"data: {json.dumps(error_body(500, f'generation failed ({type(exc).__name__})', None))}\n\n"
        yield "data: [DONE]\n\n"


# Characters of a call's arguments per streamed chunk: they are ready at once (see the module docstring),
# sent in pieces about as long as a few tokens, as clients that show calls as they arrive expect.

_ARGUMENT_PIECE = 16


async def _single(step: list[Completion]) -> AsyncIterator[list[Completion]]:
    yield step


def include_usage(body: _Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


class OpenAIServing:
    """What the /v1 routes do, on one service: model checks, sampling, prompts, structured and tool answers."""

    def __init__(self, service: GenerationService):
        self.service = service
        self.limits = service.limits

    def model_ids(self) -> list[str]:
        # The loaded model's own id, and the configured name it was loaded from (when they differ).
        engine = self.service.engine
        return list(dict.fromkeys(([engine.info().model_id] if engine else []) + [self.service.tier.model]
                                  + fine_tuning.adapter_ids(self.service)))  # and the fine-tuned adapters

    def model_card(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": int(self.service.metrics.started),
                "owned_by": "slm-space"}

    def check_model(self, name: str) -> str:
        if name not in self.model_ids():
            raise RequestError(f"model {name!r} is not served here; GET /v1/models lists {self.model_ids()}",
                               status=404, param="model")
        return name

    def sampling(self, body: _Sampling, max_tokens: int | None, default_max: int, stops: list[str],
                 use_chat_template: bool, cap: int | None = None) -> SamplingParams:
        if body.n not in (None, 1):
            raise RequestError(f"n must be 1 (one choice per prompt), got {body.n}", param="n")
        params = self.service.sampling(max_tokens if max_tokens is not None else default_max,
                                       1.0 if body.temperature is None else body.temperature,
                                       1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stops,
                                       use_chat_template=use_chat_template, cap=cap)
        return fine_tuning.with_adapter(self.service, params, body.model)  # a fine-tuned model: its adapter

    @staticmethod
    def stops_of(body: _Sampling) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    def prepare_completion(self, body: CompletionRequest) -> tuple[list[PreparedPrompt], SamplingParams]:
        # OpenAI's default of 16 tokens, within the tier's cap. Raw continuation: no chat template.
        params = self.sampling(body, body.max_tokens, min(16, self.limits.max_new_tokens), self.stops_of(body), False)
        return self.service.check_prompts(prompt_list(body.prompt), use_chat_template=False), params

    def prepare_chat(self, body: ChatRequest, fmt: str, max_tokens: int | None
                     ) -> tuple[PreparedPrompt, SamplingParams]:
        """The conversation within the tier's limits (oldest exchanges left out, as in the Chat tab)."""
        turns = chat_turns(body.messages)
        templated = conversation.render(self.service, turns).templated
        cap = self.limits.max_structured_tokens if fmt != "text" else self.limits.max_new_tokens
        params = self.sampling(body, max_tokens, cap, self.stops_of(body), not templated, cap=cap)
        prepared, rendered = conversation.fit(self.service, turns, param="messages")
        return prepared, rendered.with_stops(params) if fmt == "text" else params

    def structured_step(self, prompt: PreparedPrompt, schema: dict[str, Any], params: SamplingParams
                        ) -> list[Completion]:
        """service.structured's answer as the one step of a finished sequence, so it is answered (and
        streamed) like any other generation. Out of tokens before the JSON closed is OpenAI's
        ``finish_reason: "length"`` with the partial text; any other failure is a 422, not invalid JSON
        presented as an answer."""
        result = self.service.structured_result(prompt.prompt, json.dumps(schema), params.max_new_tokens,
                                         params.temperature, params.seed)
        if result.success:
            text, finish = json.dumps(result.data, ensure_ascii=False), "stop"
        elif result.outcome is Outcome.TRUNCATED:
            text, finish = result.raw_text, "length"
        else:
            raise RequestError(f"no JSON valid against the schema was produced: {result.error}", status=422,
                               param="response_format")
        # "tokens" counts every attempt the engine made: all of them were generated, so all are usage.
        return [Completion(text=text, prompt_tokens=prompt.n_tokens, completion_tokens=result.tokens,
                           finish_reason=finish, seed=params.seed or 0, cached_tokens=_cached(result.cached_tokens,
                                                                                           prompt.n_tokens))]

    def tool_set_of(self, body: ChatRequest) -> tools.ToolSet:
        return tools.parse_tools(None if body.tools is None else [t.model_dump() for t in body.tools],
                                 body.tool_choice, body.parallel_tool_calls, limits=self.limits)

    def call_tools(self, body: ChatRequest, max_tokens: int | None, tool_set: tools.ToolSet
                   ) -> tuple[tools.ToolAnswer, SamplingParams]:
        """Tool calls (or, with auto, a text answer) from ``tools.call_tools``."""
        cap = self.limits.max_structured_tokens
        params = self.sampling(body, max_tokens, cap, self.stops_of(body), False, cap=cap)
        return tools.call_tools(self.service, tool_set, chat_turns(body.messages), params.max_new_tokens,
                                params.temperature, params.seed), params
