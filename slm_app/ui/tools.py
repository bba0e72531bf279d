"""The Structured JSON tab's "function call" mode (``api_name="function_call"``, also an MCP tool):
OpenAI tool definitions in, the model's tool calls out, as the OpenAI route gives them. The work is
``slm_app.tools``'; this module turns UI values into its arguments."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from slm_app import conversation, tools
from slm_app.errors import RequestError, raise_failure
from slm_app.service import GenerationService, check_text
from slm_app.ui.controls import structured_controls
from slm_app.ui.errors import user_errors

EXAMPLE_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40, "description": "The city, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Get the current time in a timezone",
        "parameters": {"type": "object", "properties": {
            "timezone": {"type": "string", "maxLength": 32, "description": "An IANA timezone, e.g. Europe/Paris"}},
            "required": ["timezone"], "additionalProperties": False}}},
]
CHOICES = ["auto", "required", "none"]


def _tool_names(tools_json: Any) -> list[str]:
    """The function names in the Tools box, for the tool_choice list (nothing while it is not valid)."""
    try:
        return [t["function"]["name"] for t in json.loads(tools_json) if isinstance(t["function"]["name"], str)]
    except (TypeError, ValueError, KeyError, IndexError):
        return []


def _parse_tools_text(tools_json: Any, limit: int) -> Any:
    if not isinstance(tools_json, str):
        raise RequestError("tools must be JSON text: a list of OpenAI tool definitions", param="tools")
    check_text("tools", tools_json)
    if len(tools_json) > limit:
        raise RequestError(f"tools is {len(tools_json):,} characters; the limit is {limit:,}", param="tools")
    try:
        return json.loads(tools_json)
    except json.JSONDecodeError as exc:
        raise RequestError(f"tools: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                           param="tools") from None
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"tools: not valid JSON ({type(exc).__name__})", param="tools") from None


def function_call_answer(service: GenerationService, prompt: Any, tools_json: Any, tool_choice: Any, parallel: Any,
                         max_new_tokens: Any, temperature: Any, seed: Any) -> dict[str, Any]:
    """What the ``function_call`` endpoint returns (see ``build_function_call_mode``)."""
    lim = service.limits
    service.check_prompt(prompt)  # the user's text alone: empty, too long, NUL...
    if not isinstance(parallel, bool):
        raise RequestError(f"parallel_tool_calls must be true or false, got {parallel!r}"[:120],
                           param="parallel_tool_calls")
    if not isinstance(tool_choice, str):
        raise RequestError("tool_choice must be auto, required, none or a function name", param="tool_choice")
    choice: Any = tool_choice if tool_choice in CHOICES else {"type": "function", "function": {"name": tool_choice}}
    tool_set = tools.parse_tools(_parse_tools_text(tools_json, lim.max_schema_chars), choice, parallel, limits=lim)
    turns = tools.conversation_turns([{"role": "user", "content": prompt}])
    if tool_set.active:
        answer = tools.call_tools(service, tool_set, turns, max_new_tokens, temperature, seed)
        return {"finish_reason": answer.finish_reason, "content": answer.content,
                "tool_calls": [c.to_openai() for c in answer.calls], "tokens": answer.completion_tokens,
                "raw_text": answer.raw_text}
    # "none": a plain chat answer, with the tab's token budget.
    params = service.sampling(max_new_tokens, temperature, seed=seed, cap=lim.max_structured_tokens)
    prepared, rendered = conversation.fit(service, turns, param="prompt")
    final = service.start("function_call", prepared, rendered.with_stops(params)).result()
    raise_failure(final)
    return {"finish_reason": "length" if final.finish_reason in ("length", "timeout") else "stop",
            "content": final.text.lstrip(), "tool_calls": [], "tokens": final.completion_tokens,
            "raw_text": final.text}


def _status(result: dict | None) -> str:
    if not result:
        return ""
    calls = result.get("tool_calls") or []
    if result.get("finish_reason") == "tool_calls":
        names = ", ".join(c["function"]["name"] for c in calls)
        return f"✅ {len(calls)} call(s): {names}; arguments validated against each function's parameters · " \
               f"{result.get('tokens')} tokens"
    if result.get("finish_reason") == "length":
        return "⚠️ Out of tokens before the answer was complete: raise max new tokens."
    return f"💬 The model answered in text (no call) · {result.get('tokens')} tokens"


def build_function_call_mode(service: GenerationService, model_events: dict[str, Any]) -> gr.Column:
    """The mode's controls in a column (hidden until the tab's mode selector shows it)."""
    lim = service.limits

    @user_errors
    def function_call(prompt: str, tools_json: str, tool_choice: str, parallel_tool_calls: bool,
                      max_new_tokens: float, temperature: float, seed: float | None) -> dict[str, Any]:
        """Let the model call functions (OpenAI tool calling): each call's arguments are generated under the
        function's parameters JSON Schema and validated. Returns finish_reason ("tool_calls", "stop" when the
        model answered in text, "length"), content, tool_calls ([{id, type, function: {name, arguments}}],
        arguments as JSON text), tokens and raw_text.

        Args:
            prompt: The user's message, e.g. "What's the weather in Paris?".
            tools_json: A JSON list of OpenAI tool definitions: {"type": "function", "function": {"name",
                "description", "parameters"}}. Only local "$ref"s (#/...) are allowed in parameters.
            tool_choice: auto (the model decides), required (call at least one), none (answer in text),
                or the name of the function to call.
            parallel_tool_calls: Allow several calls in one answer.
            max_new_tokens: Token budget, from 1 to the tier's structured-output limit.
            temperature: 0 is greedy; higher is more random.
            seed: A whole number for reproducible sampling; -1 for random.
        """
        return function_call_answer(service, prompt, tools_json, tool_choice, parallel_tool_calls,
                                    max_new_tokens, temperature, seed)

    with gr.Column(visible=False) as column:
        f_prompt = gr.Textbox(label="Prompt", lines=2, value="What's the weather in Paris?")
        f_tools = gr.Code(json.dumps(EXAMPLE_TOOLS, indent=2), language="json",
                          label="Tools (OpenAI function definitions)")
        with gr.Row():
            f_choice = gr.Dropdown(CHOICES + _tool_names(json.dumps(EXAMPLE_TOOLS)), value="auto",
                                   allow_custom_value=True, label="tool_choice (auto, required, none, or a function)")
            f_parallel = gr.Checkbox(value=True, label="Parallel calls allowed")
        f_tokens, f_temp, f_seed = structured_controls(lim)
        f_button = gr.Button("Call a function", variant="primary")
        f_status = gr.Markdown()
        f_out = gr.JSON(label="Tool calls (or the text answer)", open=True)
        f_tools.change(lambda text, current: gr.Dropdown(choices=CHOICES + _tool_names(text), value=current),
                       [f_tools, f_choice], f_choice, api_visibility="private", queue=False)
        event = f_button.click(function_call, [f_prompt, f_tools, f_choice, f_parallel, f_tokens, f_temp, f_seed],
                               f_out, api_name="function_call", **model_events)
        event.success(_status, f_out, f_status, api_visibility="private", queue=False)
        event.failure(lambda: "❌ Request refused: see the error message.", None, f_status,
                      api_visibility="private", queue=False)
    return column
