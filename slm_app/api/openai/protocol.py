"""The OpenAI wire format: request and response bodies (pydantic models that /openapi.json documents),
the error body, and the server-sent-event schema. No logic: ``serving`` answers, ``routes`` maps HTTP."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from slm_app import tools


# status -> OpenAI's error "type" and "code"
_ERROR_KINDS = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
                404: ("invalid_request_error", "model_not_found"),
                413: ("invalid_request_error", "request_too_large"),
                422: ("server_error", "invalid_output"), 429: ("rate_limit_error", "rate_limit_exceeded"),
                503: ("server_error", "unavailable"), 504: ("server_error", "timeout")}


def error_body(status: int, message: str, param: str | None) -> dict[str, Any]:
    kind, code = _ERROR_KINDS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(status: int, message: str, param: str | None) -> Response:
    return JSONResponse(error_body(status, message, param), status_code=status)


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


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV came from the prompt cache instead of being "
                                           "computed (docs/prompt-cache.md)")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt(s) as the model saw them")
    completion_tokens: int = Field(description="Tokens generated (every structured-output attempt included)")
    total_tokens: int = Field(description="The sum of both")
    prompt_tokens_details: PromptTokensDetails | None = Field(
        default=None, description="With plain generations: how many prompt tokens the prompt cache served")


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

def streamed(description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": {"text/event-stream": {"schema": _SSE_EVENT}}}}
