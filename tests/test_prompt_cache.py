"""The prompt cache (slm_app.prefix_cache) on the real models: a chat turn reuses the KV of the turns
before it, slots share a common prefix, eviction serves everyone, and a cached answer is a cold one.

llama.cpp: SmolLM2-135M-Instruct (embedded GGUF) and Gemma 3 270M under a scheduler, as the app runs
them; "cold" is the same request after ``call_exclusive`` has dropped every cached prefix.
TensorFlow: a random float32 GPT-2, where a cached answer's logits are a cold one's, bit for bit.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import pytest

from slm_app.backends.base import Row, SamplingParams
from slm_app.scheduler import Completion, Scheduler
from slm_app.settings import EngineConfig, Settings
from test_llama_backend import config, offline  # noqa: F401  (a fixture)

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)
DOCUMENT = " ".join(f"Rule {i}: the {['red', 'blue', 'green', 'amber'][i % 4]} lamp means step {i}." for i in range(60))


def llama_config(model: str, **kw) -> EngineConfig:
    """tests/test_llama_backend.py's config (one thread, flash attention off), with room for a document."""
    return config(model, **{"max_prompt_tokens": 2048, "n_ctx": 4096, **kw})


@pytest.fixture(scope="module")
def smol(offline) -> Scheduler:
    pytest.importorskip("llama_cpp")
    from slm_app.backends.llama_cpp_backend import LlamaCppBackend

    s = Scheduler(LlamaCppBackend.load(llama_config("embedded:smollm2-135m-instruct")))
    yield s
    s.close()


def chat(s: Scheduler, messages: list[dict[str, str]]) -> list[int]:
    return s.backend.tokenize(s.backend.render_chat(messages))


def run(s: Scheduler, ids: list[int], params: SamplingParams = GREEDY) -> tuple[Completion, list[int]]:
    final = s.submit(ids, params).result(timeout=300)
    assert final.finish_reason in ("stop", "length"), final
    return final, s.backend.tokenize(final.text) if final.text else []


def cold(s: Scheduler, ids: list[int], params: SamplingParams = GREEDY) -> Completion:
    s.call_exclusive(lambda backend: None)  # drops every cached prefix first
    final = s.submit(ids, params).result(timeout=300)
    assert final.cached_tokens == 0
    return final


def answer_tokens(s: Scheduler, ids: list[int], params: SamplingParams = GREEDY) -> tuple[Completion, list[int]]:
    """A greedy answer and its token ids (an end of text as the model's end-of-turn token)."""
    generation = s.submit(ids, params)
    final = generation.result(timeout=300)
    tokens = list(generation._job.token_ids)  # the scheduler's record of what was sampled
    if final.finish_reason == "stop":
        tokens.append(end_of_turn(s))
    return final, tokens


def end_of_turn(s: Scheduler) -> int:
    return next(t for text in ("<|im_end|>", "<end_of_turn>") for t in s.backend.tokenize(text) if s.backend.is_end(t))


def same_or_near_tie(s: Scheduler, prompt: list[int], got: list[int], want: list[int], tol: float = 0.25) -> None:
    """Cached greedy tokens equal cold ones; where llama.cpp rounds differently they may part at a
    close call only: at the first difference the two tokens' log-probabilities (scored cold) are within
    ``tol``. (The unified KV cache places a cached sequence's cells elsewhere than a cold one's, and
    attention sums over cells in cell order: the last bits of a logit change, see docs/prompt-cache.md.)"""
    if got == want:
        return
    j = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), None)
    assert j is not None, (got, want)  # one stopped early without an end token: not a tie
    context = prompt + want[:j]
    a, b = (s.call_exclusive(lambda backend, t=t: backend.score(context + [t]))[-1] for t in (want[j], got[j]))
    assert abs(a - b) < tol, f"token {j}: cold {want[j]} ({a:.4f}) against cached {got[j]} ({b:.4f})"


@pytest.mark.llama
def test_second_turn_reuses_the_first_and_answers_as_cold(smol: Scheduler) -> None:
    s = smol
    turns = [{"role": "system", "content": "You answer from this document.\n" + DOCUMENT},
             {"role": "user", "content": "What does the red lamp mean?"}]
    s.call_exclusive(lambda backend: None)
    first, _ = run(s, chat(s, turns))
    assert first.cached_tokens == 0
    turns += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the green one?"}]
    ids = chat(s, turns)
    second, got = answer_tokens(s, ids)
    # The whole first prompt and its answer are reused: only the new turn is computed.
    assert second.cached_tokens >= first.prompt_tokens, (second.cached_tokens, first.prompt_tokens)
    assert second.prompt_tokens - second.cached_tokens < 40
    s.call_exclusive(lambda backend: None)
    same_or_near_tie(s, ids, got, answer_tokens(s, ids)[1])
    stats = s.cache_stats()
    assert stats["cached_tokens"] >= second.cached_tokens and stats["hits"] >= 1


@pytest.mark.llama
def test_different_system_prompts_share_only_their_common_tokens(smol: Scheduler) -> None:
    s = smol
    a = chat(s, [{"role": "system", "content": "You are a pirate. " + DOCUMENT[:400]},
                 {"role": "user", "content": "Say hello."}])
    b = chat(s, [{"role": "system", "content": "You are a banker. " + DOCUMENT[:400]},
                 {"role": "user", "content": "Say hello."}])
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    s.call_exclusive(lambda backend: None)
    run(s, a)
    answer, got = answer_tokens(s, b)
    # At most the template's opening (too little to take the other's slot for), never the other system prompt.
    assert answer.cached_tokens <= common
    # In another slot than a cold run's, its cells sit at other indices: near ties may part (see the docs).
    s.call_exclusive(lambda backend: None)
    same_or_near_tie(s, b, got, answer_tokens(s, b)[1])


@pytest.mark.llama
def test_another_namespace_never_reuses_kv(smol: Scheduler, monkeypatch) -> None:
    """KV computed under one LoRA adapter (a namespace) is never served under another."""
    s = smol
    ids = chat(s, [{"role": "system", "content": DOCUMENT[:600]}, {"role": "user", "content": "Hi"}])
    s.call_exclusive(lambda backend: None)
    run(s, ids)
    again, _ = run(s, ids)
    assert again.cached_tokens == len(ids) - 1
    monkeypatch.setattr(s.backend, "cache_namespace", lambda params: "adapter:pirate")
    other, _ = run(s, ids)
    assert other.cached_tokens == 0
    back, _ = run(s, ids)  # the same adapter again: its own KV now
    assert back.cached_tokens == len(ids) - 1


@pytest.mark.llama
def test_requests_sharing_a_long_prefix_compute_it_once(smol: Scheduler) -> None:
    s = smol
    system = {"role": "system", "content": "Answer from this document.\n" + DOCUMENT}
    prompts = [chat(s, [system, {"role": "user", "content": q}])
               for q in ("What is rule 3?", "Which lamp is amber?", "How many rules?", "Say hi.")]
    colds = []
    for p in prompts:
        s.call_exclusive(lambda backend: None)
        colds.append(answer_tokens(s, p)[1])
    s.call_exclusive(lambda backend: None)
    before = s.cache_stats()
    gens = [s.submit(p, GREEDY) for p in prompts]
    finals = [g.result(timeout=300) for g in gens]
    after = s.cache_stats()
    shared = min(len(p) for p in prompts) - 20
    assert all(f.cached_tokens >= shared for f in finals[1:]), [f.cached_tokens for f in finals]
    assert after["copies"] - before["copies"] >= 3
    # The prefix was computed once: the four prompts cost one prefix plus four questions.
    assert after["computed_tokens"] - before["computed_tokens"] < len(prompts[0]) + 4 * 30
    # Four decode rows in one batch run other kernels than one alone: near ties may part (as without the cache).
    for prompt, g, want in zip(prompts, gens, colds):
        got = list(g._job.token_ids) + ([end_of_turn(s)] if g.snapshot().finish_reason == "stop" else [])
        same_or_near_tie(s, prompt, got, want)


@pytest.mark.llama
def test_eviction_under_pressure_serves_everyone(offline) -> None:
    """More conversations than the cells hold: old prefixes are evicted, nobody is refused."""
    from slm_app.backends.llama_cpp_backend import LlamaCppBackend

    s = Scheduler(LlamaCppBackend.load(llama_config("embedded:smollm2-135m-instruct", n_ctx=1024, n_slots=4)))
    try:
        prompts = [chat(s, [{"role": "system", "content": f"Conversation {i}. " + DOCUMENT[i * 40: i * 40 + 900]},
                            {"role": "user", "content": "Summarise."}]) for i in range(5)]
        assert all(250 < len(p) < 400 for p in prompts), [len(p) for p in prompts]
        params = SamplingParams(max_new_tokens=32, temperature=0.0)
        finals = [g.result(timeout=300) for g in [s.submit(p, params) for p in prompts]]
        assert [f.finish_reason for f in finals] == ["length"] * 5 or all(f.finish_reason in ("stop", "length")
                                                                           for f in finals)
        stats = s.cache_stats()
        assert stats["cells_in_use"] <= stats["kv_cells"], stats
        # Four slots, 1024 cells: the oldest conversation's prefix made room (its slot was reused or
        # evicted), the newest is still cached.
        oldest = s.submit(prompts[0], params).result(timeout=300)
        assert oldest.cached_tokens < 20, oldest.cached_tokens
        # The last conversation's prefix is still cached: its next turn reuses it.
        again, got = answer_tokens(s, prompts[-1], params)
        assert again.cached_tokens == len(prompts[-1]) - 1
        s.call_exclusive(lambda backend: None)
        same_or_near_tie(s, prompts[-1], got, answer_tokens(s, prompts[-1], params)[1])
    finally:
        s.close()


@pytest.mark.llama
def test_cancel_mid_prefill_leaves_the_cache_consistent(offline) -> None:
    from slm_app.backends.llama_cpp_backend import LlamaCppBackend

    s = Scheduler(LlamaCppBackend.load(llama_config("embedded:smollm2-135m-instruct", n_batch=64)))
    try:
        ids = chat(s, [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": "What is rule 7?"}])
        s.call_exclusive(lambda backend: None)
        gen = s.submit(ids, GREEDY)

        def held() -> int:
            return max(slot["tokens"] for slot in s.cache_stats()["slots"])

        while held() < 128:  # two of its 64-token chunks are in
            time.sleep(0.002)
        gen.cancel()
        assert gen.result(timeout=60).finish_reason == "cancelled"
        kept = held()
        assert 128 <= kept < len(ids)
        again, got = answer_tokens(s, ids)
        assert again.cached_tokens == kept
        s.call_exclusive(lambda backend: None)
        same_or_near_tie(s, ids, got, answer_tokens(s, ids)[1])
    finally:
        s.close()


@pytest.mark.llama
def test_gemma_reuses_past_its_sliding_window(offline) -> None:
    """Gemma 3 attends locally (512-token windows) in most layers; the full-size SWA cache keeps
    every position, so a long prompt is reused whole and answers as cold."""
    from slm_app.backends.llama_cpp_backend import LlamaCppBackend

    s = Scheduler(LlamaCppBackend.load(llama_config("embedded:gemma-3-270m")))
    try:
        ids = s.backend.tokenize(DOCUMENT * 2 + "\nQuestion: what does the amber lamp mean?\nAnswer:")
        assert len(ids) > 700
        s.call_exclusive(lambda backend: None)
        want = answer_tokens(s, ids)[1]
        again, _ = run(s, ids + s.backend.tokenize(" Rule")[1:])
        assert again.cached_tokens >= len(ids)
        final, got = answer_tokens(s, ids)
        assert final.cached_tokens == len(ids) - 1
        same_or_near_tie(s, ids, got, want)
    finally:
        s.close()


@pytest.mark.llama
def test_a_stream_per_slot_keeps_and_copies_prefixes(offline) -> None:
    """SLM_KV_UNIFIED=false: each slot its own KV stream (as llama-server -np). A turn reuses its slot's
    prefix and answers as cold; a copy between streams (the whole stream, then the tail dropped) gives
    the logits a cold prefill gives."""
    from slm_app.backends.llama_cpp_backend import LlamaCppBackend

    s = Scheduler(LlamaCppBackend.load(llama_config("embedded:smollm2-135m-instruct", n_ctx=4096, n_slots=2,
                                                    kv_unified=False)))
    try:
        b = s.backend
        assert s.limits.max_step_tokens >= 512
        assert s.limits.max_sequence_tokens == 2048 and b.info().n_ctx == 2048
        system = {"role": "system", "content": "Answer from this document.\n" + DOCUMENT[:1200]}
        first = chat(s, [system, {"role": "user", "content": "What is rule 3?"}])
        other = chat(s, [system, {"role": "user", "content": "Which lamp is amber?"}])
        common = next(i for i, (x, y) in enumerate(zip(first, other)) if x != y)

        def logits(run) -> np.ndarray:
            def call(backend):
                out = run(backend).row(0).copy()
                backend.release(0), backend.release(1)
                return out
            return s.call_exclusive(call)

        cold_logits = logits(lambda bk: bk.forward([Row(1, tuple(other), 0, True, prompt=True)]))

        def copied(bk):
            bk.forward([Row(0, tuple(first), 0, True, prompt=True)])
            assert bk.copy_prefix(0, 1, common)
            return bk.forward([Row(1, tuple(other[common:]), common, True, prompt=True)])

        warm_logits = logits(copied)
        assert int(np.argmax(warm_logits)) == int(np.argmax(cold_logits))
        np.testing.assert_allclose(warm_logits, cold_logits, atol=0.05)  # other chunk shapes: rounding only

        s.call_exclusive(lambda backend: None)
        turn1 = run(s, first)[0]
        turn2 = first + b.tokenize(turn1.text + "\nAnd rule 4?")
        again, got = answer_tokens(s, turn2)
        assert again.cached_tokens >= len(first), (again.cached_tokens, len(first))
        s.call_exclusive(lambda backend: None)
        same_or_near_tie(s, turn2, got, answer_tokens(s, turn2)[1])
    finally:
        s.close()


# ---- TensorFlow: bit for bit ------------------------------------------------------------------------

@pytest.fixture
def tf_model(tmp_path_factory):
    from slm_app.backends.tf_gpt2 import TFGPT2Backend
    from slm_app.provisioning.tiny_gpt2 import build_random_gpt2
    from slm_app.settings import resolve_tier

    cache_dir = tmp_path_factory.mktemp("slm-cache")
    folder = build_random_gpt2(tmp_path_factory.mktemp("small") / "gpt2", seed=1, n_embd=16, n_layer=2, n_head=2,
                               vocab_size=50257, n_positions=1024, initializer_range=0.5)
    settings = Settings(tier="free", cache_dir=str(cache_dir))
    config = resolve_tier(settings).engine_config(settings).model_copy(
        update={"model": str(folder), "warmup": False, "float16": False, "n_slots": 3})
    backend = TFGPT2Backend.load(config)
    yield backend
    backend.close()


def test_tf_kept_and_copied_prefixes_give_cold_logits_bit_for_bit(tf_model) -> None:
    b = tf_model
    ids = b.tokenize("Once upon a time, in a land far away, there lived " * 4)
    cold_logits = b.forward([Row(0, ids, 0, True, prompt=True)]).row(0).copy()
    # Slot 0 keeps 37 tokens and computes the rest in other chunks; slot 1 copies 50 and computes 1.
    assert b.keep_prefix(0, 37)
    kept = b.forward([Row(0, ids[37:], 37, True, prompt=True)]).row(0).copy()
    assert b.copy_prefix(0, 1, len(ids) - 1)
    copied = b.forward([Row(1, ids[-1:], len(ids) - 1, True, prompt=True)]).row(0).copy()
    assert np.array_equal(cold_logits, kept) and np.array_equal(cold_logits, copied)


def test_tf_scheduler_cached_answers_are_cold_answers(tf_model) -> None:
    s = Scheduler(tf_model)
    try:  # (closing the scheduler closes this test's own backend)
        sampled = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)
        first = s.submit(tf_model.tokenize("The quick brown fox jumps over the lazy dog. " * 6), GREEDY).result(60)
        turn2 = tf_model.tokenize("The quick brown fox jumps over the lazy dog. " * 6 + first.text + " Then")
        for params in (GREEDY, sampled):
            want = cold(s, turn2, params)
            s.submit(tf_model.tokenize("The quick brown fox jumps over the lazy dog. " * 6), GREEDY).result(60)
            got = s.submit(turn2, params).result(60)
            # Only prefilled tokens are reused on TensorFlow (decode rows write other bits): the prompt.
            assert got.cached_tokens > 0
            assert got.text == want.text
    finally:
        s.close(timeout_s=5)


# ---- through the app: the openai SDK and the Chat tab ---------------------------------------------

@contextmanager
def _pro_pair():
    """The pro tier twice: with the prompt cache (the default) and without it (the cold reference)."""
    pytest.importorskip("llama_cpp")
    from conftest import launch_app

    with launch_app(Settings(tier="pro", n_threads=1, flash_attn="off")) as warm, \
            launch_app(Settings(tier="pro", n_threads=1, flash_attn="off", prompt_cache=False)) as cold_app:
        yield warm, cold_app


@pytest.fixture(scope="module")
def pro_apps(offline):
    with _pro_pair() as apps:
        yield apps


def _health(app) -> dict:
    import httpx

    return httpx.get(app.url.rstrip("/") + "/health", timeout=30).json()


@pytest.mark.llama
def test_openai_multi_turn_reports_cached_tokens_and_answers_as_cold(pro_apps) -> None:
    from openai import OpenAI

    warm, cold_app = pro_apps
    sdk = OpenAI(base_url=warm.url.rstrip("/") + "/v1", api_key="unused", max_retries=0)
    reference = OpenAI(base_url=cold_app.url.rstrip("/") + "/v1", api_key="unused", max_retries=0)
    model = sdk.models.list().data[0].id
    messages = [{"role": "system", "content": "You answer from this document.\n" + DOCUMENT[:1500]},
                {"role": "user", "content": "What does the blue lamp mean?"}]
    for turn, follow_up in enumerate(["And the amber one?", "Which rule is last?", "Thanks."]):
        stream = sdk.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24,
                                             stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        want = reference.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
        assert text == want.choices[0].message.content
        assert want.usage.prompt_tokens_details.cached_tokens == 0  # the cache is off there
        cached = usage.prompt_tokens_details.cached_tokens
        if turn == 0:
            assert cached < 40, cached  # at most another test's template opening
        else:
            assert usage.prompt_tokens - cached < 60, (usage.prompt_tokens, cached)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": follow_up}]
    import httpx

    metrics = httpx.get(warm.url.rstrip("/") + "/metrics", timeout=30).text
    line = next(x for x in metrics.splitlines()
                if x.startswith("slm_prompt_tokens_total{") and 'source="cached"' in x and 'endpoint="chat"' in x)
    assert float(line.split()[-1]) > 0
    cache = _health(warm)["prompt_cache"]
    assert cache["enabled"] and cache["cached_tokens"] > 0 and cache["hits"] >= 2


@pytest.mark.llama
def test_chat_tab_second_turn_is_served_from_the_cache(offline) -> None:
    """A fresh pair, so the conversation sits in the same cells in both apps: with other conversations
    cached, the unified cache places it elsewhere and a near tie may part (docs/prompt-cache.md), which
    the scheduler-level tests check with their tolerance; here the text must be equal."""
    with _pro_pair() as (warm, cold_app):
        _chat_tab_turns(warm, cold_app)


def _chat_tab_turns(warm, cold_app) -> None:
    from gradio_client import Client

    system = "Answer from this document. " + DOCUMENT[:1200]

    def conversation(app) -> list[str]:
        client = Client(app.url, verbose=False)
        return [client.predict(message, system, 24, 0, 1.0, 0, api_name="/chat")
                for message in ("What does the red lamp mean?", "And rule 9?")]

    before = _health(warm)["prompt_cache"]["cached_tokens"]
    answers = conversation(warm)
    after = _health(warm)["prompt_cache"]["cached_tokens"]
    assert after - before > 200  # the second turn reused the document and the first exchange
    assert answers == conversation(cold_app)


LAMP = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue", "green", "amber"]},
                                         "step": {"type": "integer"}},
        "required": ["colour", "step"], "additionalProperties": False}
LOOKUP = [{"type": "function", "function": {"name": "lookup_rule", "description": "Look a rule up by number",
                                            "parameters": {"type": "object", "properties": {"rule": {"type": "integer"}},
                                                           "required": ["rule"]}}}]


def _two_turns(pro_apps, extra: dict, answer) -> None:
    """Turn 1, then turn 2 resending it: turn 2 reports cached tokens and answers as the cache-off app."""
    from openai import OpenAI

    warm, cold_app = pro_apps
    sdk, reference = (OpenAI(base_url=a.url.rstrip("/") + "/v1", api_key="unused", max_retries=0)
                      for a in (warm, cold_app))
    model = sdk.models.list().data[0].id
    messages = [{"role": "system", "content": "You answer from this document.\n" + DOCUMENT[:1200]},
                {"role": "user", "content": "Which lamp does rule 6 name, and its step?"}]
    first = sdk.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=48, **extra)
    messages += [answer(first), {"role": "user", "content": "And rule 9?"}]
    second = sdk.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=48, **extra)
    want = reference.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=48, **extra)
    # The document and turn 1 came from the cache: far more than another test's template opening.
    assert second.usage.prompt_tokens_details.cached_tokens > 200, second.usage
    assert want.usage.prompt_tokens_details.cached_tokens == 0
    got, ref = second.choices[0].message, want.choices[0].message
    assert got.content == ref.content
    assert [(c.function.name, c.function.arguments) for c in got.tool_calls or []] == \
        [(c.function.name, c.function.arguments) for c in ref.tool_calls or []]


@pytest.mark.llama
def test_structured_output_second_turn_is_cached_and_answers_as_cold(pro_apps) -> None:
    _two_turns(pro_apps, {"response_format": {"type": "json_schema", "json_schema": {"name": "lamp", "schema": LAMP}}},
               lambda first: {"role": "assistant", "content": first.choices[0].message.content})


@pytest.mark.llama
def test_tool_call_second_turn_is_cached_and_answers_as_cold(pro_apps) -> None:
    def answer(first) -> dict:
        message = first.choices[0].message
        if not message.tool_calls:
            return {"role": "assistant", "content": message.content}
        return {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in message.tool_calls]}

    _two_turns(pro_apps, {"tools": LOOKUP, "tool_choice": "required"}, answer)


@pytest.mark.llama
def test_more_conversations_than_the_cache_holds_are_all_served(offline) -> None:
    """Over HTTP, five conversations on four slots and 1024 cells: everyone gets an answer, and
    /metrics counts the evicted prefixes."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor
    from conftest import launch_app

    with launch_app(Settings(tier="pro", n_threads=1, flash_attn="off", n_ctx=1024, max_prompt_tokens=512,
                             max_new_tokens=32)) as app:
        url = app.url.rstrip("/") + "/v1/chat/completions"
        model = httpx.get(app.url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]["id"]

        def ask(i: int) -> int:
            messages = [{"role": "system", "content": f"Conversation {i}. " + DOCUMENT[i * 40: i * 40 + 1200]},
                        {"role": "user", "content": "Summarise."}]
            body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 16}
            return httpx.post(url, json=body, timeout=600).status_code

        # One after another, then all at once: four ~330-token prefixes do not fit 1024 cells together.
        assert [ask(i) for i in range(5)] == [200] * 5
        with ThreadPoolExecutor(5) as pool:
            assert list(pool.map(ask, range(5))) == [200] * 5
        metrics = httpx.get(app.url.rstrip("/") + "/metrics", timeout=30).text
        evictions = next(x for x in metrics.splitlines() if x.startswith("slm_prompt_cache_evictions_total "))
        assert float(evictions.split()[-1]) >= 1, evictions
