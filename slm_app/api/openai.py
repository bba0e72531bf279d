"""OpenAI-compatible routes, so the official SDKs and OpenAI-speaking tools can use this server.

* ``GET /v1/models`` → ``{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}``;
  ``GET /v1/models/{id}`` → one of them (404 otherwise).
* ``POST /v1/completions`` ``{model, prompt: str | [str], max_tokens=16, temperature=1, top_p=1, seed, stop,
  n=1, stream, stream_options: {include_usage}}`` → ``text_completion`` with one choice per prompt
  (``{index, text, logprobs: null, finish_reason}``) and ``usage``. Raw continuation: no chat template.
* ``POST /v1/chat/completions`` ``{model, messages, max_completion_tokens | max_tokens (default: the
  tier's limit), temperature, top_p, seed, stop, n=1, stream, stream_options, response_format}`` →
  ``chat.completion`` with ``choices[0].message = {role: "assistant", content}``, ``finish_reason``
  (``"stop"`` or ``"length"``) and ``usage`` (prompt/completion/total tokens). With ``tools``, see
  "Tool calling" below.

  Request timeout (``SLM_REQUEST_TIMEOUT_S``): the answer is what was produced by then, with
  ``finish_reason: "length"``. OpenAI's set of reasons has no "timeout", and strict clients (typed SDKs
  that validate the enum) would fail on a new one; "length" already means "cut short by a server-side
  limit, the text is incomplete", which is what the caller needs to know. The REST contract, which is
  ours, says ``"timeout"``. Nothing produced at all is a 504.

  The messages become one prompt. A model with a chat template (``engine.render_chat(messages)``
  returning a string, e.g. from a GGUF's chat template) is used as is. Otherwise, as for the raw TF
  models, they are written as a transcript: ``System: ...`` / ``User: ...`` / ``Assistant: ...`` lines
  ending in ``Assistant:``, with ``"\\nUser:"`` as an extra stop string so a raw model does not go on to
  write the user's next turn; a backend with a chat template of its own (``use_chat_template``) then
  wraps that transcript as one user turn. Leading whitespace of the answer is dropped.

  ``response_format``: ``{"type": "json_schema", "json_schema": {"name", "schema"}}`` or
  ``{"type": "json_object"}`` (the schema ``{"type": "object"}``) run through ``service.structured``
  (constrained decoding, then validation); the JSON text is the message content. Streamed, it arrives
  as one chunk since the structured engine does not stream. Out of tokens before the JSON closed gives
  ``finish_reason: "length"``; no valid JSON after the engine's retries is a 422.

  Tool calling (``slm_app.tools`` does the work; this module only maps HTTP to it): ``tools`` (function
  definitions ``{type: "function", function: {name, description, parameters, strict}}``), ``tool_choice``
  (``"auto"``, the default with tools; ``"none"``; ``"required"``; ``{type: "function", function: {name}}``)
  and ``parallel_tool_calls`` (default true: up to ``tools.MAX_PARALLEL_CALLS`` calls). The structured
  engine generates the calls, each call's ``arguments`` under its function's ``parameters`` schema,
  validated. Answer: ``message = {role: "assistant", content: null, tool_calls: [{id: "call_...",
  type: "function", function: {name, arguments: "<JSON text>"}}]}`` with ``finish_reason: "tool_calls"``;
  with ``auto`` the model may answer in text instead (``content``, ``"stop"``); ``"none"`` is the plain
  text path. Out of tokens before the JSON closed: ``"length"`` with the partial text as ``content``;
  no valid output: 422. Streamed: a chunk with the role, then per call a chunk with its ``index``,
  ``id``, ``type`` and ``function.name`` (``arguments: ""``) followed by chunks carrying pieces of
  ``function.arguments``, then the ``finish_reason`` chunk. The structured engine does not stream
  token by token, so the pieces are sent after generation, as OpenAI's SDKs assemble them.
  The conversation may hold earlier calls: an assistant message with ``tool_calls`` (``content``
  null) and ``role: "tool"`` messages with ``tool_call_id`` and the result as ``content``.
  ``tools`` with ``response_format`` JSON is a 400: the calls' JSON already has its own schemas.
* ``stream: true`` → server-sent events, one ``data: {json}\\n\\n`` per chunk (``chat.completion.chunk``
  or ``text_completion``), a last chunk carrying ``finish_reason``, then (with
  ``stream_options.include_usage``) a chunk with ``choices: []`` and ``usage``, then ``data: [DONE]``.
  A client that disconnects cancels the generation. An error after the stream started arrives as
  ``data: {"error": ...}`` before ``[DONE]``.
* Errors: ``{"error": {"message", "type", "param", "code"}}`` with 400 (bad request), 401 (key), 404
  (unknown model), 413 (prompt or batch too large), 422 (no valid structured output), 429 (rate
  limit), 503 (busy, loading, failed, shutting down, memory guard), 504 (timed out before the first
  token), 500 (a bug: logged, the server keeps serving). 429 and 503 carry ``Retry-After``.
* The model is the one this server loaded: ``model`` must be an id from ``/v1/models`` (404 otherwise).
  Other OpenAI fields (``user``, ``logprobs``, ``echo``, ``presence_penalty``...) are accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from contextlib import aclosing
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.convertors import PathConvertor, register_url_convertor

from slm_app.backends.base import SamplingParams
from slm_app.engine import PreparedPrompt
from slm_app.scheduler import Completion
from slm_app.api.common import (api_router, error_responses, generation_steps, printable, prompt_list,
                                public_error)
from slm_app.service import TRANSCRIPT_STOP, GenerationService, RequestError
from slm_app import tools
from slm_app.finetune import manager as fine_tuning

class _Anything(PathConvertor):
    """Starlette's ``path`` without its blind spot: its ``.*`` does not match a newline, so an id holding
    one fell through to the Gradio mount's 404 instead of this route's own error."""

    regex = r"[\s\S]*"


register_url_convertor("anything", _Anything())

# status -> OpenAI's error "type" and "code"
_ERROR_KINDS = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
                404: ("invalid_request_error", "model_not_found"),
                413: ("invalid_request_error", "request_too_large"),
                422: ("server_error", "invalid_output"), 429: ("rate_limit_error", "rate_limit_exceeded"),
                503: ("server_error", "unavailable"), 504: ("server_error", "timeout")}


def _error_body(status: int, message: str, param: str | None) -> dict[str, Any]:
    kind, code = _ERROR_KINDS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _openai_error(status: int, message: str, param: str | None) -> Response:
    return JSONResponse(_error_body(status, message, param), status_code=status)


# ---- request bodies (unknown fields such as "user" or "logprobs" are ignored, as SDKs send them) ----
# Strict types: a value is taken only in the type /openapi.json gives it ("5" is not an integer),
# so what the schema documents is exactly what is accepted.

class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = Field(default=False, description="Send a last chunk with usage before [DONE]")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    # Optional fields may come as null (some clients send every field): null means OpenAI's default.
    model: str = Field(description="A model id from GET /v1/models")
    max_tokens: int | None = Field(default=None, description="New tokens, 1 to the tier's limit")
    temperature: float | None = Field(default=None, description="0 to 2; 0 is greedy (default 1)")
    top_p: float | None = Field(default=None, description="Nucleus sampling in (0, 1] (default 1)")
    seed: int | None = Field(default=None, description="0 to 2**32-1 for reproducible sampling")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings of at most 64 characters")
    n: int | None = Field(default=None, description="Choices per prompt: only 1 is supported")
    stream: bool | None = Field(default=None, description="Answer as server-sent events")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options")


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="One prompt or a list (at most the tier's prompts per request); "
                                                "raw continuation, no chat template")


class FunctionCallText(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(description="The function called")
    arguments: str = Field(description="Its arguments, as JSON text")


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    id: str = Field(description="The call's id, which the tool message answering it repeats")
    type: Literal["function"] = Field(default="function", description="Always function")
    function: FunctionCallText


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str = Field(description="system, developer, user, assistant or tool")
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="Text, or a list of parts of which only {type: text, text} are supported")
    tool_calls: list[MessageToolCall] | None = Field(default=None, description="An assistant message's tool calls")
    tool_call_id: str | None = Field(default=None, description="A tool message: the id of the call it answers")
    name: str | None = Field(default=None, description="A name for the participant (ignored)")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(description="1 to 64 letters, digits, _ or -; unique among the tools")
    description: str | None = Field(default=None, description="What the function does (shown to the model)")
    parameters: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the arguments object (local $ref only); default: no arguments")
    strict: bool | None = Field(default=None, description="Accepted; arguments always follow the schema here")


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"] = Field(description="Always function")
    function: FunctionDefinition


# Checked by slm_app.tools (whose messages name the field, e.g. tool_choice.function.name: no tool is
# named 'x'); pydantic only takes its JSON type, and /openapi.json documents the accepted shape.
ToolChoice = Annotated[str | dict[str, Any] | None, WithJsonSchema({
    "anyOf": [{"type": "string", "enum": ["none", "auto", "required"]},
              {"type": "object", "required": ["type", "function"],
               "properties": {"type": {"type": "string", "enum": ["function"]},
                              "function": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string"}}}}},
              {"type": "null"}]})]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)

    name: str = Field(default="response", description="A name for the schema")
    # "schema" would shadow a BaseModel attribute
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the answer must validate against")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text", "json_object", "json_schema"] = Field(description="text, or JSON (any object, or a schema)")
    json_schema: JsonSchemaFormat | None = Field(default=None, description="With type json_schema: {name, schema}")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, at least one message")
    max_completion_tokens: int | None = Field(default=None, description="Overrides max_tokens when set")
    response_format: ResponseFormat | None = Field(default=None, description="Constrain the answer to JSON")
    tools: list[ToolDefinition] | None = Field(default=None, description="Functions the model may call")
    tool_choice: ToolChoice = Field(default=None, description="auto (default with tools), none, required, or one "
                                                              "named function: {type: function, function: {name}}")
    parallel_tool_calls: bool | None = Field(default=None, description="Allow several calls in one answer "
                                                                       "(default true)")


# ---- response bodies --------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]


class ModelCard(BaseModel):
    id: str = Field(description="The model id to send as `model`")
    object: Literal["model"] = "model"
    created: int = Field(description="When the server started (Unix seconds)")
    owned_by: str = Field(description="Always slm-space")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(description="The model this server loaded (its id, and the configured name)")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt(s) as the model saw them")
    completion_tokens: int = Field(description="Tokens generated (every structured-output attempt included)")
    total_tokens: int = Field(description="The sum of both")


class CompletionChoice(BaseModel):
    index: int = Field(description="The prompt's position in the request")
    text: str = Field(description="The continuation")
    logprobs: None = None
    finish_reason: FinishReason = Field(description="stop: end of text or a stop string; length: the token "
                                                    "limit or the request timeout")


class TextCompletion(BaseModel):
    id: str = Field(description="cmpl-...")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(description="Unix seconds")
    model: str = Field(description="The model that answered")
    system_fingerprint: None = None
    choices: list[CompletionChoice] = Field(description="One per prompt, in order")
    usage: Usage


class ResponseToolCall(BaseModel):
    id: str = Field(description="call_...: a tool message answering this call repeats it as tool_call_id")
    type: Literal["function"] = "function"
    function: FunctionCallText


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The answer (JSON text with response_format); null with tool_calls")
    tool_calls: list[ResponseToolCall] | None = Field(default=None, description="The calls, with finish_reason "
                                                                                "tool_calls")


class ChatChoice(BaseModel):
    index: int = Field(description="Always 0")
    message: AssistantMessage
    logprobs: None = None
    finish_reason: ChatFinishReason = Field(description="stop: end of text, a stop string or complete JSON; length: "
                                                        "the token limit or the request timeout; tool_calls: the "
                                                        "message holds tool calls")


class ChatCompletion(BaseModel):
    id: str = Field(description="chatcmpl-...")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix seconds")
    model: str = Field(description="The model that answered")
    system_fingerprint: None = None
    choices: list[ChatChoice] = Field(description="One choice")
    usage: Usage


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong")
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error")
    param: str | None = Field(description="The request field at fault, when one is")
    code: str | None = Field(description="A machine-readable code, when there is one")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# One server-sent event, as OpenAPI 3.0/3.1 tools read a text/event-stream schema (OpenAPI 3.2 calls it
# itemSchema): its data is a JSON chunk, or "[DONE]" to end the stream.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "A JSON chunk, or [DONE] at the end"},
                             "event": {"type": "string"}}}


def _streamed(description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": {"text/event-stream": {"schema": _SSE_EVENT}}}}


# ---- chat messages to one prompt ---------------------------------------------------------------

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


def chat_prompt(service: GenerationService, messages: list[ChatMessage]) -> tuple[str, bool]:
    """The prompt for these messages, and whether it is already in the model's chat format."""
    return service.render_conversation(chat_turns(messages))


# ---- responses ---------------------------------------------------------------------------------

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


def _usage(seqs: list[Completion]) -> dict[str, int]:
    prompt = sum(s.prompt_tokens for s in seqs)
    completion = sum(s.completion_tokens for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclasses.dataclass
class _Job:
    """A validated request: what to run and how to answer it."""

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
        usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                 "total_tokens": answer.prompt_tokens + answer.completion_tokens}
        if not stream:
            message = {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in answer.calls]}
            return self.envelope(self.kind.object, [{"index": 0, "message": message, "logprobs": None,
                                                     "finish_reason": "tool_calls"}], usage=usage)
        return StreamingResponse(self._call_events(answer.calls, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _call_events(self, calls: tuple[tools.ToolCall, ...], usage: dict[str, int]) -> AsyncIterator[str]:
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
            yield f"data: {json.dumps(_error_body(exc.status, printable(message), param))}\n\n"
        except Exception as exc:  # the 200 is sent: all that is left is to say so in the stream
            yield f"data: {json.dumps(_error_body(500, f'generation failed ({type(exc).__name__})', None))}\n\n"
        yield "data: [DONE]\n\n"


# Characters of a call's arguments per streamed chunk: they are ready at once (see the module docstring),
# sent in pieces about as long as a few tokens, as clients that show calls as they arrive expect.
_ARGUMENT_PIECE = 16


async def _single(step: list[Completion]) -> AsyncIterator[list[Completion]]:
    yield step


# ---- routes ------------------------------------------------------------------------------------

def register_routes(app: FastAPI, service: GenerationService) -> None:
    """Add the /v1 routes to ``app`` (behind the bearer key when SLM_API_KEY is set)."""
    router = api_router(service, _openai_error, prefix="/v1")
    lim = service.limits

    def model_ids() -> list[str]:
        # The loaded model's own id, and the configured name it was loaded from (when they differ).
        engine = service.engine
        return list(dict.fromkeys(([engine.info().model_id] if engine else []) + [service.tier.model]
                                  + fine_tuning.adapter_ids(service)))

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": int(service.metrics.started), "owned_by": "slm-space"}

    def check_model(name: str) -> str:
        if name not in model_ids():
            raise RequestError(f"model {name!r} is not served here; GET /v1/models lists {model_ids()}", status=404,
                               param="model")
        return name

    def sampling(body: _Sampling, max_tokens: int | None, default_max: int, stops: list[str],
                 use_chat_template: bool, cap: int | None = None) -> SamplingParams:
        if body.n not in (None, 1):
            raise RequestError(f"n must be 1 (one choice per prompt), got {body.n}", param="n")
        params = service.sampling(max_tokens if max_tokens is not None else default_max,
                                  1.0 if body.temperature is None else body.temperature,
                                  1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stops,
                                  use_chat_template=use_chat_template, cap=cap)
        return fine_tuning.with_adapter(service, params, body.model)  # a fine-tuned model: its adapter

    def stops_of(body: _Sampling) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    errors = error_responses(ErrorResponse, (400, 401, 404, 413, 429, 503, 504))

    @router.get("/models", response_model=ModelList, responses=error_responses(ErrorResponse, (401, 429)))
    def list_models() -> dict[str, Any]:
        """The model this server serves."""
        return {"object": "list", "data": [model_card(m) for m in model_ids()]}

    @router.get("/models/{model_id:anything}", response_model=ModelCard,
                responses=error_responses(ErrorResponse, (401, 404, 429)))
    def retrieve_model(model_id: str) -> dict[str, Any]:
        """One model, by id (404 for any other)."""
        return model_card(check_model(model_id))

    @router.post("/completions", response_model=TextCompletion,
                 responses={**errors, **_streamed("With stream: text_completion chunks, then [DONE]")})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Raw continuation of one prompt or a batch (no chat template)."""
        def prepare() -> tuple[list[PreparedPrompt], SamplingParams]:
            # OpenAI's default of 16 tokens, within the tier's cap. Raw continuation: no chat template.
            params = sampling(body, body.max_tokens, min(16, lim.max_new_tokens), stops_of(body), False)
            return service.check_prompts(prompt_list(body.prompt), use_chat_template=False), params

        model = check_model(body.model)
        prompts, params = await run_in_threadpool(prepare)  # tokenising is CPU work: off the event loop
        steps = generation_steps(service, _COMPLETION.endpoint, prompts, params, request)
        return await _Job(_COMPLETION, model, params, _include_usage(body), steps).answer(bool(body.stream))

    @router.post("/chat/completions", response_model=ChatCompletion,
                 responses={**errors, **error_responses(ErrorResponse, (422,)),
                            **_streamed("With stream: chat.completion.chunk chunks, then [DONE]")})
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        """A chat answer; response_format constrains it to JSON (validated against the schema); with tools
        the model may call functions (their arguments validated against their parameters schemas)."""
        fmt = body.response_format.type if body.response_format else "text"
        if fmt == "json_schema" and body.response_format.json_schema is None:
            raise RequestError("response_format: type json_schema needs json_schema: {name, schema}",
                               param="response_format")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        tool_set = tool_set_of(body)
        if tool_set.active:
            if fmt != "text":
                raise RequestError(f"response_format {fmt} cannot be combined with tools: the answer is either "
                                   "tool calls, whose arguments already follow each function's parameters "
                                   "schema, or text; use tool_choice 'none' to get JSON instead",
                                   param="response_format")
            return await tool_answer(body, check_model(body.model), max_tokens, tool_set)

        def prepare() -> tuple[PreparedPrompt, SamplingParams]:
            text, templated = chat_prompt(service, body.messages)
            stops = stops_of(body)
            if not templated and fmt == "text" and len(stops) < 4:
                stops.append(TRANSCRIPT_STOP)
            cap = lim.max_structured_tokens if fmt != "text" else lim.max_new_tokens
            params = sampling(body, max_tokens, cap, stops, not templated, cap=cap)
            # A prompt rendered with the chat template is counted as it is, not wrapped again.
            return service.check_prompt(text, params.use_chat_template, templated=templated,
                                        param="messages"), params

        model = check_model(body.model)
        prompt, params = await run_in_threadpool(prepare)
        if fmt == "text":
            steps = generation_steps(service, _CHAT.endpoint, [prompt], params, request)
        else:
            # The structured engine builds its own prompt from the conversation's text.
            schema = {"type": "object"} if fmt == "json_object" else body.response_format.json_schema.schema_
            steps = _single(await run_in_threadpool(structured_step, prompt, schema, params))
        return await _Job(_CHAT, model, params, _include_usage(body), steps).answer(bool(body.stream))

    async def tool_answer(body: ChatRequest, model: str, max_tokens: int | None, tool_set: tools.ToolSet) -> Any:
        """Tool calls (or, with auto, a text answer) from ``tools.call_tools``."""
        cap = lim.max_structured_tokens

        def run() -> tuple[tools.ToolAnswer, SamplingParams]:
            params = sampling(body, max_tokens, cap, stops_of(body), False, cap=cap)
            return tools.call_tools(service, tool_set, chat_turns(body.messages), params.max_new_tokens,
                                    params.temperature, params.seed), params

        answer, params = await run_in_threadpool(run)
        if answer.finish_reason == "tool_calls":
            return await _Job(_CHAT, model, params, _include_usage(body), _single([])).answer_calls(
                answer, bool(body.stream))
        text = Completion(text=answer.content or "", prompt_tokens=answer.prompt_tokens,
                          completion_tokens=answer.completion_tokens, finish_reason=answer.finish_reason,
                          seed=params.seed or 0)
        return await _Job(_CHAT, model, params, _include_usage(body), _single([text])).answer(bool(body.stream))

    def tool_set_of(body: ChatRequest) -> tools.ToolSet:
        return tools.parse_tools(None if body.tools is None else [t.model_dump() for t in body.tools],
                                 body.tool_choice, body.parallel_tool_calls, limits=lim)

    def structured_step(prompt: PreparedPrompt, schema: dict[str, Any], params: SamplingParams) -> list[Completion]:
        """service.structured's answer as the one step of a finished sequence, so it is answered (and
        streamed) like any other generation. Out of tokens before the JSON closed is OpenAI's
        ``finish_reason: "length"`` with the partial text; any other failure is a 422, not invalid JSON
        presented as an answer."""
        result = service.structured(prompt.text, json.dumps(schema), params.max_new_tokens, params.temperature,
                                    params.seed)
        error = result.get("error") or ""
        if result["success"]:
            text, finish = json.dumps(result["data"], ensure_ascii=False), "stop"
        elif error.startswith("truncated"):
            text, finish = result.get("raw_text", ""), "length"
        else:
            raise RequestError(f"no JSON valid against the schema was produced: {error}", status=422,
                               param="response_format")
        # "tokens" counts every attempt the engine made: all of them were generated, so all are usage.
        return [Completion(text=text, prompt_tokens=len(prompt.ids), completion_tokens=int(result.get("tokens") or 0),
                           finish_reason=finish, seed=params.seed or 0)]

    app.include_router(router)


def _include_usage(body: _Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)
