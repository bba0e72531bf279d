"""The Gradio Blocks UI. Each tab's main event is also a named API endpoint (``api_name``),
which is the public contract for ``gradio_client`` and for MCP tools.

This module only adapts: it turns UI values into service calls (refused requests become ``gr.Error``
messages through ``ui.errors.user_errors``). Rules live in ``slm_app.service``. The other tabs are
``ui.chat``, ``ui.tools`` (function calling in the Structured tab) and ``ui.evaluate``.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import gradio as gr

from slm_app.ui import (chat as ui_chat, evaluate as ui_evaluate, finetune as ui_finetune, health as ui_health,
                        tools as ui_tools)
from slm_app.ui.json_output import json_text
from slm_app.presets import PRESETS
from slm_app.service import GenerationService
from slm_app.ui.controls import sampling_controls, structured_controls
from slm_app.ui.errors import user_errors

_CONCURRENCY_ID = "model"  # generate, batch and structured: requests for the scheduler's slots


def _banner(service: GenerationService) -> str:
    h = service.health()
    lim = service.limits
    info = h.get("model_info") or {}
    lines = [f"**Tier:** `{h['tier']}` ({h['tier_reason']}) · **backend:** {h['backend']} · "
             f"**model:** `{h['model']}` · **status:** {h['status']}",
             f"Limits per request: {lim.max_prompts} prompt(s), {lim.max_new_tokens} new tokens "
             f"({lim.max_structured_tokens} for structured JSON), {lim.max_prompt_chars:,} characters / "
             f"{lim.max_prompt_tokens:,} tokens of prompt."]
    if info.get("random_weights"):
        lines.append("⚠️ This model has **random weights** (tiny-gpt2 is a test model, on the hub too): "
                     "its text is meaningless. It shows the plumbing, not language ability.")
    if info.get("license"):
        lines.append(f"Model licence: {info['license']}")
    if h["reason"]:
        lines.append(f"⚠️ Model not loaded: {h['reason']}")
    return "\n\n".join(lines)


def gradio_concurrency(service: GenerationService) -> int:
    """Gradio events running at once: every slot busy and the scheduler's waiting line full."""
    return service.tier.parallel + service.settings.queue_size


def build_ui(service: GenerationService) -> gr.Blocks:
    lim = service.limits
    # The scheduler is the queue: Gradio hands every request straight to it (its slots decode them
    # together, its bounded waiting line refuses the overflow with a clear "busy").
    model_events: dict[str, Any] = {"concurrency_limit": gradio_concurrency(service),
                                    "concurrency_id": _CONCURRENCY_ID}

    @user_errors
    def generate(prompt: str, max_new_tokens: float, temperature: float, top_p: float, seed: float | None,
                 top_k: float = 0, stop: str = "", use_chat_template: bool = True,
                 repeat_penalty: float = 1.0) -> Iterator[str]:
        """Continue a prompt, streaming the text as it is generated. Returns the full generated text.

        Args:
            prompt: The text to continue.
            max_new_tokens: Tokens to generate, from 1 to the tier's limit.
            temperature: 0 is greedy (deterministic); higher is more random.
            top_p: Nucleus sampling in (0, 1]; 1 turns it off.
            seed: A whole number for reproducible sampling; -1 for random.
            top_k: Sample only among the k most likely tokens; 0 turns it off.
            stop: Stop sequences separated by "|"; generation ends before the first one.
            use_chat_template: Wrap the prompt in the model's chat template when it has one (llama.cpp).
            repeat_penalty: Above 1 discourages repeating tokens already generated.
        """
        stops = [s for s in (stop or "").split("|") if s]
        yield from service.generate_stream(prompt, max_new_tokens, temperature, top_p, seed, top_k=top_k,
                                           stop=stops, use_chat_template=use_chat_template,
                                           repeat_penalty=repeat_penalty)

    @user_errors
    def batch(prompts: str, max_new_tokens: float, temperature: float) -> dict[str, list[str]]:
        """Generate for several prompts (one per line), decoded together; results come back in order.

        Args:
            prompts: One prompt per line; blank lines are skipped. At most the tier's prompt limit.
            max_new_tokens: Tokens to generate per prompt, from 1 to the tier's limit.
            temperature: 0 is greedy (deterministic); higher is more random.
        """
        return {"results": [s.text for s in service.batch(prompts, max_new_tokens, temperature)]}

    @user_errors
    def structured(prompt: str, schema: str, max_new_tokens: float, temperature: float,
                   seed: float | None) -> str:
        """Generate JSON that validates against the given JSON Schema (constrained decoding, then jsonschema).
        Returns JSON text (parse it with json.loads): {success, data, error, relaxed, model_used,
        inference_time_ms, tokens, raw_text}; data is the generated JSON, exactly as generated.

        Args:
            prompt: What the JSON should be about.
            schema: A JSON Schema, as JSON text. Only local "$ref"s (#/...) are allowed.
            max_new_tokens: Token budget for the JSON, from 1 to the tier's structured-output limit.
            temperature: 0 is greedy; higher is more random.
            seed: A whole number for reproducible sampling; -1 for random.
        """
        # As text, not a JSON component: see json_output (keys such as "path", 64-bit integers).
        return json_text(service.structured(prompt, schema, max_new_tokens, temperature, seed))

    def health() -> dict[str, Any]:
        """Server health: tier and why, model, memory, request counts, latency and speed."""
        return service.health()

    def collect_garbage() -> dict[str, float]:
        """Run garbage collection; returns process memory before and after, in MB."""
        return service.collect_garbage()

    with gr.Blocks(title="slm-space") as demo:
        gr.Markdown("# slm-space\nSmall language models on CPU.")
        banner = gr.Markdown()

        with gr.Tab("Generate"):
            g_prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Once upon a time")
            g_tokens, g_temp, g_top_p, g_seed = sampling_controls(lim, tokens=32, temperature=0.8)
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    g_top_k = gr.Number(label="Top-k (0 = off)", value=0, precision=None)
                    g_stop = gr.Textbox(label="Stop sequences (separate with |)", value="")
                    g_chat = gr.Checkbox(label="Use the model's chat template (when it has one)", value=True)
                    g_rep = gr.Number(label="Repeat penalty", value=1.0, precision=None)
            g_button = gr.Button("Generate", variant="primary")
            g_out = gr.Textbox(label="Generated text", lines=8)
            g_button.click(generate, [g_prompt, g_tokens, g_temp, g_top_p, g_seed, g_top_k, g_stop, g_chat, g_rep],
                           g_out, api_name="generate", **model_events)
            ui_chat.build_output_feedback(service, g_prompt, g_out, [
                ("max_new_tokens", g_tokens), ("temperature", g_temp), ("top_p", g_top_p), ("seed", g_seed),
                ("top_k", g_top_k), ("stop", g_stop), ("use_chat_template", g_chat), ("repeat_penalty", g_rep)])

        ui_chat.build_chat_tab(service)

        with gr.Tab("Batch"):
            b_prompts = gr.Textbox(label=f"Prompts, one per line (at most {lim.max_prompts})", lines=5)
            with gr.Row():
                b_tokens = gr.Number(label=f"Max new tokens (1–{lim.max_new_tokens})",
                                     value=min(32, lim.max_new_tokens), precision=None)
                b_temp = gr.Number(label="Temperature", value=0.8, precision=None)
            b_button = gr.Button("Run batch", variant="primary")
            b_out = gr.JSON(label="Results")
            b_button.click(batch, [b_prompts, b_tokens, b_temp], b_out, api_name="batch", **model_events)

        with gr.Tab("Structured JSON"):
            # Two modes: JSON for a schema, or OpenAI-style function calls (ui_tools; api_name function_call).
            s_mode = gr.Radio(["JSON Schema", "Function call"], value="JSON Schema", label="Mode")
            with gr.Column() as schema_mode:
                first = next(iter(PRESETS))
                s_preset = gr.Dropdown(list(PRESETS), value=first, label="Preset schema")
                s_schema = gr.Code(json.dumps(PRESETS[first], indent=2), language="json", label="JSON Schema")
                s_prompt = gr.Textbox(label="Prompt", lines=3, value="Write about CPU inference for small models.")
                s_tokens, s_temp, s_seed = structured_controls(lim)
                s_button = gr.Button("Generate JSON", variant="primary")
                s_status = gr.Markdown()
                s_out = gr.Code(language="json", label="Result", interactive=False)
                s_raw = gr.Textbox(label="Raw model output", lines=3)
            function_mode = ui_tools.build_function_call_mode(service, model_events)
            s_mode.change(lambda mode: (gr.Column(visible=mode == "JSON Schema"),
                                        gr.Column(visible=mode == "Function call")),
                          s_mode, [schema_mode, function_mode], api_visibility="private", queue=False)
            s_preset.change(lambda name: json.dumps(PRESETS[name], indent=2), s_preset, s_schema,
                            api_visibility="private", queue=False)
            s_event = s_button.click(structured, [s_prompt, s_schema, s_tokens, s_temp, s_seed], s_out,
                                     api_name="structured", **model_events)
            # .success/.failure, not .then: after a refused request the status must not redraw the
            # previous (successful) result that is still in the JSON box.
            s_event.success(_structured_view, s_out, [s_status, s_raw], api_visibility="private", queue=False)
            s_event.failure(lambda: ("❌ Request refused: see the error message.", ""), None, [s_status, s_raw],
                            api_visibility="private", queue=False)

        ui_evaluate.build_evaluate_tab(service)
        ui_finetune.build_finetune_tab(service)

        health_outputs, health_reading = ui_health.build_health_tab(
            service, health, collect_garbage, lambda refresh: ui_chat.build_feedback_health(service, refresh))

        demo.load(lambda: (_banner(service), *health_reading()), None, [banner, *health_outputs],
                  api_visibility="private", queue=False)
    return demo


def _structured_view(text: str | None) -> tuple[str, str]:
    if not text:
        return "", ""
    result = json.loads(text)
    if result.get("success"):
        relaxed = " (schema compiled in relaxed mode)" if result.get("relaxed") else ""
        status = f"✅ Validated against the schema{relaxed} · {result.get('tokens')} tokens · " \
                 f"{result.get('inference_time_ms', 0):.0f} ms"
    else:
        status = f"❌ Not valid: {result.get('error')}"
    return status, result.get("raw_text", "")
