"""Compiling a checked schema into an llguidance grammar for one tokenizer.

``compile_schema`` tries strict first and relaxes rung by rung (``_LADDER``) only if it must; the
result (``CompiledSchema``) is cached per schema, tokenizer and budget, and carries the walk to the
smallest instance that tells whether the schema fits a token budget.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
# jsonschema checks "pattern" with Python's re, so Python's own regex parser decides what is valid.
from re import _constants as sre_c, _parser as sre_parse
from typing import Any

import llguidance
import llguidance.numpy

from slm_app.structured import numbers as json_numbers
from slm_app.structured.intake import (
    _DATA_KEYWORDS, _NAME_MAPS, _UNBOUNDABLE, SchemaError, _regex_children,
)
from slm_app.structured.walk import NO_HINTS, WALK_SECONDS, WalkHints, _cache_lock, _string_hints, walk_to_completion

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
    hints: WalkHints = NO_HINTS  # _string_hints: string contents and keys the walk tries first

    @property
    def min_tokens(self) -> int | None:
        return len(self.shortest) if self.shortest_status == "complete" and self.shortest is not None else None

    @property
    def min_instance(self) -> str | None:
        return None if self.shortest is None else self.tokenizer.decode_str(list(self.shortest))  # or its start

    def new_matcher(self) -> llguidance.LLMatcher:
        return self._matcher.deep_copy()


_cache: OrderedDict[tuple[str, int, int | None], CompiledSchema] = OrderedDict()


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


