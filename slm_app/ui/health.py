"""The Health & Memory tab as a dashboard: what an operator looks at, readable at a glance.

Memory in use against the limits over time (a plot), throughput, slots and queue, latency, garbage
collections, and what is loaded (model, backend, adapter, licence). It refreshes itself every few
seconds while the page is open. The raw JSON stays on the API (``api_name="health"``, ``GET /health``)
and below the dashboard, folded.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import gradio as gr
import pandas as pd

from slm_app.service import GenerationService

REFRESH_S = 5.0  # the dashboard's own refresh while the page is open
LIMIT_SCALE = 4.0  # limits are drawn on the memory plot when at most this many times the RSS peak


def gc_runs() -> int:
    """Collections the interpreter ran, all generations (automatic and explicit)."""
    return sum(int(s["collections"]) for s in gc.get_stats())


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


def dashboard_markdown(h: dict[str, Any]) -> str:
    """The dashboard's figures from a ``GenerationService.health()`` reading."""
    info = h.get("model_info") or {}
    mem, guard, fit = h.get("memory_usage") or {}, h.get("memory_guard") or {}, h.get("memory_fit") or {}
    slots = h.get("slots") or {}
    lat = h.get("latency_ms") or {}
    rate = h.get("tokens_per_second")
    limit = guard.get("limit_mb")
    refusing = " · ⛔ refusing new work" if guard.get("refusing") else ""
    adapter = h.get("adapter") or info.get("adapter") or "none"
    licence = info.get("license") or ("none (random weights)" if info.get("random_weights") else "not stated")
    status = {"ok": "ready", "loading": "loading", "draining": "draining"}.get(h.get("status"), f"⚠ {h.get('status')}")
    head = (f"**{status}** · **model:** `{h.get('model')}` ({info.get('name', '–')}) · **backend:** {h.get('backend')} · "
            f"**tier:** {h.get('tier')} · **adapter:** {adapter} · **licence:** {licence}")
    need = f" · the tier needs ~{fit['needed_mb']:,} MB" if fit.get("needed_mb") else ""
    rows = [
        "| Memory (RSS) | Guard limit | Tokens/s | Slots busy | Queue | p50 latency | p95 latency | GC runs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| **{mem.get('rss_mb', 0):,.0f} MB** of {mem.get('usable_mb', 0):,.0f} MB ({mem.get('percent_of_usable', 0)}%) "
        f"| {'off' if limit is None else f'{limit:,.0f} MB'} | {'–' if rate is None else f'{rate:,.1f}'} "
        f"| {slots.get('running', 0)} / {slots.get('slots', 0)} | {slots.get('waiting', 0)} | {_ms(lat.get('p50'))} "
        f"| {_ms(lat.get('p95'))} | {gc_runs():,} |",
    ]
    foot = (f"{h.get('requests', 0):,} requests served · up {h.get('uptime_s', 0):,.0f} s · usable memory from "
            f"{fit.get('source', 'the host')}{need}{refusing}")
    return "\n".join([head, "", *rows, "", foot])


def memory_frame(service: GenerationService, h: dict[str, Any]) -> pd.DataFrame:
    """RSS samples over uptime, with the guard's limit and the usable memory as flat lines beside them."""
    points = service.metrics.memory_timeline() or [(0.0, 0.0)]
    frames = [pd.DataFrame({"uptime_s": [t for t, _ in points], "MB": [m for _, m in points], "series": "RSS"})]
    xs = [points[0][0], points[-1][0]]
    peak = max(m for _, m in points)
    # A limit far above the process (a large host) would flatten the RSS line into the axis: it is drawn
    # only when within LIMIT_SCALE of the peak, and the figures above the plot always give it.
    for series, value in (("guard limit", (h.get("memory_guard") or {}).get("limit_mb")),
                          ("usable", (h.get("memory_usage") or {}).get("usable_mb"))):
        if value and value <= LIMIT_SCALE * max(peak, 1.0):
            frames.append(pd.DataFrame({"uptime_s": xs, "MB": [value] * 2, "series": series}))
    return pd.concat(frames, ignore_index=True)


def build_health_tab(service: GenerationService, health: Callable[[], dict], collect_garbage: Callable[[], dict],
                     feedback: Callable[[gr.Button], None]) -> tuple[list[gr.components.Component], Callable]:
    """The tab's components; returns the outputs a page load fills and the function that fills them."""

    def reading() -> tuple[str, pd.DataFrame, dict]:
        h = service.health()
        return dashboard_markdown(h), memory_frame(service, h), h

    with gr.Tab("Health & Memory"):
        figures = gr.Markdown(label="Dashboard")
        plot = gr.LinePlot(x="uptime_s", y="MB", color="series", title="Memory over uptime (s): RSS against limits",
                           label="Memory", y_title="MB", x_title="uptime (s)", height=340)
        with gr.Row():
            h_button = gr.Button("Refresh", variant="primary")
            gc_button = gr.Button("Run garbage collection")
        gc_out = gr.JSON(label="Garbage collection (RSS before/after, MB)")
        feedback(h_button)
        with gr.Accordion("Raw JSON (also GET /health and the health API)", open=False):
            h_out = gr.JSON(label="Health")
        outputs = [figures, plot, h_out]
        h_button.click(health, None, h_out, api_name="health", queue=False).then(
            reading, None, outputs, api_visibility="private", queue=False)
        gc_button.click(collect_garbage, None, gc_out, api_name="gc", queue=False).then(
            reading, None, outputs, api_visibility="private", queue=False)
        gr.Timer(REFRESH_S).tick(reading, None, outputs, api_visibility="private", queue=False)
    return outputs, reading
