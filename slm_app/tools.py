"""Tool calling (OpenAI's ``tools``): the model answers with function calls whose arguments are
generated under each function's ``parameters`` schema by the structured-output engine, and validated.

No HTTP here: the OpenAI chat route and the Structured JSON tab's "function call" mode both call it.

The pipeline:

- ``parse_tools``: OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked
  (``RequestError`` 400 naming the field, e.g. ``tools[1].function.name``). Each ``parameters``
  schema goes through the Structured tab's intake (``structured.parse_schema``: local ``$ref`` only,
  size, depth, regexes), so nothing a caller sends can read a file or reach the network.
- ``conversation_turns``: the chat history, tool calls and tool results included, as the
  system/user/assistant turns every chat template and the plain transcript accept. A ``tool``
  result becomes a user turn ``Result of NAME({arguments}): ...`` (the call shown with its result,
  not as an assistant turn of JSON: a small model copies its last turn, which after a result was the
  same call again, 36 of 40 follow-ups in bench/tool_followups.py); a conversation ending with
  results ends with "Answer my question with the result above.", and the tools block then puts
  answering first. Turns of one role in a row are merged (Gemma's template insists on alternating roles). No template here has native tool support (Gemma 3 and
  SmolLM2 have none; the TF models are raw), so the tools are described in a system block instead.
- ``ToolSet.output_schema``: ONE JSON Schema the structured engine decodes under, so budget
  steering, the compile ladder and jsonschema validation are the same engine's, no grammar of our own:
  ``{"tool_calls": [{"name": <const>, "arguments": <that function's parameters>}, ...]}`` (one item
  unless calls may be parallel), and with ``auto`` ``anyOf`` that and ``{"content": <string>}`` so
  the model decides between calling and answering. Each function's parameters sit in ``$defs``
  under its name, their local ``$ref``s rewritten to point there. Measured with llguidance on GPT-2's
  vocabulary (two tools): every shape compiles strictly (no relaxed rung) in 0.7-1.7 ms, and the
  smallest call takes 23-26 tokens (``{"content":""}`` 8), well within the free tier's 96.
- ``call_tools``: the prompt (conversation + tools block, shrunk to fit the tier's prompt limit),
  the engine's run, then the calls with fresh ids; each call's arguments are validated once more
  alone against its function's ``parameters``.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from slm_app import conversation, structured
from slm_app.engines.base import ModelPrompt
from slm_app.structured.generation import _without_annotations
from slm_app.structured.intake import _subschemas
from slm_app.errors import RequestError
from slm_app.service import GenerationService
from slm_app.settings import TierLimits

__all__ = ["MAX_PARALLEL_CALLS", "Tool", "ToolAnswer", "ToolCall", "ToolSet", "call_tools", "conversation_turns",
           "parse_tools"]

NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_TOOLS = 128  # OpenAI's own limit
# Calls in one answer when parallel calls are allowed: a few is what a turn needs, and every call
# costs budget (a random model would otherwise fill the array until the budget walk closes it).
MAX_PARALLEL_CALLS = 4
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_CHOICES = ("none", "auto", "required")
_REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")

ToolMode = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON Schema for the arguments object, vetted by structured.parse_schema


@dataclass(frozen=True)
class ToolSet:
    """A request's tools and what it allows: ``mode`` "none" (answer in text), "auto" (call or answer),
    "required" (call at least one), "function" (call ``function``)."""

    tools: tuple[Tool, ...]
    mode: ToolMode
    function: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether the answer is decided by tool calling (else: the normal text path)."""
        return bool(self.tools) and self.mode != "none"

    @property
    def callable(self) -> tuple[Tool, ...]:
        return tuple(t for t in self.tools if t.name == self.function) if self.mode == "function" else self.tools

    def tool(self, name: str) -> Tool:
        return next(t for t in self.tools if t.name == name)

    def output_schema(self) -> dict[str, Any]:
        """The one schema the structured engine generates under (see the module docstring)."""
        tools = self.callable
        branches = [{"type": "object", "properties": {"name": {"const": t.name},
                                                       "arguments": {"$ref": f"#/$defs/{t.name}"}},
                     "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        calls = {"type": "object", "properties": {"tool_calls": {
            "type": "array", "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if self.parallel else 1,
            "items": branches[0] if len(branches) == 1 else {"anyOf": branches}}},
            "required": ["tool_calls"], "additionalProperties": False}
        defs = {t.name: _embedded(t.parameters, f"#/$defs/{t.name}") for t in tools}
        if self.mode != "auto":
            return {"$defs": defs, **calls}
        content = {"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"],
                   "additionalProperties": False}
        return {"$defs": defs, "anyOf": [calls, content]}

    def instructions(self, detail: int = 2, follow_up: bool = False) -> str:
        """The system block that describes the tools and how to answer. ``detail`` 2: each function's
        parameters schema as given; 1: the schemas without their annotations (descriptions, titles,
        examples); 0: only the functions' names and argument names (the grammar enforces the schemas
        whatever the prompt shows). ``follow_up``: the conversation ends with tool results, so with
        ``auto`` answering comes first (a small model otherwise copies its last turn, the call)."""
        lines = ["You can call these functions:"]
        for t in self.callable:
            about = f": {t.description.strip().rstrip('.')}." if t.description.strip() and detail else ""
            if detail:
                shown = t.parameters if detail == 2 else _without_annotations(t.parameters)
                args = json.dumps(shown, separators=(",", ":"), ensure_ascii=False)
                lines.append(f"- {t.name}{about} Arguments (JSON Schema): {args}")
            else:
                names = list(t.parameters.get("properties") or {}) if isinstance(t.parameters.get("properties"),
                                                                                 dict) else []
                lines.append(f"- {t.name}({', '.join(names)})")
        example = '{"tool_calls":[{"name":"<function name>","arguments":{<arguments>}}]}'
        how = {"auto": f"To call a function, reply with JSON only: {example}. To answer without calling one, "
                       'reply with JSON only: {"content":"<your answer>"}.' if not follow_up else
                       "The results of the functions you called are in the conversation. Answer the user's "
                       'question now, in words, using those results: reply with JSON only, an object with one '
                       'member, "content", whose value is your answer.',
               "required": f"Call a function: reply with JSON only: {example}.",
               "function": f"Call the function {self.function}: reply with JSON only: {example}."}[self.mode]
        many = (f" You may call several functions at once (at most {MAX_PARALLEL_CALLS})." if self.parallel
                else " Call one function at a time.")
        return "\n".join(lines) + "\n" + how + many


def _embedded(parameters: dict[str, Any], base: str) -> dict[str, Any]:
    """``parameters`` as a part of the output schema at ``base``: its local references ("#/$defs/x",
    "#") rewritten to point inside it there. ``$id``/``$schema`` are dropped at its root (they would
    make it a resource of its own); the arguments are also validated against the original."""
    schema = copy.deepcopy({k: v for k, v in parameters.items() if k not in ("$id", "$schema")})
    for _path, node in _subschemas(schema):
        for key in _REF_KEYWORDS:
            ref = node.get(key)
            if isinstance(ref, str) and (ref in ("", "#") or ref.startswith("#/")):
                node[key] = base + ref.lstrip("#")
    return schema


# ---- intake ---------------------------------------------------------------------------------------

def _bad(param: str, message: str) -> RequestError:
    return RequestError(f"{param}: {message}", param=param)


def _parse_tool(i: int, item: Any, limits: TierLimits) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(item, Mapping):
        raise _bad(where, 'must be an object {"type": "function", "function": {...}}')
    if item.get("type", "function") != "function":
        raise _bad(f"{where}.type", f"only 'function' tools are supported, got {item.get('type')!r}")
    fn = item.get("function")
    if not isinstance(fn, Mapping):
        raise _bad(f"{where}.function", 'is required: {"name", "description", "parameters"}')
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise _bad(f"{where}.function.name", f"must be 1 to 64 letters, digits, '_' or '-', got {name!r}"[:200])
    description = fn.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise _bad(f"{where}.function.description", "must be a string")
    if fn.get("strict") is not None and not isinstance(fn.get("strict"), bool):
        raise _bad(f"{where}.function.strict", "must be true or false")
    parameters = fn.get("parameters")
    param = f"{where}.function.parameters"
    if parameters is None:
        parameters = EMPTY_PARAMETERS
    if not isinstance(parameters, Mapping):
        raise _bad(param, "must be a JSON Schema object")
    kind = parameters.get("type", "object")
    if kind != "object":
        raise _bad(param, f'must describe an object (the arguments): "type": "object", got {kind!r}')
    try:
        # The Structured tab's intake: the same limits, the same refusal of remote $ref.
        schema = structured.parse_schema(json.dumps(parameters, ensure_ascii=False), limits)
    except structured.SchemaError as exc:
        raise _bad(param, str(exc)) from None
    _check_local_refs(schema, param)
    # "strict" (OpenAI's opt-in to schema-following) changes nothing here: every call is constrained.
    return Tool(name, description, {"type": "object", **schema})


def parse_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None, *,
                limits: TierLimits) -> ToolSet:
    """Check OpenAI's tool fields (plain JSON values) and return what they ask for.

    ``tool_choice`` defaults to "auto" with tools and "none" without, ``parallel_tool_calls`` to true.
    Raises ``RequestError`` (400) whose ``param`` names the field at fault."""
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise _bad("tools", "must be a list of tools")
    if len(tools) > MAX_TOOLS:
        raise _bad("tools", f"{len(tools)} tools; at most {MAX_TOOLS} are allowed")
    parsed = [_parse_tool(i, item, limits) for i, item in enumerate(tools)]
    seen: dict[str, int] = {}
    for i, t in enumerate(parsed):
        if t.name in seen:
            raise _bad(f"tools[{i}].function.name", f"{t.name!r} is already the name of tools[{seen[t.name]}]; "
                                                   "function names must be unique")
        seen[t.name] = i
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _bad("parallel_tool_calls", "must be true or false")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if tool_choice is None:
        return ToolSet(tuple(parsed), "auto" if parsed else "none", parallel=parallel)
    if isinstance(tool_choice, str):
        if tool_choice not in _CHOICES:
            raise _bad("tool_choice", f"must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                                      f"\"function\": {{\"name\": ...}}}}, got {tool_choice!r}"[:240])
        if tool_choice == "required" and not parsed:
            raise _bad("tool_choice", "'required' needs tools to call: none were given")
        return ToolSet(tuple(parsed), tool_choice if parsed else "none", parallel=parallel)  # type: ignore[arg-type]
    if not isinstance(tool_choice, Mapping):
        raise _bad("tool_choice", "must be a string or an object")
    if tool_choice.get("type", "function") != "function":
        raise _bad("tool_choice.type", f"must be 'function', got {tool_choice.get('type')!r}"[:200])
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise _bad("tool_choice.function.name", 'is required: {"type": "function", "function": {"name": ...}}')
    if name not in seen:
        known = ", ".join(seen) or "none were given"
        raise _bad("tool_choice.function.name", f"no tool is named {name!r}"[:120] + f" (tools: {known})"[:200])
    return ToolSet(tuple(parsed), "function", name, parallel)


def _check_local_refs(schema: dict[str, Any], param: str) -> None:
    """Every "#/..." reference must point at something in the schema: said here, for this tool, rather
    than later by the compiler about the combined schema's rewritten paths."""
    for path, node in _subschemas(schema):
        for key in _REF_KEYWORDS:
            ref = node.get(key)
            if not (isinstance(ref, str) and ref.startswith("#/")):
                continue
            target: Any = schema
            for part in ref[2:].split("/"):
                part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise _bad(param, f"{key} {ref!r} at {path or '/'} points to nothing in this schema"[:300])


# ---- the conversation -----------------------------------------------------------------------------

_ROLES = ("system", "developer", "user", "assistant", "tool")


def conversation_turns(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """OpenAI chat messages (``role``, ``content`` as text, ``tool_calls``, ``tool_call_id``) as turns
    with roles system/user/assistant (see the module docstring). Raises ``RequestError`` naming
    ``messages[i]....`` for a role it does not know or a tool result that answers no call."""
    turns: list[dict[str, str]] = []
    open_calls: dict[str, str] = {}  # id -> the call as shown ("get_weather({...})"), of the last assistant turn
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        if role not in _ROLES:
            raise RequestError(f"messages[{i}].role {role!r} is not supported (use system, developer, user, "
                               "assistant or tool)", param=f"messages[{i}].role")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not open_calls:
                raise RequestError(f"messages[{i}]: a 'tool' message must answer a tool call of the assistant "
                                   "message before it", param=f"messages[{i}].role")
            if not isinstance(call_id, str) or call_id not in open_calls:
                raise RequestError(f"messages[{i}].tool_call_id must be the id of one of the calls the assistant "
                                   f"made just before (one of {sorted(open_calls)}), got {call_id!r}"[:300],
                                   param=f"messages[{i}].tool_call_id")
            turns.append({"role": "user", "content": f"{RESULT_OF} {open_calls[call_id]}: {content}"})
            continue
        open_calls = {}
        if role == "assistant" and m.get("tool_calls"):
            # The calls are shown with their results (a user turn each), not as the assistant's JSON: a
            # small model copies its last turn, and after a result that copy is the same call again.
            for j, c in enumerate(m["tool_calls"]):
                fn = c.get("function") if isinstance(c, Mapping) else None
                if not (isinstance(fn, Mapping) and isinstance(fn.get("name"), str) and isinstance(c.get("id"), str)):
                    raise RequestError(f"messages[{i}].tool_calls[{j}] must be {{\"id\", \"type\": \"function\", "
                                       "\"function\": {\"name\", \"arguments\"}}", param=f"messages[{i}].tool_calls")
                arguments = fn.get("arguments") or "{}"
                try:  # shown as JSON when it is JSON (it should be), else as the text it is
                    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                except ValueError:
                    pass
                open_calls[c["id"]] = f"{fn['name']}({json.dumps(arguments, separators=(',', ':'), ensure_ascii=False)})"
            if not content:
                continue
        turns.append({"role": "system" if role == "developer" else role, "content": content})
    if messages and messages[-1].get("role") == "tool":
        turns.append({"role": "user", "content": FOLLOW_UP})  # what to do with the results, last
    return _merged(turns)


RESULT_OF = "Result of"
FOLLOW_UP = "Answer my question with the result above."


def is_follow_up(turns: Sequence[Mapping[str, str]]) -> bool:
    """Whether ``conversation_turns`` ended the turns with tool results."""
    return bool(turns) and turns[-1]["role"] == "user" and turns[-1]["content"].endswith(FOLLOW_UP)


def _merged(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for t in turns:
        if out and out[-1]["role"] == t["role"]:
            out[-1] = {"role": t["role"], "content": out[-1]["content"] + "\n\n" + t["content"]}
        else:
            out.append(dict(t))
    return out


def with_tools(turns: list[dict[str, str]], tool_set: ToolSet, detail: int = 2) -> list[dict[str, str]]:
    """The turns with the tools block in the system turn (after the caller's own system text)."""
    block = tool_set.instructions(detail, follow_up=is_follow_up(turns))
    if turns and turns[0]["role"] == "system":
        return [{"role": "system", "content": f"{turns[0]['content']}\n\n{block}"}, *turns[1:]]
    return [{"role": "system", "content": block}, *turns]


def render_prompt(service: GenerationService, tool_set: ToolSet, turns: list[dict[str, str]]) -> ModelPrompt:
    """The conversation with the tools block, rendered for the model (``conversation.render``: its chat
    template, else a transcript), with as much detail about the parameters as the tier's prompt limits allow."""
    lim = service.limits
    prompt = ModelPrompt("")
    for detail in (2, 1, 0):
        prompt = conversation.render(service, with_tools(turns, tool_set, detail)).prompt
        if len(prompt.text) <= lim.max_prompt_chars and service.prepare(prompt).n_tokens <= lim.max_prompt_tokens:
            break
    return prompt  # the least detailed when nothing fits: check_prompt then says how long it is


# ---- the answer -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: Any  # the validated arguments object

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json}}


@dataclass(frozen=True)
class ToolAnswer:
    """What the model did: ``finish_reason`` "tool_calls" (``calls``), "stop" (``content``: it answered
    in text, ``auto`` only) or "length" (out of tokens before the JSON closed; ``content`` is the raw text)."""

    finish_reason: Literal["tool_calls", "stop", "length"]
    calls: tuple[ToolCall, ...] = ()
    content: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # every attempt of the engine
    cached_tokens: int | None = None  # prompt tokens from the prompt cache (None: not counted)
    raw_text: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # the structured engine's result, for the UI


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def call_tools(service: GenerationService, tool_set: ToolSet, turns: list[dict[str, str]], max_new_tokens: Any,
               temperature: Any = 1.0, seed: Any = None, cancel: threading.Event | None = None) -> ToolAnswer:
    """Let the model call ``tool_set``'s tools (or, with ``auto``, answer) after ``turns``.

    Raises ``RequestError``: 413 for a prompt too long (``messages``), 400 when the budget cannot
    hold the smallest call (``tools``), 422 when no valid output came from the engine's attempts."""
    if not tool_set.active:
        raise ValueError("call_tools needs tools and a tool_choice other than 'none'")
    prompt = render_prompt(service, tool_set, turns)
    try:
        prepared = service.check_prompt(prompt, param="messages")
    except RequestError as exc:
        if exc.status != 413:
            raise
        raise RequestError(f"{exc.message} (the conversation with the tools described, as the model sees it)",
                           413, exc.param) from None
    schema = tool_set.output_schema()
    try:
        result = service.structured_result(prompt, json.dumps(schema, ensure_ascii=False), max_new_tokens, temperature,
                                    seed, cancel, rendered=True)
    except RequestError as exc:
        if exc.param != "schema":
            raise
        # The tools' schemas were vetted one by one: what is left is the whole not fitting the budget.
        raise RequestError("tools: " + exc.message.removeprefix("schema: "), exc.status, "tools") from None
    base = dict(prompt_tokens=prepared.n_tokens, completion_tokens=result.tokens, raw_text=result.raw_text,
                details=result.to_api(), cached_tokens=result.cached_tokens)
    if not result.success:
        if result.outcome is structured.Outcome.TRUNCATED:
            return ToolAnswer("length", content=result.raw_text, **base)
        raise RequestError(f"no valid tool call or answer was produced: {result.error}", status=422, param="tools")
    data = result.data
    if "content" in data:
        return ToolAnswer("stop", content=data["content"], **base)
    calls = []
    for item in data["tool_calls"]:
        # The whole answer was validated; each call's arguments are judged alone too, against the
        # function's own schema as the caller gave it (before any rewriting of its references).
        parameters = tool_set.tool(item["name"]).parameters
        arguments, why = structured.validate_output(json.dumps(item["arguments"]), parameters)
        if why is not None:
            raise RequestError(f"the arguments for {item['name']} are not valid: {why}", status=422, param="tools")
        calls.append(ToolCall(new_call_id(), item["name"], arguments))
    return ToolAnswer("tool_calls", calls=tuple(calls), **base)
