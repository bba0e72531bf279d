"""Structured output: an untrusted JSON Schema in, schema-valid JSON out, on every engine.

The pipeline, each step a module usable on its own:

- ``intake``: checks on the user's schema text (``parse_schema``; ``SchemaError`` says why not).
- ``compile``: an llguidance grammar for a tokenizer, strict first, relaxed if it must be.
- ``walk``: the greedy walk to a shortest completion (does a schema fit a budget? how to close in time?).
- ``constraint``: ``JsonSchemaConstraint``, the per-token mask a local engine's decode loop applies,
  and ``TokenConstraintPlan``, how a local engine honours a schema.
- ``validation``: jsonschema with the schema's own draft and format checks; the only judge of success.
- ``generation``: the one structured path for every engine: prompt, attempts, retries, the typed result.

Nothing here fetches anything: remote ``$ref`` is refused at intake and the validator's registry
refuses to retrieve, so even a schema that skipped intake cannot reach the network.
"""

from slm_app.structured.compile import CompiledSchema, compile_schema
from slm_app.structured.constraint import JsonSchemaConstraint, TokenConstraintPlan, check_fits
from slm_app.structured.generation import (
    Outcome, SchemaPlan, StructuredOutputError, StructuredResult, StructuredRunner, Verdict, build_prompt,
    generate_model, generate_structured,
)
from slm_app.structured.intake import SchemaError, parse_schema
from slm_app.structured.validation import validate_output
from slm_app.structured.walk import shortest_completion

__all__ = [
    "CompiledSchema", "JsonSchemaConstraint", "Outcome", "SchemaError", "SchemaPlan", "StructuredOutputError",
    "StructuredResult", "StructuredRunner", "TokenConstraintPlan", "Verdict", "build_prompt", "check_fits",
    "compile_schema", "generate_model", "generate_structured", "parse_schema", "shortest_completion",
    "validate_output",
]
