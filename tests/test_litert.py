"""The free tier on LiteRT: the same tokens as TensorFlow on the same weights, and no TensorFlow in
the serving process of the app launched as the README launches it.

Tolerances: float32 weights, max |logit difference| <= 1e-4 (measured ~1e-6: only the summation order
differs); float16 tiny-gpt2 <= 1e-3 (TensorFlow rounds a step's own keys and values to float16 before
attending to them, LiteRT only once they are cached). Greedy tokens must be equal in both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from gradio_client import Client

from conftest import AppProcess, launch_app_process
from slm_app.backends import load_backend
from slm_app.backends.base import Backend, Row
from slm_app.provisioning.tiny_gpt2 import build_random_gpt2
from slm_app.settings import EngineConfig

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there"]
STEPS = 24


def greedy(backend: Backend, prompt: str, steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and every step's logits, through ``forward`` as the scheduler drives it."""
    tokens = backend.tokenize(prompt)
    out = backend.forward([Row(0, tokens, 0)])
    picks, rows, pos = [], [], len(tokens)
    for _ in range(steps):
        row = np.array(out.row(0), np.float64)
        rows.append(row)
        picks.append(int(np.argmax(row)))
        out = backend.forward([Row(0, [picks[-1]], pos)])
        pos += 1
    backend.release(0)
    return picks, np.stack(rows)


def both(model: str, cache: Path, float16: bool) -> tuple[Backend, Backend]:
    common = dict(model=model, cache_dir=cache, n_slots=2, max_prompt_tokens=64, max_new_tokens=32, warmup=False)
    tf_backend = load_backend(EngineConfig(backend="tensorflow", float16=float16, **common))
    lite = load_backend(EngineConfig(backend="litert", litert_weights="float16" if float16 else "float32", **common))
    return tf_backend, lite


@pytest.mark.parametrize("case", ["tiny-gpt2-float16", "gpt2-64wide-float32"])
def test_litert_greedy_tokens_equal_tensorflow_on_the_same_weights(case: str, tmp_path: Path) -> None:
    if case == "tiny-gpt2-float16":
        model, float16, tolerance = "sshleifer/tiny-gpt2", True, 1e-3
    else:
        # Wide enough that the logits are not flat (tiny-gpt2's 2-wide hidden state gives two logit rows).
        model = str(build_random_gpt2(tmp_path / "gpt2-64", seed=3, n_embd=64, n_layer=2, n_head=4,
                                      vocab_size=50257, n_positions=256))
        float16, tolerance = False, 1e-4
    tf_backend, lite = both(model, tmp_path / "cache", float16)
    try:
        assert lite.info().backend == "litert" and lite.info().details["weights"] == ("float16" if float16 else "float32")
        for prompt in PROMPTS:
            tf_tokens, tf_logits = greedy(tf_backend, prompt, STEPS)
            lite_tokens, lite_logits = greedy(lite, prompt, STEPS)
            assert lite_tokens == tf_tokens, prompt
            assert np.abs(lite_logits - tf_logits).max() <= tolerance, prompt
        # Perplexity scores too: the same log-probabilities.
        tokens = tf_backend.tokenize(" ".join(PROMPTS) * 4)
        assert np.abs(lite.score(tokens) - tf_backend.score(tokens)).max() <= tolerance
    finally:
        tf_backend.close()
        lite.close()


def test_litert_without_a_conversion_or_tensorflow_says_how_to_convert(tmp_path: Path) -> None:
    code = ("import importlib.util, sys; real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n == 'tensorflow' else real(n, *a)\n"
            "from slm_app.backends import load_backend; from slm_app.settings import EngineConfig\n"
            f"load_backend(EngineConfig(backend='litert', model='sshleifer/tiny-gpt2', cache_dir={str(tmp_path)!r}, "
            "n_slots=1, max_prompt_tokens=8, max_new_tokens=8))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0
    assert "BackendUnavailable" in done.stderr and "slm_app.provisioning.litert" in done.stderr


# ---- the free-tier app as the README runs it ----------------------------------------------------------
@pytest.fixture(scope="module")
def free_app_process(tmp_path_factory) -> Iterator[AppProcess]:
    """``.venv/bin/python app.py`` with SLM_TIER=free, in its own process (the default LiteRT backend)."""
    cache = tmp_path_factory.mktemp("free-cache")
    env = {"SLM_TIER": "free", "SLM_CACHE_DIR": str(cache), "SLM_BACKEND": None}
    with launch_app_process(env, cache, timeout=300) as app:
        yield app


def test_free_tier_process_serves_on_litert_without_tensorflow(free_app_process) -> None:
    url = free_app_process.url
    health = httpx.get(url + "health", timeout=30).json()
    assert health["tier"] == "free" and health["backend"] == "litert"
    assert health["model_info"]["backend"] == "litert" and health["model_info"]["weights"] == "float16"
    # Work first, so every lazy import a request can trigger has happened.
    client = Client(url, verbose=False)
    text = client.predict("Hello there", 12, 0.0, 1.0, 0, api_name="/generate")
    assert isinstance(text, str) and text
    batch = httpx.post(url + "generate", json={"prompts": ["One", ], "max_tokens": 8, "temperature": 0}, timeout=60)
    assert batch.status_code == 200 and len(batch.json()["results"]) == 1
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"}},
              "required": ["name", "ok"], "additionalProperties": False}
    out = json.loads(client.predict("Describe it.", json.dumps(schema), 64, 0.7, 0, api_name="/structured"))
    assert out["success"] is True and set(out["data"]) == {"name", "ok"} and isinstance(out["data"]["ok"], bool)
    reply = client.predict("hello", "", 8, 0, 1.0, 0, api_name="/chat")
    assert reply is not None
    chat = httpx.post(url + "v1/chat/completions", timeout=60,
                      json={"model": health["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] is not None
    # No TensorFlow: none of its files is mapped into the serving process (its Python modules load
    # its shared libraries on import), and the process is small.
    mapped = free_app_process.mapped_files()
    assert not [f for f in mapped if "/tensorflow/" in f or "/tf_keras/" in f], "TensorFlow is loaded"
    assert any("ai_edge_litert" in f for f in mapped), "LiteRT is not loaded"
    assert httpx.get(url + "health", timeout=30).json()["rss_mb"] < 400


def test_litert_greedy_calls_give_the_tokens_of_forward_then_argmax(tmp_path: Path) -> None:
    """Greedy calls (and slots taking turns in LiteRT's cache buffers) give each prompt the tokens it
    gets alone in slot 0, one ``forward`` and numpy argmax at a time."""
    lite = load_backend(EngineConfig(backend="litert", model="sshleifer/tiny-gpt2", cache_dir=tmp_path, n_slots=3,
                                     max_prompt_tokens=64, max_new_tokens=32, litert_weights="float16"))
    try:
        assert lite.max_greedy_steps() >= 2  # sized at warm-up
        expected = {p: greedy(lite, p, 16)[0] for p in PROMPTS}
        slots = {1: PROMPTS[0], 2: PROMPTS[2], 0: PROMPTS[1]}
        prompts = {slot: lite.tokenize(p) for slot, p in slots.items()}
        out = lite.forward([Row(slot, ids, 0) for slot, ids in prompts.items()])
        got = {slot: [int(np.argmax(out.row(i)))] for i, slot in enumerate(prompts)}
        for _ in range(4):  # the rows take turns in one decode buffer
            rows = [Row(slot, [got[slot][-1]], len(prompts[slot]) + len(got[slot]) - 1) for slot in prompts]
            out = lite.forward(rows)
            for i, row in enumerate(rows):
                got[row.slot].append(int(np.argmax(out.row(i))))
        lite.score(lite.tokenize(PROMPTS[1]))  # perplexity borrows slot 0 (its own buffer)
        rows = [Row(slot, [got[slot][-1]], len(prompts[slot]) + len(got[slot]) - 1) for slot in (1, 2)]
        for row, picks in zip(rows, lite.decode_greedy(rows, 11)):
            got[row.slot] += picks.tolist()
        for slot in (1, 2):
            assert got[slot] == expected[slots[slot]], slots[slot]
    finally:
        lite.close()
