"""The /v1 routes as the official ``openai`` SDK sees them, against the app served on a free port with
the free tier's limits on the fake backend (the OpenAI layer is under test, not the model: assert on
shapes, counts and statuses)."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import launch_app
from slm_app.settings import Settings

USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    # Two prompts per request (the free tier allows one) so a batch of completions is covered too.
    # Long answers allowed (512 tokens at 2 ms a step) so a client can leave mid-stream.
    settings = Settings(tier="free", backend="fake", max_prompts=2, max_new_tokens=512, fake_step_ms=2,
                        cache_dir=str(tmp_path_factory.mktemp("cache")))
    with launch_app(settings) as server:
        yield server


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    # No retries: a 429/503 must surface, not be retried behind the test's back.
    return openai.OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def cancelled_count(app) -> float:
    text = httpx.get(app.url + "metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "slm_requests_total" and s.labels == {"endpoint": "completions", "outcome": "cancelled"})


def assert_usage(usage, max_tokens: int) -> None:
    assert usage.prompt_tokens > 0 and 1 <= usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_models_lists_the_served_model(client, app):
    models = client.models.list().data
    assert models[0].id == app.service.engine.info().model_id and models[0].object == "model"
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_completion(client, model):
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == model
    assert len(r.choices) == 1 and isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert_usage(r.usage, 8)


def test_completion_of_a_batch_has_one_choice_per_prompt(client, model):
    r = client.completions.create(model=model, prompt=["First prompt", "A second, longer prompt"], max_tokens=5,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and all(isinstance(c.text, str) for c in r.choices)
    assert_usage(r.usage, 10)
    events = list(client.completions.create(model=model, prompt=["One", "Two"], max_tokens=4, stream=True))
    finished = [(c.index, c.finish_reason) for e in events for c in e.choices if c.finish_reason]
    assert sorted(i for i, _ in finished) == [0, 1]


def test_chat_completion(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "system", "content": "Be brief."}, *USER],
                                       max_tokens=8, temperature=0.7, top_p=0.9, seed=7)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert_usage(r.usage, 8)


def test_seeded_answers_repeat(client, model):
    kwargs = dict(model=model, messages=USER, max_tokens=6, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == a


def test_chat_stream_matches_the_plain_answer(client, model):
    kwargs = dict(model=model, messages=USER, max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, usage_chunk = chunks
    assert content_chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == plain.choices[0].message.content
    assert usage_chunk.choices == [] and usage_chunk.usage == plain.usage


def test_completion_stream_is_server_sent_events(app, model):
    body = {"model": model, "prompt": "Stream me", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", app.url + "v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks and all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                        "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_answer_validates(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a person."}], temperature=0.7, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert r.usage.completion_tokens >= 1  # every attempt the engine made counts
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_json_object_streams_as_one_chunk(client, model):
    # Any object is allowed, so random weights rarely close one within the budget: either a
    # complete object ("stop") or OpenAI's "length" for a truncated answer, never invalid JSON as "stop".
    chunks = list(client.chat.completions.create(model=model, messages=USER, seed=5, stream=True, max_tokens=8,
                                                 response_format={"type": "json_object"}))
    assert [c.choices[0].delta.role for c in chunks] == ["assistant", None]
    finish, text = chunks[-1].choices[0].finish_reason, chunks[-1].choices[0].delta.content
    assert finish == "length" or (finish == "stop" and isinstance(json.loads(text), dict))


@pytest.mark.parametrize("kwargs, error, param", [
    ({"temperature": 5}, openai.BadRequestError, "temperature"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ({"n": 2}, openai.BadRequestError, "n"),
    ({"messages": []}, openai.BadRequestError, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, openai.BadRequestError, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     openai.BadRequestError, "messages[0].content"),
    ({"response_format": {"type": "json_schema"}}, openai.BadRequestError, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     openai.BadRequestError, "schema"),
    ({"model": "gpt-4o"}, openai.NotFoundError, "model"),
])
def test_bad_chat_requests_get_openai_errors(client, model, kwargs, error, param):
    with pytest.raises(error) as info:
        client.chat.completions.create(**{"model": model, "messages": USER, "max_tokens": 4, **kwargs})
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["type"] == "invalid_request_error" and body["param"] == param


@pytest.mark.parametrize("prompt, limit", [("x" * 1001, "at most 1,000"), (["a", "b", "c"], "at most 2 per request")])
def test_too_large_is_413_naming_the_limit(client, model, prompt, limit):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=model, prompt=prompt, max_tokens=4)
    assert info.value.status_code == 413 and limit in info.value.body["message"]


def test_disconnect_mid_stream_cancels_and_the_server_keeps_serving(app, client, model):
    before = cancelled_count(app)
    body = {"model": model, "prompt": "A long story", "max_tokens": 512, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", app.url + "v1/completions", json=body, timeout=60) as r:
        events = r.iter_lines()
        assert next(line for line in events if line.startswith("data: "))
    # The client is gone after one chunk; /health answers meanwhile and the request is recorded as cancelled.
    assert httpx.get(app.url + "health").status_code == 200
    deadline = time.monotonic() + 15
    while cancelled_count(app) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_count(app) == before + 1
    # The backend's lock was released: the next request completes.
    r = client.completions.create(model=model, prompt="Next", max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
