"""Many users at once, through the launched app: every surface submits to the scheduler's slots.

The fake model stands in where the model does not matter (it is fast and its seeded answers are
distinct per seed, so an answer mixed with another's would show). Greedy answers of the real
TensorFlow model under concurrency must equal the same requests made alone, exactly.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gradio_client import Client

from conftest import launch_app
from slm_app.settings import Settings

N_CLIENTS = 8


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    settings = Settings(tier="standard", backend="fake", parallel=4, queue_size=32, fake_step_ms=3,
                        cache_dir=str(tmp_path_factory.mktemp("cache")))
    with launch_app(settings) as server:
        yield server


def model_id(app) -> str:
    return httpx.get(app.url + "v1/models").json()["data"][0]["id"]


async def stream_completion(url: str, body: dict) -> tuple[str, list[str], str]:
    """(text, the deltas in order, finish_reason) of one streamed /v1/completions request."""
    deltas, finish = [], None
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", url + "v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                deltas.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return "".join(deltas), deltas, finish


def seeded(app, seed: int, max_tokens: int = 40) -> dict:
    return {"model": model_id(app), "prompt": f"Client {seed} says", "max_tokens": max_tokens,
            "temperature": 1.0, "seed": seed}


def test_openai_streams_of_concurrent_clients_are_complete_and_their_own(app):
    bodies = [seeded(app, seed) for seed in range(N_CLIENTS)]
    alone = [asyncio.run(stream_completion(app.url, b))[0] for b in bodies]
    assert len(set(alone)) == N_CLIENTS, "each seed should give its own answer"

    async def together():
        return await asyncio.gather(*(stream_completion(app.url, b) for b in bodies))

    started = app.service.metrics.summary()["requests"]
    results = asyncio.run(together())
    for (text, deltas, finish), expected in zip(results, alone):
        assert text == expected and finish == "length"
        assert len(deltas) > 1
    assert app.service.metrics.summary()["requests"] - started == N_CLIENTS


def test_chat_streams_of_concurrent_clients_match_their_answers_alone(app):
    def chat(seed: int) -> str:
        with httpx.stream("POST", app.url + "v1/chat/completions", timeout=120, json={
                "model": model_id(app), "messages": [{"role": "user", "content": f"Hello {seed}"}],
                "max_tokens": 30, "temperature": 1.0, "seed": seed, "stream": True}) as r:
            assert r.status_code == 200
            parts = [json.loads(line[6:])["choices"] for line in r.iter_lines()
                     if line.startswith("data: ") and line != "data: [DONE]"]
        return "".join(c[0]["delta"].get("content") or "" for c in parts if c)

    alone = [chat(seed) for seed in range(N_CLIENTS)]
    with ThreadPoolExecutor(N_CLIENTS) as pool:
        together = list(pool.map(chat, range(N_CLIENTS)))
    assert together == alone


def test_gradio_streams_of_concurrent_clients_match_their_answers_alone(app):
    client = Client(app.url, verbose=False)
    args = [(f"User {seed} writes", 24, 1.0, 1.0, seed) for seed in range(N_CLIENTS)]
    alone = [client.predict(*a, api_name="/generate") for a in args]
    jobs = [client.submit(*a, api_name="/generate") for a in args]
    finals = [job.result(timeout=120) for job in jobs]
    assert finals == alone
    for job, final in zip(jobs, finals):
        updates = job.outputs()
        assert len(updates) > 1 and updates[-1] == final
        assert all(b.startswith(a) for a, b in zip(updates, updates[1:]))


def test_rest_batches_of_concurrent_clients_come_back_in_order(app):
    def batch(i: int) -> list[str]:
        r = httpx.post(app.url + "generate", timeout=120,
                       json={"prompts": [f"first {i}", f"second {i}", f"third {i}"], "max_tokens": 8 + i,
                             "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["results"]

    with ThreadPoolExecutor(N_CLIENTS) as pool:
        results = list(pool.map(batch, range(N_CLIENTS)))
    # Greedy: the fake recites its script, so a client's three answers are equal, and the i-th client
    # asked for 8+i tokens per prompt, so each client's answer is longer than the one before.
    for texts in results:
        assert len(texts) == 3 and len(set(texts)) == 1
    firsts = [texts[0] for texts in results]
    assert all(b.startswith(a) and len(a) < len(b) for a, b in zip(firsts, firsts[1:]))


def test_a_client_that_disconnects_frees_its_slot(app):
    body = {**seeded(app, 1, max_tokens=2000), "stream": True}
    body["max_tokens"] = app.service.limits.max_new_tokens
    with httpx.stream("POST", app.url + "v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break
        assert app.service.engine.occupancy().running == 1
    # The connection is closed: the slot must be free long before the 64 tokens would have taken.
    deadline = time.monotonic() + 10
    while app.service.engine.occupancy().running:
        assert time.monotonic() < deadline, "the slot of a disconnected client was not freed"
        time.sleep(0.01)
    outcomes = app.service.metrics.requests.labels("completions", "cancelled")._value.get()
    assert outcomes >= 1


@pytest.mark.parametrize("n", [N_CLIENTS])
def test_free_tier_greedy_answers_under_concurrency_equal_answers_alone(free_app, n):
    """The free tier's real model (tiny-gpt2 on LiteRT): greedy, every answer exactly as when it ran alone."""
    client = Client(free_app.url, verbose=False)
    prompts = [f"Prompt number {i} is {'long ' * i}" for i in range(n)]
    alone = [client.predict(p, 16, 0.0, 1.0, 0, api_name="/generate") for p in prompts]
    jobs = [client.submit(p, 16, 0.0, 1.0, 0, api_name="/generate") for p in prompts]
    assert [job.result(timeout=300) for job in jobs] == alone
