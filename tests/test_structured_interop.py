"""Structured JSON that every client carries intact (issue 25), as users reach it.

- Data with file-like members (``path``, ``url``, ``meta``...) and extreme (still interoperable)
  numbers round-trips exactly through ``gradio_client`` with its default settings (which download
  anything shaped like a file), raw HTTP to Gradio's API, the OpenAI route and MCP. A ``const``
  schema makes the engine write exactly the generated object, so what comes back can be compared
  with it; the fake backend stands in for the model (the grammar forces every token).
- Free-number schemas on the free tier's real TensorFlow model (random weights: the hardest case)
  give valid data whose numbers every JSON reader agrees on, on every seed.
- A schema whose bounds demand numbers beyond that is refused with its reason, on every surface.
"""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import jsonschema
import openai
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import launch_app
from slm_app.structured.numbers import MAX_SAFE_INTEGER
from slm_app.settings import Settings

FILE_KEYS = ["path", "url", "meta", "orig_name", "mime_type", "is_stream", "size"]
FILE_VALUES = ["/etc/passwd", "app.py", "http://127.0.0.1:1/x", "https://example.com/a.png", "file.txt", ""]
# Interoperable extremes: the largest safe integers and 6-decimal fractions.
_numbers = (st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
            | st.sampled_from([MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 0, -1, 2**53 - 2, 0.000001, -0.000001, 123456.654321])
            | st.decimals(min_value=-10**9, max_value=10**9, places=6, allow_nan=False, allow_infinity=False).map(
                lambda d: float(d) if d != d.to_integral_value() else int(d)))
_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8)
_scalars = st.none() | st.booleans() | _numbers | st.sampled_from(FILE_VALUES) | _text
_file_meta = st.just({"_type": "gradio.FileData"})


def _objects() -> st.SearchStrategy:
    leaf = _scalars | _file_meta
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(FILE_KEYS) | _text, inner, max_size=4), max_leaves=10).filter(
        lambda v: isinstance(v, (dict, list)))


FILE_LIKE = [  # the examples: objects any Gradio client would take for files
    {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}, "url": "/gradio_api/file=/etc/passwd", "size": 1},
    [{"path": "app.py", "orig_name": "app.py"}, {"path": "README.md", "orig_name": "r", "is_stream": True}],
    {"deep": [{"x": {"path": "http://127.0.0.1:9/secret", "meta": {"_type": "gradio.FileData"}, "is_stream": True,
                     "url": "http://127.0.0.1:9/secret", "mime_type": "text/plain"}}], "n": MAX_SAFE_INTEGER},
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    settings = Settings(tier="free", backend="fake", cache_dir=str(tmp_path_factory.mktemp("cache")),
                        max_structured_tokens=512)
    with launch_app(settings) as server:
        yield server


@pytest.fixture(scope="module")
def gradio(app) -> Client:
    return Client(app.url, verbose=False)  # defaults: download_files on


@pytest.fixture(scope="module")
def http(app):
    with httpx.Client(base_url=app.url, timeout=120) as c:
        yield c


def _const(value) -> str:
    return json.dumps({"const": value})


def _structured(gradio: Client, value) -> dict:
    out = gradio.predict("Repeat it", _const(value), 512, 0.7, 1, api_name="/structured")
    assert isinstance(out, str), out  # JSON text: nothing in it is read as a file
    return json.loads(out)


def _gradio_http(http: httpx.Client, api: str, data: list) -> str:
    """Gradio's own HTTP API: POST the call, then read its server-sent events to the end."""
    event = http.post(f"/gradio_api/call/{api}", json={"data": data})
    assert event.status_code == 200, event.text
    stream = http.get(f"/gradio_api/call/{api}/{event.json()['event_id']}")
    lines = stream.text.splitlines()
    kind = next(line for line in reversed(lines) if line.startswith("event:"))
    payload = lines[lines.index(kind) + 1].removeprefix("data:").strip()
    assert kind == "event: complete", stream.text
    return json.loads(payload)[0]


@pytest.mark.parametrize("value", FILE_LIKE, ids=["file-data", "files", "deep"])
def test_file_like_members_come_back_intact_on_every_surface(gradio, http, app, value):
    out = _structured(gradio, value)
    assert out["success"] is True and out["data"] == value and json.loads(out["raw_text"]) == value
    assert json.loads(_gradio_http(http, "structured", ["Repeat it", _const(value), 512, 0.7, 1]))["data"] == value
    # The OpenAI route's response_format, and tool-call arguments (the function-call tab and /v1).
    client = openai.OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Repeat it"}], seed=1,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "v", "schema": {"const": value}}})
    assert json.loads(r.choices[0].message.content) == value
    tool = [{"type": "function", "function": {"name": "store", "parameters": {
        "type": "object", "properties": {"v": {"const": value}}, "required": ["v"]}}}]
    call = gradio.predict("Store it", json.dumps(tool), "store", False, 512, 0.7, 1, api_name="/function_call")
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"v": value}
    # Nothing was taken for a file: the server serves none of these paths.
    for path in ("/etc/passwd", "app.py"):
        assert http.get(f"/gradio_api/file={path}").status_code != 200


def test_file_like_members_through_mcp(app):
    from test_fuzz_gradio import _McpSession  # one MCP client session on a background loop

    session = _McpSession(app.url + "gradio_api/mcp/")
    try:
        for value in FILE_LIKE:
            is_error, text = session.call("structured", {"prompt": "Repeat it", "schema": _const(value),
                                                         "max_new_tokens": 512, "temperature": 0.7, "seed": 1})
            assert not is_error, text
            assert json.loads(text)["data"] == value
    finally:
        session.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_objects())
def test_generated_objects_round_trip_through_gradio_client(gradio, value):
    out = _structured(gradio, value)
    if not out["success"]:  # only a budget refusal is acceptable, and it is an error, not a result
        pytest.fail(out["error"])
    assert out["data"] == value and json.loads(out["raw_text"]) == value


# ---- the free tier's real model: free numbers ------------------------------------------------------

FREE_NUMBERS = [
    {"type": "object", "properties": {"height": {"type": "number"}, "count": {"type": "integer"}},
     "required": ["height", "count"]},
    {"type": "object", "properties": {"path": {"type": "string"}, "meta": {"type": "object"}, "url": {"type": "string"},
                                      "size": {"type": "integer"}}, "required": ["path", "meta", "url", "size"]},
    {"type": "array", "items": {"type": "object", "properties": {"path": {"type": "string"},
                                                                 "orig_name": {"type": "string"}},
                                "required": ["path", "orig_name"]}, "minItems": 1},
    {"type": "object"},  # every member's value free: numbers at any depth
]


def _interoperable(raw: str) -> bool:
    """Every number in the JSON text, as written: an integer within ±(2^53-1), or a finite decimal
    within it with at most 6 decimals (checked here on its own, not with the app's json_numbers)."""
    ok = [True]

    def number(text: str):
        d = Decimal(text)
        ok[0] &= d.is_finite() and abs(d) <= MAX_SAFE_INTEGER and (d == d.to_integral_value() or
                                                                   d.normalize().as_tuple().exponent >= -6)
        return 0

    json.loads(raw, parse_int=number, parse_float=number)
    return ok[0]


@pytest.fixture(scope="module")
def free_client(free_app) -> Client:
    return Client(free_app.url, verbose=False)


@pytest.mark.parametrize("schema", FREE_NUMBERS, ids=["height-count", "file-data", "files", "any-object"])
def test_free_numbers_on_the_free_tier_are_valid_and_interoperable_on_every_seed(free_client, schema):
    for seed in range(8):
        out = json.loads(free_client.predict("Describe it.", json.dumps(schema), 96, 1.0, seed,
                                             api_name="/structured"))
        assert out["success"] is True, (seed, out["error"], out["raw_text"])
        jsonschema.validate(out["data"], schema)
        assert _interoperable(out["raw_text"]), (seed, out["raw_text"])
        assert json.loads(out["raw_text"]) == out["data"]


# ---- refusals ---------------------------------------------------------------------------------------

DEMANDING = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 2**63}}, "required": ["id"]}


def test_a_bounds_demanding_schema_is_refused_with_its_reason(gradio, app):
    with pytest.raises(AppError, match=r"minimum at /properties/id is 9223372036854775808, beyond 9007199254740991"):
        gradio.predict("x", json.dumps(DEMANDING), 64, 0.7, 0, api_name="/structured")
    client = openai.OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match=r"2\^53-1"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "v", "schema": DEMANDING}})
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]\.function\.parameters.*2\^53-1"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": DEMANDING}}])
    fractions = {"type": "number", "exclusiveMinimum": 0, "maximum": 1e-7}
    with pytest.raises(AppError, match=r"multiple of 0\.000001"):
        gradio.predict("x", json.dumps(fractions), 64, 0.7, 0, api_name="/structured")
    # Bounds beyond the range are narrowed, not refused, when some interoperable number remains.
    wide = {"type": "integer", "minimum": -1e300, "maximum": 1e300}
    out = json.loads(gradio.predict("x", json.dumps(wide), 64, 0.7, 0, api_name="/structured"))
    assert out["success"] is True and abs(out["data"]) <= MAX_SAFE_INTEGER
