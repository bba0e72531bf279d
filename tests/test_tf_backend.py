"""The TensorFlow GPT-2 backend, offline, on real (randomly initialised) models built here.

tiny-gpt2 is the free tier's model, but its 2-wide hidden state goes through a LayerNorm that
leaves only two possible outputs, so greedy decoding repeats one token whatever the prompt.
Comparisons that must tell prompts apart (batch vs alone, XLA vs no XLA) therefore use a
slightly wider random GPT-2 ("small", n_embd=16), built by the same code with a large
initialisation range (0.5 instead of GPT-2's 0.02, at which a random model ignores its input).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pytest

from slm_app.backends.base import BackendUnavailable, SamplingParams
from slm_app.backends.tf_gpt2 import (TINY_GPT2_ID, TFGPT2Backend, _stable_text, build_offline_tiny_gpt2,
                                      build_random_gpt2, offline_tiny_gpt2_dir)
from slm_app.settings import TIER_PROFILES, Settings, Tier

FREE = TIER_PROFILES[Tier.free]  # float16, aggressive GC
# The shared tiny backend skips the free tier's gc.collect() after every decode (~0.3 s each with
# TensorFlow loaded); the warm-up and fallback tests load the real free profile.
FREE_NO_GC = FREE.model_copy(update={"aggressive_gc": False})
STANDARD_FP32 = TIER_PROFILES[Tier.standard]  # float16=False, batch buckets 1 and 3
PROMPTS = ["Hello", "The quick brown fox jumps over", "Once upon a time, in a land far away, there"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slm-cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_dir: Path) -> Path:
    return build_offline_tiny_gpt2(offline_tiny_gpt2_dir(cache_dir))


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path, cache_dir: Path) -> Iterator[TFGPT2Backend]:
    backend = TFGPT2Backend.load(FREE_NO_GC, Settings(cache_dir=str(cache_dir), warmup=False), str(tiny_dir))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory) -> Path:
    return build_random_gpt2(tmp_path_factory.mktemp("small") / "gpt2-small-random", seed=1,
                             n_embd=16, n_layer=2, n_head=2, vocab_size=50257, n_positions=1024,
                             initializer_range=0.5)


def _load_small(small_dir: Path, cache_dir: Path, xla: bool) -> TFGPT2Backend:
    return TFGPT2Backend.load(STANDARD_FP32, Settings(cache_dir=str(cache_dir), warmup=False, xla=xla), str(small_dir))


@pytest.fixture(scope="session")
def small_xla(small_dir: Path, cache_dir: Path) -> Iterator[TFGPT2Backend]:
    backend = _load_small(small_dir, cache_dir, xla=True)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def small_graph(small_dir: Path, cache_dir: Path) -> Iterator[TFGPT2Backend]:
    backend = _load_small(small_dir, cache_dir, xla=False)
    yield backend
    backend.close()


def _weights(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(folder / "tf_model.h5") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_offline_tiny_build_is_deterministic_and_complete(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_offline_tiny_gpt2(tmp_path / "again")
    a, b = _weights(tiny_dir), _weights(again)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary build folder left behind"
    assert build_offline_tiny_gpt2(again) == again  # already complete: not rebuilt


def test_tiny_info_says_random_weights(tiny: TFGPT2Backend) -> None:
    import tf_keras

    assert tf_keras.mixed_precision.global_policy().name == "float32", "float16 policy leaked out of load()"
    info = tiny.info()
    assert info["random_weights"] is True and info["source"] == "local"
    assert info["dtype"] == "float16" and info["n_params"] == 102_714
    assert info["xla"] is True and info["xla_note"] is None
    assert tiny.vocab_width == 50257 and tiny.eos_token_id == 50256
    assert tiny.count_tokens("Hello world") == 2


def test_tiny_id_falls_back_to_offline_build(tiny_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    backend = TFGPT2Backend.load(FREE, Settings(cache_dir=str(cache_dir), warmup=False), TINY_GPT2_ID)
    try:
        info = backend.info()
        assert info["source"] == "offline-fallback" and info["model_path"] == str(tiny_dir)
        assert "HF_HUB_OFFLINE" in info["reason"] and info["random_weights"] is True
    finally:
        backend.close()


def test_unknown_model_is_unavailable_with_reason(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(BackendUnavailable, match="HF_HUB_OFFLINE is set"):
        TFGPT2Backend.load(TIER_PROFILES[Tier.standard], Settings(cache_dir=str(tmp_path), warmup=False),
                           "acme/no-such-gpt2")
    assert not offline_tiny_gpt2_dir(tmp_path).exists(), "only tiny-gpt2 may fall back to the local build"


def test_greedy_is_deterministic_and_xla_matches_graph(small_xla: TFGPT2Backend, small_graph: TFGPT2Backend) -> None:
    assert small_xla.info()["xla"] is True and small_graph.info()["xla"] is False
    runs = [b.generate([PROMPTS[1]], GREEDY)[0].token_ids for b in (small_xla, small_xla, small_graph)]
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == GREEDY.max_new_tokens
    assert len(set(runs[0])) > 1, "the small model should not just repeat one token"


def test_batch_matches_each_prompt_alone(small_xla: TFGPT2Backend) -> None:
    batch = small_xla.generate(PROMPTS, GREEDY)
    alone = [small_xla.generate([p], GREEDY)[0] for p in PROMPTS]
    assert [s.prompt for s in batch] == PROMPTS
    assert [s.token_ids for s in batch] == [s.token_ids for s in alone]
    assert len({tuple(s.token_ids) for s in batch}) > 1, "prompts should lead to different continuations"
    # Sampling too: row i of a seeded batch uses seed + i.
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    rows = small_xla.generate(PROMPTS, sampled)
    third = small_xla.generate([PROMPTS[2]], SamplingParams(max_new_tokens=8, temperature=1.0, seed=9))[0]
    assert rows[2].token_ids == third.token_ids


def test_seed_reproducibility(tiny: TFGPT2Backend) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=1234)
    a, b = (tiny.generate(["Seeded"], params)[0] for _ in range(2))
    c = tiny.generate(["Seeded"], SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=4321))[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_streaming_yields_one_update_per_token(tiny: TFGPT2Backend) -> None:
    params = SamplingParams(max_new_tokens=9, temperature=1.0, seed=3)
    updates = [(len(seqs[0].token_ids), seqs[0].text, seqs[0].finish_reason)
               for seqs in tiny.decode(["Stream me"], params)]
    assert [n for n, _, _ in updates] == list(range(1, 10))
    assert all(b.startswith(a) for (_, a, _), (_, b, _) in zip(updates, updates[1:])), "text must only grow"
    assert [r for _, _, r in updates] == [None] * 8 + ["length"]


def test_max_new_tokens_is_respected(tiny: TFGPT2Backend) -> None:
    for n in (1, 5):
        seq = tiny.generate(["Count"], SamplingParams(max_new_tokens=n, temperature=1.0, seed=0))[0]
        assert seq.completion_tokens == n and seq.finish_reason == "length"


def test_stop_strings_cut_the_text(tiny: TFGPT2Backend) -> None:
    free = tiny.generate(["Stop"], SamplingParams(max_new_tokens=16, temperature=1.0, seed=11))[0]
    stop = free.text[len(free.text) // 2:][:3]
    stopped = tiny.generate(["Stop"], SamplingParams(max_new_tokens=16, temperature=1.0, seed=11, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert stopped.completion_tokens < free.completion_tokens


def test_stable_text_holds_back_partial_characters_and_stop_prefixes() -> None:
    assert _stable_text("caf\ufffd", ()) == "caf"
    assert _stable_text("one\n", ("\n\n",)) == "one"
    assert _stable_text("one\nx", ("\n\n",)) == "one\nx"


class DigitsOrEnd:
    """A real TokenConstraint: only tokens made of ASCII digits, then end-of-text after 4 tokens."""

    def __init__(self, backend: TFGPT2Backend):
        vocab = backend._tokenizer.convert_ids_to_tokens(list(range(backend.vocab_width)))
        self.digits = np.array([t.isascii() and t.isdigit() for t in vocab])
        self.eos = backend.eos_token_id
        self.seen: list[int] = []

    def allowed_tokens(self) -> np.ndarray:
        if len(self.seen) >= 4:
            mask = np.zeros_like(self.digits)
            mask[self.eos] = True
            return mask
        return self.digits

    def consume(self, token_id: int) -> None:
        self.seen.append(token_id)

    def is_finished(self) -> bool:
        return bool(self.seen) and self.seen[-1] == self.eos


def test_constraint_mask_is_respected(tiny: TFGPT2Backend, small_xla: TFGPT2Backend) -> None:
    for backend in (tiny, small_xla):
        constraints = [DigitsOrEnd(backend), DigitsOrEnd(backend)]
        seqs = backend.generate(["Numbers:", "Pick some"], SamplingParams(max_new_tokens=10, temperature=1.0, seed=2),
                                constraints=constraints)
        for seq, c in zip(seqs, constraints):
            assert seq.token_ids and all(c.digits[t] for t in seq.token_ids)
            assert seq.text.isdigit() and seq.finish_reason == "stop"
            assert c.seen == seq.token_ids + [c.eos]


def test_cancel_and_lock(tiny: TFGPT2Backend) -> None:
    cancel = threading.Event()
    steps = tiny.decode(["Cancel me"], SamplingParams(max_new_tokens=30, temperature=1.0, seed=0), cancel=cancel)
    first = next(steps)
    assert tiny._lock.locked(), "the lock is held while a decode is in progress"
    cancel.set()
    rest = list(steps)
    assert len(rest) == 1 and first[0].finish_reason == "cancelled" and first[0].completion_tokens == 1
    assert not tiny._lock.locked()


def test_warmup_compiles_every_bucket_so_requests_do_not(tiny_dir: Path, cache_dir: Path) -> None:
    limits = FREE.limits.model_copy(update={"max_prompt_tokens": 20, "max_new_tokens": 8, "max_structured_tokens": 8})
    profile = FREE.model_copy(update={"limits": limits})
    backend = TFGPT2Backend.load(profile, Settings(cache_dir=str(cache_dir)), str(tiny_dir))  # warmup on
    try:
        info = backend.info()
        assert info["buckets"] == {"batch": [1], "prompt_tokens": [32], "context_tokens": [32]}
        assert info["warmup_s"] > 0
        compiled = dict(backend._fns._concrete)
        backend.generate(["A prompt within the limits"], SamplingParams(max_new_tokens=8, temperature=0.5, seed=1))
        assert backend._fns._concrete == compiled, "a request inside the tier's limits compiled a new shape"
    finally:
        backend.close()


class _NoXla:
    """Stands in for a jit-compiled tf.function whose compilation fails."""

    def get_concrete_function(self, *args):
        def fail(*args):
            raise RuntimeError("XLA cannot compile this")
        return fail


def test_xla_failure_falls_back_to_graphs(tiny_dir: Path, cache_dir: Path) -> None:
    backend = TFGPT2Backend.load(FREE, Settings(cache_dir=str(cache_dir), warmup=False), str(tiny_dir))
    try:
        backend._fns._functions[True] = {"prefill": _NoXla(), "step": _NoXla()}
        seq = backend.generate(["Still works"], GREEDY)[0]
        assert seq.completion_tokens == GREEDY.max_new_tokens
        info = backend.info()
        assert info["xla"] is False and "XLA cannot compile this" in info["xla_note"]
    finally:
        backend.close()
