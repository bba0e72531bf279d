"""Structured generation: the one path every engine's structured output takes.

``generate_structured`` reads the schema (``intake.parse_schema``), asks the engine how it honours it
(``StructuredRunner.schema_plan``: an llguidance token constraint on a local engine, the upstream's
``response_format`` on a remote one), builds the prompt, runs attempts (retrying with the next seed
when sampling), and judges each with the plan and the validator. The result is one typed
``StructuredResult`` whose ``outcome`` says what happened (callers test the enum, not the text).
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence, TypeVar

from pydantic import BaseModel

from slm_app.backends.base import SamplingParams
from slm_app.errors import raise_failure
from slm_app.settings import TierLimits
from slm_app.structured.intake import _ANNOTATIONS, _DATA_KEYWORDS, _NAME_MAPS, SchemaError, parse_schema

if TYPE_CHECKING:
    from slm_app.scheduler import Completion

_PROMPT = "{prompt}\n\nAnswer with one JSON value only, valid against this JSON Schema:\n{schema}\nJSON:\n"
_PROMPT_NO_SCHEMA = "{prompt}\n\nAnswer with one JSON value only.\nJSON:\n"


class Outcome(enum.Enum):
    """How a structured request ended."""

    OK = "ok"  # valid JSON
    INVALID = "invalid"  # JSON (or text) that the validator refused
    TRUNCATED = "truncated"  # out of tokens before the JSON was complete
    STOPPED = "stopped"  # generation ended otherwise before the JSON was complete
    CONSTRAINT_FAILED = "constraint_failed"  # the token constraint itself failed


@dataclass(frozen=True)
class Verdict:
    """A plan's judgement of one attempt's output."""

    outcome: Outcome
    data: Any = None
    error: str | None = None


@dataclass
class StructuredResult:
    outcome: Outcome
    data: Any
    error: str | None
    relaxed: bool
    model_used: str
    inference_time_ms: float  # the whole call: compile (if not cached), every attempt, validation
    tokens: int  # generated tokens over all attempts
    raw_text: str = ""  # the last attempt's output, valid or not
    details: dict[str, Any] = field(default_factory=dict)  # what the engine's plan adds (upstream_format)
    # Prompt tokens the first attempt took from the prompt cache (None: not counted, a remote engine).
    cached_tokens: int | None = None

    @property
    def success(self) -> bool:
        return self.outcome is Outcome.OK

    def to_api(self) -> dict[str, Any]:
        # The documented seven fields, plus the model's raw text (what a failure looked like; the UI shows it).
        return {"success": self.success, "data": self.data, "error": self.error, "relaxed": self.relaxed,
                "model_used": self.model_used, "inference_time_ms": round(self.inference_time_ms, 1),
                "tokens": self.tokens, "raw_text": self.raw_text, **self.details}


class StructuredOutputError(RuntimeError):
    """``generate_model`` got no valid output; ``.result`` has the raw text and the reason."""

    def __init__(self, result: StructuredResult):
        super().__init__(result.error)
        self.result = result


class SchemaPlan(Protocol):
    """How an engine honours one schema (``Engine.schema_plan``)."""

    schema: dict  # the schema as the prompt shows it
    details: dict[str, Any]  # extra fields for the API result

    @property
    def relaxed(self) -> bool:
        """The schema is not enforced exactly as given while generating (the validator still is)."""

    def check_fits(self, max_new_tokens: int, cap: int) -> None:
        """Raise ``SchemaError`` when the smallest instance cannot fit ``max_new_tokens``."""

    def new_constraint(self) -> Any:
        """What one attempt passes to ``Engine.submit`` as its constraint."""

    def ask_another_way(self, final: Completion) -> bool:
        """The engine refused the way the schema was asked for: True to try the next way (not an attempt)."""

    def judge(self, constraint: Any, final: Completion) -> Verdict:
        """The attempt's output: valid, invalid, or incomplete, and why."""


class StructuredRunner(Protocol):
    """What structured output needs from the engine: the service's run path (``GenerationService``'s
    ``ServiceRunner``), or any engine wrapped the same way (tests, benchmarks)."""

    model_id: str
    max_sequence_tokens: int  # prompt and answer together (the model's context per sequence)

    def schema_plan(self, schema: dict, budget: int, steer: bool = True) -> SchemaPlan: ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the model will see it (the prompt budget counts these)."""

    def generate(self, prompts: Sequence[str], params: SamplingParams, constraints: Sequence[Any]) -> list[Completion]:
        """One generation per prompt, run to the end; failures raise (a refused way of asking for the
        schema is returned, for the plan to judge)."""


def build_prompt(runner: StructuredRunner, prompt: str, schema: dict, limits: TierLimits,
                 max_new_tokens: int | None = None) -> str:
    """The user's prompt plus the instruction and the schema, within ``max_prompt_tokens`` if possible,
    and leaving ``max_new_tokens`` of the model's context for the answer (or half of it, at least).

    The schema is shown so the model knows the task; the grammar enforces it regardless, so a
    schema too long to show goes without its annotations, then is left out.
    """
    room = runner.max_sequence_tokens - (max_new_tokens or 0)
    most = min(limits.max_prompt_tokens, max(room, runner.max_sequence_tokens // 2))
    for shown in (schema, _without_annotations(schema)):
        text = _PROMPT.format(prompt=prompt, schema=json.dumps(shown, separators=(",", ":"), ensure_ascii=False))
        if runner.count_tokens(text) <= most:
            return text
    return _PROMPT_NO_SCHEMA.format(prompt=prompt)


def _without_annotations(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_annotations(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _ANNOTATIONS:
            continue
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _NAME_MAPS and isinstance(value, dict):
            out[key] = {name: _without_annotations(sub) for name, sub in value.items()}
        else:
            out[key] = _without_annotations(value)
    return out


def generate_structured(runner: StructuredRunner, prompt: str, schema_text: str, *, limits: TierLimits,
                        max_new_tokens: int, temperature: float, seed: int | None,
                        attempts: int = 3, steer: bool = True, instruct: bool = True) -> StructuredResult:
    """Generation of JSON valid against ``schema_text``; success only if jsonschema agrees.

    Raises ``ValueError`` for a token budget outside 1..``limits.max_structured_tokens`` and
    ``SchemaError`` for a refused schema (one whose smallest instance cannot fit the budget too).
    A local engine's constraint steers to a shortest completion as the budget runs out, so the JSON
    closes in time; invalid output is retried with the next seed (``attempts`` in all) and, if still
    bad, returned with its ``outcome`` and the reason. ``steer=False`` turns budget steering and the
    up-front fit check off (for comparison only). ``instruct=False``: ``prompt`` already says what to
    answer (tool calling renders its own conversation and instructions), so it is used as is.
    """
    cap = limits.max_structured_tokens
    if not 1 <= max_new_tokens <= cap:
        raise ValueError(f"max_new_tokens must be between 1 and {cap} (this tier's cap for structured "
                         f"output); got {max_new_tokens}")
    start = time.perf_counter()
    schema = parse_schema(schema_text, limits)
    plan = runner.schema_plan(schema, max_new_tokens, steer)
    if steer:
        plan.check_fits(max_new_tokens, cap)
    full_prompt = build_prompt(runner, prompt, plan.schema, limits, max_new_tokens) if instruct else prompt
    # The answer also ends where the sequence is full: steer to that end if it comes first.
    room = runner.max_sequence_tokens - runner.count_tokens(full_prompt)
    if room < max_new_tokens:
        if room < 1:
            raise SchemaError(f"the prompt leaves no room for an answer in this model's context of "
                              f"{runner.max_sequence_tokens} tokens; shorten it")
        max_new_tokens = room
        if steer:
            plan.check_fits(max_new_tokens, cap)
    # Greedy decoding gives the same tokens whatever the seed: a retry could only repeat itself.
    tries = max(1, attempts) if temperature > 0 else 1
    tokens, raw, verdict, attempt = 0, "", Verdict(Outcome.STOPPED, None, "no attempt was made"), 0
    cached: int | None = None
    while attempt < tries:
        constraint = plan.new_constraint()
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=None if seed is None else seed + attempt)
        seq = runner.generate([full_prompt], params, [constraint])[0]
        if plan.ask_another_way(seq):
            continue  # not an attempt: the engine never generated
        raise_failure(seq)
        if attempt == 0:
            cached = seq.cached_tokens
        attempt += 1
        tokens += seq.completion_tokens
        raw = seq.text
        verdict = plan.judge(constraint, seq)
        if verdict.outcome is Outcome.OK:
            break
    return StructuredResult(outcome=verdict.outcome, data=verdict.data, error=verdict.error,
                            relaxed=plan.relaxed, model_used=runner.model_id,
                            inference_time_ms=(time.perf_counter() - start) * 1000, tokens=tokens, raw_text=raw,
                            details=dict(plan.details), cached_tokens=cached)


M = TypeVar("M", bound=BaseModel)


def generate_model(runner: StructuredRunner, prompt: str, model_cls: type[M], **kw: Any) -> M:
    """``generate_structured`` for a pydantic model: its JSON Schema in, a validated instance out.

    ``kw`` are ``generate_structured``'s keyword arguments (limits, max_new_tokens, temperature, seed...).
    Raises ``StructuredOutputError`` when no valid output was produced.
    """
    result = generate_structured(runner, prompt, json.dumps(model_cls.model_json_schema()), **kw)
    if not result.success:
        raise StructuredOutputError(result)
    return model_cls.model_validate(result.data)
