"""The adapters on disk, each with its card, and which one is promoted (survives a restart).

Layout under ``SLM_DATA_DIR/finetune/adapters/``::

    <job-id>/adapter.gguf    the GGUF LoRA llama.cpp loads (pro tier), or
    <job-id>/adapter.npz     the TensorFlow GPT-2 LoRA (standard tier, slm_app.backends.tf_lora)
    <job-id>/card.json       base model + sha256, data manifest, hyper-parameters, metrics before and
                             after, gate verdict, times, trainer versions, status
    state.json               {"promoted": adapter id or null, "history": [earlier promoted ids]}

An adapter's id is OpenAI's fine-tuned model name shape, ``ft:<base>:<suffix>:<job>``, and is what
``model`` selects on the OpenAI routes. Status: ``candidate`` (being evaluated), ``promoted`` (served
by default), ``refused`` (the gate said no; ``gate.reasons`` says why), ``retired`` (promoted once).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

STATUSES = ("candidate", "promoted", "refused", "retired")


def adapter_id(base_model: str, suffix: str | None, job_id: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base_model.removeprefix("embedded:")).strip("-")
    return f"ft:{base}:{suffix or 'slm'}:{job_id.removeprefix('ftjob-')}"


def sha256_file(path: Path, _cache: dict[tuple[str, int, int], str] = {}) -> str:
    """sha256 of a file, remembered per (path, size, mtime): the base GGUF is hashed once per process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _cache[key] = digest.hexdigest()
    return _cache[key]


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a crash never leaves half a card


class AdapterRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.RLock()

    # ---- adapters --------------------------------------------------------------------------------
    def add(self, job_id: str, adapter: Path, card: dict[str, Any]) -> dict[str, Any]:
        """Move ``adapter`` (its file name kept) in as the adapter of ``job_id`` and write its card."""
        with self._lock:
            directory = self.root / job_id
            directory.mkdir(parents=True, exist_ok=True)
            target = directory / adapter.name
            os.replace(adapter, target)
            card = {**card, "adapter_file": adapter.name, "size_bytes": target.stat().st_size,
                    "adapter_sha256": sha256_file(target)}
            _write_json(directory / "card.json", card)
            return card

    def cards(self) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for card_file in sorted(self.root.glob("*/card.json")):
                try:
                    out.append(json.loads(card_file.read_text(encoding="utf-8")))
                except (OSError, json.JSONDecodeError):
                    continue  # a card being written by another process: skipped this time
            return sorted(out, key=lambda c: c.get("created_at", ""))

    def card(self, adapter: str) -> dict[str, Any] | None:
        return next((c for c in self.cards() if c["id"] == adapter), None)

    def path(self, adapter: str) -> Path:
        card = self.card(adapter)
        if card is None:
            raise KeyError(adapter)
        return self.root / card["job_id"] / card.get("adapter_file", "adapter.gguf")

    def update(self, adapter: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            card = self.card(adapter)
            if card is None:
                raise KeyError(adapter)
            card.update(fields)
            _write_json(self.root / card["job_id"] / "card.json", card)
            return card

    # ---- which one is served ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        path = self.root / "state.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {"promoted": None, "history": []}

    def set_promoted(self, adapter: str | None) -> dict[str, Any]:
        """Record ``adapter`` (None: the base model) as the served one; the previous one goes on the
        history, which rollback pops."""
        with self._lock:
            state = self.state()
            previous = state.get("promoted")
            if previous == adapter:
                return state
            if previous is not None:
                state["history"] = [*state.get("history", []), previous][-20:]
                if self.card(previous):
                    self.update(previous, status="retired")
            elif adapter is not None:
                state["history"] = [*state.get("history", []), None][-20:]
            state["promoted"] = adapter
            if adapter is not None:
                self.update(adapter, status="promoted")
            self.root.mkdir(parents=True, exist_ok=True)
            _write_json(self.root / "state.json", state)
            return state

    def rollback(self) -> dict[str, Any]:
        """Serve what was promoted before the current one (the base model when there is none)."""
        with self._lock:
            state = self.state()
            history = list(state.get("history", []))
            current = state.get("promoted")
            target = history.pop() if history else None
            if current is not None and self.card(current):
                self.update(current, status="retired")
            if target is not None and self.card(target):
                self.update(target, status="promoted")
            state = {"promoted": target, "history": history}
            self.root.mkdir(parents=True, exist_ok=True)
            _write_json(self.root / "state.json", state)
            return state
