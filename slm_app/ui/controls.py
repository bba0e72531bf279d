"""Gradio controls the tabs share, so every tab states the tier's limits the same way."""

from __future__ import annotations

import gradio as gr

from slm_app.settings import TierLimits


def sampling_controls(lim: TierLimits, tokens: int, temperature: float
                      ) -> tuple[gr.Number, gr.Number, gr.Number, gr.Number]:
    """Max new tokens, temperature, top-p and seed inputs, in one row, labelled with the tier's limits."""
    with gr.Row():
        max_tokens = gr.Number(label=f"Max new tokens (1–{lim.max_new_tokens})",
                               value=min(tokens, lim.max_new_tokens), precision=None)
        temp = gr.Number(label=f"Temperature ({lim.min_temperature}–{lim.max_temperature}, 0 = greedy)",
                         value=temperature, precision=None)
        top_p = gr.Number(label="Top-p (0–1]", value=0.95, precision=None)
        seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=None)
    return max_tokens, temp, top_p, seed


def structured_controls(lim: TierLimits) -> tuple[gr.Number, gr.Number, gr.Number]:
    """Max new tokens (the tier's structured cap), temperature and seed, for the Structured tab's modes."""
    with gr.Row():
        tokens = gr.Number(label=f"Max new tokens (1–{lim.max_structured_tokens})",
                           value=lim.max_structured_tokens, precision=None)
        temp = gr.Number(label="Temperature", value=0.7, precision=None)
        seed = gr.Number(label="Seed (-1 = random)", value=0, precision=None)
    return tokens, temp, seed
