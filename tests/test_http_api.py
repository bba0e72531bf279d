"""The plain HTTP contract (/generate, /health, /metrics), bearer auth and the MCP server, against the
app served on a free port with the free tier's limits on the fake backend (the model does not matter
here: these tests are about the HTTP layer)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import launch_app
from slm_app.server import build_app, serve_in_thread
from slm_app.settings import Settings

KEY = "test-key-123"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with launch_app(Settings(tier="free", backend="fake", cache_dir=str(tmp_path_factory.mktemp("cache")))) as server:
        yield server


@pytest.fixture(scope="module")
def http(app):
    with httpx.Client(base_url=app.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory):
    """A second app with SLM_API_KEY set whose model never loads: auth must answer before 'not ready'."""
    settings = Settings(tier="free", backend="fake", api_key=KEY, cache_dir=str(tmp_path_factory.mktemp("cache2")))
    server = serve_in_thread(build_app(settings, load_model=False))
    yield server
    server.stop()


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """One sample's value from /metrics (0 when the series does not exist yet)."""
    text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# ---- POST /generate -----------------------------------------------------------------------------

@pytest.mark.parametrize("prompts", ["Once upon a time\nthere was", ["Once upon a time"]])
def test_generate_returns_one_result_per_prompt(http, prompts):
    r = http.post("/generate", json={"prompts": prompts, "max_tokens": 8, "temperature": 0.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["results", "finish_reasons"] and len(body["results"]) == 1
    assert isinstance(body["results"][0], str) and body["finish_reasons"][0] in ("stop", "length")


def test_generate_defaults_apply(http):
    r = http.post("/generate", json={"prompts": "Hello"})
    assert r.status_code == 200 and len(r.json()["results"]) == 1


@pytest.mark.parametrize("body, limit", [
    ({"prompts": ["one", "two"], "max_tokens": 4}, "at most 1 per request"),
    ({"prompts": "x" * 1001, "max_tokens": 4}, "at most 1,000"),
])
def test_generate_too_large_is_413_naming_the_limit(http, body, limit):
    r = http.post("/generate", json=body)
    assert r.status_code == 413
    assert r.json()["status"] == 413 and limit in r.json()["error"]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"json": {"prompts": "Hi", "max_tokens": 0}}, "max_tokens must be between 1 and 32"),
    ({"json": {"prompts": "Hi", "max_tokens": 4, "temperature": 9}}, "temperature must be between"),
    ({"json": {"prompts": "Hi", "max_tokens": "many"}}, "max_tokens:"),
    ({"json": {"prompts": ["Hi", "  "], "max_tokens": 4}}, "prompt 1 is empty"),
    ({"json": {"prompt": "Hi"}}, "prompts: Field required"),
    ({"json": {"prompts": "Hi", "max_token": 4}}, "max_token: Extra inputs are not permitted"),
    ({"json": {"prompts": 42}}, "prompts"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "not valid JSON"),
    ({"content": b"prompts=Hi"}, "must be a JSON object"),
    # Python's JSON parser takes these; RFC 8259 and the tokenizer do not.
    ({"content": b'{"prompts": "\\ud800 lone surrogate"}', "headers": {"content-type": "application/json"}},
     "prompts: is not valid Unicode"),
    ({"content": b'{"prompts": "a\\u0000b"}', "headers": {"content-type": "application/json"}},
     "prompts: contains a NUL"),
    ({"content": b'{"prompts": "Hi", "temperature": NaN}', "headers": {"content-type": "application/json"}},
     "temperature: must be a finite number"),
    ({"content": b'{"prompts": "Hi", "max_tokens": 1e999}', "headers": {"content-type": "application/json"}},
     "max_tokens: must be a finite number"),
    ({"content": b'{"prompts": ["ok", "\\udfff"]}', "headers": {"content-type": "application/json"}},
     "prompts[1]: is not valid Unicode"),
])
def test_generate_bad_requests_are_400_with_a_message(http, kwargs, fragment):
    r = http.post("/generate", **kwargs)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"] and r.json()["status"] == 400


def test_oversized_body_is_413(http):
    r = http.post("/generate", json={"prompts": "x" * (2 << 20)})
    assert r.status_code == 413 and "larger than" in r.json()["error"]


def test_unexpected_error_is_500_and_the_server_keeps_serving(app, http, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(app.service, "check_prompts", broken)
    r = http.post("/generate", json={"prompts": "Hi", "max_tokens": 2})
    assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]
    monkeypatch.undo()
    assert http.post("/generate", json={"prompts": "Hi", "max_tokens": 2}).status_code == 200


def test_generation_runs_off_the_event_loop(app, http, monkeypatch):
    """While a /generate is busy in its worker thread, /health still answers at once."""
    release, started = threading.Event(), threading.Event()

    real = app.service.check_prompts

    def slow_check(*args, **kwargs):
        started.set()
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(app.service, "check_prompts", slow_check)
    pending = threading.Thread(target=lambda: http.post("/generate", json={"prompts": "Hi"}))
    pending.start()
    try:
        assert started.wait(10)
        assert http.get("/health").status_code == 200
        # /health answered while the generate request was still held in its worker thread.
        assert pending.is_alive() and not release.is_set()
    finally:
        release.set()
        pending.join(20)


# ---- GET /health and /metrics -------------------------------------------------------------------

def test_health_is_200_when_loaded(http):
    r = http.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["model_loaded"] is True and h["reason"] is None and h["tier"] == "free"
    assert h["memory_guard"]["refusing"] is False and h["memory_guard"]["limit_mb"] > 0


def test_health_is_503_with_the_same_body_while_loading(locked_app):
    r = httpx.get(locked_app.url + "health")  # open even with a key set
    assert r.status_code == 503
    h = r.json()
    assert h["status"] == "loading" and h["model_loaded"] is False and "reason" in h and "tier" in h


def test_metrics_parse_and_count_requests(http):
    ok = ("slm_requests_total", {"endpoint": "batch", "outcome": "ok"})
    bad = ("slm_http_requests_total", {"route": "/generate", "status": "400"})
    tokens = ("slm_generated_tokens_total", {"endpoint": "batch"})
    before = [metric(http, name, **labels) for name, labels in (ok, bad, tokens)]
    for _ in range(2):
        assert http.post("/generate", json={"prompts": "Count me", "max_tokens": 3}).status_code == 200
    assert http.post("/generate", json={"prompts": ""}).status_code == 400
    after = [metric(http, name, **labels) for name, labels in (ok, bad, tokens)]
    assert after[0] - before[0] == 2 and after[1] - before[1] == 1
    assert 2 <= after[2] - before[2] <= 6  # 1 to 3 tokens each (a sequence may end early)

    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"slm_requests", "slm_generated_tokens", "slm_request_latency_seconds", "slm_time_to_first_token_seconds",
            "slm_process_rss_bytes", "slm_model_loaded", "slm_http_requests"} <= names
    assert metric(http, "slm_model_loaded") == 1 and metric(http, "slm_process_rss_bytes") > 0
    assert metric(http, "slm_request_latency_seconds_count", endpoint="batch") >= 2


# ---- bearer auth --------------------------------------------------------------------------------

def test_auth_is_off_by_default(app):
    assert app.service.settings.api_key is None


@pytest.mark.parametrize("method, path", [("POST", "generate"), ("GET", "metrics"), ("GET", "v1/models"),
                                          ("POST", "v1/chat/completions"), ("POST", "v1/completions")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_auth_rejects_missing_or_wrong_key(locked_app, method, path, headers):
    r = httpx.request(method, locked_app.url + path, headers=headers, json={"prompts": "Hi"})
    assert r.status_code == 401
    assert "API key" in str(r.json())


def test_auth_comes_before_model_readiness(locked_app):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(locked_app.url + "generate", json={"prompts": "Hi", "max_tokens": 2}, headers=auth)
    assert r.status_code == 503 and "loading" in r.json()["error"]
    assert httpx.get(locked_app.url + "metrics", headers=auth).status_code == 200
    assert httpx.get(locked_app.url + "v1/models", headers=auth).status_code == 200


# ---- MCP ----------------------------------------------------------------------------------------

def test_mcp_schema_lists_the_tab_tools(http):
    r = http.get("/gradio_api/mcp/schema")
    assert r.status_code == 200
    tools = {t["name"]: t for t in r.json()}
    assert {"generate", "batch", "structured", "health", "collect_garbage"} <= set(tools)
    assert all(t["description"] for t in tools.values())
    assert "prompt" in tools["generate"]["inputSchema"]["properties"]


def test_mcp_client_lists_and_calls_tools(app):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def session() -> tuple[list[str], str]:
        async with streamable_http_client(app.url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as s:
                await s.initialize()
                names = [t.name for t in (await s.list_tools()).tools]
                # health is not queued, so Gradio runs it in-process. A queued tool (generate, batch...)
                # goes through a gradio_client loopback whose heartbeat stream never ends, and uvicorn's
                # graceful shutdown would then wait for it (see the report on serve_in_thread).
                result = await s.call_tool("health", {})
                return names, result.content[0].text

    names, text = asyncio.run(asyncio.wait_for(session(), 60))
    assert {"generate", "batch", "structured", "health", "collect_garbage"} <= set(names)
    assert "'status': 'ok'" in text and "'tier': 'free'" in text
