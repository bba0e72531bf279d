"""Feedback on answers, kept as training data: one SQLite file under ``SLM_DATA_DIR``.

A row exists only because a user sent feedback (a thumb, a rating, a correction): chatting and
generating store nothing. Each row keeps what was asked (a plain prompt or the chat messages before
the answer), the answer, the 1–5 rating, an optional corrected answer, the model and the sampling
parameters that produced it, and the time.

The export is JSONL in the chat-messages format fine-tuning tools read (``{"messages": [{"role",
"content"}, ...]}`` per line, as OpenAI fine-tuning, TRL's SFTTrainer and axolotl's ``chat_template``
datasets take): only rows rated 4 or 5, the correction in place of the answer when there is one, and
each distinct conversation once.

stdlib ``sqlite3`` in WAL mode (readers never block the writer), a short-lived connection per call
so any thread (Gradio workers, FastAPI's pool) may use the store.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from slm_app.errors import RequestError
from slm_app.settings import Settings

FILE_NAME = "feedback.sqlite3"
RATINGS = (1, 2, 3, 4, 5)
EXPORT_MIN_RATING = 4
# A thumb is a rating: up is the best, down the worst. The user may change it before sending.
THUMB_RATING = {True: 5, False: 1}
MAX_TEXT_CHARS = 32_000  # per text field: far above any tier's prompt, bounded so the file cannot balloon
MAX_MESSAGES = 200
_ROLES = ("system", "user", "assistant")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at  TEXT    NOT NULL,             -- ISO 8601, UTC
    updated_at  TEXT,
    source      TEXT    NOT NULL,             -- chat | generate | api | rest
    model       TEXT    NOT NULL,
    prompt      TEXT,                         -- a plain prompt, or NULL when messages are given
    messages    TEXT,                         -- JSON: the conversation before the answer
    output      TEXT    NOT NULL,             -- the model's answer
    rating      INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
    correction  TEXT,                         -- the user's better answer, if any
    sampling    TEXT                          -- JSON: the sampling parameters of the answer
);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _text(name: str, value: Any, *, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RequestError(f"{name} is empty: feedback needs the answer it is about", param=name)
        return None
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}", param=name)
    if len(value) > MAX_TEXT_CHARS:
        raise RequestError(f"{name} is {len(value):,} characters; feedback takes at most {MAX_TEXT_CHARS:,}",
                           status=413, param=name)
    return value


def check_rating(value: Any) -> int:
    if isinstance(value, bool) or value is None or value == "":
        raise RequestError(f"rating must be a whole number from 1 to 5, got {value!r}", param="rating")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"rating must be a whole number from 1 to 5, got {str(value)[:20]!r}",
                           param="rating") from None
    if number not in RATINGS:
        raise RequestError(f"rating must be a whole number from 1 to 5, got {value!r}", param="rating")
    return int(number)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The conversation before the answer: system/user/assistant turns of text, ending with the user."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise RequestError(f"messages is not valid JSON: {exc}", param="messages") from None
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"messages has {len(messages)} turns; at most {MAX_MESSAGES}", status=413,
                           param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) - {"role", "content"} or "role" not in m:
            raise RequestError(f"messages[{i}] must be an object with \"role\" and \"content\" only",
                               param=f"messages[{i}]")
        if m["role"] not in _ROLES:
            raise RequestError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(_ROLES)}",
                               param=f"messages[{i}].role")
        out.append({"role": m["role"], "content": _text(f"messages[{i}].content", m.get("content"), required=True)})
    if out[-1]["role"] != "user":
        raise RequestError("messages must end with the user's turn that the output answers "
                           "(put the answer in output)", param="messages")
    return out


class FeedbackStore:
    """The feedback table in one SQLite file (created on first use)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._ready = False
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if not self._ready:
            with self._lock:
                if not self._ready:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with closing(sqlite3.connect(self.path, timeout=10)) as db:
                        db.execute("PRAGMA journal_mode=WAL")  # persistent: stays set in the file
                        db.executescript(_SCHEMA)
                    self._ready = True
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        return db

    def journal_mode(self) -> str:
        with closing(self._connect()) as db:
            return db.execute("PRAGMA journal_mode").fetchone()[0]

    def add(self, *, output: Any, rating: Any, model: str, source: str, prompt: Any = None,
            messages: Any = None, correction: Any = None, sampling: Mapping[str, Any] | None = None) -> int:
        """Validate and store one piece of feedback; returns its id."""
        if (prompt is None or prompt == "") == (messages is None or messages == "" or messages == []):
            raise RequestError("give either prompt or messages (what the output answers), not both or neither",
                               param="prompt")
        row = {
            "prompt": _text("prompt", prompt, required=True) if messages in (None, "", []) else None,
            "messages": json.dumps(check_messages(messages), ensure_ascii=False) if messages not in (None, "", []) else None,
            "output": _text("output", output, required=True),
            "rating": check_rating(rating),
            "correction": _text("correction", correction, required=False),
            "model": _text("model", model, required=True),
            "source": source,
            "sampling": json.dumps(dict(sampling), default=str) if sampling else None,
            "created_at": _now(),
        }
        with closing(self._connect()) as db, db:
            cur = db.execute(f"INSERT INTO feedback ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             tuple(row.values()))
            return int(cur.lastrowid)

    def update(self, feedback_id: int, *, rating: Any, correction: Any = None) -> None:
        """Change the rating / correction of feedback already sent (the form after a thumb)."""
        values = (check_rating(rating), _text("correction", correction, required=False), _now(), int(feedback_id))
        with closing(self._connect()) as db, db:
            if db.execute("UPDATE feedback SET rating = ?, correction = ?, updated_at = ? WHERE id = ?",
                          values).rowcount != 1:
                raise RequestError(f"no feedback with id {feedback_id}", status=404)

    def get(self, feedback_id: int) -> dict[str, Any] | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM feedback WHERE id = ?", (int(feedback_id),)).fetchone()
        return _as_dict(row) if row else None

    def all(self) -> list[dict[str, Any]]:
        with closing(self._connect()) as db:
            return [_as_dict(r) for r in db.execute("SELECT * FROM feedback ORDER BY id")]

    def counts(self) -> dict[str, int]:
        """Feedback by rating, for Health: {"1": n, ..., "5": n, "total": n}."""
        if not self.path.exists():  # nothing sent yet: do not create the file just to count nothing
            return {**{str(r): 0 for r in RATINGS}, "total": 0}
        with closing(self._connect()) as db:
            found = dict(db.execute("SELECT rating, COUNT(*) FROM feedback GROUP BY rating").fetchall())
        counts = {str(r): int(found.get(r, 0)) for r in RATINGS}
        return {**counts, "total": sum(counts.values())}

    def export_records(self, min_rating: int = EXPORT_MIN_RATING) -> Iterator[dict[str, Any]]:
        """Fine-tuning examples, oldest first, each distinct conversation once."""
        if not self.path.exists():
            return
        seen: set[str] = set()
        with closing(self._connect()) as db:
            rows = db.execute("SELECT prompt, messages, output, correction FROM feedback WHERE rating >= ? "
                              "ORDER BY id", (min_rating,)).fetchall()
        for row in rows:
            turns = json.loads(row["messages"]) if row["messages"] else [{"role": "user", "content": row["prompt"]}]
            answer = row["correction"] if row["correction"] else row["output"]
            example = {"messages": [*turns, {"role": "assistant", "content": answer.strip()}]}
            key = json.dumps(example, sort_keys=True, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                yield example

    def export_jsonl(self, min_rating: int = EXPORT_MIN_RATING) -> str:
        return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.export_records(min_rating))


def _as_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for key in ("messages", "sampling"):
        if d.get(key):
            d[key] = json.loads(d[key])
    return d


_STORES: dict[Path, FeedbackStore] = {}
_STORES_LOCK = threading.Lock()


def store_for(settings: Settings) -> FeedbackStore:
    """The store of this data dir, shared by the UI and the HTTP routes of one process."""
    path = (settings.data_path / FILE_NAME).resolve()
    with _STORES_LOCK:
        return _STORES.setdefault(path, FeedbackStore(path))


def sampling_record(params: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """Sampling parameters as stored: plain JSON values, unset ones left out."""
    items = params.items() if isinstance(params, Mapping) else params
    return {k: v for k, v in items if v is not None and v != ""}
