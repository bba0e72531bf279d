"""The pro tier as users reach it: llama.cpp on the embedded models (SmolLM2-135M-Instruct, the offline
default, a chat model; Gemma 3 270M, a base model under Gemma's terms), through gradio_client and the
OpenAI routes."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from slm_app.presets import PRESETS
from conftest import launch_app
from slm_app.settings import Settings

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def pro_app():
    # The default pro model is on the hub, which is unreachable here: the embedded GGUF is the fallback.
    with launch_app(Settings(tier="pro")) as server:
        yield server


@pytest.fixture(scope="module")
def client(pro_app) -> Client:
    return Client(pro_app.url, verbose=False)


def test_health_says_which_model_and_why(client: Client) -> None:
    h = client.predict(api_name="/health")
    assert h["tier"] == "pro" and h["backend"] == "llama.cpp" and h["model_loaded"] is True
    info = h["model_info"]
    assert h["model"] == "embedded:smollm2-135m-instruct" and "SmolLM2" in info["name"]
    assert info["source"] == "offline-fallback" and "hub" in info["reason"]
    assert info["license"].startswith("Apache-2.0")
    assert info["n_slots"] == 4 and info["chat_template"] is True
    for key in ("size_mb", "quantization", "n_ctx", "n_threads", "n_batch", "load_time_s", "llama_cpp_python"):
        assert key in info, key


def test_generate_streams_text(client: Client) -> None:
    job = client.submit("The capital of France is", 24, 0.0, 1.0, 0, api_name="/generate")
    updates = list(job)
    assert len(updates) > 1 and job.result() == updates[-1] and updates[-1].strip()


def test_batch_one_result_per_prompt(client: Client) -> None:
    out = client.predict("Water boils at\nThe sky is\nOne, two, three,", 12, 0.0, api_name="/batch")
    assert len(out["results"]) == 3 and all(isinstance(r, str) and r for r in out["results"])


def test_batch_over_the_limit_is_refused(client: Client) -> None:
    with pytest.raises(AppError, match="5 prompts; the pro tier allows at most 4"):
        client.predict("a\nb\nc\nd\ne", 8, 0.0, api_name="/batch")


def test_two_concurrent_clients_get_their_own_complete_answers(pro_app) -> None:
    prompts = {"a": "List three fruits:", "b": "Count from one to five:"}
    together: dict[str, str] = {}

    def ask(key: str) -> None:
        together[key] = Client(pro_app.url, verbose=False).predict(prompts[key], 24, 0.0, 1.0, 0,
                                                                   api_name="/generate")

    threads = [threading.Thread(target=ask, args=(k,)) for k in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    # They decode side by side in one llama.cpp batch; a batch of two may break a near-tie otherwise
    # than one request alone (tests/test_llama_backend.py), so the answers are checked for being whole.
    assert set(together) == {"a", "b"} and all(t.strip() for t in together.values())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_structured_presets_validate_on_llama(client: Client, preset: str) -> None:
    schema = PRESETS[preset]
    out = json.loads(client.predict("Describe a small language model served on a CPU.", json.dumps(schema), 512,
                                    0.7, 3, api_name="/structured"))
    assert out["success"] is True, out["error"]
    jsonschema.validate(out["data"], schema)
    assert json.loads(out["raw_text"]) == out["data"] and "smollm2" in out["model_used"] and out["tokens"] > 0


def test_corrupt_gguf_is_reported_not_fatal(tmp_path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    with launch_app(Settings(tier="pro", model=str(bad)), expect_loaded=False) as server:
        client = Client(server.url, verbose=False)
        h = client.predict(api_name="/health")
        assert h["model_loaded"] is False and h["status"] == "error" and "broken.gguf" in h["reason"]
        with pytest.raises(AppError, match="model not loaded"):
            client.predict("Hi", 8, 0.8, 1.0, -1, api_name="/generate")


def test_smollm2_chats_through_its_template_offline(pro_app) -> None:
    reply = httpx.post(pro_app.url.rstrip("/") + "/v1/chat/completions", timeout=120, json={
        "model": "embedded:smollm2-135m-instruct", "temperature": 0, "max_tokens": 48,
        "messages": [{"role": "system", "content": "Answer in one short sentence."},
                     {"role": "user", "content": "What is the capital of France?"}]})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert "Paris" in choice["message"]["content"] and choice["finish_reason"] == "stop"


def test_gemma_is_selectable_and_shows_its_terms(tmp_path) -> None:
    with launch_app(Settings(tier="pro", model="embedded:gemma-3-270m")) as server:
        client = Client(server.url, verbose=False)
        info = client.predict(api_name="/health")["model_info"]
        assert info["source"] == "embedded" and "Gemma 3 270M" in info["name"] and info["chat_template"] is False
        assert "Gemma Terms of Use" in info["license"]  # Gemma's terms are shown wherever the model is
        assert client.predict("The capital of France is", 12, 0.0, 1.0, 0, api_name="/generate").strip()
