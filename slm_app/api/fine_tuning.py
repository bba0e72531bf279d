"""OpenAI's fine-tuning API, so the official SDKs drive this server's learning loop unchanged.

* ``POST /v1/files`` (multipart: ``file``, ``purpose=fine-tune``) → a ``file`` object; at most
  ``SLM_FINETUNE_MAX_FILE_BYTES``; chat JSONL (``{"messages": [...]}`` per line) or plain text, checked
  on upload (a malformed line is a 400 naming it). ``GET /v1/files/{id}``.
* ``POST /v1/fine_tuning/jobs`` ``{model, training_file: file id | "feedback", validation_file,
  hyperparameters: {n_epochs, learning_rate_multiplier, batch_size} (or method.supervised.hyperparameters),
  suffix, seed}`` → a ``fine_tuning.job``; one at a time (a second is a 409 naming the running one).
* ``GET /v1/fine_tuning/jobs`` (newest first), ``/{id}``, ``/{id}/events``, ``POST /{id}/cancel``.
  A job also carries ``progress`` (step, total_steps, loss, val_loss, eta_s), ``losses`` and ``gate``.
* The job's ``fine_tuned_model`` is listed in ``GET /v1/models`` and chosen per request by ``model``
  on ``/v1/chat/completions`` and ``/v1/completions`` (``slm_app.finetune.manager.with_adapter``).
* Beyond OpenAI: ``GET /v1/fine_tuning/adapters`` (cards), ``POST /v1/fine_tuning/adapters/{id}/promote``,
  ``POST /v1/fine_tuning/rollback``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from slm_app.api.common import api_router, error_responses
from slm_app.api.openai.protocol import ErrorResponse, openai_error
from slm_app.finetune.manager import FineTuner, tuner_for
from slm_app.errors import RequestError
from slm_app.service import GenerationService


class Supervised(BaseModel):
    model_config = ConfigDict(extra="ignore")
    hyperparameters: dict[str, Any] | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "supervised"
    supervised: Supervised | None = None


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="The base model to train an adapter for (an id from GET /v1/models)")
    training_file: str = Field(description="A file id from POST /v1/files, or \"feedback\" for the app's feedback")
    validation_file: str | None = Field(default=None, description="A file id: validation data instead of a split")
    hyperparameters: dict[str, Any] | None = Field(
        default=None, description="n_epochs (1-20), batch_size (1-64), learning_rate_multiplier; each may be auto")
    method: Method | None = Field(default=None, description="OpenAI's newer form: {type: supervised, supervised: "
                                                            "{hyperparameters}}")
    suffix: str | None = Field(default=None, description="Up to 40 letters, digits, - or _ in the adapter's name")
    seed: int | None = Field(default=None, description="Data shuffling and training seed")


def register_routes(app: FastAPI, service: GenerationService) -> None:
    router = api_router(service, openai_error, prefix="/v1")
    tuner: FineTuner = tuner_for(service)
    errors = error_responses(ErrorResponse, (400, 401, 404, 409, 413, 429, 503))

    @router.post("/files", responses=errors)
    async def upload_file(request: Request) -> dict[str, Any]:
        """Upload a training file (multipart: file, purpose=fine-tune)."""
        form = await request.form()
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise RequestError("send the file as multipart form field 'file'", param="file")
        content = await upload.read()
        return tuner.add_file(upload.filename or "upload", content, str(purpose or ""))

    @router.get("/files/{file_id}", responses=errors)
    def retrieve_file(file_id: str) -> dict[str, Any]:
        """One uploaded file's record."""
        return tuner.file(file_id)

    @router.post("/fine_tuning/jobs", responses=errors)
    def create_job(body: JobRequest) -> dict[str, Any]:
        """Start a LoRA fine-tuning job for the served model (one at a time)."""
        hyper = body.hyperparameters
        if hyper is None and body.method is not None and body.method.supervised is not None:
            hyper = body.method.supervised.hyperparameters
        return tuner.create_job(body.model, body.training_file, body.validation_file, hyper, body.suffix,
                                body.seed).public()

    @router.get("/fine_tuning/jobs", responses=errors)
    def list_jobs(limit: int = 20, after: str | None = None) -> dict[str, Any]:
        """Jobs, newest first."""
        jobs = tuner.jobs()
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        page = jobs[:max(1, min(limit, 100))]
        return {"object": "list", "data": [j.public() for j in page], "has_more": len(jobs) > len(page)}

    @router.get("/fine_tuning/jobs/{job_id}", responses=errors)
    def retrieve_job(job_id: str) -> dict[str, Any]:
        """One job, with its progress and gate verdict."""
        return tuner.job(job_id).public()

    @router.get("/fine_tuning/jobs/{job_id}/events", responses=errors)
    def job_events(job_id: str, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        """The job's events, newest first."""
        events = list(reversed(tuner.job(job_id).events))
        if after is not None:
            ids = [e["id"] for e in events]
            events = events[ids.index(after) + 1:] if after in ids else []
        page = events[:max(1, min(limit, 1000))]
        return {"object": "list", "data": page, "has_more": len(events) > len(page)}

    @router.post("/fine_tuning/jobs/{job_id}/cancel", responses=errors)
    def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel a job: its trainer process ends at once; nothing is promoted."""
        return tuner.cancel(job_id).public()

    @router.get("/fine_tuning/adapters", responses=errors)
    def list_adapters() -> dict[str, Any]:
        """Every adapter's card (refused candidates too, with the gate's reasons), and what is served."""
        return {"object": "list", "data": tuner.registry.cards(), **tuner.registry.state()}

    @router.post("/fine_tuning/adapters/{adapter:path}/promote", responses=errors)
    def promote(adapter: str) -> dict[str, Any]:
        """Serve this adapter by default (running requests finish on theirs first)."""
        return tuner.promote(adapter)

    @router.post("/fine_tuning/rollback", responses=errors)
    def rollback() -> dict[str, Any]:
        """Serve the previously promoted adapter, or the base model."""
        return tuner.rollback()

    app.include_router(router)
