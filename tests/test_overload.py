"""Overload, limits and shutdown, as clients see them: a full waiting line (503 + Retry-After), the
per-client rate limit (429 + Retry-After), the request timeout (partial answer, or 504), the memory
guard (503 with its reason) and SIGTERM (drain, then exit 0). The fake backend stands in for the model
(``fake_step_ms`` makes each decode step take time, so requests overlap); apps run on free ports, and
the SIGTERM test runs ``app.py`` itself in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from conftest import launch_app
from slm_app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
MODEL = "fake-gpt2-script"


def fake(tmp_path_factory, **overrides) -> Settings:
    return Settings(tier="free", backend="fake", cache_dir=str(tmp_path_factory.mktemp("cache")), **overrides)


def complete(url: str, max_tokens: int, **headers: str) -> httpx.Response:
    return httpx.post(url + "v1/completions", headers=headers, timeout=120,
                      json={"model": MODEL, "prompt": "Tell me", "max_tokens": max_tokens, "temperature": 0})


# ---- a full waiting line ----------------------------------------------------------------------------

def test_a_full_queue_answers_503_with_retry_after_and_serves_the_rest_unmixed(tmp_path_factory):
    """One slot and a waiting line of 2, ten clients at once: whoever does not fit gets 503 with
    Retry-After; everyone served gets their own answer (each asked for a different length), exactly the
    answer the request gets when it runs alone."""
    with launch_app(fake(tmp_path_factory, parallel=1, queue_size=2, fake_step_ms=30)) as app:
        barrier = threading.Barrier(10)

        def client(i: int) -> httpx.Response:
            barrier.wait()
            return complete(app.url, 6 + i)

        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(client, range(10)))
        served = {i: r for i, r in enumerate(responses) if r.status_code == 200}
        refused = [r for r in responses if r.status_code != 200]
        assert served and refused, [r.status_code for r in responses]
        for r in refused:
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert "busy" in r.json()["error"]["message"]
        for i, r in served.items():  # none lost, none mixed up
            alone = complete(app.url, 6 + i).json()
            assert r.json()["usage"]["completion_tokens"] == 6 + i
            assert r.json()["choices"][0]["text"] == alone["choices"][0]["text"]
        # REST says the same, with the same header.
        with ThreadPoolExecutor(6) as pool:
            rest = list(pool.map(lambda _: httpx.post(app.url + "generate", json={"prompts": "Hi", "max_tokens": 20},
                                                      timeout=120), range(6)))
        busy = [r for r in rest if r.status_code == 503]
        assert busy and all(int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["error"] for r in busy)
        assert all(r.status_code in (200, 503) for r in rest)
        assert httpx.get(app.url + "health").json()["slots"] == {"waiting": 0, "running": 0, "slots": 1}


# ---- rate limit -------------------------------------------------------------------------------------

def test_rate_limit_answers_429_with_retry_after_per_client(tmp_path_factory):
    with launch_app(fake(tmp_path_factory, rate_limit=3)) as app:
        alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
        assert [complete(app.url, 2, **alice).status_code for _ in range(3)] == [200, 200, 200]
        over = complete(app.url, 2, **alice)
        assert over.status_code == 429 and 1 <= int(over.headers["Retry-After"]) <= 60
        assert over.json()["error"]["type"] == "rate_limit_error" and "SLM_RATE_LIMIT" in over.json()["error"]["message"]
        rest = httpx.post(app.url + "generate", headers=alice, json={"prompts": "Hi", "max_tokens": 2})
        assert rest.status_code == 429 and rest.headers["Retry-After"]
        assert complete(app.url, 2, **bob).status_code == 200  # another client has its own window
        assert httpx.get(app.url + "health").status_code == 200  # probes are never limited
        # Gradio's queue counts against the same per-address window (no key sent: the address).
        client = Client(app.url, verbose=False)
        outcomes = []
        for _ in range(5):
            try:
                client.predict("Hi", 2, 0.0, api_name="/batch")
                outcomes.append("ok")
            except Exception as exc:  # noqa: BLE001 - gradio_client's error for an HTTP 429
                outcomes.append(type(exc).__name__)
        assert outcomes[:3] == ["ok", "ok", "ok"] and "ok" not in outcomes[3:], outcomes


# ---- request timeout --------------------------------------------------------------------------------

def test_request_timeout_returns_what_was_produced_or_504(tmp_path_factory):
    # n_batch=1: a prompt is prefilled one token per 50 ms step, so a long prompt cannot produce its
    # first token within the 1 s timeout, while a one-token prompt produces several.
    with launch_app(fake(tmp_path_factory, parallel=1, n_batch=1, fake_step_ms=50, request_timeout_s=1.0)) as app:
        r = httpx.post(app.url + "generate", json={"prompts": "Hi", "max_tokens": 32}, timeout=60)
        assert r.status_code == 200 and r.json()["finish_reasons"] == ["timeout"] and r.json()["results"][0]
        chat = httpx.post(app.url + "v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32})
        assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] == "length"
        assert 0 < chat.json()["usage"]["completion_tokens"] < 32
        long_prompt = "word " * 40
        late = httpx.post(app.url + "generate", json={"prompts": long_prompt, "max_tokens": 8}, timeout=60)
        assert late.status_code == 504 and "timed out" in late.json()["error"]
        late = httpx.post(app.url + "v1/completions", json={"model": MODEL, "prompt": long_prompt, "max_tokens": 8},
                          timeout=60)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        with pytest.raises(AppError, match="timed out"):
            Client(app.url, verbose=False).predict(long_prompt, 8, 0.0, 1.0, 0, api_name="/generate")


# ---- memory guard -----------------------------------------------------------------------------------

def test_memory_guard_refuses_new_work_with_503_and_says_so(tmp_path_factory):
    with launch_app(fake(tmp_path_factory, memory_guard_mb=1)) as app:  # any process is above 1 MB
        r = httpx.post(app.url + "generate", json={"prompts": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and "memory guard" in r.json()["error"] and r.headers["Retry-After"]
        r = complete(app.url, 2)
        assert r.status_code == 503 and "memory guard" in r.json()["error"]["message"]
        with pytest.raises(AppError, match="memory guard"):
            Client(app.url, verbose=False).predict("Hi", 2, 0.0, api_name="/batch")
        health = httpx.get(app.url + "health").json()
        assert health["memory_guard"]["refusing"] is True and health["memory_guard"]["limit_mb"] == 1
        assert "memory guard" in health["memory_guard"]["reason"]
        metrics = httpx.get(app.url + "metrics").text
        assert "slm_memory_guard_refusing 1.0" in metrics
        assert 'slm_requests_total{endpoint="batch",outcome="memory_guard"}' in metrics


# ---- SIGTERM ----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(tmp_path):
    port = _free_port()
    env = {**os.environ, "SLM_BACKEND": "fake", "SLM_TIER": "free", "SLM_FAKE_STEP_MS": "100", "SLM_DRAIN_S": "30",
           "SLM_CACHE_DIR": str(tmp_path), "GRADIO_SERVER_PORT": str(port), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "app did not start"
            try:
                if httpx.get(url + "health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        # Two requests of 20 tokens at 100 ms a step: about two seconds each, running side by side.
        with ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(complete, url, 20) for _ in range(2)]
            while httpx.get(url + "health").json()["slots"]["running"] < 2:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused = complete(url, 2)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            assert refused.headers["Retry-After"]
            health = httpx.get(url + "health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            for future in in_flight:
                r = future.result(timeout=60)
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 20  # finished, not cut
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "draining" in output


# ---- SLM_PROTECT_UI ---------------------------------------------------------------------------------

def test_protect_ui_requires_the_key_for_the_page_gradio_api_and_mcp(tmp_path_factory):
    import asyncio

    from gradio_client.exceptions import AuthenticationError
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    key = "s3cret-key"
    with launch_app(fake(tmp_path_factory, api_key=key, protect_ui=True)) as app:
        assert httpx.get(app.url + "config").status_code == 401  # the page's config: login first
        with pytest.raises(AuthenticationError):
            Client(app.url, verbose=False)
        with pytest.raises(ValueError):  # Gradio's login refuses a wrong key
            Client(app.url, auth=("anyone", "wrong"), verbose=False)
        client = Client(app.url, auth=("anyone", key), verbose=False)  # any user name, the key as password
        assert client.predict("Hi", 2, 0.0, api_name="/batch")["results"][0]
        assert httpx.post(app.url + "gradio_api/mcp/", json={}).status_code == 401

        async def mcp_with_key() -> tuple[list[str], str]:
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
                async with streamable_http_client(app.url + "gradio_api/mcp/", http_client=http) as (read, write, _):
                    async with ClientSession(read, write) as session:
                        await session.initialize()
                        tools = [t.name for t in (await session.list_tools()).tools]
                        # batch is queued: Gradio runs it through its own loopback client
                        batch = await session.call_tool("batch", {"prompts": "Hi", "max_new_tokens": 2,
                                                                  "temperature": 0})
                        return tools, (await session.call_tool("health", {})).content[0].text, batch

        tools, health, batch = asyncio.run(asyncio.wait_for(mcp_with_key(), 60))
        assert "generate" in tools and "'status': 'ok'" in health
        assert not batch.isError and "results" in batch.content[0].text
        # The key as a bearer header also opens Gradio's API to scripts; MCP's own header opens nothing
        # that starts work.
        keyed = Client(app.url, headers={"Authorization": f"Bearer {key}"}, verbose=False)
        assert keyed.predict("Hi", 2, 0.0, api_name="/batch")["results"][0]
        spoof = httpx.post(app.url + "gradio_api/queue/join", headers={"x-gradio-user": "mcp"},
                           json={"data": ["Hi", 2, 0], "fn_index": 0, "session_hash": "x"})
        assert spoof.status_code == 401
