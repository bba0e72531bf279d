"""Structured output: an untrusted JSON Schema in, schema-valid JSON out, on every backend.

The pipeline, each step usable on its own:

- ``parse_schema``: intake checks on the user's text (size, depth, draft metaschema,
  local ``$ref`` only, regexes that are valid and not catastrophic).
- ``compile_schema``: llguidance grammar for a tokenizer, strict first, relaxed if it must be.
- ``JsonSchemaConstraint``: the per-token mask the backends' decode loop applies.
- ``validate_output``: jsonschema with the schema's own draft and format checks; the only judge
  of success (the grammar can be relaxed, the validator never is).
- ``generate_structured``: prompt, constrained decode, validation, retries, API result.

Nothing here fetches anything: remote ``$ref`` is refused at intake and the validator's
registry refuses to retrieve, so even a schema that skipped intake cannot reach the network.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
# jsonschema checks "pattern" with Python's re, so Python's own regex parser decides what is valid.
from re import _constants as sre_c, _parser as sre_parse
from typing import Any, Iterator, TypeVar

import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import referencing.exceptions
from jsonschema import FormatChecker
from jsonschema.validators import Draft202012Validator, validator_for
from pydantic import BaseModel
from referencing import Registry

from slm_app.backends.base import Backend, SamplingParams
from slm_app.settings import TierLimits

__all__ = [
    "CompiledSchema", "JsonSchemaConstraint", "SchemaError", "StructuredOutputError", "StructuredResult",
    "build_prompt", "compile_schema", "generate_model", "generate_structured", "parse_schema", "validate_output",
]


class SchemaError(ValueError):
    """The schema was refused; the message says where and why, in words meant for the user."""


# ---------------------------------------------------------------------------------------------
# Intake
# ---------------------------------------------------------------------------------------------

MAX_PATTERN_CHARS = 1_000  # a regex longer than this is refused: costly to compile, never needed for output
_REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")
# Keywords whose values are data, not subschemas: a {"$ref": ...} inside an enum is just a value.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "example"})
# Keywords whose values map names to subschemas: the names are not keywords.
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
                        "dependencies"})
# Keywords under which narrowing a subschema could widen or change the whole schema's meaning.
_UNBOUNDABLE = frozenset({"not", "if", "then", "else", "contains", "propertyNames", "unevaluatedItems",
                          "unevaluatedProperties"})
_ANNOTATIONS = frozenset({"title", "description", "examples", "example", "$comment", "default"})


def parse_schema(text: str, limits: TierLimits) -> dict:
    """Parse and vet a user's schema text; returns the schema (``true`` becomes ``{}``).

    Raises ``SchemaError`` with a message that names the place and the rule broken.
    """
    if not isinstance(text, str):
        raise SchemaError("the schema must be JSON text")
    if len(text) > limits.max_schema_chars:
        raise SchemaError(f"the schema is {len(text):,} characters; the limit is {limits.max_schema_chars:,}")
    try:
        schema = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:
        raise SchemaError(f"invalid JSON: {exc}") from None
    except RecursionError:  # thousands of brackets: deeper than any limit we allow anyway
        raise SchemaError(f"the schema nests deeper than {limits.max_schema_depth} levels") from None
    if schema is True:
        return {}
    if schema is False:
        raise SchemaError("the schema is `false`: no JSON value can satisfy it")
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema must be a JSON object or a boolean, not {_json_type(schema)}")
    depth = _depth(schema)
    if depth > limits.max_schema_depth:
        raise SchemaError(f"the schema nests {depth} levels deep; the limit is {limits.max_schema_depth}")
    # Our own checks first: their messages are more precise than the metaschema's "is not a 'regex'".
    for path, node in _subschemas(schema):
        _check_node(node, path)
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        draft = cls.__name__.removesuffix("Validator")
        raise SchemaError(f"not a valid {draft} schema: {exc.message} (at {exc.json_path})") from None
    return schema


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # Python's json accepts NaN/Infinity; JSON does not


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number"}.get(type(value), "null")


def _depth(value: Any) -> int:
    """Nesting depth in containers (a flat object is 1), iteratively: the input is untrusted."""
    best, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            best = max(best, d)
            stack.extend((child, d + 1) for child in children)
    return best


def _subschemas(schema: dict) -> Iterator[tuple[str, dict]]:
    """Every object in schema position, with its JSON pointer (data keywords are not entered)."""
    stack = [("", schema)]
    while stack:
        path, node = stack.pop()
        yield path, node
        for key, value in node.items():
            here = f"{path}/{_pointer_escape(key)}"
            if key in _DATA_KEYWORDS:
                continue
            if key in _NAME_MAPS and isinstance(value, dict):
                stack.extend((f"{here}/{_pointer_escape(n)}", s) for n, s in value.items() if isinstance(s, dict))
            elif isinstance(value, dict):
                stack.append((here, value))
            elif isinstance(value, list):
                stack.extend((f"{here}/{i}", s) for i, s in enumerate(value) if isinstance(s, dict))


def _pointer_escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _check_node(node: dict, path: str) -> None:
    for key in _REF_KEYWORDS:
        ref = node.get(key)
        if isinstance(ref, str) and ref and not ref.startswith("#"):  # "" is this document too
            raise SchemaError(f"{key} {ref!r} at {path or '/'} points outside this schema; only local "
                              f"references such as '#/$defs/name' are allowed, and nothing is ever fetched")
    if isinstance(node.get("pattern"), str):
        _check_regex(node["pattern"], f"{path}/pattern")
    if isinstance(node.get("patternProperties"), dict):
        for regex in node["patternProperties"]:
            _check_regex(regex, f"{path}/patternProperties/{_pointer_escape(regex)}")


def _check_regex(regex: str, where: str) -> None:
    if len(regex) > MAX_PATTERN_CHARS:
        raise SchemaError(f"the regex at {where} is {len(regex):,} characters; the limit is {MAX_PATTERN_CHARS:,}")
    try:
        parsed = sre_parse.parse(regex)
    except (re.error, RecursionError, OverflowError) as exc:
        raise SchemaError(f"the regex at {where} is not a valid regular expression: {exc}") from None
    if _catastrophic(parsed):
        raise SchemaError(f"the regex at {where} repeats a repetition (like (a+)+): matching it can take "
                          f"exponential time, so it is refused; rewrite it so each repeated group has a "
                          f"required separator")


_REPEATS = (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT)  # possessive repeats never backtrack: not listed
_MANY = 10  # an outer repeat allowing more iterations than this counts as unbounded


def _catastrophic(seq: Any) -> bool:
    """True if an unbounded repeat's body can split the same text in many ways (star height > 1).

    The classic shapes: ``(a+)+``, ``(\\w+\\s?)*``, ``(\\d+(\\.\\d+)?)*``. A separator that must
    appear in each iteration (``([a-z]+\\.)*``) makes the split unique, so that passes.
    Overlapping alternations such as ``(a|aa)+`` are not detected.
    """
    for op, av in seq:
        if op in _REPEATS:
            lo, hi, body = av
            if hi > _MANY and _splits_many_ways(body):
                return True
            children = [body]
        elif op is sre_c.POSSESSIVE_REPEAT:
            children = [av[2]]
        elif op is sre_c.SUBPATTERN:
            children = [av[3]]
        elif op is sre_c.BRANCH:
            children = av[1]
        elif op is sre_c.ATOMIC_GROUP:
            children = [av]
        elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
            children = [av[1]]
        else:
            continue
        if any(_catastrophic(child) for child in children):
            return True
    return False


def _splits_many_ways(seq: Any) -> bool:
    """True if the sequence holds a variable-length repeat and everything beside it may match empty."""
    items = list(seq)
    for i, (op, av) in enumerate(items):
        others = sre_parse.SubPattern(seq.state, items[:i] + items[i + 1:])
        if others.getwidth()[0] != 0:
            continue
        if op in _REPEATS and av[0] != av[1]:
            return True
        if op is sre_c.SUBPATTERN and _splits_many_ways(av[3]):
            return True
        if op is sre_c.BRANCH and any(_splits_many_ways(alt) for alt in av[1]):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------

# Compact JSON: no free whitespace means no tokens wasted on it, and a model cannot loop on spaces.
# Property order is llguidance's: the order of "properties" in the schema.
_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# Strict first; then oneOf read as anyOf (llguidance only proves the two equal in some cases);
# then lenient, which ignores keywords it does not implement. The validator still judges the output.
_LADDER = (("strict", {}), ("oneOf as anyOf", {"coerce_one_of": True}), ("lenient", {"lenient": True}))
# verbose_errors off: error messages go to users and must not dump grammar internals.
_PARSER_LIMITS = llguidance.LLParserLimits(verbose_errors=False)
_CACHE_SIZE = 64


@dataclass(frozen=True, eq=False)
class CompiledSchema:
    """A schema compiled for one tokenizer. Immutable: every constraint starts from a copy."""

    schema: dict  # as compiled: the user's schema without our "x-guidance" knob
    relaxed: bool
    mode: str  # "strict" | "oneOf as anyOf" | "lenient"
    warnings: tuple[str, ...]
    compile_ms: float  # all rungs tried, not only the one that worked
    tokenizer: llguidance.LLTokenizer
    _matcher: llguidance.LLMatcher = field(repr=False)

    def new_matcher(self) -> llguidance.LLMatcher:
        return self._matcher.deep_copy()


_cache: OrderedDict[tuple[str, int], CompiledSchema] = OrderedDict()
_cache_lock = threading.Lock()


def budget_bounds(budget: int) -> tuple[int, int]:
    """(characters per unbounded string, items per unbounded array) for a token budget."""
    return min(max(budget, 16), 512), min(max(budget // 16, 4), 64)


def bound_for_budget(node: Any, budget: int, _in_all_of: bool = False) -> Any:
    """The schema with its unbounded strings, arrays and objects bounded, for the grammar only.

    A small model (or one caught in a loop: ``["id","id","id",...``) can spend any token budget
    inside one string or array before the JSON closes. Adding ``maxLength``/``maxItems`` where the
    schema sets none only narrows what may be generated, so every output is still valid against
    the user's schema, which validation keeps using unchanged. Objects that list their properties
    get only those (no invented extra keys, whose free-text names are unbounded too), except where
    the object is combined with others (allOf, $ref, anyOf...), where that could rule out a key
    another part allows. ``not``/``if``/``contains`` and the like are left alone: narrowing inside
    them could widen or change what the whole schema means.
    """
    if isinstance(node, list):
        return [bound_for_budget(item, budget, _in_all_of) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA_KEYWORDS or key in _UNBOUNDABLE:
            out[key] = value
        elif key in _NAME_MAPS and isinstance(value, dict):
            out[key] = {name: bound_for_budget(sub, budget) for name, sub in value.items()}
        else:
            out[key] = bound_for_budget(value, budget, _in_all_of=key == "allOf")
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types}
    max_chars, max_items = budget_bounds(budget)
    if "string" in types and not any(k in out for k in ("maxLength", "pattern", "format", "enum", "const")):
        out["maxLength"] = max(max_chars, out.get("minLength", 0) if isinstance(out.get("minLength"), int) else 0)
    combined = _in_all_of or any(k in out for k in ("allOf", "anyOf", "oneOf", "$ref", "$dynamicRef", "if",
                                                      "dependentSchemas", "dependencies"))
    if (isinstance(out.get("properties"), dict) and out["properties"] and not combined
            and not any(k in out for k in ("additionalProperties", "patternProperties", "unevaluatedProperties"))):
        out["additionalProperties"] = False
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max(max_items, out.get("minItems", 0) if isinstance(out.get("minItems"), int) else 0)
    return out


def compile_schema(schema: dict, tokenizer: llguidance.LLTokenizer, budget: int | None = None) -> CompiledSchema:
    """Compile for ``tokenizer``, relaxing only if strict compilation is refused. Cached (LRU).

    With a token ``budget``, the grammar bounds unbounded strings and arrays (``bound_for_budget``).
    """
    # "x-guidance" would let a user switch our options (lenient, whitespace) behind the ladder's back.
    schema = {k: v for k, v in schema.items() if k != "x-guidance"}
    grammar_schema = schema if budget is None else bound_for_budget(schema, budget)
    # Key order stays: it is the output's property order. The entry keeps the tokenizer alive,
    # so its id() cannot be reused by another tokenizer while the entry exists.
    key = (json.dumps(grammar_schema, separators=(",", ":"), ensure_ascii=False), id(tokenizer))
    with _cache_lock:
        if (hit := _cache.get(key)) is not None:
            _cache.move_to_end(key)
            return hit
    errors: list[str] = []
    start = time.perf_counter()
    for mode, options in _LADDER:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(grammar_schema, overrides={**_COMPACT, **options})
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_PARSER_LIMITS)
        elapsed = (time.perf_counter() - start) * 1000
        if matcher.is_error():
            errors.append(matcher.get_error())
            continue
        compiled = CompiledSchema(schema=schema, relaxed=mode != "strict", mode=mode,
                                  warnings=tuple(matcher.get_grammar_warnings()), compile_ms=elapsed,
                                  tokenizer=tokenizer, _matcher=matcher)
        with _cache_lock:
            _cache[key] = compiled
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
        return compiled
    relaxed = "" if errors[-1] == errors[0] else f"; relaxed mode also failed: {errors[-1]}"
    raise SchemaError(f"this schema cannot be used for constrained decoding: {errors[0]}{relaxed}")


# ---------------------------------------------------------------------------------------------
# The token constraint
# ---------------------------------------------------------------------------------------------


class JsonSchemaConstraint:
    """``TokenConstraint`` over an llguidance matcher: which tokens keep the JSON on the schema.

    The end-of-text token is in the mask only once the JSON is complete (llguidance's rule), and
    ``is_finished`` turns true as soon as nothing more can follow, so the backend stops there.
    """

    def __init__(self, compiled: CompiledSchema, vocab_width: int):
        self.compiled = compiled
        self.vocab_width = vocab_width
        self._matcher = compiled.new_matcher()
        # One bit per token of the tokenizer's vocabulary, filled in place by llguidance (GIL released).
        # Token 32*j + i is bit i of word j; on the little-endian hosts llguidance ships for, that is
        # bit i % 8 of byte 4*j + i // 8, so a uint8 view unpacks in token order with no copy.
        self._bits = llguidance.numpy.allocate_token_bitmask(1, compiled.tokenizer.vocab_size)
        self._bytes = self._bits.view(np.uint8)

    def allowed_tokens(self, remaining: int | None = None) -> np.ndarray:
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bits)
        # count= cuts a vocabulary wider than the logits, and pads with False (zero bits) when the
        # logits are wider than the vocabulary (models pad their embedding to a multiple of 64...).
        return np.unpackbits(self._bytes, count=self.vocab_width, bitorder="little").view(np.bool_)

    def consume(self, token_id: int) -> None:
        self._matcher.consume_token(int(token_id))  # on a disallowed token the matcher enters its error state

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()  # also true in the error state: stop wasting tokens

    def is_accepting(self) -> bool:
        """The JSON so far is complete (more might still be allowed, as after ``12`` for a number)."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error() or "the matcher is in its error state"


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


class RemoteRefRefused(LookupError):
    """Raised by the validator's registry instead of fetching a URI."""


def _refuse_retrieval(uri: str) -> Any:
    raise RemoteRefRefused(f"refusing to fetch {uri!r}: only local references are allowed")


# jsonschema's default registry fetches unknown URIs with urlopen; this one never does.
NO_FETCH_REGISTRY: Registry = Registry(retrieve=_refuse_retrieval)  # type: ignore[call-arg]

_RFC3339_TIME = r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)"
_DATE_TIME_RE = re.compile(rf"\d{{4}}-\d\d-\d\d[Tt]{_RFC3339_TIME}", re.ASCII)
_TIME_RE = re.compile(_RFC3339_TIME, re.ASCII)
_DURATION_RE = re.compile(
    r"P(?!$)((\d+Y)?(\d+M)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+S)?)?|\d+W)", re.ASCII)
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", re.ASCII)
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s<>\"{}|\\^`]*", re.ASCII)


def _date_time(value: str) -> bool:
    if not _DATE_TIME_RE.fullmatch(value):
        return False
    try:  # the regex cannot tell 02-30 from 02-28; leap seconds (:60) are allowed by RFC 3339
        datetime.fromisoformat(value[:10])
    except ValueError:
        return False
    return True


def _hostname(value: str) -> bool:
    return len(value) <= 253 and all(_HOST_LABEL_RE.fullmatch(label) for label in value.split("."))


# Formats llguidance enforces that jsonschema checks only with optional packages we do not ship:
# without these a relaxed grammar could let e.g. a malformed date-time through unjudged.
_EXTRA_FORMATS = {
    "date-time": _date_time,
    "time": lambda v: bool(_TIME_RE.fullmatch(v)),
    "duration": lambda v: bool(_DURATION_RE.fullmatch(v)),
    "hostname": _hostname,
    "uri": lambda v: bool(_URI_RE.fullmatch(v)),
}


def _format_checker(cls: type) -> FormatChecker:
    checker = FormatChecker(())
    checker.checkers = dict(cls.FORMAT_CHECKER.checkers)
    for name, check in _EXTRA_FORMATS.items():
        if name not in checker.checkers:  # an installed optional package knows better
            checker.checks(name)(lambda v, check=check: not isinstance(v, str) or check(v))
    return checker


_FORMAT_CHECKERS: dict[type, FormatChecker] = {}


def _validator(schema: dict | bool) -> jsonschema.protocols.Validator:
    cls = validator_for(schema, default=Draft202012Validator)
    if cls not in _FORMAT_CHECKERS:
        _FORMAT_CHECKERS[cls] = _format_checker(cls)
    return cls(schema, registry=NO_FETCH_REGISTRY, format_checker=_FORMAT_CHECKERS[cls])


def validate_output(text: str, schema: dict) -> tuple[Any, str | None]:
    """``(data, None)`` if ``text`` is one JSON value valid against ``schema``, else ``(None, why)``."""
    try:
        data = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    except ValueError as exc:  # NaN, duplicate keys
        return None, f"not valid JSON: {exc}"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"
    try:
        error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(data))
    except referencing.exceptions.Unresolvable as exc:  # a $ref to nowhere, or one we refused to fetch
        cause: BaseException = exc
        while (inner := cause.__cause__ or cause.__context__) is not None:
            cause = inner
        return None, f"the schema could not be applied: {cause if isinstance(cause, RemoteRefRefused) else exc}"
    if error is not None:
        return None, f"{error.message} (at {error.json_path})"
    return data, None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # llguidance does not enforce unique keys under additionalProperties; json.loads would keep
    # the last silently, and the data would no longer be what the model wrote.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

_PROMPT = "{prompt}\n\nAnswer with one JSON value only, valid against this JSON Schema:\n{schema}\nJSON:\n"
_PROMPT_NO_SCHEMA = "{prompt}\n\nAnswer with one JSON value only.\nJSON:\n"


@dataclass
class StructuredResult:
    success: bool
    data: Any
    error: str | None
    relaxed: bool
    model_used: str
    inference_time_ms: float  # the whole call: compile (if not cached), every attempt, validation
    tokens: int  # generated tokens over all attempts
    raw_text: str = ""  # the last attempt's output, valid or not

    def to_api(self) -> dict[str, Any]:
        # The documented seven fields, plus the model's raw text (what a failure looked like; the UI shows it).
        return {"success": self.success, "data": self.data, "error": self.error, "relaxed": self.relaxed,
                "model_used": self.model_used, "inference_time_ms": round(self.inference_time_ms, 1),
                "tokens": self.tokens, "raw_text": self.raw_text}


class StructuredOutputError(RuntimeError):
    """``generate_model`` got no valid output; ``.result`` has the raw text and the reason."""

    def __init__(self, result: StructuredResult):
        super().__init__(result.error)
        self.result = result


def build_prompt(backend: Backend, prompt: str, schema: dict, limits: TierLimits) -> str:
    """The user's prompt plus the instruction and the schema, within ``max_prompt_tokens`` if possible.

    The schema is shown so the model knows the task; the grammar enforces it regardless, so a
    schema too long to show goes without its annotations, then is left out.
    """
    for shown in (schema, _without_annotations(schema)):
        text = _PROMPT.format(prompt=prompt, schema=json.dumps(shown, separators=(",", ":"), ensure_ascii=False))
        if backend.count_tokens(text) <= limits.max_prompt_tokens:
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


def generate_structured(backend: Backend, prompt: str, schema_text: str, *, limits: TierLimits,
                        max_new_tokens: int, temperature: float, seed: int | None,
                        attempts: int = 3) -> StructuredResult:
    """Constrained generation of JSON valid against ``schema_text``; success only if jsonschema agrees.

    Raises ``ValueError`` for a token budget outside 1..``limits.max_structured_tokens`` and
    ``SchemaError`` for a refused schema. Invalid or truncated output is retried with the next
    seed (``attempts`` in all) and, if still bad, returned with ``success=False`` and the reason.
    """
    cap = limits.max_structured_tokens
    if not 1 <= max_new_tokens <= cap:
        raise ValueError(f"max_new_tokens must be between 1 and {cap} (this tier's cap for structured "
                         f"output); got {max_new_tokens}")
    start = time.perf_counter()
    schema = parse_schema(schema_text, limits)
    compiled = compile_schema(schema, backend.llguidance_tokenizer(), budget=max_new_tokens)
    full_prompt = build_prompt(backend, prompt, compiled.schema, limits)
    # Greedy decoding gives the same tokens whatever the seed: a retry could only repeat itself.
    tries = max(1, attempts) if temperature > 0 else 1
    tokens, raw, data, error = 0, "", None, "no attempt was made"
    for attempt in range(tries):
        constraint = JsonSchemaConstraint(compiled, backend.vocab_width)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=None if seed is None else seed + attempt)
        seq = backend.generate([full_prompt], params, constraints=[constraint])[0]
        tokens += seq.completion_tokens
        raw = seq.text
        if constraint.error:
            data, error = None, f"constrained decoding failed: {constraint.error}"
        elif not (constraint.is_finished() or constraint.is_accepting()):
            data, error = None, (f"truncated at {seq.completion_tokens} tokens before the JSON was complete"
                                 if seq.finish_reason == "length" else
                                 f"generation stopped ({seq.finish_reason}) before the JSON was complete")
        else:
            data, error = validate_output(raw, schema)
        if error is None:
            break
    return StructuredResult(success=error is None, data=data, error=error, relaxed=compiled.relaxed,
                            model_used=backend.model_id, inference_time_ms=(time.perf_counter() - start) * 1000,
                            tokens=tokens, raw_text=raw)


M = TypeVar("M", bound=BaseModel)


def generate_model(backend: Backend, prompt: str, model_cls: type[M], **kw: Any) -> M:
    """``generate_structured`` for a pydantic model: its JSON Schema in, a validated instance out.

    ``kw`` are ``generate_structured``'s keyword arguments (limits, max_new_tokens, temperature, seed...).
    Raises ``StructuredOutputError`` when no valid output was produced.
    """
    result = generate_structured(backend, prompt, json.dumps(model_cls.model_json_schema()), **kw)
    if not result.success:
        raise StructuredOutputError(result)
    return model_cls.model_validate(result.data)
