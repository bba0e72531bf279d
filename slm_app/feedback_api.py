"""HTTP routes for feedback: ``POST /feedback`` and ``GET /feedback/export``.

* ``POST /feedback`` ``{"prompt": str} or {"messages": [{"role", "content"}, ...]}`` (what the answer
  answers; messages end with the user's turn), ``"output": str`` (the answer), ``"rating": 1-5``,
  optional ``"correction": str`` (a better answer), ``"model": str`` (default: the loaded model) and
  ``"sampling": {...}`` (the parameters that produced the answer) → ``{"id": int, "stored": true}``.
* ``GET /feedback/export`` → JSONL (``application/jsonl``), one ``{"messages": [...]}`` per line: the
  feedback rated 4 or 5, corrections in place of answers, each conversation once (``slm_app.feedback``).
* ``GET /feedback/stats`` → counts by rating (also on the Health tab).

Same auth and error shape as the REST contract (``slm_app.http_api``): behind ``SLM_API_KEY`` when it is
set (the export is user data), errors ``{"error", "status"}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from slm_app.feedback import store_for
from slm_app.http_api import _rest_error, api_router
from slm_app.service import GenerationService


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo'd field is an error, not silently dropped

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    output: str
    rating: int
    correction: str | None = None
    model: str | None = None
    sampling: dict[str, Any] | None = None


def loaded_model(service: GenerationService) -> str:
    """What the feedback is about when the caller does not say: the model being served."""
    engine = service.engine
    return engine.info().model_id if engine is not None else service.tier.model


def register_routes(app: FastAPI, service: GenerationService) -> None:
    router = api_router(service, _rest_error)
    store = store_for(service.settings)

    @router.post("/feedback")
    def send_feedback(body: FeedbackRequest) -> dict[str, Any]:
        """Store feedback on one answer (nothing is stored otherwise)."""
        feedback_id = store.add(prompt=body.prompt, messages=body.messages, output=body.output, rating=body.rating,
                                correction=body.correction, model=body.model or loaded_model(service),
                                sampling=body.sampling, source="rest")
        return {"id": feedback_id, "stored": True}

    @router.get("/feedback/export")
    def export() -> Response:
        """Fine-tuning data: JSONL in the chat-messages format, rated >= 4, corrections applied, deduplicated."""
        return Response(store.export_jsonl(), media_type="application/jsonl",
                        headers={"Content-Disposition": 'attachment; filename="feedback.jsonl"'})

    @router.get("/feedback/stats")
    def stats() -> dict[str, int]:
        """Feedback counts by rating."""
        return store.counts()

    app.include_router(router)
