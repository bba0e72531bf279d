"""The pro tier's llama.cpp backend, offline, on the real embedded Gemma 3 270M Q4_K_M.

One backend is loaded per module and shared, as the app shares one. Greedy decoding keeps every
expected output a fact of the model rather than of chance.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from slm_app.backends.base import BackendUnavailable, SamplingParams  # noqa: E402
from slm_app.backends.llama_cpp_backend import (  # noqa: E402
    EMBEDDED_LABEL,
    LlamaCppBackend,
    embedded_gguf,
    validate_gguf,
)
from slm_app.settings import TIER_PROFILES, Settings, Tier  # noqa: E402

pytestmark = pytest.mark.llama

PRO = TIER_PROFILES[Tier.pro]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def offline():
    """No hub: what CI and dev machines see. huggingface_hub reads HF_HUB_OFFLINE at import, so
    its constant is patched as well as the environment."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def settings() -> Settings:
    # The real cache (SLM_CACHE_DIR or ~/.cache/slm_app): the file `python -m slm_app.prepare --pro` makes.
    # One thread: on a shared 2-core CI box two ggml threads collapse when a neighbour takes a core
    # (MODELS.md); one thread is ~25% slower when idle but never 10x slower.
    return Settings(n_threads=1, n_ctx=2048)


@pytest.fixture(scope="module")
def backend(offline, settings) -> LlamaCppBackend:
    b = LlamaCppBackend.load(PRO, settings, PRO.model)  # a hub spec that cannot be reached
    yield b
    b.close()


@pytest.fixture(scope="module")
def gguf_path(backend) -> Path:
    return Path(backend.info()["model_file"])


def alone(backend: LlamaCppBackend, prompt: str, params: SamplingParams = GREEDY):
    return backend.generate([prompt], params)[0]


def test_load_falls_back_to_the_embedded_model(backend):
    info = backend.info()
    assert info["source"] == "offline-fallback"
    assert info["model"] == EMBEDDED_LABEL
    assert "unreachable" in info["reason"]
    assert info["architecture"] == "gemma3"
    assert info["quantization"] == "Q4_K_M"
    assert info["chat_template"] is False  # the base model has none: raw completion
    assert "Gemma Terms of Use" in info["license"]
    assert 200 < info["size_mb"] < 300 and info["load_time_s"] > 0
    assert info["n_ctx"] >= 2048 and info["n_threads"] >= 1 and info["n_seq_max"] == PRO.limits.max_prompts
    assert backend.vocab_width == 262_144


def test_generate_returns_text(backend):
    seq = alone(backend, "The capital of France is")
    assert seq.text.strip() and seq.finish_reason == "length"
    assert seq.completion_tokens == GREEDY.max_new_tokens
    assert seq.prompt_tokens == backend.count_tokens("The capital of France is") > 1


def test_greedy_is_deterministic_and_requests_do_not_leak(backend):
    first = alone(backend, "Water boils at")
    alone(backend, "A long story about dragons and knights begins " * 20)  # fills the KV cache
    again = alone(backend, "Water boils at")
    assert again.token_ids == first.token_ids and again.text == first.text


def test_streaming_yields_growing_text(backend):
    texts = [seqs[0].text for seqs in backend.decode(["Once upon a time"], GREEDY)]
    assert len(set(texts)) >= 5
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "streamed text only grows"
    assert backend.last_stats["ttft_s"] > 0 and backend.last_stats["completion_tokens"] == GREEDY.max_new_tokens


def test_streaming_utf8_is_never_split(backend):
    # Gemma spells each flamingo as 4 byte tokens: a character arrives in pieces.
    texts = [seqs[0].text for seqs in backend.decode(["🦩🦩🦩🦩🦩🦩"], GREEDY)]
    assert texts[-1].startswith("🦩🦩🦩🦩")
    assert not any("\ufffd" in t for t in texts)
    assert all(texts[-1].startswith(t) for t in texts)
    cut = alone(backend, "🦩🦩🦩🦩🦩🦩", SamplingParams(max_new_tokens=6, temperature=0.0))
    assert cut.text == "🦩", "the half character left by max_new_tokens is dropped, not shown as U+FFFD"


def test_batch_returns_one_result_per_prompt_like_alone(backend):
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    batch = backend.generate(prompts, GREEDY)
    assert [s.prompt for s in batch] == prompts
    for prompt, seq in zip(prompts, batch):
        ref = alone(backend, prompt)
        # A 3-row llama.cpp batch sums in another order than a 1-row one, so a near-tie may flip
        # late in the output (see the module docstring); the start must agree.
        assert seq.token_ids[:8] == ref.token_ids[:8], prompt
        assert seq.finish_reason == "length"


def test_concurrent_requests_queue_and_do_not_interleave(backend):
    prompts = ["The three primary colours are", "My favourite animal is the"]
    refs = [alone(backend, p) for p in prompts]
    results, spans = [None, None], [None, None]

    def worker(i):
        t_first = t_last = None
        for seqs in backend.decode([prompts[i]], GREEDY):
            t_last = time.perf_counter()
            t_first = t_first or t_last
        results[i], spans[i] = seqs[0], (t_first, t_last)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    assert [r.token_ids for r in results] == [r.token_ids for r in refs]
    assert [r.text for r in results] == [r.text for r in refs]
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 < b0, "one request's steps all come before the other's"


def test_closing_a_stream_early_releases_the_model(backend):
    stream = backend.decode(["Once upon a time"], SamplingParams(max_new_tokens=200, temperature=0.0))
    seqs = next(stream)
    next(stream)
    stream.close()
    assert seqs[0].finish_reason == "cancelled"
    done = threading.Event()
    threading.Thread(target=lambda: (alone(backend, "Hello"), done.set())).start()
    assert done.wait(20), "a closed stream must not keep the lock"


def test_cancel_event_stops_generation(backend):
    cancel = threading.Event()
    seqs = []
    for n, seqs in enumerate(backend.decode(["Once upon a time"], SamplingParams(max_new_tokens=200,
                                                                                  temperature=0.0), cancel=cancel)):
        if n == 3:
            cancel.set()
    assert seqs[0].finish_reason == "cancelled" and seqs[0].completion_tokens < 10


class DigitsOnly:
    """A tiny TokenConstraint: only digit tokens, then end-of-text after ``n`` of them."""

    def __init__(self, tokenizer, width: int, n: int = 5):
        self.digits = np.zeros(width, dtype=bool)
        for d in "0123456789":
            (tok,) = tokenizer.tokenize_str(d)
            self.digits[tok] = True
        self.eos = np.zeros(width, dtype=bool)
        self.eos[tokenizer.eos_token] = True
        self.n, self.seen = n, []

    def allowed_tokens(self) -> np.ndarray:
        return self.eos if len(self.seen) >= self.n else self.digits

    def consume(self, token_id: int) -> None:
        self.seen.append(token_id)

    def is_finished(self) -> bool:
        return len(self.seen) > self.n


def test_constraint_mask_is_respected(backend):
    tok = backend.llguidance_tokenizer()
    assert backend.llguidance_tokenizer() is tok  # cached
    prompt = "My favourite word is"
    free = alone(backend, prompt)
    assert not free.text.strip().isdigit()
    for params in (GREEDY, SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, seed=1)):
        constraint = DigitsOnly(tok, backend.vocab_width)
        seq = backend.generate([prompt], params, constraints=[constraint])[0]
        assert seq.text.isdigit() and len(seq.text) == 5, seq.text
        assert seq.finish_reason == "stop"
        assert constraint.seen[-1] == tok.eos_token  # the end-of-text token was sampled and consumed


def test_stop_sequences_cut_the_text(backend):
    params = SamplingParams(max_new_tokens=40, temperature=0.0, stop=(" 7",))
    texts = [seqs[0].text for seqs in backend.decode(["1, 2, 3, 4,"], params)]
    assert texts[-1] == " 5, 6,"
    assert " 7" not in "".join(texts), "a stop string is never shown, even for a moment"
    assert alone(backend, "1, 2, 3, 4,", params).finish_reason == "stop"


def test_max_new_tokens_is_respected(backend):
    seq = alone(backend, "Once upon a time", SamplingParams(max_new_tokens=5, temperature=0.7, seed=3))
    assert seq.completion_tokens == 5 and seq.finish_reason == "length"


def test_seeded_sampling_is_reproducible(backend):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=42)
    assert alone(backend, "Once upon a time", params).token_ids == alone(backend, "Once upon a time", params).token_ids


def test_chat_template_formats_one_user_turn(backend, monkeypatch):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    assert backend.format_prompt("Hi") == "Hi"  # no template in the base model: raw completion
    template = (r"{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] }}"
                r"{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
    fmt = Jinja2ChatFormatter(template=template, eos_token="<eos>", bos_token="<bos>")
    monkeypatch.setattr(backend, "_chat_formatter", fmt)
    assert backend.format_prompt("Hi") == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert backend.format_prompt("Hi", use_chat_template=False) == "Hi"
    # The template's <bos> and turn markers are single control tokens, and BOS is not doubled.
    assert backend.count_tokens("Hi") == 10  # <bos> <start_of_turn> user \n Hi <end_of_turn> \n <start_of_turn> model \n
    seq = backend.generate(["Hi"], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    assert seq.prompt_tokens == 10 and seq.completion_tokens >= 1


def test_embedded_gguf_assembles_once(tmp_path):
    path = embedded_gguf(tmp_path)
    t0 = time.perf_counter()
    assert embedded_gguf(tmp_path) == path
    assert time.perf_counter() - t0 < 0.05, "an assembled file is checked by size, not rehashed"
    with path.open("r+b") as fh:
        fh.truncate(1_000_000)
    assert embedded_gguf(tmp_path).stat().st_size == 253_113_024  # a damaged file is rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_corrupt_gguf_is_reported_and_the_process_survives(tmp_path, gguf_path, offline, settings):
    random_bytes = tmp_path / "random.gguf"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    truncated = tmp_path / "truncated.gguf"
    with gguf_path.open("rb") as src:
        truncated.write_bytes(src.read(50_000_000))
    empty = tmp_path / "empty.gguf"
    empty.touch()
    for path, why in [(random_bytes, "not a GGUF file"), (truncated, "truncated"), (empty, "empty"),
                      (tmp_path / "missing.gguf", "does not exist")]:
        with pytest.raises(BackendUnavailable, match=why):
            validate_gguf(path)
        with pytest.raises(BackendUnavailable, match=why):
            LlamaCppBackend.load(PRO, settings, str(path))
    # Without the check, llama.cpp itself refuses these files with a ValueError instead of crashing.
    code = ("import sys, llama_cpp\nfor p in sys.argv[1:]:\n  try: llama_cpp.Llama(p, n_ctx=256, verbose=False)\n"
            "  except ValueError: print('refused')")
    out = subprocess.run([sys.executable, "-c", code, str(random_bytes), str(truncated)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["refused", "refused"]


def test_small_context_groups_the_batch_and_refuses_overlong_prompts(offline, gguf_path):
    small = LlamaCppBackend.load(PRO, Settings(n_ctx=256, n_threads=1), str(gguf_path))
    try:
        assert small.info()["source"] == "local"
        params = SamplingParams(max_new_tokens=40, temperature=0.0)
        prompts = ["Once upon a time " * 16, "The capital of France is " * 16, "1, 2, 3, 4,"]
        # prompt + 40 cells each: the first two fill the 256-cell cache together, the third runs after.
        seqs = small.generate(prompts, params)
        assert [s.completion_tokens for s in seqs] == [40, 40, 40]
        assert seqs[2].token_ids == small.generate(prompts[2:], params)[0].token_ids  # it ran alone
        with pytest.raises(ValueError, match="context holds"):
            small.generate(["word " * 300], params)
    finally:
        small.close()
    with pytest.raises(BackendUnavailable, match="closed"):  # not a crash on freed memory
        small.generate(["Hello"], params)
