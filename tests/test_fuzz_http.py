"""Property-based fuzzing of the HTTP API (REST and OpenAI routes) from the app's own /openapi.json.

Schemathesis generates requests from the schema the app publishes, both valid ones and ones that break
it (wrong types, missing fields, out-of-range values), and checks each answer against that schema: a
documented status, a body of the documented shape. Hypothesis then sends raw JSON bodies that the
schema cannot express but clients can send: lone surrogates, NUL characters, NaN/Infinity, numbers
beyond a float, deep nesting. Every request is sent twice. What must hold for every input: no 5xx,
an answer within the client's timeout, the same status both times; and the app healthy at the end.

Runs on the fake backend (the model is not under test here), so hundreds of requests take seconds.
"""

from __future__ import annotations

import collections
import json

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from conftest import launch_app
from slm_app.settings import Settings

SCHEMA_EXAMPLES = 40  # per operation and generation mode
RAW_EXAMPLES = 60  # per POST route
TIMEOUT_S = 30  # "no hang": every answer within this

MODEL = "fake-gpt2-script"  # the fake backend's model id
STATUSES: collections.Counter[tuple[str, int]] = collections.Counter()


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    # Short answers, a bounded wait: the fuzzer is after the HTTP layer, not long generations.
    settings_ = Settings(tier="free", backend="fake", max_prompts=2, request_timeout_s=20,
                         cache_dir=str(tmp_path_factory.mktemp("cache")))
    with launch_app(settings_) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    schema = schemathesis.openapi.from_url(fuzz_app.url + "openapi.json")
    schema.config.update(base_url=fuzz_app.url.rstrip("/"))
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE],
                                    max_examples=SCHEMA_EXAMPLES, deterministic=False)
    return schema


def _served_model(case_and_flag):
    """Half the OpenAI bodies name the served model, so generation itself is reached, not only the 404."""
    case, use_served = case_and_flag
    if use_served and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL
    return case


def _operations(api_schema):
    return [result.ok() for result in api_schema.get_all_operations()]


# Schemathesis' own pytest integration (from_fixture) does not run on pytest 9.2 yet (it reads a node
# attribute pytest removed), so each operation's strategy drives a plain Hypothesis test instead.
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_schema_generated_requests_never_get_a_5xx(api_schema, mode):
    operations = _operations(api_schema)
    assert {op.label for op in operations} >= {"POST /generate", "GET /health", "GET /metrics", "GET /v1/models",
                                               "POST /v1/completions", "POST /v1/chat/completions"}
    for operation in operations:
        @settings(max_examples=SCHEMA_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=st.tuples(operation.as_strategy(generation_mode=mode), st.booleans()).map(_served_model))
        def run(case) -> None:
            first = case.call(timeout=TIMEOUT_S)
            STATUSES[(operation.label, first.status_code)] += 1
            assert first.status_code < 500, f"{operation.label} -> {first.status_code}: {first.text[:300]}"
            # Every answer is one the schema documents, with the documented body. Not checked: that
            # schema-valid data is accepted; the tier's limits (tokens, prompt length in tokens) and
            # meaning (a blank prompt, an unknown model) are decided at run time, beyond a schema.
            case.validate_response(first, excluded_checks=[positive_data_acceptance])
            again = case.call(timeout=TIMEOUT_S)
            assert again.status_code == first.status_code, (first.text[:200], again.text[:200])

        try:
            run()
        except Unsatisfiable:
            # Nothing the schema can make invalid: no body, no parameters or only string path ids (GET
            # /health, /metrics, /v1/models/{id}; POST /v1/fine_tuning/rollback, .../{id}/cancel); POST
            # /v1/files is a multipart upload the route reads itself (tests/test_finetune_pro.py sends it
            # bad files).
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
            assert operation.method.upper() == "GET" or not operation.get_request_payload_content_types(), \
                operation.label


# ---- raw bodies beyond what the schema can say ----------------------------------------------------

# Text as JSON can carry it: any code point, lone surrogates and NUL included (json.dumps escapes them).
_text = st.text(alphabet=st.characters(codec=None, categories=None), max_size=40) | st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "ok\x00", "Hi", "", " ", "\u2028", "🙂"])
_number = st.integers(min_value=-(10**30), max_value=10**30) | st.floats(allow_nan=True, allow_infinity=True) \
    | st.sampled_from([0, 1, -1, 2**32, 1e308])
_scalar = st.none() | st.booleans() | _number | _text
_json = st.recursive(_scalar, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_text, kids, max_size=4),
                     max_leaves=12)

_rest_body = st.fixed_dictionaries({}, optional={"prompts": _json | _text | st.lists(_text, max_size=3),
                                                 "max_tokens": _json | _number, "temperature": _json | _number})
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool"]) | _text,
                                  "content": _text | _json})
_chat_body = st.fixed_dictionaries(
    {"model": st.just(MODEL) | _text},
    optional={"messages": st.lists(_message, max_size=3) | _json, "max_tokens": _number | _json,
              "temperature": _number, "top_p": _number, "seed": _number, "stop": _text | st.lists(_text, max_size=5),
              "n": _number, "stream": st.booleans() | _json,
              "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"},
                                                  {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}])
              | _json})
_completion_body = st.fixed_dictionaries(
    {"model": st.just(MODEL) | _text},
    optional={"prompt": _text | st.lists(_text, max_size=3) | _json, "max_tokens": _number, "stop": _text | _json,
              "stream": st.booleans(), "seed": _number | _json})

# Every few bodies are not JSON documents at all, or JSON with a syntax slip.
_raw = st.binary(max_size=64) | st.sampled_from([b"", b"{", b"[1,]", b'{"prompts": "\xff\xfe"}', b"\x00" * 8,
                                                b'{"prompts": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                                b'{"max_tokens": ' + b"9" * 5000 + b"}"])


def _encode(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN / Infinity as Python writes them


def _send(client: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return client.post(path, content=content, headers={"content-type": "application/json"}, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def http(fuzz_app):
    with httpx.Client(base_url=fuzz_app.url) as client:
        yield client


@pytest.mark.parametrize("path, bodies", [
    ("/generate", _rest_body.map(_encode) | _raw),
    ("/v1/chat/completions", _chat_body.map(_encode) | _raw),
    ("/v1/completions", _completion_body.map(_encode) | _raw),
])
def test_raw_json_bodies_never_get_a_5xx(http, path, bodies):
    @settings(max_examples=RAW_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(content=bodies)
    def run(content: bytes) -> None:
        first = _send(http, path, content)
        STATUSES[(f"POST {path} (raw)", first.status_code)] += 1
        assert first.status_code < 500, (content[:200], first.text[:300])
        if first.status_code >= 400:  # an error says what was wrong, in the route's JSON shape
            body = first.json()
            message = body["error"]["message"] if path.startswith("/v1") else body["error"]
            assert message
        assert _send(http, path, content).status_code == first.status_code

    run()


def test_the_app_is_healthy_after_the_fuzzing(http, fuzz_app):
    total = sum(STATUSES.values())
    by_status = collections.Counter()
    for (_, status), n in STATUSES.items():
        by_status[status] += n
    print(f"\nHTTP fuzz: {total} generated inputs (each sent twice); statuses {dict(sorted(by_status.items()))}")
    for (label, status), n in sorted(STATUSES.items()):
        print(f"  {label:<40} {status}: {n}")
    assert total >= 400
    assert not any(status >= 500 for status in by_status)
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["slots"]["running"] == 0
    r = http.post("/generate", json={"prompts": "Still here?", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["results"][0]
