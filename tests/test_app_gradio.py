"""The app as a user's gradio_client sees it: launched on a free port, every endpoint called by name.

Where the model does not matter (limits, errors, shapes, streaming) the free tier runs on the fake
backend; what the model decides (structured presets closing) runs on the real TensorFlow tiny-gpt2.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from conftest import launch_app
from slm_app.presets import PRESETS
from slm_app.settings import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Client:
    settings = Settings(tier="free", backend="fake", cache_dir=str(tmp_path_factory.mktemp("cache")))
    with launch_app(settings) as server:
        yield Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def tf_client(free_app) -> Client:
    return Client(free_app.url, verbose=False)


def test_endpoints_are_named(client: Client) -> None:
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/batch", "/structured", "/health", "/gc"} <= names


def test_generate_streams_then_returns_full_text(client: Client) -> None:
    job = client.submit("Hello there", 12, 0.0, 1.0, 0, api_name="/generate")
    updates = list(job)
    final = job.result()
    assert len(updates) > 1, "streaming should deliver several partial texts"
    assert final == updates[-1] and len(final) > 0
    # Each update extends the previous one: tokens arrive in order, the text only grows.
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:]))


def test_generate_is_reproducible_with_seed(client: Client) -> None:
    a = client.predict("Seeded", 10, 0.9, 0.95, 1234, api_name="/generate")
    b = client.predict("Seeded", 10, 0.9, 0.95, 1234, api_name="/generate")
    assert a == b


def test_batch_returns_one_result_per_prompt(client: Client) -> None:
    out = client.predict("\n  \nOne prompt\n\n", 8, 0.0, api_name="/batch")
    assert isinstance(out, dict) and len(out["results"]) == 1 and isinstance(out["results"][0], str)


def test_health_on_the_free_tier_model_says_the_weights_are_random(tf_client: Client) -> None:
    h = tf_client.predict(api_name="/health")
    assert h["backend"] == "litert" and h["model_info"]["random_weights"] is True  # the free tier's default
    assert h["model_info"]["backend"] == "litert" and h["slots"]["slots"] >= 1


def test_health_reports_tier_and_model(client: Client) -> None:
    h = client.predict(api_name="/health")
    for key in ("status", "model_loaded", "memory_usage", "tier", "tier_reason", "backend", "model", "rss_mb",
                "system_memory_mb", "requests", "latency_ms", "tokens_per_second", "uptime_s"):
        assert key in h, key
    assert h["status"] == "ok" and h["model_loaded"] is True
    assert h["tier"] == "free" and h["tier_reason"] == "SLM_TIER=free" and h["backend"] == "fake"
    assert h["requests"] >= 1 and h["latency_ms"]["p50"] > 0 and h["tokens_per_second"] > 0
    assert h["model_info"]["random_weights"] is True
    assert set(h["system_memory_mb"]) == {"total", "available"}


def test_gc_reports_memory_before_and_after(client: Client) -> None:
    out = client.predict(api_name="/gc")
    assert out["rss_before_mb"] > 0 and out["rss_after_mb"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (("", 8, 0.8, 1.0, -1), "prompt is empty"),
        (("   \n\t", 8, 0.8, 1.0, -1), "prompt is empty"),
        (("x" * 1001, 8, 0.8, 1.0, -1), "allows at most 1,000"),
        (("Hi", 0, 0.8, 1.0, -1), "max_new_tokens must be between 1 and 32"),
        (("Hi", 33, 0.8, 1.0, -1), "max_new_tokens must be between 1 and 32"),
        (("Hi", 8, 2.5, 1.0, -1), "temperature must be between 0.0 and 2.0"),
        (("Hi", 8, -1, 1.0, -1), "temperature must be between"),
        (("Hi", 8, 0.8, 0, -1), "top_p must be in (0, 1]"),
        (("Hi", 8, 0.8, 1.5, -1), "top_p must be in (0, 1]"),
        (("Hi", "many", 0.8, 1.0, -1), "max_new_tokens must be a number, got 'many'"),
        (("Hi", 8, "hot", 1.0, -1), "temperature must be a number, got 'hot'"),
        (("Hi", 8.5, 0.8, 1.0, -1), "max_new_tokens must be a whole number"),
    ],
)
def test_generate_bad_input_gets_specific_error(client: Client, args, message) -> None:
    with pytest.raises(AppError) as err:
        client.predict(*args, api_name="/generate")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (("one\ntwo", 8, 0.8), "2 prompts; the free tier allows at most 1"),
        (("\n   \n\n", 8, 0.8), "no prompts"),
        (("ok", 99, 0.8), "max_new_tokens must be between 1 and 32"),
    ],
)
def test_batch_bad_input_gets_specific_error(client: Client, args, message) -> None:
    with pytest.raises(AppError) as err:
        client.predict(*args, api_name="/batch")
    assert message in str(err.value)


def test_app_keeps_serving_after_errors(client: Client) -> None:
    with pytest.raises(AppError):
        client.predict("", 8, 0.8, 1.0, -1, api_name="/generate")
    assert client.predict("Still here", 4, 0.0, 1.0, 0, api_name="/generate")
    assert client.predict(api_name="/health")["status"] == "ok"


def test_structured_endpoint_returns_validated_json(client: Client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = json.loads(client.predict("Answer", json.dumps(schema), 32, 0.7, 1, api_name="/structured"))
    assert out["success"] is True and isinstance(out["data"]["ok"], bool) and out["error"] is None


@pytest.mark.parametrize("preset", list(PRESETS))
def test_structured_presets_validate_on_tensorflow(tf_client: Client, preset: str) -> None:
    schema = PRESETS[preset]
    out = json.loads(tf_client.predict("Describe a small language model.", json.dumps(schema), 96, 0.7, 0,
                                       api_name="/structured"))
    assert out["success"] is True, out["error"]
    jsonschema.validate(out["data"], schema)
    assert json.loads(out["raw_text"]) == out["data"]


def test_structured_bad_schema_and_remote_ref_are_refused(client: Client) -> None:
    with pytest.raises(AppError, match="invalid JSON at line 1, column 19"):
        client.predict("x", '{"type": "object",', 32, 0.7, 0, api_name="/structured")
    remote = {"type": "object", "properties": {"a": {"$ref": "https://example.com/schema.json"}}}
    with pytest.raises(AppError, match=r"\$ref"):
        client.predict("x", json.dumps(remote), 32, 0.7, 0, api_name="/structured")


def test_structured_budget_too_small_for_any_valid_json_is_refused_up_front(client: Client) -> None:
    schema = {"type": "object", "properties": {"essay": {"type": "string", "minLength": 50}}, "required": ["essay"]}
    with pytest.raises(AppError, match="more than the budget of 4: raise max_new_tokens to at least"):
        client.predict("Write", json.dumps(schema), 4, 0.7, 0, api_name="/structured")


def test_standard_tier_without_weights_starts_and_says_why(tmp_path) -> None:
    with launch_app(Settings(tier="standard", cache_dir=str(tmp_path)), expect_loaded=False) as server:
        client = Client(server.url, verbose=False)
        h = client.predict(api_name="/health")
        assert h["tier"] == "standard" and h["model_loaded"] is False and h["status"] == "error"
        assert "openai-community/gpt2" in h["reason"] or "hub" in h["reason"]
        with pytest.raises(AppError) as err:
            client.predict("Hi", 8, 0.8, 1.0, -1, api_name="/generate")
        assert "model not loaded" in str(err.value)
