"""Interoperable numbers in structured output (I-JSON, RFC 7493 §2.2).

JSON itself puts no limit on numbers, but its readers do: JavaScript and most JSON libraries read
every number as an IEEE 754 double (integers are exact only within ±(2**53-1)), Python's reads
``123...`` (300 digits) as an int that no 64-bit serializer (orjson, hence Gradio's JSON output)
can write back, and ``1e999`` as infinity. A small or random model writes such numbers happily
where a schema says ``"type": "number"``. So every number the app generates is **a multiple of
10**-6 within ±(2**53-1)**: at most 16 digits before the point and 6 after it, no exponent. Every
JSON reader gets the same finite value from that text.

How it is enforced, by construction and then checked:

- ``check_schema`` (intake): a schema whose own bounds leave no such number where it asks for one
  (``"minimum": 1e20``; ``"exclusiveMinimum": 0, "maximum": 1e-7``; a ``const`` or every ``enum``
  value beyond the range) is refused, with the place and the reason.
- ``interoperable_grammar_schema`` (compilation, grammar only): the bounds written into the schema
  for llguidance, which compiles ``minimum``/``maximum``/``multipleOf`` into the number's regex (a
  bounded range has no exponent; ``multipleOf`` 1e-6 caps the decimals). Values left open by the
  schema (``{}``, an object's unlisted members, an array's unlisted items) get a recursive "any
  value with interoperable numbers" definition. Narrowing only: whatever the grammar admits is
  still valid against the user's schema, which validation keeps using unchanged.
- ``number_problem`` (validation): the output's numbers, as written, checked against the rule; where
  the grammar could not be narrowed (inside ``not``/``if``, objects combined by ``allOf``, a
  remote upstream's output) an offending attempt is invalid, with the reason, and retried.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

__all__ = ["DECIMALS", "MAX_SAFE_INTEGER", "NotInteroperable", "check_schema", "interoperable_grammar_schema",
           "number_problem"]

MAX_SAFE_INTEGER = 2**53 - 1  # RFC 7493 §2.2; JavaScript's Number.MAX_SAFE_INTEGER
DECIMALS = 6  # digits after the point
STEP = Fraction(1, 10**DECIMALS)
RULE = (f"this server generates only numbers every JSON reader agrees on: multiples of 1e-{DECIMALS} within "
        f"±{MAX_SAFE_INTEGER} (2^53-1; I-JSON, RFC 7493)")
ANY_NAME = "interop.any"  # not a valid tool name (tools.NAME_RE has no "."), so it cannot collide
_U32 = 2**32 - 1  # llguidance keeps multipleOf as a u32 coefficient and a power of ten

_DATA = frozenset({"enum", "const", "default", "examples", "example"})
# Narrowing under these could widen or change what the whole schema means (as in bound_for_budget).
_HANDS_OFF = frozenset({"not", "if", "then", "else", "contains", "propertyNames", "unevaluatedItems",
                        "unevaluatedProperties"})
_ONE = frozenset({"items", "additionalItems", "additionalProperties"})  # a subschema (items: or a list)
_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"})
_ANNOTATIONS = frozenset({"title", "description", "$comment", "default", "examples", "example", "deprecated",
                          "readOnly", "writeOnly", "$schema", "$anchor"})
_COMBINERS = ("allOf", "anyOf", "oneOf", "$ref", "$dynamicRef", "$recursiveRef", "if", "dependentSchemas",
              "dependencies")
_NUMERIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


class NotInteroperable(ValueError):
    """The schema asks for numbers outside the interoperable range; the message says where and why."""


# ---- intake --------------------------------------------------------------------------------------

def check_schema(schema: Any) -> None:
    """Raise ``NotInteroperable`` if a numeric subschema's bounds, ``const`` or ``enum`` leave no
    interoperable number where the schema asks for one."""
    stack: list[tuple[str, Any]] = [("", schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        where = path or "/"
        if "const" in node and (why := number_problem_in(node["const"])):
            raise NotInteroperable(f"the const at {where} holds {why}; {RULE}")
        if isinstance(node.get("enum"), list) and node["enum"] and all(number_problem_in(v) for v in node["enum"]):
            raise NotInteroperable(f"every enum value at {where} holds a number beyond what JSON readers agree on "
                                   f"({number_problem_in(node['enum'][0])}); {RULE}")
        if _may_be_number(node):
            _numeric_range(node, where)
        for key, value in node.items():
            if key in _DATA or key in _HANDS_OFF:  # only what the output must satisfy is checked
                continue
            here = f"{path}/{key}"
            if key in _MAPS and isinstance(value, dict):
                stack.extend((f"{here}/{name}", sub) for name, sub in value.items())
            elif isinstance(value, dict):
                stack.append((here, value))
            elif isinstance(value, list):
                stack.extend((f"{here}/{i}", sub) for i, sub in enumerate(value))


def _types(node: dict) -> set[str] | None:
    t = node.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    return None  # any type


def _may_be_number(node: dict) -> bool:
    """A node without "type" admits numbers too, unless const/enum/$ref decide its values or its
    combined parts do (each part is bounded itself: bounds beside them would be merged into each,
    which llguidance refuses for recursive references)."""
    types = _types(node)
    return bool(types & {"number", "integer"}) if types is not None else not any(
        k in node for k in ("const", "enum", "$ref", "$dynamicRef", "$recursiveRef", "allOf", "anyOf", "oneOf",
                            "not", "if"))


def _number(value: Any) -> Fraction | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return Fraction(value) if isinstance(value, int) else Fraction(Decimal(repr(value)))


def _bound(node: dict, plain: str, exclusive: str, lower: bool) -> tuple[Fraction | None, bool]:
    """The tighter of ``minimum``/``exclusiveMinimum`` (or the maximums): (value, exclusive?)."""
    value, excl = _number(node.get(plain)), False
    flag = node.get(exclusive)
    if isinstance(flag, bool):  # draft 4: a flag on minimum/maximum
        return value, flag and value is not None
    other = _number(flag)
    if other is not None and (value is None or (other >= value if lower else other <= value)):
        value, excl = other, True
    return value, excl


def _step(node: dict) -> Fraction | None:
    """The multiple every generated number of this node is written as (None: llguidance's own)."""
    m = _number(node.get("multipleOf"))
    types = _types(node)
    integer_only = types is not None and not types & {"number"}
    if m is not None and m <= 0:
        return None
    unit = Fraction(1) if integer_only else STEP
    if m is None:
        return unit
    return _lcm(m, unit)


def _lcm(a: Fraction, b: Fraction) -> Fraction:
    den = math.lcm(a.denominator, b.denominator)
    x, y = int(a * den), int(b * den)
    return Fraction(x * y // math.gcd(x, y), den)


def _numeric_range(node: dict, where: str) -> tuple[Fraction, Fraction, Fraction | None]:
    """The interoperable range left by the node's bounds (lowest and highest allowed multiple of
    its step, and the step); raises ``NotInteroperable`` if there is none."""
    lo, lo_excl = _bound(node, "minimum", "exclusiveMinimum", True)
    hi, hi_excl = _bound(node, "maximum", "exclusiveMaximum", False)
    if lo is not None and hi is not None and (lo > hi or lo == hi and (lo_excl or hi_excl)):
        return Fraction(0), Fraction(0), None  # the schema's own contradiction: not ours to report
    top = Fraction(MAX_SAFE_INTEGER)
    step = _step(node)
    if lo is not None and (lo > top or lo == top and lo_excl):
        raise NotInteroperable(f"the minimum at {where} is {_show(node, 'minimum', 'exclusiveMinimum')}, beyond "
                               f"{MAX_SAFE_INTEGER}: {RULE}")
    if hi is not None and (hi < -top or hi == -top and hi_excl):
        raise NotInteroperable(f"the maximum at {where} is {_show(node, 'maximum', 'exclusiveMaximum')}, beyond "
                               f"-{MAX_SAFE_INTEGER}: {RULE}")
    low, low_excl = (-top, False) if lo is None or lo < -top else (lo, lo_excl)
    high, high_excl = (top, False) if hi is None or hi > top else (hi, hi_excl)
    if step is None:
        return low, high, None
    first, last = math.ceil(low / step), math.floor(high / step)
    first += low_excl and first * step == low
    last -= high_excl and last * step == high
    if first > last:
        raise NotInteroperable(f"no number at {where} is both within its bounds ({_show(node, 'minimum', 'exclusiveMinimum')}"
                               f" to {_show(node, 'maximum', 'exclusiveMaximum')}) and a multiple of "
                               f"{_decimal(step)}: {RULE}")
    return first * step, last * step, step


def _show(node: dict, plain: str, exclusive: str) -> str:
    flag = node.get(exclusive)
    if _number(flag) is not None:
        return f"{flag} ({exclusive})"
    return "none" if node.get(plain) is None else f"{node.get(plain)}{' (exclusive)' if flag is True else ''}"


def _decimal(f: Fraction) -> str:
    return str(Decimal(f.numerator) / Decimal(f.denominator)) if f.denominator != 1 else str(f.numerator)


# ---- the grammar's schema ------------------------------------------------------------------------

def _any_def(ref: str) -> dict[str, Any]:
    """Any JSON value whose numbers are interoperable, nested values included (recursive)."""
    return {"minimum": -MAX_SAFE_INTEGER, "maximum": MAX_SAFE_INTEGER, "multipleOf": float(STEP),
            "items": {"$ref": ref}, "additionalProperties": {"$ref": ref}}


def interoperable_grammar_schema(schema: Any) -> Any:
    """``schema`` with interoperable bounds written in, for the grammar only (see the module docstring)."""
    if not isinstance(schema, dict):
        return schema
    if not (set(schema) - _ANNOTATIONS):  # the root is "any value"
        return {**schema, **_any_def("#")}
    defs_key = "$defs" if "$defs" in schema or "definitions" not in schema else "definitions"
    ref = f"#/{defs_key}/{ANY_NAME}"
    used = [False]
    out = _walk(schema, ref, used, combined=False, root=True, parts=_parts(schema))
    if used[0]:
        defs = dict(out.get(defs_key) or {})
        defs[ANY_NAME] = _any_def(ref)
        out[defs_key] = defs
    return out


def _parts(schema: dict) -> frozenset[str]:
    """Definitions ("#/$defs/x") used as a part of something combined (a member of allOf/anyOf/oneOf,
    or a $ref beside other keywords), and the definitions those refer to: their open values stay
    open, as llguidance would intersect the recursive "any" with itself there without end."""
    found: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key in ("allOf", "anyOf", "oneOf"):
            for member in node.get(key) if isinstance(node.get(key), list) else ():
                if isinstance(member, dict) and isinstance(member.get("$ref"), str):
                    found.add(member["$ref"])
        if isinstance(node.get("$ref"), str) and len(set(node) - _ANNOTATIONS) > 1:
            found.add(node["$ref"])
        stack.extend(v for k, v in node.items() if k not in _DATA)
    defs = {f"#/{key}/{name}": sub for key in ("$defs", "definitions") if isinstance(schema.get(key), dict)
            for name, sub in schema[key].items()}
    todo = list(found)
    while todo:  # what a shared definition refers to is shared too
        target = defs.get(todo.pop())
        refs: list[str] = []
        stack = [target]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("$ref"), str):
                    refs.append(node["$ref"])
                stack.extend(v for k, v in node.items() if k not in _DATA)
            elif isinstance(node, list):
                stack.extend(node)
        for r in refs:
            if r not in found:
                found.add(r)
                todo.append(r)
    return frozenset(found)


def _is_any(node: Any) -> bool:
    return node is True or isinstance(node, dict) and not (set(node) - _ANNOTATIONS)


def _walk(node: dict, ref: str, used: list[bool], combined: bool, root: bool = False,
          parts: frozenset[str] = frozenset()) -> dict:
    """One node, rebuilt: its subschemas walked, open values pointed at the "any" definition, and
    its numbers bounded. ``combined``: the node is a part of an object other parts also describe
    (an allOf member...): there its open values are left open, as merging could go wrong."""
    if not root and (isinstance(node.get("$id"), str) or isinstance(node.get("id"), str)):
        ref = ""  # a subtree with an id of its own resolves "#/..." against itself
    closed_here = not combined and not any(k in node for k in _COMBINERS)
    shares = combined or any(k in node for k in ("properties", "required", "patternProperties", "additionalProperties"))

    def sub(value: Any, part: bool = False) -> Any:
        if _is_any(value) and ref and closed_here and not part:
            used[0] = True
            return {"$ref": ref}
        return _walk(value, ref, used, part, parts=parts) if isinstance(value, dict) else value

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA or key in _HANDS_OFF:
            out[key] = value
        elif key in ("$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _walk(s, ref, used, f"#/{key}/{name}" in parts, parts=parts) if isinstance(s, dict)
                        else s for name, s in value.items()}
        elif key in _MAPS and isinstance(value, dict):
            out[key] = {name: sub(s) if isinstance(s, dict) or s is True else s for name, s in value.items()}
        elif key in _LISTS and isinstance(value, list):
            part = key == "allOf" or (key in ("anyOf", "oneOf") and shares)
            out[key] = [sub(s, part) for s in value]
        elif key in _ONE and (isinstance(value, dict) or value is True):
            out[key] = sub(value)
        else:
            out[key] = value
    if "const" in node or "enum" in node:
        if isinstance(node.get("enum"), list):  # the grammar offers only the interoperable values
            out["enum"] = [v for v in node["enum"] if not number_problem_in(v)] or node["enum"]
        return out
    types = _types(node)
    if _may_be_number(node) and "$ref" not in node:
        _bound_numbers(node, out, types)
    if ref and closed_here:
        if (types is None or "array" in types) and "items" not in node and "prefixItems" not in node:
            used[0] = True
            out["items"] = {"$ref": ref}
        elif isinstance(node.get("items"), list) and "additionalItems" not in node:
            used[0] = True
            out["additionalItems"] = {"$ref": ref}
        if (types is None or "object" in types) and not any(
                k in node for k in ("additionalProperties", "patternProperties", "unevaluatedProperties")):
            used[0] = True
            out["additionalProperties"] = {"$ref": ref}
    return out


def _bound_numbers(node: dict, out: dict, types: set[str] | None) -> None:
    """Write the interoperable range and step into ``out`` (the rebuilt ``node``)."""
    lo, _ = _bound(node, "minimum", "exclusiveMinimum", True)
    hi, _ = _bound(node, "maximum", "exclusiveMaximum", False)
    if lo is None or lo < -MAX_SAFE_INTEGER:
        out["minimum"] = -MAX_SAFE_INTEGER
    if hi is None or hi > MAX_SAFE_INTEGER:
        out["maximum"] = MAX_SAFE_INTEGER
    step = _step(node)
    if types is not None and "number" not in types or step is None:
        return  # integers: the range alone bounds their digits
    coefficient = step
    while coefficient.denominator != 1 and coefficient.numerator <= _U32:
        coefficient *= 10
    if coefficient.denominator == 1 and coefficient <= _U32 and step != _number(node.get("multipleOf")):
        out["multipleOf"] = float(step)  # a terminating decimal llguidance can hold


# ---- the output ----------------------------------------------------------------------------------

def _text_problem(text: str) -> str | None:
    """Why one number, as written, is not interoperable (None if it is)."""
    if len(text) > 64:
        return f"a number of {len(text)} characters ({text[:20]}...)"
    try:
        value = Decimal(text)
    except InvalidOperation:
        return f"the number {text}"
    if not value.is_finite() or abs(value) > MAX_SAFE_INTEGER:
        return f"the number {text}, beyond ±{MAX_SAFE_INTEGER}"
    if value != value.quantize(Decimal(1).scaleb(-DECIMALS), rounding="ROUND_DOWN"):
        return f"the number {text}, with more than {DECIMALS} decimals"
    return None


def number_problem(text: str) -> str | None:
    """Why the JSON ``text``'s numbers are not all interoperable (None if they are, or if it is not JSON)."""
    found: list[str] = []

    def check(s: str) -> Any:
        if not found and (why := _text_problem(s)):
            found.append(why)
        return 0

    try:
        json.loads(text, parse_int=check, parse_float=check, parse_constant=check)
    except (ValueError, RecursionError):
        return None  # not JSON: the validator says so
    return found[0] if found else None


def number_problem_in(value: Any) -> str | None:
    """``number_problem`` for a value already parsed (a schema's const or enum value)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        if isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                return f"the number {v}"
            if isinstance(v, int) and abs(v) > MAX_SAFE_INTEGER:
                return f"the integer {v if v.bit_length() < 200 else '(%d bits)' % v.bit_length()}, beyond ±{MAX_SAFE_INTEGER}"
            if isinstance(v, float) and (why := _text_problem(repr(v))) is not None:
                return why
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None
