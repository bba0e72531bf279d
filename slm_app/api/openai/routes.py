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

  The messages become one prompt through ``slm_app.conversation``, as in the Chat tab: the model's
  chat template when it has one, else a ``System: / User: / Assistant:`` transcript with ``"\\nUser:"``
  as an extra stop string so a raw model does not go on to write the user's next turn. A conversation
  over the tier's prompt limit loses its oldest exchanges (the system prompt and the last user turn
  stay). Leading whitespace of the answer is dropped.

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

from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from starlette.convertors import PathConvertor, register_url_convertor

from slm_app import tools
from slm_app.api.common import api_router, error_responses, generation_steps
from slm_app.api.openai.protocol import (
    ChatCompletion, ChatRequest, CompletionRequest, ErrorResponse, ModelCard, ModelList, TextCompletion, openai_error,
    streamed,
)
from slm_app.api.openai.serving import _CHAT, _COMPLETION, OpenAIAnswer, OpenAIServing, _single, include_usage
from slm_app.errors import RequestError
from slm_app.scheduler import Completion
from slm_app.service import GenerationService


class _Anything(PathConvertor):
    """Starlette's ``path`` without its blind spot: its ``.*`` does not match a newline, so an id holding
    one fell through to the Gradio mount's 404 instead of this route's own error."""

    regex = r"[\s\S]*"


register_url_convertor("anything", _Anything())


def register_routes(app: FastAPI, service: GenerationService) -> None:
    """Add the /v1 routes to ``app`` (behind the bearer key when SLM_API_KEY is set)."""
    router = api_router(service, openai_error, prefix="/v1")
    serving = OpenAIServing(service)
    errors = error_responses(ErrorResponse, (400, 401, 404, 413, 429, 503, 504))

    @router.get("/models", response_model=ModelList, responses=error_responses(ErrorResponse, (401, 429)))
    def list_models() -> dict[str, Any]:
        """The model this server serves."""
        return {"object": "list", "data": [serving.model_card(m) for m in serving.model_ids()]}

    @router.get("/models/{model_id:anything}", response_model=ModelCard,
                responses=error_responses(ErrorResponse, (401, 404, 429)))
    def retrieve_model(model_id: str) -> dict[str, Any]:
        """One model, by id (404 for any other)."""
        return serving.model_card(serving.check_model(model_id))

    @router.post("/completions", response_model=TextCompletion,
                 responses={**errors, **streamed("With stream: text_completion chunks, then [DONE]")})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Raw continuation of one prompt or a batch (no chat template)."""
        model = serving.check_model(body.model)
        # Tokenising is CPU work: off the event loop.
        prompts, params = await run_in_threadpool(serving.prepare_completion, body)
        steps = generation_steps(service, _COMPLETION.endpoint, prompts, params, request)
        return await OpenAIAnswer(_COMPLETION, model, params, include_usage(body), steps).answer(bool(body.stream))

    @router.post("/chat/completions", response_model=ChatCompletion,
                 responses={**errors, **error_responses(ErrorResponse, (422,)),
                            **streamed("With stream: chat.completion.chunk chunks, then [DONE]")})
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        """A chat answer; response_format constrains it to JSON (validated against the schema); with tools
        the model may call functions (their arguments validated against their parameters schemas)."""
        fmt = body.response_format.type if body.response_format else "text"
        if fmt == "json_schema" and body.response_format.json_schema is None:
            raise RequestError("response_format: type json_schema needs json_schema: {name, schema}",
                               param="response_format")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        tool_set = serving.tool_set_of(body)
        if tool_set.active:
            if fmt != "text":
                raise RequestError(f"response_format {fmt} cannot be combined with tools: the answer is either "
                                   "tool calls, whose arguments already follow each function's parameters "
                                   "schema, or text; use tool_choice 'none' to get JSON instead",
                                   param="response_format")
            return await tool_answer(body, serving.check_model(body.model), max_tokens, tool_set)
        model = serving.check_model(body.model)
        prompt, params = await run_in_threadpool(serving.prepare_chat, body, fmt, max_tokens)
        if fmt == "text":
            steps = generation_steps(service, _CHAT.endpoint, [prompt], params, request)
        else:
            # The structured engine builds its own prompt from the conversation.
            schema = {"type": "object"} if fmt == "json_object" else body.response_format.json_schema.schema_
            steps = _single(await run_in_threadpool(serving.structured_step, prompt, schema, params))
        return await OpenAIAnswer(_CHAT, model, params, include_usage(body), steps).answer(bool(body.stream))

    async def tool_answer(body: ChatRequest, model: str, max_tokens: int | None, tool_set: tools.ToolSet) -> Any:
        answer, params = await run_in_threadpool(serving.call_tools, body, max_tokens, tool_set)
        respond = OpenAIAnswer(_CHAT, model, params, include_usage(body), _single([]))
        if answer.finish_reason == "tool_calls":
            return await respond.answer_calls(answer, bool(body.stream))
        text = Completion(text=answer.content or "", prompt_tokens=answer.prompt_tokens,
                          completion_tokens=answer.completion_tokens, finish_reason=answer.finish_reason,
                          seed=params.seed or 0, cached_tokens=answer.cached_tokens)
        respond.steps = _single([text])
        return await respond.answer(bool(body.stream))

    app.include_router(router)
