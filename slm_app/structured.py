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

import collections
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
# jsonschema checks "pattern" with Python's re, so Python's own regex parser decides what is valid.
from re import _constants as sre_c, _parser as sre_parse
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence, TypeVar

import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import referencing.exceptions
from jsonschema import FormatChecker
from jsonschema.validators import Draft202012Validator, validator_for
from pydantic import BaseModel
from referencing import Registry

from slm_app import json_numbers
from slm_app.backends.base import SamplingParams, TokenConstraint
from slm_app.settings import TierLimits

if TYPE_CHECKING:
    from slm_app.scheduler import Completion

__all__ = [
    "CompiledSchema", "JsonSchemaConstraint", "SchemaError", "StructuredOutputError", "StructuredResult",
    "StructuredRunner", "build_prompt", "check_fits", "compile_schema", "generate_model", "generate_structured",
    "parse_schema", "shortest_completion", "validate_output",
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
    try:  # numbers are generated only where every JSON reader agrees on them (json_numbers)
        json_numbers.check_schema(schema)
    except json_numbers.NotInteroperable as exc:
        raise SchemaError(str(exc)) from None
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


def _regex_children(op: Any, av: Any) -> list[Any]:
    """The sub-sequences of one parsed regex node (what a walk over the pattern descends into)."""
    if op in _REPEATS or op is sre_c.POSSESSIVE_REPEAT:
        return [av[2]]
    if op is sre_c.SUBPATTERN:
        return [av[3]]
    if op is sre_c.BRANCH:
        return list(av[1])
    if op is sre_c.ATOMIC_GROUP:
        return [av]
    if op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
        return [av[1]]
    return []


def _catastrophic(seq: Any) -> bool:
    """True if an unbounded repeat's body can split the same text in many ways (star height > 1).

    The classic shapes: ``(a+)+``, ``(\\w+\\s?)*``, ``(\\d+(\\.\\d+)?)*``. A separator that must
    appear in each iteration (``([a-z]+\\.)*``) makes the split unique, so that passes.
    Overlapping alternations such as ``(a|aa)+`` are not detected.
    """
    for op, av in seq:
        if op in _REPEATS and av[1] > _MANY and _splits_many_ways(av[2]):
            return True
        if any(_catastrophic(child) for child in _regex_children(op, av)):
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
# The last rung: lenient, and regexes llguidance's (Rust) regex engine cannot express (look-arounds,
# back-references) left out of the grammar. Those strings are then only checked by the validator.
_WITHOUT_PATTERNS = "lenient, some patterns unenforced"
# llguidance cannot merge a recursive definition with sibling keywords (an allOf of it and more, as
# in the source map schema, whose sections are source maps). Past every other rung, such a reference
# is left out where it has siblings, one named definition at a time: the grammar is then wider there,
# and the validator still judges the output against the whole schema.
_WITHOUT_CIRCULAR = "lenient, recursive references with siblings unenforced"
_CIRCULAR_ERROR = re.compile(r"circular references with sibling keys are not supported: \S*?(#\S*)")
_MAX_LOOSENED = 8  # definitions left out, one rung each, before the schema is refused
# Compile cost is bounded by llguidance's own budgets, not by the schema's length: a 200k-character
# Kubernetes schema compiles in well under a second, while a small schema with a pathological regex
# would not. Grammar symbols and regex fuel are llguidance's defaults (500k symbols; 1M fuel, ~20 ms);
# lexer states, ~1-2 kB each, are capped at 50k (~100 MB) instead of 250k (~500 MB): a schema that
# needs more is refused with llguidance's reason. Each mask step keeps its default fuel (~15 ms).
# verbose_errors off: error messages go to users and must not dump grammar internals.
_PARSER_LIMITS = llguidance.LLParserLimits(max_grammar_size=500_000, initial_lexer_fuel=1_000_000,
                                           max_lexer_states=50_000, verbose_errors=False)
_CACHE_SIZE = 64
MAX_SHORTEST = 1_024  # without a budget, how far the walk to the smallest instance goes


@dataclass(frozen=True, eq=False)
class CompiledSchema:
    """A schema compiled for one tokenizer. Immutable: every constraint starts from a copy."""

    schema: dict  # as compiled: the user's schema without our "x-guidance" knob
    relaxed: bool
    mode: str  # "strict" | "oneOf as anyOf" | "lenient"
    warnings: tuple[str, ...]
    compile_ms: float  # all rungs tried, not only the one that worked
    walk_ms: float  # the walk to the smallest instance (``walk_to_completion``), after compiling
    tokenizer: llguidance.LLTokenizer
    _matcher: llguidance.LLMatcher = field(repr=False)
    # The walk from the start (``walk_to_completion``): the smallest instance's tokens as far as the
    # greedy walk finds it, when ``shortest_status`` is "complete"; "long": it needs more than the
    # budget compiled for; "stuck": unknown.
    shortest: tuple[int, ...] | None = None
    shortest_status: str = "stuck"
    walk_limit: int = 0
    hints: tuple[bytes, ...] = ()  # _string_hints: string contents the walk tries first

    @property
    def min_tokens(self) -> int | None:
        return len(self.shortest) if self.shortest_status == "complete" and self.shortest is not None else None

    @property
    def min_instance(self) -> str | None:
        return None if self.shortest is None else self.tokenizer.decode_str(list(self.shortest))  # or its start

    def new_matcher(self) -> llguidance.LLMatcher:
        return self._matcher.deep_copy()


_cache: OrderedDict[tuple[str, int, int | None], CompiledSchema] = OrderedDict()
_cache_lock = threading.Lock()


def budget_bounds(budget: int) -> tuple[int, int]:
    """(characters per unbounded string, items per unbounded array) for a token budget."""
    return min(max(budget, 16), 512), min(max(budget // 16, 4), 64)


def _shared_definitions(schema: Any) -> frozenset[str]:
    """Pointers (``#/definitions/x``, ``#/$defs/x``) of definitions used as a part of an object that
    other parts also describe (an allOf member, or an anyOf/oneOf branch beside the object's own
    members), followed through definitions that are themselves such references."""
    shared: set[str] = set()

    def refs_of(branches: Any) -> None:
        for branch in branches if isinstance(branches, list) else []:
            if isinstance(branch, dict) and isinstance(branch.get("$ref"), str):
                shared.add(branch["$ref"])

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            refs_of(node.get("allOf"))
            if any(k in node for k in ("properties", "required", "patternProperties", "additionalProperties")):
                refs_of(node.get("anyOf"))
                refs_of(node.get("oneOf"))
            if isinstance(node.get("$ref"), str) and len(node) > 1:  # a $ref beside other keywords
                shared.add(node["$ref"])
            for key, value in node.items():
                if key not in _DATA_KEYWORDS:
                    walk(value)

    walk(schema)
    defs = {f"#/{key}/{name}": sub for key in ("definitions", "$defs") if isinstance(schema, dict)
            and isinstance(schema.get(key), dict) for name, sub in schema[key].items()}
    todo = list(shared)
    while todo:  # a shared definition that is a reference or allOf shares what it points to
        target = defs.get(todo.pop())
        if isinstance(target, dict):
            more = {target["$ref"]} if isinstance(target.get("$ref"), str) else set()
            more |= {b["$ref"] for b in target.get("allOf", []) if isinstance(b, dict) and isinstance(b.get("$ref"), str)}
            for ref in more - shared:
                shared.add(ref)
                todo.append(ref)
    return frozenset(shared)


def bound_for_budget(node: Any, budget: int, _in_all_of: bool = False,
                     _shared: frozenset[str] | None = None, _top: bool = True) -> Any:
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
    if _shared is None:
        _shared = _shared_definitions(node)
    if isinstance(node, list):
        return [bound_for_budget(item, budget, _in_all_of, _shared, False) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    # A branch of allOf, or of anyOf/oneOf beside the object's own members, describes the same object
    # as its siblings: closing it would rule out their keys ("required property is unsatisfiable").
    shares = _in_all_of or any(k in node for k in ("properties", "required", "patternProperties",
                                                   "additionalProperties"))
    for key, value in node.items():
        if key in _DATA_KEYWORDS or key in _UNBOUNDABLE:
            out[key] = value
        elif key in _NAME_MAPS and isinstance(value, dict):
            out[key] = {name: bound_for_budget(sub, budget, _top and key in ("definitions", "$defs")
                                               and f"#/{key}/{name}" in _shared, _shared, False)
                        for name, sub in value.items()}
        else:
            out[key] = bound_for_budget(value, budget, key == "allOf" or (key in ("anyOf", "oneOf") and shares),
                                        _shared, False)
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types}
    max_chars, max_items = budget_bounds(budget)
    if "string" in types and not any(k in out for k in ("maxLength", "pattern", "format", "enum", "const")):
        out["maxLength"] = max(max_chars, out.get("minLength", 0) if isinstance(out.get("minLength"), int) else 0)
    combined = _in_all_of or any(k in out for k in ("allOf", "anyOf", "oneOf", "$ref", "$dynamicRef", "if",
                                                      "dependentSchemas", "dependencies"))
    required = out.get("required") if isinstance(out.get("required"), list) else []
    if (isinstance(out.get("properties"), dict) and out["properties"] and not combined
            and all(name in out["properties"] for name in required)  # a required name it does not list
            and not any(k in out for k in ("additionalProperties", "patternProperties", "unevaluatedProperties"))):
        out["additionalProperties"] = False
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max(max_items, out.get("minItems", 0) if isinstance(out.get("minItems"), int) else 0)
    return out


_REGEX_ONLY_IN_PYTHON = (sre_c.ASSERT, sre_c.ASSERT_NOT, sre_c.GROUPREF, sre_c.GROUPREF_EXISTS)


def _python_only_regex(regex: str) -> bool:
    """True if ``regex`` uses what only a backtracking engine has (look-arounds, back-references)."""
    try:
        seq = sre_parse.parse(regex)
    except (re.error, RecursionError, OverflowError):
        return True

    def visit(items: Any) -> bool:
        return any(op in _REGEX_ONLY_IN_PYTHON or any(visit(child) for child in _regex_children(op, av))
                   for op, av in items)

    return visit(seq)


def without_python_only_patterns(node: Any) -> tuple[Any, int]:
    """The schema without the ``pattern``s and ``patternProperties`` entries llguidance cannot compile,
    and how many were left out. Leaving out a pattern only widens what the grammar allows; leaving out
    a patternProperties entry makes its keys fall to additionalProperties (narrower or wider). Either
    way the validator, which keeps the user's schema, still judges the output."""
    dropped = 0

    def walk(n: Any) -> Any:
        nonlocal dropped
        if isinstance(n, list):
            return [walk(item) for item in n]
        if not isinstance(n, dict):
            return n
        out: dict[str, Any] = {}
        for key, value in n.items():
            if key in _DATA_KEYWORDS:
                out[key] = value
            elif key == "pattern" and isinstance(value, str) and _python_only_regex(value):
                dropped += 1
            elif key in _NAME_MAPS and isinstance(value, dict):
                kept = {}
                for name, sub in value.items():
                    if key == "patternProperties" and _python_only_regex(name):
                        dropped += 1
                    else:
                        kept[name] = walk(sub)
                out[key] = kept
            else:
                out[key] = walk(value)
        return out

    return walk(node), dropped


def without_ref_siblings(node: Any, fragment: str) -> Any:
    """The schema with every ``$ref`` to ``fragment`` ("#/definitions/x") left out where it has
    siblings: beside other keys, or as a member of an allOf of several."""

    def is_target(n: Any) -> bool:
        return isinstance(n, dict) and isinstance(n.get("$ref"), str) and n["$ref"].endswith(fragment) \
            and n["$ref"][:len(n["$ref"]) - len(fragment)].count("#") == 0

    def walk(n: Any) -> Any:
        if isinstance(n, list):
            return [walk(item) for item in n]
        if not isinstance(n, dict):
            return n
        out = {k: walk(v) for k, v in n.items() if not (k == "$ref" and len(n) > 1 and is_target(n))}
        if isinstance(n.get("allOf"), list) and len(n["allOf"]) > 1:
            out["allOf"] = [{} if is_target(member) and len(member) == 1 else walk(member) for member in n["allOf"]]
        return out

    return walk(node)


def compile_schema(schema: dict, tokenizer: llguidance.LLTokenizer, budget: int | None = None) -> CompiledSchema:
    """Compile for ``tokenizer``, relaxing only if strict compilation is refused. Cached (LRU).

    With a token ``budget``, the grammar bounds unbounded strings and arrays (``bound_for_budget``).
    """
    # "x-guidance" would let a user switch our options (lenient, whitespace) behind the ladder's back.
    schema = {k: v for k, v in schema.items() if k != "x-guidance"}
    grammar_schema = schema if budget is None else bound_for_budget(schema, budget)
    grammar_schema = json_numbers.interoperable_grammar_schema(grammar_schema)
    # Key order stays: it is the output's property order. The entry keeps the tokenizer alive,
    # so its id() cannot be reused by another tokenizer while the entry exists.
    # The budget is in the key too: it bounds the walk to the smallest instance.
    key = (json.dumps(grammar_schema, separators=(",", ":"), ensure_ascii=False), id(tokenizer), budget)
    with _cache_lock:
        if (hit := _cache.get(key)) is not None:
            _cache.move_to_end(key)
            return hit
    errors: list[str] = []
    start = time.perf_counter()
    ladder: list[tuple[str, dict, dict]] = [(mode, options, grammar_schema) for mode, options in _LADDER]
    patternless, dropped = without_python_only_patterns(grammar_schema)
    if dropped:
        ladder.append((_WITHOUT_PATTERNS, {"lenient": True}, patternless))
    for mode, options, grammar_schema in ladder:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(grammar_schema, overrides={**_COMPACT, **options})
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_PARSER_LIMITS)
        elapsed = (time.perf_counter() - start) * 1000
        if matcher.is_error():
            errors.append(matcher.get_error())
            circular = _CIRCULAR_ERROR.search(errors[-1])
            if options.get("lenient") and circular and len(ladder) < len(_LADDER) + 1 + _MAX_LOOSENED:
                ladder.append((_WITHOUT_CIRCULAR, {"lenient": True},
                               without_ref_siblings(grammar_schema, circular.group(1))))
            continue
        # Past the budget the walk's exact length no longer matters: the schema cannot fit.
        limit = (budget or MAX_SHORTEST) + 1
        hints = _string_hints(schema)
        walk_start = time.perf_counter()
        shortest, status = walk_to_completion(matcher, tokenizer, limit, hints=hints, seconds=WALK_SECONDS)
        walk_ms = (time.perf_counter() - walk_start) * 1000
        compiled = CompiledSchema(schema=schema, relaxed=mode != "strict", mode=mode,
                                  warnings=tuple(matcher.get_grammar_warnings()), compile_ms=elapsed,
                                  walk_ms=walk_ms, tokenizer=tokenizer, _matcher=matcher, shortest=tuple(shortest),
                                  shortest_status=status, walk_limit=limit, hints=hints)
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


# Budget steering. A model (a random one especially, or one caught in a loop) can spend any budget
# before the JSON closes. So every step the constraint knows a shortest way to close the value from
# where it is (``shortest_completion``: a greedy walk over a copy of the matcher), and as the
# remaining budget comes near its length it narrows the mask: first to tokens that open nothing
# (no ``{ [ , :`` or escapes: the current string or number may go on, containers may close), then,
# at the last moment, to the walk's next token only. Output then closes within budget whenever the
# walk's completion fits, and the walk from the start measures the smallest instance, which is how
# a schema that cannot fit is refused up front.
NEAR = 8  # slack (tokens to spare beyond the shortest completion) at which the mask starts narrowing
TIGHT = 2  # slack at which only the shortest completion's next token is allowed
RECHECK_EVERY = 8  # near the end, recompute the shortest completion at least this often
VERIFY = 2 * NEAR  # slack at which a choice among a few tokens is checked token by token
MAX_CHECKED = 16  # "a few"
FREE_TEXT = 256  # more allowed tokens than this, near the end, is free text (a string's content)
# Farther out, recompute it after slack/RECHECK_SHARE tokens: the shortest completion grows with what
# the model writes (each level of a recursive schema it opens adds its closers and required members),
# and a walk first rerun only within a fixed distance of the end found it already longer than the
# budget (the model had nested 40 levels deep). A geometric schedule: ~30 walks over 1,024 tokens.
RECHECK_SHARE = 8
# Tried in this order at each step of the walk, before falling back to the full mask: closers first,
# then "," (allowed only where a required member or item must follow, or as string text), then the
# shortest values ("1" before "0": years, exclusive minimums and dates refuse 0 more often).
_WALK_PREFERENCE = ('"', "}", "]", ",", "1", "0", '""', "[]", "{}", "null", "false", "true", "[", "{", ":")
_OPENERS = frozenset(b"{[,:\\")


@dataclass(frozen=True, eq=False)
class _VocabFacts:
    """Per tokenizer: the walk's preferred tokens and which tokens open nothing."""

    preferred: tuple[int, ...]
    eos: int
    safe: np.ndarray  # bool over the vocabulary: the token's bytes contain none of { [ , : \\
    opens: np.ndarray  # the complement (special tokens such as EOS carry no JSON: they open nothing)
    token_bytes: tuple[bytes, ...]
    quotes: np.ndarray  # bool over the vocabulary: the token's bytes contain '"' (it may open or close a key)


_vocab_facts: dict[int, tuple[llguidance.LLTokenizer, _VocabFacts]] = {}


def _facts(tokenizer: llguidance.LLTokenizer) -> _VocabFacts:
    hit = _vocab_facts.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    preferred = []
    for text in _WALK_PREFERENCE:
        ids = tokenizer.tokenize_str(text)
        if len(ids) == 1 and ids[0] not in preferred:
            preferred.append(ids[0])
    n = tokenizer.vocab_size
    pieces = tuple(b"" if tokenizer.is_special_token(i) else tokenizer.decode_bytes([i]) for i in range(n))
    opens = np.fromiter((not _OPENERS.isdisjoint(p) for p in pieces), dtype=np.bool_, count=n)
    quotes = np.fromiter((b'"' in p for p in pieces), dtype=np.bool_, count=n)
    facts = _VocabFacts(tuple(preferred), tokenizer.eos_token, ~opens, opens, pieces, quotes)
    with _cache_lock:
        _vocab_facts[id(tokenizer)] = (tokenizer, facts)  # holds the tokenizer: its id stays unique
    return facts


def _allowed_ids(matcher: llguidance.LLMatcher, n: int) -> np.ndarray:
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    return np.flatnonzero(np.unpackbits(bits, count=n, bitorder="little"))


# Strings the walk tries first when it opens a string value: a shortest match of each pattern in the
# schema and an example of each format, so that it can close strings whose grammar a greedy choice
# of characters would never satisfy (``^.*\\.md$``, ``[0-9]+-[0-9]+``, an email). The grammar decides
# whether one fits where the walk is; these are only suggestions.
_FORMAT_EXAMPLES = {
    "date-time": "2000-01-01T00:00:00Z", "date": "2000-01-01", "time": "00:00:00Z", "duration": "P1D",
    "email": "a@b.co", "idn-email": "a@b.co", "hostname": "a.co", "idn-hostname": "a.co", "ipv4": "1.1.1.1",
    "ipv6": "::1", "uri": "a:b", "uri-reference": "a", "iri": "a:b", "iri-reference": "a", "uuid":
    "00000000-0000-0000-0000-000000000000", "uri-template": "a", "json-pointer": "", "relative-json-pointer": "0",
    "regex": "a",
}
_MAX_HINTS = 64
_CATEGORY_CHARS = {sre_c.CATEGORY_DIGIT: "1", sre_c.CATEGORY_WORD: "a", sre_c.CATEGORY_SPACE: " ",
                   sre_c.CATEGORY_NOT_DIGIT: "a", sre_c.CATEGORY_NOT_WORD: "-", sre_c.CATEGORY_NOT_SPACE: "a"}


def shortest_match(regex: str) -> str | None:
    """A short string ``regex`` matches (searched, as JSON Schema's "pattern" is), or None if this
    simple construction cannot tell (lookarounds, backreferences...)."""
    try:
        text = _example(sre_parse.parse(regex))
    except (re.error, RecursionError, _NoExample):
        return None
    return text if text is not None and re.search(regex, text) else None


class _NoExample(Exception):
    pass


def _example(seq: Any) -> str:
    out = []
    for op, av in seq:
        if op is sre_c.LITERAL:
            out.append(chr(av))
        elif op is sre_c.ANY:
            out.append("a")
        elif op is sre_c.IN:
            out.append(_in_example(av))
        elif op in _REPEATS or op is sre_c.POSSESSIVE_REPEAT:
            lo, _hi, body = av
            if lo > 256:  # a hint is a suggestion for a short string, not worth building a long one
                raise _NoExample
            out.append(_example(body) * lo)
        elif op is sre_c.SUBPATTERN:
            out.append(_example(av[3]))
        elif op is sre_c.ATOMIC_GROUP:
            out.append(_example(av))
        elif op is sre_c.BRANCH:
            out.append(min((_example(alt) for alt in av[1]), key=len))
        elif op is sre_c.AT:
            continue
        else:  # lookarounds, backreferences, NOT_LITERAL...: not worth the complexity
            raise _NoExample
    return "".join(out)


def _in_example(items: Any) -> str:
    if items and items[0][0] is sre_c.NEGATE:
        excluded = "".join(_in_example([item]) for item in items[1:] if item[0] is not sre_c.NEGATE)
        return next(c for c in "a1-_ " if c not in excluded)
    for op, av in items:
        if op is sre_c.LITERAL:
            return chr(av)
        if op is sre_c.RANGE:
            lo, hi = av
            return chr(max(lo, min(hi, ord("a")))) if lo <= ord("a") <= hi else chr(lo)
        if op is sre_c.CATEGORY and av in _CATEGORY_CHARS:
            return _CATEGORY_CHARS[av]
    raise _NoExample


def _string_hints(schema: dict) -> tuple[bytes, ...]:
    """The schema's pattern and format examples as JSON string contents with the closing quote."""
    texts: list[str] = []
    for _path, node in _subschemas(schema):
        if isinstance(node.get("pattern"), str):
            texts.append(shortest_match(node["pattern"]) or "")
        if isinstance(node.get("format"), str):
            texts.append(_FORMAT_EXAMPLES.get(node["format"], ""))
        if isinstance(node.get("patternProperties"), dict):
            texts.extend(shortest_match(r) or "" for r in node["patternProperties"])
    seen: dict[str, None] = dict.fromkeys(t for t in texts if t)
    return tuple(json.dumps(text, ensure_ascii=False)[1:].encode() for text in list(seen)[:_MAX_HINTS])


# Full-mask look-ups one walk may make, and for how long: bounds its cost (a mask costs up to a few ms
# on big grammars, ~75-350 ms on lexer-heavy ones). While decoding, a walk that failed is retried only
# after 2, 4, 8... more tokens.
# Compile time: big schemas (a cloud service catalogue of 60 required members) need ~200 look-ups to
# find that their smallest instance is longer than the budget (refused with the reason, not cut off).
MAX_WALK_MASKS = 256
WALK_SECONDS = 1.0
# Decoding: GOV.UK's content schemas (60 members with uuids and enums) need ~40 look-ups (~9 ms) to
# close from mid-document; the time bound keeps a lexer-heavy grammar's walk from stalling every slot.
DECODE_WALK_MASKS = 48
DECODE_WALK_SECONDS = 0.05


def shortest_completion(matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, limit: int,
                        position: "_JsonPosition | None" = None, max_masks: int = MAX_WALK_MASKS,
                        hints: Sequence[bytes] = (), seconds: float | None = None) -> list[int] | None:
    """Tokens that take ``matcher`` (not modified) to a complete value, found greedily; None if the
    walk finds none within ``limit`` tokens. See ``walk_to_completion``."""
    path, status = walk_to_completion(matcher, tokenizer, limit, position, max_masks, hints, seconds)
    return path if status == "complete" else None


def walk_to_completion(matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, limit: int,
                       position: "_JsonPosition | None" = None, max_masks: int = MAX_WALK_MASKS,
                       hints: Sequence[bytes] = (), seconds: float | None = None) -> tuple[list[int], str]:
    """A short way from ``matcher``'s state (not modified) to a complete value: ``(tokens, status)``.

    Status "complete": ``tokens`` (at most ``limit``) complete the value. "long": the completion
    needs more than ``limit`` tokens (the structure itself needs more; ``tokens`` is its first
    ``limit``). "stuck": it found no way on (a string whose pattern it could not satisfy, or too many
    look-ups). The walk goes on past ``limit`` (to twice it) and then writes what it found in the
    tokenizer's own tokens (``_compact``) before it compares.

    Each step takes the forced tokens if there are any, else the first preferred token the grammar
    allows (close the string, the array, the object; else the shortest value), else the lowest
    allowed token id. Optional members and items are never opened (closing is preferred wherever it
    is allowed) and required ones get minimal values. Greedy, so an upper bound on the shortest:
    exact on most schemas, longer where choosing a branch early would have paid off later.
    ``position`` is where the text so far stands (None: at the start). ``hints``: whole string
    contents (closing quote included, ``_string_hints``) tried first inside a string value whose
    text so far begins one of them (the grammar may have forced a prefix).
    """
    path, status = _walk(matcher, tokenizer, 2 * limit + 16, position, max_masks, hints, seconds)
    if status == "complete":
        path = _compact(matcher, tokenizer, path)
        if len(path) > limit:
            status = "long"
    elif len(path) > limit and len(tokenizer.tokenize_bytes(_text(tokenizer, path))) > limit:
        status = "long"  # even what it wrote so far, in the tokenizer's own tokens, is over the limit
    if status == "long":
        path = path[:limit]
    return path, status


def _text(tokenizer: llguidance.LLTokenizer, path: list[int]) -> bytes:
    return b"".join(_facts(tokenizer).token_bytes[t] for t in path)


def _compact(matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, path: list[int]) -> list[int]:
    """``path``'s text in the tokenizer's own (fewest) tokens, where the grammar takes them.

    The walk writes closers one character at a time wherever a member or item could still follow
    ("}" then "]", not "}]"): on a recursive schema nested 40 levels deep that is over twice the
    tokens the model, or the tokenizer, would use, and a walk that long looked like it would not fit.
    """
    short = tokenizer.tokenize_bytes(_text(tokenizer, path))
    if len(short) >= len(path):
        return path
    m = matcher.deep_copy()
    return short if m.consume_tokens(short) and m.is_accepting() else path


def _walk(matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, limit: int,
          position: "_JsonPosition | None", max_masks: int, hints: Sequence[bytes],
          seconds: float | None) -> tuple[list[int], str]:
    facts = _facts(tokenizer)
    deadline = None if seconds is None else time.perf_counter() + seconds
    m = matcher.deep_copy()
    path: list[int] = []
    # Inside a string with a format or pattern, a preferred token may be allowed as text forever
    # ("}}}}" in an email's local part): within one string a token already chosen twice is passed
    # over, so the walk tries other characters until one moves the string toward its end.
    recent: collections.Counter[int] = collections.Counter()
    pos = _JsonPosition() if position is None else position.copy()
    masks, tried_hints = 0, False
    while not m.is_accepting():
        if m.is_stopped():
            return path, "stuck"
        if deadline is not None and time.perf_counter() > deadline:
            return path, "stuck"  # out of time: unknown
        if len(path) >= limit:  # looping in a string (it repeats itself) or simply long
            return path, "stuck" if pos.in_string and any(n >= 2 for n in recent.values()) else "long"
        forced = m.compute_ff_tokens()
        if forced:
            if not m.consume_tokens(forced):
                return path, "stuck"
            path.extend(forced)
            for t in forced:
                pos.feed(facts.token_bytes[t])
            recent.clear()
            continue
        if (hints and pos.in_string and not pos.in_key and not tried_hints
                and m.validate_tokens([facts.preferred[0]]) == 0):  # only where the string cannot end now
            tried_hints = True  # once per string: a hint that does not fit now will not later
            hint = _first_fitting(m, tokenizer, hints, bytes(pos.string_text))
            if hint is not None:
                path.extend(hint)
                for t in hint:
                    pos.feed(facts.token_bytes[t])
                recent.clear()
                continue
        if not pos.in_string:
            tried_hints = False
        token = next((t for t in facts.preferred if recent[t] < 2 and not _repeats_key(pos, facts, t)
                      and m.try_consume_tokens([t]) == 1), None)
        if token is None:
            masks += 1
            allowed = _allowed_ids(m, tokenizer.vocab_size) if masks <= max_masks else []
            allowed = [int(t) for t in allowed if t != facts.eos and not _repeats_key(pos, facts, t)]
            if not allowed:
                return path, "stuck"
            token = next((t for t in allowed if t not in recent), allowed[0])
            if not m.consume_token(token):
                return path, "stuck"
        path.append(token)
        pos.feed(facts.token_bytes[token])
        if pos.in_string:
            recent[token] += 1
        else:
            recent.clear()
    return path, "complete"


def _first_fitting(m: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, hints: Sequence[bytes],
                   written: bytes) -> list[int] | None:
    """Consume the rest of the first hint that begins with ``written`` and that the grammar takes whole;
    else a whole hint after ``written``, where the grammar takes it (JSON Schema's pattern is searched,
    not anchored: after "2021-01-13 20:30" that the model wrote, a timestamp pattern's example still
    matches, and the string can close)."""
    rests = [text[len(written):] for text in hints if text.startswith(written) and len(text) > len(written)]
    for rest in rests + [text for text in hints if not text.startswith(written)]:
        hint = tokenizer.tokenize_bytes(rest)
        n = m.try_consume_tokens(hint)
        if n == len(hint) and not m.is_error():
            return hint
        if n:
            m.rollback(n)
    return None


def _repeats_key(pos: "_JsonPosition", facts: _VocabFacts, token: int) -> bool:
    if not pos.in_key or pos.repeated_key:
        return False
    after = pos.copy()
    after.feed(facts.token_bytes[token])
    return after.repeated_key


class JsonSchemaConstraint:
    """``TokenConstraint`` over an llguidance matcher: which tokens keep the JSON on the schema and,
    given the remaining budget, closable in time.

    The end-of-text token is in the mask only once the JSON is complete (llguidance's rule), and
    ``is_finished`` turns true as soon as nothing more can follow, so the backend stops there.
    """

    def __init__(self, compiled: CompiledSchema, vocab_width: int, steer: bool = True):
        self.compiled = compiled
        self.vocab_width = vocab_width
        self._matcher = compiled.new_matcher()
        # One bit per token of the tokenizer's vocabulary, filled in place by llguidance (GIL released).
        # Token 32*j + i is bit i of word j; on the little-endian hosts llguidance ships for, that is
        # bit i % 8 of byte 4*j + i // 8, so a uint8 view unpacks in token order with no copy.
        self._bits = llguidance.numpy.allocate_token_bitmask(1, compiled.tokenizer.vocab_size)
        self._bytes = self._bits.view(np.uint8)
        self._facts = _facts(compiled.tokenizer) if steer else None
        self._safe = None if self._facts is None else self._widen(self._facts.safe)
        self._path: list[int] | None = None  # a shortest completion, from the current state if _fresh
        self._closing: int | None = None  # its length when last computed (None: none found)
        self._fresh = False
        self._walked = False
        self._backoff = 0  # tokens to wait before walking again after a walk that found nothing
        self._stale = False  # a token that opens something came since the last walk
        self._since = 0  # tokens consumed since the last walk
        self._json = _JsonPosition()
        if compiled.min_tokens is not None:  # the compile-time walk starts from the same state
            self._path, self._closing, self._fresh, self._walked = list(compiled.shortest), compiled.min_tokens, True, True
        self.steered = 0  # steps at which the budget narrowed the mask (for tests and benchmarks)
        self.overrun = False  # the shortest completion outgrew the budget: this output may be cut short

    def _widen(self, mask: np.ndarray) -> np.ndarray:
        out = np.zeros(self.vocab_width, dtype=np.bool_)
        n = min(self.vocab_width, mask.size)
        out[:n] = mask[:n]
        return out

    def allowed_tokens(self, remaining: int | None = None) -> np.ndarray:
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bits)
        # count= cuts a vocabulary wider than the logits, and pads with False (zero bits) when the
        # logits are wider than the vocabulary (models pad their embedding to a multiple of 64...).
        allowed = np.unpackbits(self._bytes, count=self.vocab_width, bitorder="little").view(np.bool_)
        if self._facts is not None and self._json.in_key and self._json.open_keys():
            self._forbid_repeated_keys(allowed)
        if remaining is None or self._facts is None or self._matcher.is_stopped():
            return allowed
        path = self._closing_path(remaining)
        if path is None:  # no completion found (or none within the budget): nothing to steer to
            return allowed
        slack = remaining - len(path)
        if slack > VERIFY or not path:
            return allowed
        if slack > NEAR:
            # A choice among few tokens (an enum value, an anyOf branch, close or go on) can commit
            # to a much longer completion in one token: those few are checked one by one.
            few = np.flatnonzero(allowed)
            if few.size <= MAX_CHECKED:
                # Each check is a walk: past a handful of candidates only those that open something.
                self._keep_fitting(allowed, few if few.size <= 4 else few[self._facts.opens[few]], remaining)
                if not allowed.any():  # none checked out (a walk too costly to finish): leave the choice
                    allowed[few] = True
            return allowed
        self.steered += 1
        if slack <= TIGHT or self._json.in_key:
            # Only the shortest completion's next token: a key's name decides which value follows,
            # so near the end the walk picks it, not the model.
            allowed[:] = False
        else:
            allowed &= self._safe
            few = np.flatnonzero(allowed)
            if few.size <= MAX_CHECKED:
                self._keep_fitting(allowed, few, remaining)
            elif few.size <= FREE_TEXT:  # neither a few checkable choices nor free text: play safe
                allowed[:] = False
        if path[0] < self.vocab_width:
            allowed[path[0]] = True
        return allowed

    def _forbid_repeated_keys(self, allowed: np.ndarray) -> None:
        """Clear tokens that would close a key the open object already has.

        llguidance lets an object with free-form keys (or a declared one, again) repeat a key; the
        output would then be rejected (a repeated key is ambiguous JSON), after a whole attempt's
        tokens. Only tokens holding a quote can close a key, so few are checked, and only in keys."""
        n = min(allowed.size, self._facts.quotes.size)
        candidates = np.flatnonzero(allowed[:n] & self._facts.quotes[:n])
        pieces = self._facts.token_bytes
        bad = [t for t in candidates.tolist() if self._json.closes_repeated_key(pieces[t])]
        if bad and len(bad) < candidates.size + np.count_nonzero(allowed[:n] & ~self._facts.quotes[:n]):
            allowed[bad] = False  # never all of them: an empty mask would end the output in error

    def _keep_fitting(self, allowed: np.ndarray, candidates: np.ndarray, remaining: int) -> None:
        """Clear the candidates after which no completion fits in what is left of the budget."""
        facts = self._facts
        for token in candidates.tolist():
            if token == facts.eos:
                continue
            m = self._matcher.deep_copy()
            position = self._json.copy()
            position.feed(facts.token_bytes[token])
            if not m.consume_token(token) or (
                    not m.is_accepting()
                    and shortest_completion(m, self.compiled.tokenizer, limit=remaining - 1, position=position,
                                            max_masks=DECODE_WALK_MASKS, hints=self.compiled.hints,
                                            seconds=DECODE_WALK_SECONDS) is None):
                allowed[token] = False

    def _closing_path(self, remaining: int) -> list[int] | None:
        """The shortest completion from here if it may matter now (else a stale one, or None)."""
        # The walk costs ~0.04 ms a token (GPT-2), a mask lookup more where it must fall back, so it
        # runs only when it may matter: near the end (every step: its next token is needed); within
        # 2*VERIFY tokens of slack after a token that opens something (where the shortest completion
        # can grow by more than a token); else after slack/RECHECK_SHARE tokens. When the model takes
        # the walk's own next token, the rest of the walk is still a shortest completion.
        if self._fresh:
            return self._path
        if self._closing is None:
            walk = not self._walked or self._since >= self._backoff
        else:
            slack = remaining - self._closing
            walk = (slack <= NEAR + TIGHT or (self._stale and slack <= 2 * VERIFY)
                    or self._since >= max(RECHECK_EVERY, slack // RECHECK_SHARE))
        if walk and self._path and self._closing is not None and not self._stale:
            # The last walk's completion may still complete from here (text went on inside a string
            # or a number): checking it costs no mask, a new walk may cost many.
            m = self._matcher.deep_copy()
            if m.consume_tokens(self._path) and m.is_accepting():
                self._fresh, self._since = True, 0
                return self._path
        if walk:
            self._walked = True
            self._path = shortest_completion(self._matcher, self.compiled.tokenizer, limit=remaining + 1,
                                             position=self._json, max_masks=DECODE_WALK_MASKS,
                                             hints=self.compiled.hints, seconds=DECODE_WALK_SECONDS)
            if self._path is None:
                self.overrun = True  # no completion found within the budget: the output may be cut short
                self._backoff = 2 * self._backoff or 2
            else:
                self._backoff = 0
            self._closing = None if self._path is None else len(self._path)
            self._fresh, self._stale, self._since = self._path is not None, False, 0
        return self._path

    def consume(self, token_id: int) -> None:
        token_id = int(token_id)
        self._matcher.consume_token(token_id)  # on a disallowed token the matcher enters its error state
        if self._facts is None or not 0 <= token_id < len(self._facts.token_bytes):
            return
        self._json.feed(self._facts.token_bytes[token_id])
        if self._fresh and self._path and self._path[0] == token_id:
            self._path = self._path[1:]
            self._closing = len(self._path)
            return
        self._fresh = False
        self._since += 1
        self._stale |= bool(self._facts.opens[token_id])

    def forced_tokens(self) -> list[int]:
        if self._matcher.is_stopped() or self._matcher.is_error():
            return []
        return self._matcher.compute_ff_tokens()

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


class _JsonPosition:
    """Where in the JSON text the output is, as far as steering needs: inside an object's key, inside
    a string, and which keys the open objects already have (the walk must not repeat one: llguidance
    allows a repeated key in an open map, the validator does not)."""

    def __init__(self) -> None:
        self._stack: list[set[bytes] | None] = []  # per open container: an object's keys, None for an array
        self._in_string = self._escape = self._is_key = False
        self._key = bytearray()
        self.in_key = False  # after "{" or "," in an object, up to the ":" (the key decides the value)
        self.repeated_key = False  # a key was written twice in one object
        self.string_text = bytearray()  # the open string's text so far (first 256 bytes)

    @property
    def in_string(self) -> bool:
        return self._in_string

    def open_keys(self) -> set[bytes] | None:
        """The keys the innermost open object already has (None inside an array or at the top)."""
        return self._stack[-1] if self._stack else None

    def closes_repeated_key(self, data: bytes) -> bool:
        """Would feeding ``data`` close a key the innermost object already has? (No copy: a key
        step checks thousands of tokens.)"""
        keys = self.open_keys()
        if not keys or not self.in_key:
            return False
        in_string, escape = self._in_string, self._escape
        key = bytearray(self._key) if in_string else bytearray()
        for b in data:
            if not in_string:
                if b == 0x22:
                    in_string = True
                elif b not in b" \t\r\n,":  # past the key (":"), or out of the object
                    return False
            elif escape:
                escape = False
                key.append(b)
            elif b == 0x5C:
                escape = True
                key.append(b)
            elif b == 0x22:
                return bytes(key) in keys
            else:
                key.append(b)
        return False

    def copy(self) -> "_JsonPosition":
        other = _JsonPosition()
        other._stack = [None if keys is None else set(keys) for keys in self._stack]
        other._in_string, other._escape, other._is_key = self._in_string, self._escape, self._is_key
        other._key = bytearray(self._key)
        other.in_key, other.repeated_key = self.in_key, self.repeated_key
        other.string_text = bytearray(self.string_text)
        return other

    def feed(self, data: bytes) -> None:
        for b in data:
            if self._in_string:
                if len(self.string_text) < 256:
                    self.string_text.append(b)
                if self._escape:
                    self._escape = False
                elif b == 0x5C:  # backslash
                    self._escape = True
                elif b == 0x22:
                    self._in_string = False
                    if self._is_key and self._stack and self._stack[-1] is not None:
                        key = bytes(self._key)
                        self.repeated_key |= key in self._stack[-1]
                        self._stack[-1].add(key)
                    continue
                if self._is_key:
                    self._key.append(b)
            elif b == 0x22:
                self._in_string, self._is_key = True, self.in_key
                self._key.clear()
                self.string_text.clear()
            elif b == 0x7B:  # {
                self._stack.append(set())
                self.in_key = True
            elif b == 0x5B:  # [
                self._stack.append(None)
                self.in_key = False
            elif b in (0x7D, 0x5D):  # } ]
                if self._stack:
                    self._stack.pop()
                self.in_key = False
            elif b == 0x2C:  # ,
                self.in_key = bool(self._stack) and self._stack[-1] is not None
            elif b == 0x3A:  # :
                self.in_key = False


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
    except RecursionError:  # jsonschema recurses per level: a recursive schema and a model that nests on
        return None, "the output nests too deeply to be checked against the schema"
    if error is not None:
        return None, f"{error.message} (at {error.json_path})"
    if (why := json_numbers.number_problem(text)) is not None:
        return None, f"{why}: {json_numbers.RULE}"
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


class StructuredRunner(Protocol):
    """What structured output needs from the model: the service's run path (``GenerationService``'s
    ``ServiceRunner``), or any engine wrapped the same way (tests, benchmarks)."""

    model_id: str
    vocab_width: int  # logits width: the mask width
    max_sequence_tokens: int  # prompt and answer together (the model's context per sequence)

    def llguidance_tokenizer(self) -> llguidance.LLTokenizer: ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the model will see it (the prompt budget counts these)."""

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 constraints: Sequence[TokenConstraint]) -> list[Completion]:
        """One constrained generation per prompt, run to the end; failures raise."""


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


def check_fits(compiled: CompiledSchema, max_new_tokens: int, cap: int) -> None:
    """Refuse, with the reason, a schema whose smallest instance takes more than the budget.

    The walk is greedy, so its length is an upper bound; a walk that found nothing ("stuck":
    a pattern it cannot satisfy) refuses nothing: the model may still do better.
    """
    status, walked, limit = compiled.shortest_status, compiled.shortest or (), compiled.walk_limit
    if status == "complete" and len(walked) <= max_new_tokens or status == "stuck":
        return
    if status == "long" and limit <= cap:  # measure up to the tier's cap, to say what budget would do
        limit = cap + 1
        walked, status = walk_to_completion(compiled.new_matcher(), compiled.tokenizer, limit, hints=compiled.hints,
                                             seconds=WALK_SECONDS)
        if status == "stuck" or status == "complete" and len(walked) <= max_new_tokens:
            return
    example = compiled.tokenizer.decode_str(list(walked[:48]))
    example = example if len(walked) <= 48 else example + "..."
    need = f"{len(walked)} tokens" if status == "complete" else f"more than {limit - 1} tokens"
    least = len(walked) if status == "complete" else None
    how = (f"raise max_new_tokens to at least {least}" if least is not None and least <= cap else
           f"this tier allows at most {cap} tokens for structured output, so simplify the schema "
           f"(fewer required members, shorter minimums)" if least is not None else
           "simplify the schema (fewer required members, shorter minimums) or raise max_new_tokens")
    raise SchemaError(f"the smallest JSON this schema allows takes {need} of this model "
                      f"({example}), more than the budget of {max_new_tokens}: {how}")


def generate_structured(runner: StructuredRunner, prompt: str, schema_text: str, *, limits: TierLimits,
                        max_new_tokens: int, temperature: float, seed: int | None,
                        attempts: int = 3, steer: bool = True, instruct: bool = True) -> StructuredResult:
    """Constrained generation of JSON valid against ``schema_text``; success only if jsonschema agrees.

    Raises ``ValueError`` for a token budget outside 1..``limits.max_structured_tokens`` and
    ``SchemaError`` for a refused schema (one whose smallest instance cannot fit the budget too).
    The constraint steers to a shortest completion as the budget runs out, so the JSON closes in
    time; invalid output (possible where the grammar is relaxed) is retried with the next seed
    (``attempts`` in all) and, if still bad, returned with ``success=False`` and the reason.
    ``steer=False`` turns budget steering and the up-front fit check off (for comparison only).
    ``instruct=False``: ``prompt`` already says what to answer (tool calling renders its own
    conversation and instructions), so it is used as is, without the schema appended.
    """
    cap = limits.max_structured_tokens
    if not 1 <= max_new_tokens <= cap:
        raise ValueError(f"max_new_tokens must be between 1 and {cap} (this tier's cap for structured "
                         f"output); got {max_new_tokens}")
    start = time.perf_counter()
    schema = parse_schema(schema_text, limits)
    compiled = compile_schema(schema, runner.llguidance_tokenizer(), budget=max_new_tokens)
    if steer:
        check_fits(compiled, max_new_tokens, cap)
    full_prompt = build_prompt(runner, prompt, compiled.schema, limits, max_new_tokens) if instruct else prompt
    # The answer also ends where the sequence is full: steer to that end if it comes first.
    room = runner.max_sequence_tokens - runner.count_tokens(full_prompt)
    if room < max_new_tokens:
        if room < 1:
            raise SchemaError(f"the prompt leaves no room for an answer in this model's context of "
                              f"{runner.max_sequence_tokens} tokens; shorten it")
        max_new_tokens = room
        if steer:
            check_fits(compiled, max_new_tokens, cap)
    # Greedy decoding gives the same tokens whatever the seed: a retry could only repeat itself.
    tries = max(1, attempts) if temperature > 0 else 1
    tokens, raw, data, error = 0, "", None, "no attempt was made"
    for attempt in range(tries):
        constraint = JsonSchemaConstraint(compiled, runner.vocab_width, steer=steer)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=None if seed is None else seed + attempt)
        seq = runner.generate([full_prompt], params, [constraint])[0]
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
                            model_used=runner.model_id, inference_time_ms=(time.perf_counter() - start) * 1000,
                            tokens=tokens, raw_text=raw)


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
