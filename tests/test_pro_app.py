"""The pro tier as users reach it: llama.cpp on the embedded Gemma 3 270M, through gradio_client."""

from __future__ import annotations

import json
import threading

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
    assert "Gemma 3 270M" in h["model"] and info["source"] == "offline-fallback"
    assert "hub" in info["reason"]
    for key in ("size_mb", "quantization", "n_ctx", "n_threads", "load_time_s"):
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
    alone = {k: Client(pro_app.url, verbose=False).predict(p, 24, 0.0, 1.0, 0, api_name="/generate")
             for k, p in prompts.items()}
    together: dict[str, str] = {}

    def ask(key: str) -> None:
        together[key] = Client(pro_app.url, verbose=False).predict(prompts[key], 24, 0.0, 1.0, 0,
                                                                   api_name="/generate")

    threads = [threading.Thread(target=ask, args=(k,)) for k in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    # Greedy answers identical to running alone: the requests queued, nothing interleaved.
    assert together == alone


@pytest.mark.parametrize("preset", list(PRESETS))
def test_structured_presets_validate_on_llama(client: Client, preset: str) -> None:
    schema = PRESETS[preset]
    out = client.predict("Describe a small language model served on a CPU.", json.dumps(schema), 512, 0.7, 3,
                         api_name="/structured")
    assert out["success"] is True, out["error"]
    jsonschema.validate(out["data"], schema)
    assert json.loads(out["raw_text"]) == out["data"] and "Gemma" in out["model_used"] and out["tokens"] > 0


def test_corrupt_gguf_is_reported_not_fatal(tmp_path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    with launch_app(Settings(tier="pro", model=str(bad)), expect_loaded=False) as server:
        client = Client(server.url, verbose=False)
        h = client.predict(api_name="/health")
        assert h["model_loaded"] is False and h["status"] == "error" and "broken.gguf" in h["reason"]
        with pytest.raises(AppError, match="model not loaded"):
            client.predict("Hi", 8, 0.8, 1.0, -1, api_name="/generate")
