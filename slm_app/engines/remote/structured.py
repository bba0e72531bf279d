"""How a remote engine honours a JSON Schema: the upstream's ``response_format`` when it takes one
(OpenAI's ``json_schema``, then llama-cpp-python's ``json_object`` with ``schema``), else plain
generation. The output is always judged here by ``structured.validate_output``; the attempts, retries
and result are ``structured.generation``'s, as for a local engine."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from slm_app.errors import Failure
from slm_app.scheduler import Completion
from slm_app.structured.generation import Outcome, Verdict
from slm_app.structured.validation import validate_output

log = logging.getLogger(__name__)

# How a structured request asks the upstream for JSON, best first. "plain" asks for nothing.
RESPONSE_FORMATS = ("json_schema", "json_object+schema", "plain")


@dataclass(frozen=True)
class ResponseFormat:
    """The structured-output constraint of a remote request: enforced by the upstream (or not at
    all, for "plain"); the output is validated here either way. Passed as ``submit``'s constraint."""

    schema: dict
    kind: str  # one of RESPONSE_FORMATS

    def payload(self) -> dict[str, Any] | None:
        if self.kind == "json_schema":  # OpenAI's, vLLM, llama-server, TGI, Ollama
            return {"type": "json_schema", "json_schema": {"name": "response", "schema": self.schema, "strict": True}}
        if self.kind == "json_object+schema":  # llama-cpp-python's server dialect
            return {"type": "json_object", "schema": self.schema}
        return None


def json_candidates(text: str) -> list[str]:
    """The output as is, then the first JSON value inside it (plain generation may wrap the JSON in
    prose or a Markdown fence). Each candidate is still judged by ``validate_output``."""
    out = [text.strip()]
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if starts:
        try:
            _, end = json.JSONDecoder().raw_decode(text, min(starts))
            out.append(text[min(starts):end])
        except ValueError:
            pass
    return out


class ResponseFormatPlan:
    """``structured.generation.SchemaPlan`` for a remote engine: tries the formats best first from the
    one that last worked (``remember(kind)`` keeps it for the next request)."""

    def __init__(self, schema: dict, first: str | None, remember: Any):
        self.schema = schema
        self._formats = list(RESPONSE_FORMATS[RESPONSE_FORMATS.index(first or RESPONSE_FORMATS[0]):])
        self._remember = remember

    @property
    def kind(self) -> str:
        return self._formats[0]

    @property
    def relaxed(self) -> bool:
        # The schema was not enforced as given while generating (only validated after).
        return self.kind != "json_schema"

    @property
    def details(self) -> dict[str, Any]:
        return {"upstream_format": self.kind}

    def check_fits(self, max_new_tokens: int, cap: int) -> None:
        """The upstream's grammar is not ours to walk: nothing is refused up front."""

    def new_constraint(self) -> ResponseFormat:
        return ResponseFormat(self.schema, self.kind)

    def ask_another_way(self, final: Completion) -> bool:
        if final.failure is Failure.FORMAT_REJECTED and len(self._formats) > 1:
            log.info("upstream refused response_format %s (%s); trying %s", self.kind, final.error, self._formats[1])
            self._formats.pop(0)
            return True
        if final.finish_reason not in ("error", "cancelled"):
            self._remember(self.kind)
        return False

    def judge(self, constraint: ResponseFormat, final: Completion) -> Verdict:
        data, error = None, "no output"
        for candidate in json_candidates(final.text):
            data, error = validate_output(candidate, self.schema)
            if error is None:
                return Verdict(Outcome.OK, data, None)
        if final.finish_reason == "length":
            return Verdict(Outcome.TRUNCATED, None,
                           f"truncated at {final.completion_tokens} tokens before the JSON was complete ({error})")
        return Verdict(Outcome.INVALID, data, error)
