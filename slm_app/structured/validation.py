"""Validation: the only judge of success. jsonschema with the schema's own draft and format checks;
the grammar may be relaxed, the validator never is. Its registry refuses to retrieve anything.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import jsonschema
import referencing.exceptions
from jsonschema import FormatChecker
from jsonschema.validators import Draft202012Validator, validator_for
from referencing import Registry

from slm_app.structured import numbers as json_numbers
from slm_app.structured.intake import _refuse_constant

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


