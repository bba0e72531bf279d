"""HTTP routes for feedback: ``POST /feedback`` and ``GET /feedback/export``.

* ``POST /feedback`` ``{"prompt": str} or {"messages": [{"role", "content"}, ...]}`` (what the answer
  answers; messages end with the user's turn), ``"output": str`` (the answer), ``"rating": 1-5``,
  optional ``"correction": str`` (a better answer), ``"model": str`` (default: the loaded model) and
  ``"sampling": {...}`` (the parameters that produced the answer) → ``{"id": int, "stored": true}``.
* ``GET /feedback/export`` → JSONL (``application/jsonl``), one ``{"messages": [...]}`` per line: the
  feedback rated 4 or 5, corrections in place of answers, each conversation once (``slm_app.feedback``).
* ``GET /feedback/stats`` → counts by rating (also on the Health tab).

Same auth and error shape as the REST contract (``slm_app.api.common``): behind ``SLM_API_KEY`` when it is
set (the export is user data), errors ``{"error", "status"}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from slm_app.api.common import ErrorResponse, api_router, error_responses, rest_error
from slm_app.feedback import store_for
from slm_app.service import GenerationService


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo'd field is an error, not silently dropped

    prompt: str | None = Field(None, description="The prompt the answer answers (or give messages)")
    messages: list[dict[str, Any]] | None = Field(
        None, description="The conversation the answer answers: [{role, content}, ...] ending with the user's turn")
    output: str = Field(description="The model's answer being rated")
    rating: int = Field(description="1 (bad) to 5 (good)")
    correction: str | None = Field(None, description="A better answer, used in place of output when exported")
    model: str | None = Field(None, description="The model that answered (default: the one being served)")
    sampling: dict[str, Any] | None = Field(None, description="The sampling parameters that produced the answer")


class FeedbackStored(BaseModel):
    id: int = Field(description="The stored feedback's id")
    stored: bool = Field(description="Always true: the feedback is in the SQLite store")


def register_routes(app: FastAPI, service: GenerationService) -> None:
    router = api_router(service, rest_error)
    store = store_for(service.settings)

    @router.post("/feedback", response_model=FeedbackStored,
                 responses=error_responses(ErrorResponse, (400, 401, 413, 429)))
    def send_feedback(body: FeedbackRequest) -> dict[str, Any]:
        """Store feedback on one answer (nothing is stored otherwise)."""
        feedback_id = store.add(prompt=body.prompt, messages=body.messages, output=body.output, rating=body.rating,
                                correction=body.correction, model=body.model or service.model_id(),
                                sampling=body.sampling, source="rest")
        return {"id": feedback_id, "stored": True}

    @router.get("/feedback/export", response_class=Response,
                responses={200: {"content": {"application/jsonl": {}}, "description": "JSONL, one conversation a line"},
                           **error_responses(ErrorResponse, (401, 429))})
    def export() -> Response:
        """Fine-tuning data: JSONL in the chat-messages format, rated >= 4, corrections applied, deduplicated."""
        return Response(store.export_jsonl(), media_type="application/jsonl",
                        headers={"Content-Disposition": 'attachment; filename="feedback.jsonl"'})

    @router.get("/feedback/stats", response_model=dict[str, int],
                responses=error_responses(ErrorResponse, (401, 429)))
    def stats() -> dict[str, int]:
        """Feedback counts by rating."""
        return store.counts()

    app.include_router(router)
