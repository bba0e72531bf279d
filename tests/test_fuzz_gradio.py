"""Hypothesis-driven fuzzing of the Gradio endpoints (through ``gradio_client``, and as raw calls to
Gradio's HTTP API for what ``gradio_client`` cannot send: lone surrogates, NaN) and of the MCP tools.

For every generated input: an answer, or a refusal with a clear message (a ``gr.Error`` from the
service's checks, which name the field), never a crash or a hang; the same input gives the same kind
of outcome twice; the app is healthy at the end. Runs on the fake backend (the model is not under test).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import launch_app
from slm_app.settings import Settings

EXAMPLES = 30  # per endpoint and way in
TIMEOUT_S = 60
OUTCOMES: collections.Counter[tuple[str, str]] = collections.Counter()

# What a client can put in any slot: text (printable or not), numbers, null, booleans, lists, objects.
_text = st.text(max_size=30) | st.sampled_from(["", " ", "Hi", "a\x00b", "🙂", "-1", "1e9", "{", "{}",
                                                '{"type": "object"}', '{"type": "string", "pattern": "(a+)+$"}'])
_number = st.integers(min_value=-(2**40), max_value=2**40) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.sampled_from([0, 1, -1, 0.5, 2**32])
_any = st.none() | st.booleans() | _number | _text | st.lists(_text, max_size=2) | st.dictionaries(_text, _text, max_size=2)
_slot = {"text": _text | _any, "number": _number | _any, "bool": st.booleans() | _any}

ENDPOINTS = {  # the api_name's inputs, by kind, in order
    "/generate": ["text", "number", "number", "number", "number", "number", "text", "bool", "number"],
    "/batch": ["text", "number", "number"],
    "/structured": ["text", "text", "number", "number", "number"],
    "/function_call": ["text", "text", "text", "bool", "number", "number", "number"],
}


VALID = {  # a request that is served, to mutate: fuzzing near valid inputs reaches generation too
    "/generate": ["Once upon a time", 8, 0.7, 0.95, 1, 0, "", True, 1.0],
    "/batch": ["One prompt", 8, 0.7],
    "/structured": ["A person", '{"type": "object", "properties": {"name": {"type": "string"}}}', 24, 0.7, 1],
    "/function_call": ["Weather in Paris?", '[{"type": "function", "function": {"name": "get_weather", "parameters": '
                       '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]',
                       "required", True, 48, 0.7, 1],
}


def _inputs(kinds: list[str], valid: list | None = None) -> st.SearchStrategy[list]:
    """Anything in every slot, or a valid request with one or two slots replaced."""
    anything = st.tuples(*[_slot[k] for k in kinds]).map(list)
    if valid is None:
        return anything
    changes = st.lists(st.integers(0, len(kinds) - 1).flatmap(lambda i: st.tuples(st.just(i), _slot[kinds[i]])),
                       max_size=2)

    def mutate(edits: list[tuple[int, object]]) -> list:
        args = list(valid)
        for i, value in edits:
            args[i] = value
        return args

    return anything | changes.map(mutate)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with launch_app(Settings(tier="free", backend="fake", request_timeout_s=20,
                             cache_dir=str(tmp_path_factory.mktemp("cache")))) as server:
        yield server


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def _outcome(client: Client, api_name: str, args: list) -> str:
    try:
        job = client.submit(*args, api_name=api_name)
        job.result(timeout=TIMEOUT_S)
        return "ok"
    except AppError as exc:
        message = str(exc)
        # A refusal says what was wrong: the service's message, not Gradio's bare "Error".
        assert message and message != "Error" and "Traceback" not in message, (api_name, args, message)
        return "refused: " + message.split(",")[0][:60]


@pytest.mark.parametrize("api_name", list(ENDPOINTS))
def test_gradio_client_inputs_get_an_answer_or_a_clear_error(client, api_name):
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(args=_inputs(ENDPOINTS[api_name], VALID[api_name]))
    def run(args: list) -> None:
        first = _outcome(client, api_name, args)
        OUTCOMES[(f"gradio_client {api_name}", first.split(":")[0])] += 1
        second = _outcome(client, api_name, args)
        assert first.split(":")[0] == second.split(":")[0], (args, first, second)

    run()


# ---- raw calls: what gradio_client cannot encode ----------------------------------------------------

_hostile = st.sampled_from(["\ud800", "x\udfffy", "\x00", float("nan"), float("inf"), -float("inf"), 1e308 * 10])


def _raw_call(http: httpx.Client, api_name: str, args: list) -> str:
    body = json.dumps({"data": args}, allow_nan=True).encode()
    r = http.post(f"gradio_api/call{api_name}", content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text[:300]
    if r.status_code != 200:
        return f"http {r.status_code}"
    event_id = r.json()["event_id"]
    with http.stream("GET", f"gradio_api/call{api_name}/{event_id}") as stream:
        assert stream.status_code == 200
        events = stream.read().decode()
    last_event = [line for line in events.splitlines() if line.startswith("event: ")][-1]
    if last_event == "event: error":
        data = json.loads(events.rsplit("data: ", 1)[1])
        assert data and data.get("error"), (api_name, args, events[-300:])
        return "refused"
    assert last_event == "event: complete", events[-300:]
    return "ok"


@pytest.mark.parametrize("api_name", list(ENDPOINTS))
def test_raw_gradio_calls_with_hostile_values_are_refused_clearly(app, api_name):
    kinds = ENDPOINTS[api_name]
    with httpx.Client(base_url=app.url, timeout=TIMEOUT_S) as http:
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(args=_inputs(kinds, VALID[api_name]), where=st.integers(0, len(kinds) - 1), value=_hostile)
        def run(args: list, where: int, value) -> None:
            args[where] = value
            first = _raw_call(http, api_name, args)
            OUTCOMES[(f"gradio raw {api_name}", first)] += 1
            assert first == _raw_call(http, api_name, args)

        run()


# ---- MCP ---------------------------------------------------------------------------------------------

class _McpSession:
    """One MCP client session on a background event loop, callable from Hypothesis' synchronous tests."""

    def __init__(self, url: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ready = asyncio.run_coroutine_threadsafe(self._open(url), self.loop)
        self.ready.result(60)

    async def _open(self, url: str) -> None:
        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client

        self._closed = asyncio.Event()
        opened = asyncio.Event()

        async def hold() -> None:
            async with streamable_http_client(url) as (read, write, _):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    self.session = session
                    opened.set()
                    await self._closed.wait()

        self._task = asyncio.create_task(hold())
        await asyncio.wait_for(opened.wait(), 60)

    def call(self, tool: str, arguments: dict) -> tuple[bool, str]:
        result = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self.session.call_tool(tool, arguments), TIMEOUT_S), self.loop).result(TIMEOUT_S + 5)
        text = " ".join(getattr(c, "text", "") for c in result.content)
        return bool(result.isError), text

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._closed.set)
        try:
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(self._task, 10), self.loop).result(15)
        except Exception:  # noqa: BLE001 - the server may already have gone
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def mcp(app):
    session = _McpSession(app.url + "gradio_api/mcp/")
    yield session
    session.close()


MCP_TOOLS = {
    "generate": {"prompt": _slot["text"], "max_new_tokens": _slot["number"], "temperature": _slot["number"],
                 "top_p": _slot["number"], "seed": _slot["number"]},
    "batch": {"prompts": _slot["text"], "max_new_tokens": _slot["number"], "temperature": _slot["number"]},
    "structured": {"prompt": _slot["text"], "schema": _slot["text"], "max_new_tokens": _slot["number"],
                   "temperature": _slot["number"], "seed": _slot["number"]},
}


@pytest.mark.parametrize("tool", list(MCP_TOOLS))
def test_mcp_tool_inputs_get_a_result_or_a_clear_error(mcp, tool):
    valid = dict(zip(MCP_TOOLS[tool], VALID["/" + tool]))
    fuzzed = st.fixed_dictionaries({}, optional=MCP_TOOLS[tool])

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(arguments=fuzzed | fuzzed.map(lambda some: {**valid, **dict(list(some.items())[:2])}))
    def run(arguments: dict) -> None:
        is_error, text = mcp.call(tool, arguments)
        assert text, (tool, arguments)
        OUTCOMES[(f"mcp {tool}", "error" if is_error else "ok")] += 1
        assert mcp.call(tool, arguments)[0] == is_error

    run()


def test_the_app_is_healthy_after_the_fuzzing(app, client):
    total = sum(OUTCOMES.values())
    print(f"\nGradio/MCP fuzz: {total} generated inputs (each sent twice)")
    for (where, outcome), n in sorted(OUTCOMES.items()):
        print(f"  {where:<32} {outcome:<10} {n}")
    assert total >= 200
    health = httpx.get(app.url + "health").json()
    assert health["status"] == "ok" and health["slots"]["running"] == 0
    assert client.predict("Still here?", 4, 0.0, api_name="/batch")["results"][0]
