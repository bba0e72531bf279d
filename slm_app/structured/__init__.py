"""Structured output: an untrusted JSON Schema in, schema-valid JSON out, on every engine."""

from slm_app.structured.constraint import *  # noqa: F401,F403
from slm_app.structured.constraint import __all__  # noqa: F401
