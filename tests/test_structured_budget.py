"""Budget steering: structured output closes within the token budget whenever an instance fits.

The constraint walks to a shortest completion and narrows the mask as the remaining budget nears
its length; a schema whose smallest instance cannot fit is refused up front with the reason. The
models here are random: uniform choices among the allowed tokens (the harshest driver: it never
closes anything by itself), and the fake backend through the real service and scheduler (under a
JSON constraint its scripted tokens are almost all disallowed, so it samples like a random model).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator

import jsonschema
import llguidance
import numpy as np
import pytest

from slm_app.errors import RequestError
from slm_app.service import GenerationService, ServiceRunner
from slm_app.settings import Settings, TierLimits
from slm_app.structured import JsonSchemaConstraint, SchemaError, compile_schema, parse_schema, validate_output
from slm_app.structured.walk import NEAR, walk_to_completion

ROOMY = TierLimits(max_prompts=1, max_new_tokens=32, max_structured_tokens=1_024, max_prompt_chars=1_000,
                   max_prompt_tokens=256)
SAMPLE = os.path.join(os.path.dirname(__file__), "data", "jsonschemabench-sample")


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[GenerationService]:
    service = GenerationService(Settings(tier="free", backend="fake", cache_dir=str(tmp_path_factory.mktemp("c"))))
    service.load()
    assert service.status == "ok", service.load_error
    yield service
    service.close()


@pytest.fixture(scope="module")
def tok(service) -> llguidance.LLTokenizer:
    return service.ready().capabilities.logits.llguidance_tokenizer()


def obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


FREE_TEXT = {"type": "string"}
# Required members with minimal values, plus optional members a random model loves to open:
# free strings (bounded only by the budget), arrays of objects, nested optional objects.
SCHEMAS: dict[str, dict[str, Any]] = {
    "required ints + optional text": obj({f"f{i}": {"type": "integer"} for i in range(6)} | {
        "note": FREE_TEXT, "tags": {"type": "array", "items": FREE_TEXT}}, required=[f"f{i}" for i in range(6)]),
    "minItems of objects": {"type": "array", "minItems": 4, "items": obj(
        {"id": {"type": "integer"}, "name": FREE_TEXT, "extra": {"type": "array", "items": {"type": "number"}}},
        required=["id", "name"])},
    "long minimum strings": obj({"title": {"type": "string", "minLength": 12}, "body": FREE_TEXT,
                                 "meta": obj({"a": FREE_TEXT, "b": {"type": "boolean"}}, required=["b"])}),
    "anyOf branches": {"anyOf": [obj({"kind": {"const": "a"}, "v": {"type": "array", "items": FREE_TEXT}}),
                                 obj({"kind": {"const": "b"}, "w": obj({"x": FREE_TEXT, "y": FREE_TEXT})})]},
    "open map": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}},
                 "minProperties": 2},
}


def uniform_drive(constraint: JsonSchemaConstraint, budget: int, rng: np.random.Generator) -> list[int]:
    """Uniform choices among the allowed tokens, with the budget counting down as the scheduler does."""
    tokens: list[int] = []
    eos = constraint.compiled.tokenizer.eos_token
    while not constraint.is_finished() and len(tokens) < budget:
        allowed = np.flatnonzero(constraint.allowed_tokens(budget - len(tokens)))
        assert allowed.size, f"no token allowed after {tokens}"
        token = int(rng.choice(allowed))
        constraint.consume(token)
        if token == eos:
            break
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_uniform_random_choices_close_even_when_the_budget_is_nearly_the_minimum(name, tok) -> None:
    schema = parse_schema(json.dumps(SCHEMAS[name]), ROOMY)
    closed = 0
    for slack in (0, 1, 3, 10, 40):
        # The smallest instance is measured on the grammar for this very budget (strings are
        # bounded by it), so compile once to learn it, then for the budget that leaves `slack`.
        need = compile_schema(schema, tok, budget=96).min_tokens
        assert need is not None
        budget = need + slack
        compiled = compile_schema(schema, tok, budget=budget)
        assert compiled.min_tokens == need
        data, error = validate_output(compiled.min_instance, schema)
        assert error is None, (compiled.min_instance, error)
        for seed in range(6):
            c = JsonSchemaConstraint(compiled, tok.vocab_size)
            tokens = uniform_drive(c, budget, np.random.default_rng(seed))
            text = tok.decode_str(tokens)
            assert c.error is None
            assert c.is_accepting(), f"budget {budget} (minimum {need}): not closed: {text!r}"
            assert len(tokens) <= budget
            assert validate_output(text, schema)[1] is None or "duplicate key" in validate_output(text, schema)[1]
            if slack >= 10:
                assert c.steered <= len(tokens)  # narrowed only on the way to the end
            closed += 1
    assert closed == 30


def test_steering_leaves_the_model_free_far_from_the_end(tok) -> None:
    schema = parse_schema(json.dumps(SCHEMAS["required ints + optional text"]), ROOMY)
    compiled = compile_schema(schema, tok, budget=400)
    c = JsonSchemaConstraint(compiled, tok.vocab_size)
    full = JsonSchemaConstraint(compiled, tok.vocab_size)
    # With room to spare the mask is the grammar's own.
    assert np.array_equal(c.allowed_tokens(400), full.allowed_tokens())
    assert c.steered == 0
    # With no room at all only the shortest completion's next token is left.
    tight = JsonSchemaConstraint(compiled, tok.vocab_size)
    mask = tight.allowed_tokens(compiled.min_tokens)
    assert mask.sum() == 1 and np.flatnonzero(mask)[0] == compiled.shortest[0]


def test_walk_reports_how_it_ended(tok) -> None:
    compiled = compile_schema({"type": "array", "items": {"type": "integer"}, "minItems": 50}, tok)
    path, status = walk_to_completion(compiled.new_matcher(), tok, limit=20)
    assert status == "long" and len(path) >= 20
    path, status = walk_to_completion(compiled.new_matcher(), tok, limit=500)
    assert status == "complete" and len(json.loads(tok.decode_str(path))) == 50


@pytest.mark.parametrize("schema, smallest", [
    # Required members only, whatever optional ones come first (the walk used to open "award_value").
    (obj({"award_value": {"type": "integer"}, "awarding_name": FREE_TEXT, "brief_id": {"type": "integer"},
          "id": {"type": "integer"}, "result": FREE_TEXT}, required=["id", "result"]), {"id": 1, "result": ""}),
    # Nothing required: the empty object, not its first optional member.
    (obj({"apiVersion": FREE_TEXT, "kind": {"enum": ["HorizontalPodAutoscaler"]}}, required=[]), {}),
], ids=["required members only", "nothing required"])
def test_the_smallest_instance_has_only_what_the_schema_requires(tok, schema, smallest) -> None:
    compiled = compile_schema(parse_schema(json.dumps(schema), ROOMY), tok, budget=96)
    assert json.loads(compiled.min_instance) == smallest


@pytest.mark.parametrize("string, extra", [
    ({"type": "string", "minLength": 40}, 4),
    # The pattern's own example ("a@a.___") is too short: its first "+" is repeated to the minimum.
    ({"type": "string", "minLength": 10, "pattern": ".+[@].+[.]___"}, 8),
    ({"type": "string", "minLength": 1, "maxLength": 30}, 2),  # "-", not the date hint beside it
], ids=["minLength 40", "pattern and minLength", "minLength 1"])
def test_strings_of_a_minimum_length_take_few_tokens(tok, string, extra) -> None:
    """A filler the tokenizer merges ("-" * 40 is 3 GPT-2 tokens), not one token per character:
    the free tier's 96 tokens then hold schemas whose every string has a minimum length."""
    schema = obj({"a": string, "b": {"type": "string", "format": "date"}})  # a date hint beside it
    compiled = compile_schema(parse_schema(json.dumps(schema), ROOMY), tok, budget=96)
    assert validate_output(compiled.min_instance, schema)[1] is None, compiled.min_instance
    assert compiled.min_tokens <= len(tok.tokenize_str('{"a":"","b":"2000-01-01"}')) + extra, compiled.min_instance


def test_a_schema_that_cannot_fit_is_refused_with_its_reason(service) -> None:
    schema = obj({f"field_{i}": {"type": "integer"} for i in range(12)})
    with pytest.raises(RequestError) as err:
        service.structured("A record", json.dumps(schema), max_new_tokens=20)
    assert err.value.status == 400 and err.value.param == "schema"
    message = err.value.message
    assert "the smallest JSON this schema allows takes" in message and "more than the budget of 20" in message
    assert '{"field_0":1,"field_1":1' in message  # shows the smallest instance it measured
    need = int(message.split("takes ")[1].split(" ")[0])
    assert 20 < need <= 96 and f"raise max_new_tokens to at least {need}" in message
    # And at that budget it is accepted and closes.
    result = service.structured("A record", json.dumps(schema), max_new_tokens=need, temperature=0.9, seed=1)
    assert result["success"], result

    too_big = obj({f"field_{i}": {"type": "integer"} for i in range(60)})
    with pytest.raises(RequestError, match="more than 96 tokens .*simplify the schema"):
        service.structured("A record", json.dumps(too_big), max_new_tokens=96)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_model_through_the_service_closes_at_a_tight_budget(name, service, tok) -> None:
    need = compile_schema(parse_schema(json.dumps(SCHEMAS[name]), ROOMY), tok, budget=96).min_tokens
    for seed in range(3):
        result = service.structured("Fill it in", json.dumps(SCHEMAS[name]), max_new_tokens=need + 2,
                                    temperature=1.0, seed=seed)
        assert result["success"], result
        assert result["tokens"] <= need + 2  # one attempt was enough


def independent_valid(raw: str, schema: dict) -> bool:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(json.loads(raw))


def test_random_model_closes_the_shared_schema_sample(service) -> None:
    """The free tier's 96 tokens on a random model: the engine, not the model, makes the JSON close."""
    outcomes: dict[str, list[str]] = {"valid": [], "refused": [], "failed": []}
    for path in sorted(glob.glob(os.path.join(SAMPLE, "*", "*.json"))):
        name = os.path.relpath(path, SAMPLE)
        schema = json.load(open(path))["schema"]
        try:
            result = service.structured("Write one example", json.dumps(schema), max_new_tokens=96,
                                        temperature=0.7, seed=0)
        except RequestError as exc:
            assert exc.param == "schema" and exc.message.startswith("schema: ")
            outcomes["refused"].append(f"{name}: {exc.message[:90]}")
            continue
        if result["success"]:
            assert independent_valid(result["raw_text"], schema), name  # never reported valid when it is not
            outcomes["valid"].append(name)
        else:
            outcomes["failed"].append(f"{name}: {result['error'][:90]}")
    fitting = len(outcomes["valid"]) + len(outcomes["failed"])
    print(json.dumps({k: len(v) for k, v in outcomes.items()}), outcomes["refused"], outcomes["failed"])
    assert len(outcomes["valid"]) + len(outcomes["refused"]) + len(outcomes["failed"]) == 40
    assert len(outcomes["valid"]) >= 0.9 * fitting and len(outcomes["valid"]) >= 0.8 * 40


@pytest.mark.parametrize("schema", [
    {"type": "object", "additionalProperties": {"type": "integer"}},  # free-form keys
    {"type": "object", "patternProperties": {"^t": {"type": "integer"}}},  # keys by pattern (OCDS schemas)
], ids=["free keys", "pattern keys"])
def test_a_key_is_never_repeated(tok, schema) -> None:
    """llguidance lets an open object repeat a key; the output would be rejected after a whole attempt
    (found on the real Gemma with a schema of this shape). The mask takes such tokens away."""
    compiled = compile_schema(schema, tok)
    constraint = JsonSchemaConstraint(compiled, tok.vocab_size)
    written = '{"title":1,'
    for t in tok.tokenize_str(written):
        assert constraint.allowed_tokens()[t]
        constraint.consume(t)
    allowed = constraint.allowed_tokens()
    # Opening the key again is fine (it may become "titles"); closing it as "title" is not.
    for t in tok.tokenize_str('"title'):
        assert allowed[t]
        constraint.consume(t)
        allowed = constraint.allowed_tokens()
    quote = tok.tokenize_str('"')[0]
    bare = compiled.new_matcher()
    assert bare.consume_tokens(tok.tokenize_str('{"title":1,"title')) and bare.validate_tokens([quote]) == 1
    assert not allowed[quote]  # llguidance alone allows it (above); the constraint does not
    closing = [t for t in np.flatnonzero(allowed).tolist() if b'"' in tok.decode_bytes([t])]
    assert closing  # other keys can still be closed: "titles", "title2"...
    assert all(tok.decode_bytes([t]).split(b'"')[0] != b"" for t in closing)
    # Driving the constraint with uniform random choices never yields a repeated key.
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = JsonSchemaConstraint(compiled, tok.vocab_size)
        out = []
        for _ in range(60):
            ids = np.flatnonzero(c.allowed_tokens(60 - len(out)))
            if c.is_finished() or not ids.size:
                break
            t = int(rng.choice(ids))
            c.consume(t)
            out.append(t)
        text = tok.decode_str(out)
        if c.is_accepting():
            validate_output(text.removesuffix(tok.decode_str([tok.eos_token])), schema)



def test_the_answer_closes_where_the_context_ends_first(tmp_path) -> None:
    """A long schema shown in the prompt leaves less of the context than the budget: the engine steers
    to the context's end, not to a budget the sequence cannot reach (found on the pro tier's 1,024
    tokens with a 1,024-token context: JSON cut off at ~1,000 tokens)."""
    service = GenerationService(Settings(tier="pro", backend="fake", cache_dir=str(tmp_path)))
    service.load()
    try:
        runner = ServiceRunner(service)
        assert runner.max_sequence_tokens == 1_024 == service.limits.max_structured_tokens
        schema = {"type": "object", "description": "a long description " * 120,
                  "properties": {"items": {"type": "array", "items": {"type": "string"}},
                                 "n": {"type": "integer"}}, "required": ["items", "n"]}
        assert runner.count_tokens(json.dumps(schema)) > 400
        for seed in range(3):
            result = service.structured("Fill it in", json.dumps(schema), max_new_tokens=1_024, temperature=1.0,
                                        seed=seed)
            assert result["success"], result
    finally:
        service.close()
