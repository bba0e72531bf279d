"""OpenAI-compatible routes, so the official SDKs and OpenAI-speaking tools can use this server.

* ``GET /v1/models`` → ``{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}``;
  ``GET /v1/models/{id}`` → one of them (404 otherwise).
* ``POST /v1/completions`` ``{model, prompt: str | [str], max_tokens=16, temperature=1, top_p=1, seed, stop,
  n=1, stream, stream_options: {include_usage}}`` → ``text_completion`` with one choice per prompt
  (``{index, text, logprobs: null, finish_reason}``) and ``usage``. Raw continuation: no chat template.
* ``POST /v1/chat/completions`` ``{model, messages, max_completion_tokens | max_tokens (default: the
  tier's limit), temperature, top_p, seed, stop, n=1, stream, stream_options, response_format}`` →
  ``chat.completion`` with ``choices[0].message = {role: "assistant", content}``, ``finish_reason``
  (``"stop"`` or ``"length"``) and ``usage`` (prompt/completion/total tokens).

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
* ``stream: true`` → server-sent events, one ``data: {json}\\n\\n`` per chunk (``chat.completion.chunk``
  or ``text_completion``), a last chunk carrying ``finish_reason``, then (with
  ``stream_options.include_usage``) a chunk with ``choices: []`` and ``usage``, then ``data: [DONE]``.
  A client that disconnects cancels the generation. An error after the stream started arrives as
  ``data: {"error": ...}`` before ``[DONE]``.
* Errors: ``{"error": {"message", "type", "param", "code"}}`` with 400 (bad request), 401 (key), 404
  (unknown model), 413 (prompt or batch too large), 422 (no valid structured output), 429 (busy),
  503 (model loading or failed), 500 (a bug: logged, the server keeps serving).
* The model is the one this server loaded: ``model`` must be an id from ``/v1/models`` (404 otherwise).
  Other OpenAI fields (``user``, ``logprobs``, ``echo``, ``presence_penalty``...) are accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from slm_app.backends.base import SamplingParams
from slm_app.engine import Engine, PreparedPrompt
from slm_app.scheduler import Completion
from slm_app.http_api import api_error, api_router, generation_steps, prompt_list
from slm_app.service import GenerationService, RequestError

_TRANSCRIPT_STOP = "\nUser:"
_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
# status -> OpenAI's error "type" and "code"
_ERROR_KINDS = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
                404: ("invalid_request_error", "model_not_found"),
                413: ("invalid_request_error", "request_too_large"),
                422: ("server_error", "invalid_output"), 429: ("rate_limit_error", "rate_limit_exceeded"),
                503: ("server_error", "model_not_ready")}


def _error_body(status: int, message: str, param: str | None) -> dict[str, Any]:
    kind, code = _ERROR_KINDS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _openai_error(status: int, message: str, param: str | None) -> Response:
    return JSONResponse(_error_body(status, message, param), status_code=status)


# ---- request bodies (unknown fields such as "user" or "logprobs" are ignored, as SDKs send them) ----

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # Optional fields may come as null (some clients send every field): null means OpenAI's default.
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")  # "schema" would shadow a BaseModel attribute


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None


# ---- chat messages to one prompt ---------------------------------------------------------------

def _message_text(i: int, m: ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"messages[{i}].content: only text parts are supported, got {part.get('type')!r}")
        parts.append(part["text"])
    return "".join(parts)


def chat_prompt(engine: Engine, messages: list[ChatMessage]) -> tuple[str, bool]:
    """The prompt for these messages, and whether it is already in the model's chat format."""
    turns = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise RequestError(f"messages[{i}].role {m.role!r} is not supported (use system, user or assistant)")
        turns.append({"role": "system" if m.role == "developer" else m.role, "content": _message_text(i, m)})
    if (rendered := engine.render_chat(turns)) is not None:
        return rendered, True
    lines = [f"{_ROLES[t['role']]}: {t['content']}" for t in turns]
    return "\n".join(lines + ["Assistant:"]), False


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
    if seq.finish_reason == "length" or (seq.finish_reason is None and seq.completion_tokens >= params.max_new_tokens):
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

    async def answer(self, stream: bool) -> Response:
        if not stream:
            seqs: list[Completion] = []
            async with aclosing(self.steps):
                async for seqs in self.steps:
                    pass
            choices = [self.kind.choice(i, self.kind.visible(s.text), _finish_reason(s, self.params))
                       for i, s in enumerate(seqs)]
            return JSONResponse(self.envelope(self.kind.object, choices, usage=_usage(seqs)))
        # Wait for the first step before answering 200, so busy / not loaded still get their status.
        first = await anext(self.steps, None)
        return StreamingResponse(self._events(first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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
            yield f"data: {json.dumps(_error_body(exc.status, *api_error(exc)))}\n\n"
        except Exception as exc:  # the 200 is sent: all that is left is to say so in the stream
            yield f"data: {json.dumps(_error_body(500, f'generation failed ({type(exc).__name__})', None))}\n\n"
        yield "data: [DONE]\n\n"


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
        return list(dict.fromkeys(([engine.info().model_id] if engine else []) + [service.tier.model]))

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": int(service.metrics.started), "owned_by": "slm-space"}

    def check_model(name: str) -> str:
        if name not in model_ids():
            raise RequestError(f"model {name!r} is not served here; GET /v1/models lists {model_ids()}", status=404)
        return name

    def sampling(body: _Sampling, max_tokens: int | None, default_max: int, stops: list[str],
                 use_chat_template: bool, cap: int | None = None) -> SamplingParams:
        if body.n not in (None, 1):
            raise RequestError(f"n must be 1 (one choice per prompt), got {body.n}")
        return service.sampling(max_tokens if max_tokens is not None else default_max,
                                1.0 if body.temperature is None else body.temperature,
                                1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stops,
                                use_chat_template=use_chat_template, cap=cap)

    def stops_of(body: _Sampling) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    @router.get("/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in model_ids()]}

    @router.get("/models/{model_id:path}")
    def retrieve_model(model_id: str) -> dict[str, Any]:
        return model_card(check_model(model_id))

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        def prepare() -> tuple[list[PreparedPrompt], SamplingParams]:
            # OpenAI's default of 16 tokens, within the tier's cap. Raw continuation: no chat template.
            params = sampling(body, body.max_tokens, min(16, lim.max_new_tokens), stops_of(body), False)
            return service.check_prompts(prompt_list(body.prompt), use_chat_template=False), params

        model = check_model(body.model)
        prompts, params = await run_in_threadpool(prepare)  # tokenising is CPU work: off the event loop
        steps = generation_steps(service, _COMPLETION.endpoint, prompts, params, request)
        return await _Job(_COMPLETION, model, params, _include_usage(body), steps).answer(bool(body.stream))

    @router.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        fmt = body.response_format.type if body.response_format else "text"
        if fmt == "json_schema" and body.response_format.json_schema is None:
            raise RequestError("response_format: type json_schema needs json_schema: {name, schema}")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens

        def prepare() -> tuple[PreparedPrompt, SamplingParams]:
            text, templated = chat_prompt(service.ready(), body.messages)
            stops = stops_of(body)
            if not templated and fmt == "text" and len(stops) < 4:
                stops.append(_TRANSCRIPT_STOP)
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
            raise RequestError(f"no JSON valid against the schema was produced: {error}", status=422)
        # "tokens" counts every attempt the engine made: all of them were generated, so all are usage.
        return [Completion(text=text, prompt_tokens=len(prompt.ids), completion_tokens=int(result.get("tokens") or 0),
                           finish_reason=finish, seed=params.seed or 0)]

    app.include_router(router)


def _include_usage(body: _Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)
