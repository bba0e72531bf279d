"""The learning loop on the TensorFlow GPT-2 tier (standard), on small random GPT-2s built here.

Offline, GPT-2's weights are random, so these tests hold the mechanism, not quality: LoRA factors in
the compiled graphs (decode kernels included) that an adapter fills by assignment, with nothing
recompiled; the TensorFlow trainer's loss falls; the training answers' log-likelihood rises under the
adapter; swapping and rolling back give the base model's outputs back exactly. The whole loop runs
through the official ``openai`` SDK against a launched standard-tier app. The free tier (LiteRT, no
TensorFlow in its process) refuses jobs with its reason.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from gradio_client import Client

from conftest import launch_app
from test_finetune_pro import ANSWER, OPENERS, QUESTIONS  # the same made-up fact as the pro tier's test
from slm_app.backends.base import Row
from slm_app.backends.tf_gpt2 import TFGPT2Backend
from slm_app.backends.tf_lora import AdapterError, TARGETS, target_shapes, write_adapter
from slm_app.provisioning.tiny_gpt2 import build_random_gpt2
from slm_app.settings import EngineConfig, Settings

pytestmark = pytest.mark.timeout(1800)

SMALL = dict(n_embd=16, n_layer=2, n_head=2, vocab_size=50257, n_positions=1024, initializer_range=0.5)
WIDE = dict(SMALL, n_embd=256, n_head=4)  # wide enough for the decode kernels (tf_matvec)
RANK = 4
PROMPT = "The capital of Zorbania is"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tf-lora-models")
    return {"small": build_random_gpt2(root / "small", seed=1, **SMALL),
            "wide": build_random_gpt2(root / "wide", seed=2, **WIDE)}


def load(folder: Path, cache: Path) -> TFGPT2Backend:
    return TFGPT2Backend.load(EngineConfig(backend="tensorflow", model=str(folder), cache_dir=cache, n_slots=2,
                                           max_prompt_tokens=64, max_new_tokens=32, warmup=False, lora_rank=RANK))


def random_adapter(path: Path, n_layer: int, n_embd: int, seed: int, rank: int = RANK, **meta) -> Path:
    rng = np.random.default_rng(seed)
    factors = {}
    for i in range(n_layer):
        for t in TARGETS:
            n_in, n_out = target_shapes(n_embd)[t]
            factors[f"{i}.{t}.A"] = rng.normal(0, 1 / np.sqrt(n_in), (n_in, rank))
            factors[f"{i}.{t}.B"] = rng.normal(0, 0.5, (rank, n_out))
    write_adapter(path, factors, rank, rank, n_layer, n_embd, **meta)
    return path


def greedy(backend: TFGPT2Backend, tokens: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and each step's logits; the steps after the prompt are decode rows (the kernel on
    the wide model)."""
    out = backend.forward([Row(0, tokens, 0, prompt=True)])
    picks, rows, pos = [], [], len(tokens)
    for _ in range(steps):
        rows.append(np.array(out.row(0), np.float64))
        picks.append(int(np.argmax(rows[-1])))
        out = backend.forward([Row(0, [picks[-1]], pos)])
        pos += 1
    backend.release(0)
    return picks, np.stack(rows)


@pytest.mark.parametrize("which", ["small", "wide"])
def test_adapter_applies_in_every_path_and_swaps_exactly_without_recompiling(which: str, models, tmp_path) -> None:
    cfg = SMALL if which == "small" else WIDE
    backend = load(models[which], Path.home() / ".cache" / "slm_app")
    try:
        if which == "wide":
            assert backend.info().details["matvec_kernel"].startswith("on"), backend.info().details
        assert backend.supports_adapters and backend.info().details["lora_rank"] == RANK
        prompt = backend.tokenize(PROMPT)
        base_tokens, base_logits = greedy(backend, prompt, 8)
        base_score = backend.score(prompt + base_tokens)
        shapes = backend.compiled_shapes()

        backend.load_adapter("a", str(random_adapter(tmp_path / "a.npz", cfg["n_layer"], cfg["n_embd"], seed=5)))
        backend.set_adapter("a")
        assert backend.active_adapter() == "a" and backend.cache_namespace(None) == "a"
        tokens, logits = greedy(backend, prompt, 8)
        assert np.abs(logits[0] - base_logits[0]).max() > 1e-2  # the prefill path applies it
        # Decode rows (the kernel on the wide model) apply it too: each decode step's logits are those a
        # prefill of the same tokens gives under the adapter, and not the base model's.
        for k in range(1, 4):
            seq = prompt + tokens[:k]
            prefill = np.array(backend.forward([Row(1, seq, 0, prompt=True)]).row(0), np.float64)
            backend.release(1)
            assert np.abs(logits[k] - prefill).max() < 1e-3 * max(1.0, np.abs(prefill).max())
        backend.set_adapter(None)
        decode_base = greedy(backend, prompt + tokens[:1], 1)[1][0]
        backend.set_adapter("a")
        decode_adapted = greedy(backend, prompt + tokens[:1], 1)[1][0]
        assert np.abs(decode_adapted - decode_base).max() > 1e-2

        # Swap to another adapter and back to the base: exact, and nothing new compiled.
        backend.load_adapter("b", str(random_adapter(tmp_path / "b.npz", cfg["n_layer"], cfg["n_embd"], seed=6, rank=2)))
        backend.set_adapter("b")
        assert greedy(backend, prompt, 8)[1][0].tolist() != logits[0].tolist()
        backend.set_adapter("a")
        again_tokens, again_logits = greedy(backend, prompt, 8)
        assert again_tokens == tokens and np.array_equal(again_logits, logits)
        backend.set_adapter(None)
        back_tokens, back_logits = greedy(backend, prompt, 8)
        assert back_tokens == base_tokens and np.array_equal(back_logits, base_logits)
        assert np.array_equal(backend.score(prompt + base_tokens), base_score)
        assert backend.compiled_shapes() == shapes
    finally:
        backend.close()


def test_a_bad_adapter_file_is_refused_and_what_is_applied_stays(models, tmp_path) -> None:
    backend = load(models["small"], Path.home() / ".cache" / "slm_app")
    try:
        backend.load_adapter("good", str(random_adapter(tmp_path / "good.npz", 2, 16, seed=1)))
        backend.set_adapter("good")
        before = greedy(backend, backend.tokenize(PROMPT), 4)
        (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
        (tmp_path / "text.npz").write_text("not an adapter")
        cases = {"corrupt.npz": "not a readable adapter file",
                 "text.npz": "not a readable adapter file",
                 "wide.npz": "2 layers of width 256; the served model has 2 of width 16",
                 "rank.npz": "this server applies ranks 1 to 4"}
        random_adapter(tmp_path / "wide.npz", 2, 256, seed=1)
        random_adapter(tmp_path / "rank.npz", 2, 16, seed=1, rank=8)
        for name, reason in cases.items():
            with pytest.raises(AdapterError, match=reason):
                backend.load_adapter(name, str(tmp_path / name))
        assert backend.active_adapter() == "good"
        after = greedy(backend, backend.tokenize(PROMPT), 4)
        assert after[0] == before[0] and np.array_equal(after[1], before[1])
    finally:
        backend.close()


# ---- the loop through the app ----------------------------------------------------------------------


def completion(url: str, model: str, prompt: str = PROMPT) -> str:
    r = httpx.post(url + "v1/completions", timeout=120,
                   json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_standard_tier_learning_loop_through_the_openai_sdk(models, tmp_path) -> None:
    settings = Settings(tier="standard", model=str(models["small"]), cache_dir=str(tmp_path / "cache"),
                        data_dir=str(tmp_path / "data"), parallel=2, finetune_auto=False, finetune_threads=2)
    with launch_app(settings) as app:
        url = app.url
        client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
        model_id = client.models.list().data[0].id
        base_out = completion(url, model_id)

        ui = Client(url, verbose=False)
        status = ui.predict(api_name="/finetune_status")
        assert "random weights" in status["note"] and "mechanism, not quality" in status["note"]

        lines = [json.dumps({"messages": [{"role": "user", "content": o + q},
                                          {"role": "assistant", "content": ANSWER}]})
                 for q in QUESTIONS for o in OPENERS]
        upload = client.files.create(file=("zorbania.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=model_id, training_file=upload.id, suffix="zorb",
                                             hyperparameters={"n_epochs": 3, "batch_size": 4,
                                                              "learning_rate_multiplier": 10})
        with pytest.raises(openai.ConflictError, match=job.id):  # one job at a time
            client.fine_tuning.jobs.create(model=model_id, training_file=upload.id)
        deadline = time.time() + 900
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.time() < deadline, job
            time.sleep(1)
        assert job.status == "succeeded", job.error
        raw = job.model_dump()
        losses = [p["loss"] for p in raw["losses"] if p.get("loss") is not None]
        assert len(losses) >= 10 and np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses  # the loss falls
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]
        assert any("Gate passed" in m for m in events), events

        adapter = job.fine_tuned_model
        card = next(c for c in httpx.get(url + "v1/fine_tuning/adapters").json()["data"] if c["id"] == adapter)
        assert card["status"] == "promoted" and card["adapter_file"] == "adapter.npz" and card["random_weights"]
        assert card["trainer"]["versions"]["tensorflow"]
        before, after = card["metrics"]["before"], card["metrics"]["after"]
        # The training answers' log-likelihood rises under the adapter (each held-out item, and the mean).
        assert after["new_data_nll"] < before["new_data_nll"]
        assert all(a > b for a, b in zip(after["answer_logliks"], before["answer_logliks"]))
        assert adapter in [m.id for m in client.models.list().data]

        promoted_out = completion(url, model_id)  # the base model's id gets what is promoted
        assert promoted_out != base_out and completion(url, adapter) == promoted_out
        health = httpx.get(url + "health").json()["finetune"]
        assert health["active_adapter"] == adapter

        client.post("/fine_tuning/rollback", cast_to=object)
        assert completion(url, model_id) == base_out  # rollback: the base's greedy output exactly
        assert completion(url, adapter) == promoted_out  # and the adapter, asked by name, is unchanged
        assert httpx.get(url + "health").json()["finetune"]["active_adapter"] == "base"
        client.post(f"/fine_tuning/adapters/{adapter}/promote", cast_to=object)
        assert completion(url, model_id) == promoted_out

    with launch_app(settings) as app:  # a restart serves the promoted adapter again, from its file
        assert httpx.get(app.url + "health").json()["finetune"]["active_adapter"] == adapter
        assert completion(app.url, model_id) == promoted_out


def test_free_tier_refuses_jobs_with_its_reason(free_app) -> None:
    r = httpx.post(free_app.url + "v1/fine_tuning/jobs", timeout=30,
                   json={"model": "sshleifer/tiny-gpt2", "training_file": "feedback"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "free tier" in message and "512 MB" in message and "standard tier" in message
