"""Schema intake: the user's JSON Schema text checked before anything compiles it.

``parse_schema`` checks size, depth, the draft's metaschema, local ``$ref`` only, and regexes that
are valid and not catastrophic; ``SchemaError`` says what was refused, in words meant for the user.
Nothing here fetches anything: a remote ``$ref`` is refused.
"""

from __future__ import annotations

import json
import re
# jsonschema checks "pattern" with Python's re, so Python's own regex parser decides what is valid.
from re import _constants as sre_c, _parser as sre_parse
from typing import Any, Iterator

import jsonschema
from jsonschema.validators import Draft202012Validator, validator_for

from slm_app.structured import numbers as json_numbers
from slm_app.settings import TierLimits


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


