"""The Evaluate tab: perplexity (``api_name="perplexity"``), ROUGE-L and behavioural checks
(``api_name="evaluate"``), and the feedback export. The measuring lives in ``slm_app.evaluate``.

Evaluations are generators that yield after every chunk or item: the page shows a progress bar
(``gr.Progress``) and partial results, and the Stop button cancels the event, which closes the
generator at its next step (a generation in flight is cancelled and frees its slot). They run one at
a time (their own concurrency group), so an evaluation never takes every slot from chat users.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from slm_app import evaluate
from slm_app.feedback import store_for
from slm_app.errors import RequestError
from slm_app.service import GenerationService
from slm_app.ui.errors import user_errors

KINDS = [("Behavioural checks", "checks"), ("ROUGE-L", "rouge")]
DEFAULTS = {"checks": evaluate.DEFAULT_CHECKS, "rouge": evaluate.DEFAULT_ROUGE}
_CHECK_COLUMNS = ["name", "result", "details", "output", "prompt"]
_ROUGE_COLUMNS = ["prompt", "reference", "generation", "rougeL_f1", "rougeL_precision", "rougeL_recall"]
_EVALUATION = {"concurrency_id": "evaluate", "concurrency_limit": 1}


def _read_upload(path: str | None, pasted: str | None, what: str) -> str:
    """An uploaded file wins over pasted text."""
    if path:
        try:
            return Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"the uploaded {what} is not UTF-8 text") from None
    return pasted or ""


def _chunk_frame(report: dict[str, Any] | None) -> pd.DataFrame:
    ppl = (report or {}).get("chunk_ppl") or []
    return pd.DataFrame({"chunk": list(range(1, len(ppl) + 1)), "ppl": ppl}, columns=["chunk", "ppl"])


def _perplexity_summary(report: dict[str, Any] | None) -> str:
    if not report:
        return ""
    state = "" if report.get("done") else " (stopped early: partial)"
    return (f"**PPL = {report['ppl']:.4f} ± {report['ppl_error']:.4f}**{state} · {report['tokens_scored']:,} of "
            f"{report['tokens']:,} tokens scored in {len(report['chunk_ppl'])} chunk(s) · method "
            f"`{report['method']}`, ctx {report['ctx']} · model `{report['model']}`")


def build_evaluate_tab(service: GenerationService) -> None:
    """The Evaluate tab; call inside the app's ``gr.Blocks``."""
    lim = service.limits

    @user_errors
    def perplexity(text: str, file: str | None, ctx: float, method: str,
                   progress: gr.Progress = gr.Progress()) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
        """Perplexity of a text under the loaded model: PPL, its ± estimate, tokens scored, per-chunk PPL.

        Args:
            text: The text to score (ignored when a file is given).
            file: A UTF-8 text file to score instead.
            ctx: Chunk (llama.cpp) or window (sliding) length in tokens; 0 for the default.
            method: "auto" (chunks on llama.cpp, sliding window elsewhere), "chunks" (llama-perplexity's
                way: non-overlapping chunks, second half scored) or "sliding".
        """
        source = _read_upload(file, text, "text")
        engine = service.ready()
        progress(0, desc="tokenizing")
        for report in evaluate.iter_perplexity(engine, source, ctx, method or "auto"):
            done = len(report.chunk_ppl)
            progress((done, report.chunks_total), desc="scoring chunks", unit="chunks")
            result = report.to_dict()
            yield result, _chunk_frame(result)

    @user_errors
    def run_evaluation(kind: str, data: str, file: str | None, max_new_tokens: float, temperature: float,
                       progress: gr.Progress = gr.Progress()) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
        """ROUGE-L against references, or behavioural checks, over a JSONL dataset; a summary and a table.

        Args:
            kind: "checks" (lines {"prompt", "expect": {contains, not_contains, regex, json_schema, max_chars}})
                or "rouge" (lines {"prompt", "reference"}).
            data: The JSONL text (ignored when a file is given); empty for the set shipped with the app.
            file: A JSONL file instead.
            max_new_tokens: Tokens per answer, from 1 to the tier's limit.
            temperature: 0 is greedy (reproducible); higher is more random.
        """
        if kind not in DEFAULTS:
            raise RequestError(f"kind must be one of {', '.join(DEFAULTS)}, got {kind!r}", param="kind")
        source = _read_upload(file, data, "dataset")
        if not source.strip():
            source = evaluate.default_data(DEFAULTS[kind])
        runner = evaluate.iter_checks if kind == "checks" else evaluate.iter_rouge
        rows: list[dict[str, Any]] = []
        progress(0, desc="starting")
        for row, total in runner(service, source, max_new_tokens, temperature, 0):
            rows.append(row)
            progress((len(rows), total), desc="evaluating", unit="items")
            yield _evaluation_view(kind, rows, total)
        if not rows:  # unreachable (parse_jsonl refuses empty data), kept so the outputs are always set
            yield _evaluation_view(kind, rows, 0)

    with gr.Tab("Evaluate"):
        gr.Markdown("Measure the loaded model. Long runs show progress and can be stopped. "
                    "Nothing here is stored.")
        with gr.Accordion("Perplexity", open=True):
            p_text = gr.Textbox(label="Text to score", lines=6,
                                placeholder="Paste a text; lower perplexity = the model finds it more likely.")
            p_file = gr.File(label="…or upload a text file", file_types=[".txt", ".md"], type="filepath",
                             height=90)
            with gr.Row():
                p_ctx = gr.Number(label="Context ctx in tokens (0 = default)", value=0, precision=0)
                p_method = gr.Dropdown(list(evaluate.METHODS), value="auto", label="Method")
            with gr.Row():
                p_run = gr.Button("Compute perplexity", variant="primary")
                p_stop = gr.Button("Stop perplexity", variant="stop")
            p_summary = gr.Markdown()
            p_out = gr.JSON(label="Perplexity")
            p_plot = gr.LinePlot(_chunk_frame(None), x="chunk", y="ppl", label="Per-chunk perplexity",
                                 title="Perplexity of each chunk")
            p_event = p_run.click(perplexity, [p_text, p_file, p_ctx, p_method], [p_out, p_plot],
                                  api_name="perplexity", **_EVALUATION)
            p_event.then(_perplexity_summary, p_out, p_summary, api_visibility="private", queue=False)
            p_stop.click(_perplexity_stopped, p_out, p_summary, cancels=[p_event], api_visibility="private",
                         queue=False)

        with gr.Accordion("ROUGE-L and behavioural checks", open=True):
            e_kind = gr.Radio(KINDS, value="checks", label="Evaluation")
            e_data = gr.Textbox(evaluate.default_data(DEFAULTS["checks"]), label="JSONL data (one item per line)",
                                lines=8, max_lines=16)
            e_file = gr.File(label="…or upload a JSONL file", file_types=[".jsonl", ".json", ".txt"],
                             type="filepath", height=90)
            with gr.Row():
                e_tokens = gr.Number(label=f"Max new tokens per answer (1–{lim.max_new_tokens})",
                                     value=min(64, lim.max_new_tokens), precision=None)
                e_temp = gr.Number(label="Temperature (0 = greedy)", value=0.0, precision=None)
            with gr.Row():
                e_run = gr.Button("Run evaluation", variant="primary")
                e_stop = gr.Button("Stop evaluation", variant="stop")
            e_summary = gr.JSON(label="Evaluation summary")
            e_table = gr.Dataframe(label="Evaluation results", wrap=True, interactive=False)
            e_kind.change(lambda kind: evaluate.default_data(DEFAULTS[kind]), e_kind, e_data,
                          api_visibility="private", queue=False)
            e_event = e_run.click(run_evaluation, [e_kind, e_data, e_file, e_tokens, e_temp], [e_summary, e_table],
                                  api_name="evaluate", **_EVALUATION)
            e_stop.click(None, None, None, cancels=[e_event], api_visibility="private", queue=False)

        with gr.Accordion("Training data from feedback", open=False):
            gr.Markdown("Answers rated 4–5 (with corrections in place of the answers), each conversation "
                        "once, as JSONL in the chat-messages format fine-tuning tools read. "
                        "Also at `GET /feedback/export`.")
            x_button = gr.Button("Export feedback as JSONL")
            x_file = gr.File(label="feedback.jsonl", interactive=False)
            x_button.click(lambda: _export_file(service), None, x_file, api_visibility="private", queue=False)


def _perplexity_stopped(report: dict[str, Any] | None) -> str:
    return "⏹ Stopped." + (f" Last partial result: {_perplexity_summary(report)}" if report else "")


def _evaluation_view(kind: str, rows: list[dict[str, Any]], total: int) -> tuple[dict[str, Any], pd.DataFrame]:
    if kind == "checks":
        summary = evaluate.checks_summary(rows)
        table = pd.DataFrame([{**r, "result": "PASS" if r["passed"] else "FAIL"} for r in rows],
                             columns=[*_CHECK_COLUMNS, "passed"])[_CHECK_COLUMNS]
    else:
        summary = evaluate.rouge_summary(rows)
        table = pd.DataFrame(rows, columns=_ROUGE_COLUMNS)
    return {**summary, "total": total, "done": len(rows) == total}, table


def _export_file(service: GenerationService) -> str:
    data = store_for(service.settings).export_jsonl()
    folder = Path(tempfile.mkdtemp(prefix="slm-feedback-"))
    path = folder / "feedback.jsonl"
    path.write_text(data, encoding="utf-8")
    return str(path)
