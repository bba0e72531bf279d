"""The Fine-tune tab: what the feedback holds, start and cancel a job, its progress and loss curve,
the adapters with their gate metrics, promote and rollback. Each action is an API endpoint
(``finetune_status``, ``finetune_start``, ``finetune_cancel``, ``finetune_promote``, ``finetune_rollback``);
the rules live in ``slm_app.finetune.manager``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from slm_app.finetune.manager import FEEDBACK, tuner_for
from slm_app.errors import RequestError
from slm_app.service import GenerationService
from slm_app.ui.errors import user_errors


def _bar(progress: dict[str, Any]) -> str:
    step, total = progress.get("step") or 0, progress.get("total_steps") or 0
    if not total:
        return ""
    filled = round(20 * step / total)
    eta = progress.get("eta_s")
    return (f"`{'█' * filled}{'░' * (20 - filled)}` step {step}/{total} · loss {progress.get('loss')} · "
            f"validation loss {progress.get('val_loss')}" + (f" · ETA {eta:.0f} s" if eta is not None else ""))


RANDOM_WEIGHTS_NOTE = ("This model has random weights (no trained GPT-2 is available offline): an adapter "
                       "trained on it shows the mechanism, not quality. The loss, the gate, swap and rollback are "
                       "real; its answers mean nothing.")


def _note(service: GenerationService) -> str | None:
    engine = service.engine
    return RANDOM_WEIGHTS_NOTE if engine is not None and engine.info().random_weights else None


def build_finetune_tab(service: GenerationService) -> None:
    tuner = tuner_for(service)

    def status() -> dict[str, Any]:
        """The learning loop: feedback available, the running or last job, the adapters and what is served."""
        jobs = tuner.jobs()
        return {"feedback": tuner.feedback.counts(), "new_qualifying_feedback": tuner.new_feedback(),
                "auto_after": service.settings.finetune_after, "auto": service.settings.finetune_auto,
                "job": jobs[0].public() if jobs else None, "adapters": tuner.registry.cards(),
                "note": _note(service), **tuner.registry.state()}

    @user_errors
    def start(source: str, upload: str | None, n_epochs: float, lr_multiplier: float, batch_size: float,
              suffix: str) -> dict[str, Any]:
        """Start a LoRA fine-tuning job on the feedback (rated 4-5, corrections applied) or an uploaded file.

        Args:
            source: "feedback" or "file".
            upload: The training file (chat JSONL or plain text) when source is "file".
            n_epochs: Passes over the training data (1-20).
            lr_multiplier: Multiplies the base learning rate (1e-3).
            batch_size: Examples per step.
            suffix: A name part for the adapter (letters, digits, - or _), or empty.
        """
        training = FEEDBACK
        if source == "file":
            if not upload:
                raise RequestError("choose a training file to upload", param="file")
            path = Path(upload)
            training = tuner.add_file(path.name, path.read_bytes(), "fine-tune")["id"]
        model = service.ready().info().model_id
        return tuner.create_job(model, training, None, {"n_epochs": n_epochs, "learning_rate_multiplier": lr_multiplier,
                                                        "batch_size": batch_size}, suffix or None).public()

    @user_errors
    def cancel() -> dict[str, Any]:
        """Cancel the running fine-tuning job."""
        running = tuner.running()
        if running is None:
            raise RequestError("no job is running")
        return tuner.cancel(running.id).public()

    @user_errors
    def promote(adapter: str) -> dict[str, Any]:
        """Serve this adapter by default (requests running finish on theirs first).

        Args:
            adapter: The adapter's id (ft:...).
        """
        return tuner.promote(adapter or "")

    @user_errors
    def rollback() -> dict[str, Any]:
        """Serve the previously promoted adapter, or the base model, at once."""
        return tuner.rollback()

    def view() -> tuple[str, pd.DataFrame, pd.DataFrame, Any]:
        jobs = tuner.jobs()
        job = jobs[0] if jobs else None
        counts = tuner.feedback.counts()
        lines = [f"**Feedback:** {counts['total']} items, {counts['4'] + counts['5']} rated 4-5; "
                 f"{tuner.new_feedback()} new since the last job "
                 + (f"(a job starts by itself at {service.settings.finetune_after})" if service.settings.finetune_auto
                    else "(automatic jobs are off)"),
                 f"**Served:** `{(tuner.router.promoted if tuner.router else None) or 'base model'}`"]
        if (note := _note(service)) is not None:
            lines.insert(0, f"⚠️ {note}")
        if job is not None:
            lines.append(f"**Job** `{job.id}`: {job.status}" + (f" — {job.error['message']}" if job.error else ""))
            lines.append(_bar(job.progress))
            if job.gate:
                lines.append(("✅ " if job.gate["passed"] else "❌ ") + "; ".join(job.gate["reasons"]))
        losses = pd.DataFrame([{"step": p["step"], "loss": p["loss"], "series": "training"} for p in (job.losses if job else [])
                               if p.get("loss") is not None]
                              + [{"step": p["step"], "loss": p["val_loss"], "series": "validation"}
                                 for p in (job.losses if job else []) if p.get("val_loss") is not None],
                              columns=["step", "loss", "series"])
        rows = []
        for card in reversed(tuner.registry.cards()):
            after, before = card.get("metrics", {}).get("after", {}), card.get("metrics", {}).get("before", {})
            rows.append({"adapter": card["id"], "status": card.get("status"),
                         "new-data loss before → after": f"{before.get('new_data_nll')} → {after.get('new_data_nll')}",
                         "regression ppl before → after": f"{before.get('regression_ppl')} → {after.get('regression_ppl')}",
                         "checks": f"{after.get('checks_passed')}/{after.get('checks_total')}",
                         "ROUGE-L": after.get("rougeL_f1"), "size MB": round(card.get("size_bytes", 0) / 2**20, 2),
                         "gate": "; ".join((card.get("gate") or {}).get("reasons", []))})
        adapters = pd.DataFrame(rows, columns=["adapter", "status", "new-data loss before → after",
                                               "regression ppl before → after", "checks", "ROUGE-L", "size MB", "gate"])
        return "\n\n".join(lines), losses, adapters, gr.Dropdown(choices=[r["adapter"] for r in rows])

    with gr.Tab("Fine-tune"):
        gr.Markdown("Teach the served model from rated answers: a LoRA adapter trained in a background process "
                    "(low priority), checked by an evaluation gate, then served without a restart. Standard "
                    "(TensorFlow GPT-2) and pro (llama.cpp) tiers; the free tier cannot (memory).")
        summary = gr.Markdown()
        with gr.Row():
            source = gr.Radio(["feedback", "file"], value="feedback", label="Training data")
            upload = gr.File(label="Training file (chat JSONL or text)", type="filepath")
        with gr.Row():
            epochs = gr.Number(label="Epochs", value=3, precision=0)
            lr = gr.Number(label="Learning-rate multiplier", value=1.0)
            batch = gr.Number(label="Batch size", value=4, precision=0)
            suffix = gr.Textbox(label="Name suffix", value="")
        with gr.Row():
            start_button = gr.Button("Start fine-tuning", variant="primary")
            cancel_button = gr.Button("Cancel job")
            refresh_button = gr.Button("Refresh")
        loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss per step", label="Loss")
        adapters = gr.Dataframe(label="Adapters (gate metrics: candidate vs what was served)", interactive=False)
        with gr.Row():
            choice = gr.Dropdown(label="Adapter", choices=[], allow_custom_value=True)
            promote_button = gr.Button("Promote")
            rollback_button = gr.Button("Roll back")
        result = gr.JSON(label="Result")
        outputs = [summary, loss_plot, adapters, choice]
        start_button.click(start, [source, upload, epochs, lr, batch, suffix], result, api_name="finetune_start"
                           ).then(view, None, outputs, api_visibility="private", queue=False)
        cancel_button.click(cancel, None, result, api_name="finetune_cancel")
        promote_button.click(promote, choice, result, api_name="finetune_promote"
                             ).then(view, None, outputs, api_visibility="private", queue=False)
        rollback_button.click(rollback, None, result, api_name="finetune_rollback"
                              ).then(view, None, outputs, api_visibility="private", queue=False)
        refresh_button.click(status, None, result, api_name="finetune_status", queue=False
                             ).then(view, None, outputs, api_visibility="private", queue=False)
        gr.Timer(2.0).tick(view, None, outputs, api_visibility="private", queue=False)
