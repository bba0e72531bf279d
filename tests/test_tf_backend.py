"""The TensorFlow GPT-2 backend, offline, on real (randomly initialised) models built here.

tiny-gpt2 is the free tier's model, but its 2-wide hidden state goes through a LayerNorm that
leaves only two possible outputs, so greedy decoding repeats one token whatever the prompt.
Tests that must tell prompts apart (numerics, slots) therefore use a slightly wider random GPT-2
("small", n_embd=16), built by the same code with a large initialisation range (0.5 instead of
GPT-2's 0.02, at which a random model ignores its input). Requests go through the real
``Scheduler``, as the service sends them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pytest

from slm_app.backends.base import BackendUnavailable, Row, SamplingParams
from slm_app.backends.tf_gpt2 import DECODE_STEPS, PREFILL_BLOCK, TFGPT2Backend
from slm_app.backends.tf_lora import TARGETS
from slm_app.provisioning.tiny_gpt2 import (TINY_GPT2_ID, build_offline_tiny_gpt2, build_random_gpt2,
                                            configure_tensorflow_env, offline_tiny_gpt2_dir)
from slm_app.scheduler import Scheduler
from slm_app.settings import TIER_PROFILES, EngineConfig, Settings, Tier, resolve_tier

PROMPTS = ["Hello", "The quick brown fox jumps over", "Once upon a time, in a land far away, there lived " * 3]
SMALL = dict(n_embd=16, n_layer=2, n_head=2, vocab_size=50257, n_positions=1024, initializer_range=0.5)
# Wide enough for the decode kernel (tf_matvec, n_embd >= 256), so the same tests hold it to the same rules.
WIDE = dict(SMALL, n_embd=256, n_head=4)


def engine_config(model: str | Path, cache_dir: Path, **overrides) -> EngineConfig:
    """The free tier's engine config (what the app hands the backend), with overrides."""
    tier = Settings(tier="free", cache_dir=str(cache_dir))
    from slm_app.settings import resolve_tier

    config = resolve_tier(tier).engine_config(tier)
    return config.model_copy(update={"model": str(model), "warmup": False, **overrides})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slm-cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_dir: Path) -> Path:
    return build_offline_tiny_gpt2(offline_tiny_gpt2_dir(cache_dir))


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory) -> Path:
    return build_random_gpt2(tmp_path_factory.mktemp("small") / "gpt2-small-random", seed=1, **SMALL)


@contextmanager
def float32_backend(folder: Path, cache_dir: Path, **overrides) -> Iterator[TFGPT2Backend]:
    """A float32 test model with 3 slots, closed after use."""
    backend = TFGPT2Backend.load(engine_config(folder, cache_dir, float16=False, n_slots=3, **overrides))
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="session")
def small(small_dir: Path, cache_dir: Path) -> Iterator[TFGPT2Backend]:
    with float32_backend(small_dir, cache_dir) as backend:
        yield backend


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory) -> Path:
    return build_random_gpt2(tmp_path_factory.mktemp("wide") / "gpt2-wide-random", seed=2, **WIDE)


@pytest.fixture(scope="session")
def wide(wide_dir: Path, cache_dir: Path) -> Iterator[TFGPT2Backend]:
    with float32_backend(wide_dir, cache_dir) as backend:
        assert backend.info().details["matvec_kernel"].startswith("on"), backend.info().details["matvec_kernel"]
        yield backend


@pytest.fixture(params=["small", "wide"])
def model(request) -> TFGPT2Backend:
    """Each float32 test model: "small" decodes on XLA's matmul, "wide" on the decode kernel."""
    return request.getfixturevalue(request.param)


def _weights(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(folder / "tf_model.h5") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


_HF_MODELS: dict[str, object] = {}


def _hf_logits(backend: TFGPT2Backend, ids: list[int]) -> np.ndarray:
    """transformers' own TFGPT2LMHeadModel on the same weights (loaded from the same folder): logits at
    every position."""
    tf = configure_tensorflow_env()
    path = backend.info().details["model_path"]
    if path not in _HF_MODELS:
        from transformers import TFGPT2LMHeadModel

        _HF_MODELS[path] = TFGPT2LMHeadModel.from_pretrained(path)
    return _HF_MODELS[path](tf.constant([ids]), training=False).logits.numpy()[0].astype(np.float32)


def test_offline_tiny_build_is_deterministic_and_complete(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_offline_tiny_gpt2(tmp_path / "again")
    a, b = _weights(tiny_dir), _weights(again)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary build folder left behind"
    assert build_offline_tiny_gpt2(again) == again  # already complete: not rebuilt


def test_free_tier_tiny_runs_float16_and_says_its_weights_are_random(tiny_dir: Path, cache_dir: Path) -> None:
    import tf_keras

    config = engine_config(tiny_dir, cache_dir)
    assert config.float16 and config.n_slots == TIER_PROFILES[Tier.free].parallel
    backend = TFGPT2Backend.load(config)
    try:
        assert tf_keras.mixed_precision.global_policy().name == "float32", "float16 policy leaked out of load()"
        info = backend.info()
        assert info.backend == "tensorflow" and info.random_weights is True and info.source == "local"
        assert info.details["dtype"] == "float16" and info.details["n_params"] == 102_714
        assert info.details["xla"] is True and info.details["xla_note"] is None
        assert info.n_ctx == 256 + 96 and info.n_slots == config.n_slots and info.vocab_size == 50257
        assert backend.tokenize("Hello world") == [15496, 995] and backend.tokenize("") == [50256]
        assert backend.token_bytes(15496) == b"Hello" and backend.is_end(50256) and not backend.is_end(995)
        scheduler = Scheduler(backend)
        try:
            done = scheduler.submit(backend.tokenize("Hi"), SamplingParams(max_new_tokens=12, temperature=1.0,
                                                                           seed=3)).result(timeout=120)
            assert done.completion_tokens == 12 and done.finish_reason == "length" and done.text
        finally:
            scheduler.close()
    finally:
        backend.close()


def test_tiny_id_falls_back_to_offline_build(tiny_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    backend = TFGPT2Backend.load(engine_config(TINY_GPT2_ID, cache_dir))
    try:
        info = backend.info()
        assert info.source == "offline-fallback" and info.details["model_path"] == str(tiny_dir)
        assert "HF_HUB_OFFLINE" in info.reason and info.random_weights is True and info.model_id == TINY_GPT2_ID
    finally:
        backend.close()


def test_unknown_model_is_unavailable_with_reason(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(BackendUnavailable, match="HF_HUB_OFFLINE is set"):
        TFGPT2Backend.load(engine_config("acme/no-such-gpt2", tmp_path))
    assert not offline_tiny_gpt2_dir(tmp_path).exists(), "only tiny-gpt2 may fall back to the local build"


def test_logits_match_transformers_through_chunked_prefill_and_decode(model: TFGPT2Backend) -> None:
    small = model
    ids = small.tokenize(PROMPTS[2])
    assert len(ids) > PREFILL_BLOCK + 1  # more than one prefill block
    split = 21  # two chunks, the second one starting inside a block
    first = small.forward([Row(1, tuple(ids[:split]), 0, logits=False)])
    assert len(first) == 0
    out = small.forward([Row(1, tuple(ids[split:]), split)])
    seq = list(ids)
    for _ in range(6):
        reference = _hf_logits(small, seq)[-1]
        np.testing.assert_allclose(out.row(0), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
        assert out.argmax(0) == int(np.argmax(reference)) == int(np.argmax(out.row(0)))
        seq.append(out.argmax(0))
        out = small.forward([Row(1, (seq[-1],), len(seq) - 1)])
    small.release(1)


def test_score_matches_transformers(small: TFGPT2Backend) -> None:
    ids = small.tokenize(PROMPTS[2] + PROMPTS[1])
    logits = _hf_logits(small, ids).astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    reference = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    expected = reference[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(small.score(ids), expected, rtol=1e-4, atol=1e-4)


class _Borrowed:
    """The session's backend lent to one scheduler: everything but ``close``."""

    def __init__(self, backend: TFGPT2Backend):
        self._backend = backend

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def close(self) -> None:
        pass


class _OneStep(_Borrowed):
    """The backend with its several-steps-per-call greedy decoding switched off: one ``forward`` per token."""

    def max_greedy_steps(self) -> int:
        return 0


def _run_all(backend: TFGPT2Backend, requests: list[tuple[str, SamplingParams]], together: bool,
             one_step: bool = False, steps: list[int] | None = None):
    """Each request's text and token count: all submitted at once (sharing steps) or one after another.
    ``steps`` receives how many backend calls the scheduler made."""
    scheduler = Scheduler(_OneStep(backend) if one_step else _Borrowed(backend))
    try:
        if together:
            handles = [scheduler.submit(backend.tokenize(p), params) for p, params in requests]
            finals = [h.result(timeout=300) for h in handles]
        else:
            finals = [scheduler.submit(backend.tokenize(p), params).result(timeout=300) for p, params in requests]
        if steps is not None:
            steps.append(scheduler.steps)
        return [(f.text, f.completion_tokens, f.finish_reason) for f in finals]
    finally:
        scheduler.close()


@pytest.mark.parametrize("attention", ["batched", "per-row"])
def test_requests_decode_the_same_alone_and_next_to_each_other(model: TFGPT2Backend, attention: str) -> None:
    """Greedy and seeded answers are exactly the same whatever else shares the steps and the slots."""
    small = model
    small._graph.per_row_attention = attention == "per-row"
    small._graph._concrete.clear()
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    # The long prompt (> max_step_tokens) is prefilled in chunks that depend on what else is running.
    long_prompt = PROMPTS[2] * 5
    assert len(small.tokenize(long_prompt)) > small.limits().max_step_tokens
    requests = [(PROMPTS[0], greedy), (PROMPTS[1], greedy), (long_prompt, greedy),
                (PROMPTS[1], SamplingParams(max_new_tokens=16, temperature=1.0, seed=7))]
    alone = _run_all(small, requests, together=False)
    together = _run_all(small, requests, together=True)
    assert alone == together
    assert len({text for text, _, _ in alone[:3]}) == 3, "prompts should lead to different continuations"


@pytest.mark.parametrize("attention", ["batched", "per-row"])
def test_greedy_steps_in_one_call_are_the_steps_one_at_a_time(model: TFGPT2Backend, attention: str) -> None:
    """``decode_greedy`` picks exactly the tokens of one ``forward`` + argmax per step, for rows decoding
    together or alone, across a context window boundary, however the steps are split into calls."""
    small = model
    small._graph.per_row_attention = attention == "per-row"
    small._graph._concrete.clear()
    windows = small.info().details["buckets"]["context_windows"]
    # Crosses the first window while decoding (the attention kernel has one window: the whole context).
    window = windows[0] if len(windows) > 1 else 100
    prompts = [small.tokenize(PROMPTS[0]), small.tokenize(PROMPTS[1]),
               small.tokenize(PROMPTS[2] * 4)[: window - 6]]
    steps = small.max_greedy_steps()
    assert steps >= 2
    n = 2 * steps + 10

    def prefill(slots: list[int]) -> list[int]:
        out = small.forward([Row(s, tuple(prompts[s]), 0) for s in slots])
        return [out.argmax(i) for i in range(len(slots))]

    def one_at_a_time(slots: list[int]) -> list[list[int]]:
        seqs = [[t] for t in prefill(slots)]
        for _ in range(n - 1):
            out = small.forward([Row(s, (seq[-1],), len(prompts[s]) + len(seq) - 1) for s, seq in zip(slots, seqs)])
            for i, seq in enumerate(seqs):
                seq.append(out.argmax(i))
        return seqs

    def in_calls(slots: list[int], splits: list[int]) -> list[list[int]]:
        seqs = [[t] for t in prefill(slots)]
        for k in splits:
            picks = small.decode_greedy([Row(s, (seq[-1],), len(prompts[s]) + len(seq) - 1)
                                         for s, seq in zip(slots, seqs)], k)
            assert picks.shape == (len(slots), k)
            for seq, row in zip(seqs, picks.tolist()):
                seq.extend(row)
        return seqs

    splits = [1, steps, 3, steps, n - 1 - 4 - 2 * steps]
    assert min(splits) >= 1 and sum(splits) == n - 1
    together = one_at_a_time([0, 1, 2])
    assert len({tuple(seq) for seq in together}) == 3
    assert in_calls([0, 1, 2], splits) == together
    assert in_calls([2], splits[::-1]) == one_at_a_time([2]) == [together[2]]
    with pytest.raises(ValueError, match="do not fit"):
        small.decode_greedy([Row(0, (1,), small.limits().max_sequence_tokens - 2)], 3)
    for slot in range(3):
        small.release(slot)


def test_scheduler_decodes_greedy_requests_several_tokens_per_call(small: TFGPT2Backend) -> None:
    """Greedy requests with nothing to do between tokens run several steps per backend call, and their
    answers, stop strings and token counts are exactly those of one step per call."""
    greedy = SamplingParams(max_new_tokens=23, temperature=0.0)
    requests = [(PROMPTS[0], greedy), (PROMPTS[1], greedy), (PROMPTS[2] * 4, greedy)]
    reference = _run_all(small, requests, together=False, one_step=True)
    text = reference[1][0]
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a stop string that turns up mid-call
    requests.append((PROMPTS[1], SamplingParams(max_new_tokens=23, temperature=0.0, stop=(stop,))))
    reference = _run_all(small, requests, together=False, one_step=True)
    assert reference[3][2] == "stop" and len(reference[3][0]) < len(text)
    for together in (False, True):
        calls: list[int] = []
        assert _run_all(small, requests, together=together, steps=calls) == reference
        tokens = sum(n for _, n, _ in reference)
        assert calls[0] < tokens / 2, f"{calls[0]} backend calls for {tokens} tokens: not several per call"


def test_batch_invariance_off_runs_a_lone_row_alone(small: TFGPT2Backend, small_dir: Path, cache_dir: Path,
                                                   monkeypatch) -> None:
    """``SLM_BATCH_INVARIANT=false``: a lone decoding request runs as one row (no dummy twin), and its
    logits agree with the batch-invariant ones up to rounding; two requests still share a batch row."""
    fast = TFGPT2Backend.load(engine_config(small_dir, cache_dir, float16=False, n_slots=3, batch_invariant=False))
    try:
        assert fast.info().details["batch_invariant"] is False
        assert fast.info().details["buckets"]["decode_rows"] == [1, 2, 3]
        ids = small.tokenize(PROMPTS[1])
        outs = []
        for backend in (small, fast):
            first = backend.forward([Row(0, tuple(ids), 0)])
            outs.append(backend.forward([Row(0, (first.argmax(0),), len(ids))]).row(0))
            backend.release(0)
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4 * np.abs(outs[0]).max())
        widths = {shape[-1][1] for shape in fast.compiled_shapes() if shape[1] == "decode"}
        assert widths == {1}, f"a lone row ran as {widths}"
        # The lone row's matrix-vector products read the row-major copies; a batch reads Keras' weights.
        row_major = {id(block[f"{name}_t"].handle) for block in fast._graph.blocks for name in ("attn", "proj", "fc", "out")}
        keras = {id(block[name][0].handle) for block in fast._graph.blocks for name in ("attn", "proj", "fc", "out")}

        def reads(rows: int) -> set[int]:
            fn = next(f for key, f in fast._graph._concrete.items() if key[1] == "decode" and key[-1][1] == rows)
            return {id(t) for t in fn.captured_inputs}

        assert row_major <= reads(1) and not keras & reads(1)
        fast.forward([Row(0, (1,), 0), Row(1, (2,), 0)])
        assert {shape[-1][1] for shape in fast.compiled_shapes() if shape[1] == "decode"} == {1, 2}
        assert keras <= reads(2) and not row_major & reads(2)
        defaults = Settings(tier="standard")
        assert resolve_tier(defaults).engine_config(defaults).batch_invariant is True
        monkeypatch.setenv("SLM_BATCH_INVARIANT", "false")
        opted_out = Settings(tier="standard")
        assert resolve_tier(opted_out).engine_config(opted_out).batch_invariant is False
    finally:
        fast.close()


def test_decode_kernel_gives_a_lone_row_its_batch_bits(wide: TFGPT2Backend, wide_dir: Path, cache_dir: Path,
                                                       monkeypatch) -> None:
    """With the decode kernels a lone decoding request runs as one row, no dummy twin, and its logits
    are exactly those it gets as any row of a batch; every decode matmul, the head and attention run them.
    ``SLM_MATVEC_KERNEL=false`` goes back to XLA's matmul (and the twin)."""
    assert wide.info().details["buckets"]["decode_rows"] == [1, 3]
    prompts = [wide.tokenize(p) for p in PROMPTS]
    for slot, ids in enumerate(prompts):
        wide.forward([Row(slot, tuple(ids), 0, logits=False)])
    rows = [Row(slot, (ids[-1],), len(ids)) for slot, ids in enumerate(prompts)]
    alone = [wide.forward([row]).row(0) for row in rows]
    assert not np.array_equal(alone[0], alone[1])
    for group in ([0, 1], [2, 0], [1, 2, 0]):
        out = wide.forward([rows[i] for i in group])
        for j, i in enumerate(group):
            assert np.array_equal(out.row(j), alone[i]), f"row {i} in {group} differs from the row alone"
    widths = {shape[-1][1] for shape in wide.compiled_shapes() if shape[1] == "decode"}
    assert widths == {1, 3}
    window = wide.info().details["buckets"]["context_windows"][0]
    lone = np.array([[rows[0].tokens[0]], [0], [rows[0].pos], [rows[0].pos], [1]], np.int32)
    hlo = wide._graph.optimized_hlo("decode", lone, window=window)
    lora = 2 * len(TARGETS) if wide._graph.lora is not None else 0  # each LoRA target's (x·A)·B (tf_lora)
    assert hlo.count('custom_call_target="slm_matvec"') == (4 + lora) * wide._graph.n_layer + 1  # blocks and head
    assert hlo.count('custom_call_target="slm_attention"') == wide._graph.n_layer
    for slot in range(3):
        wide.release(slot)
    with float32_backend(wide_dir, cache_dir, matvec_kernel=False) as plain:
        assert plain.info().details["matvec_kernel"] == "off (SLM_MATVEC_KERNEL=false)"
        assert plain.info().details["buckets"]["decode_rows"] == [2, 3]
        plain.forward([Row(0, tuple(prompts[0]), 0, logits=False)])
        np.testing.assert_allclose(plain.forward([rows[0]]).row(0), alone[0], rtol=1e-4,
                                   atol=1e-4 * np.abs(alone[0]).max())
    monkeypatch.setenv("SLM_MATVEC_KERNEL", "false")
    opted_out = Settings(tier="standard")
    assert resolve_tier(opted_out).engine_config(opted_out).matvec_kernel is False


def test_without_a_compiler_decoding_uses_xla_matmul(wide_dir: Path, tmp_path: Path) -> None:
    """No C++ compiler (here: one that fails): the kernel is off, the info says why, requests still run."""
    script = f"""
import json, numpy as np
from slm_app.backends.base import Row
from slm_app.backends.tf_gpt2 import TFGPT2Backend
from slm_app.settings import Settings, resolve_tier
s = Settings(tier="standard", cache_dir={str(tmp_path)!r})
config = resolve_tier(s).engine_config(s).model_copy(update=dict(model={str(wide_dir)!r}, warmup=False, n_slots=3))
b = TFGPT2Backend.load(config)
out = b.forward([Row(0, (464, 2068, 7586), 0)])
d = b.info().details
print(json.dumps(dict(kernel=d["matvec_kernel"], rows=d["buckets"]["decode_rows"], token=out.argmax(0))))
"""
    env = {**os.environ, "CXX": "false", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kernel"].startswith("off (unavailable (RuntimeError: false failed"), result
    assert result["rows"] == [2, 3] and 0 <= result["token"] < 50257
    assert not list((tmp_path / "kernels").glob("*.so")), "a failed build left a library behind"


def test_no_compilation_after_warmup(small_dir: Path, cache_dir: Path) -> None:
    config = engine_config(small_dir, cache_dir, warmup=True, n_slots=3, max_prompt_tokens=40, max_new_tokens=30,
                           float16=False)
    backend = TFGPT2Backend.load(config)
    try:
        details = backend.info().details
        assert details["buckets"] == {"decode_rows": [2, 3], "context_windows": [70], "prefill_block": 32}
        assert details["warmup_s"] > 0
        # Greedy calls are sized at warmup from a measured step (however long: within the compiled loop).
        assert 2 <= details["greedy_steps_per_call"] == backend.max_greedy_steps() <= DECODE_STEPS
        compiled = backend.compiled_shapes()
        scheduler = Scheduler(_Borrowed(backend))
        try:
            long_prompt = backend.tokenize("word " * 400)[:39]
            handles = [scheduler.submit(long_prompt, SamplingParams(max_new_tokens=30, temperature=0.0)),
                       scheduler.submit(backend.tokenize("Hi"), SamplingParams(max_new_tokens=30, temperature=0.7)),
                       scheduler.submit(backend.tokenize("Yo"), SamplingParams(max_new_tokens=5, temperature=0.0)),
                       scheduler.submit(backend.tokenize("Hey"), SamplingParams(max_new_tokens=3, temperature=0.0))]
            finals = [h.result(timeout=300) for h in handles]
            assert [f.finish_reason for f in finals] == ["length"] * 4
            assert scheduler.call_exclusive(lambda b: b.score(long_prompt), timeout=300).shape == (38,)
        finally:
            scheduler.close()
        assert backend.compiled_shapes() == compiled, "a request inside the tier's limits compiled a new shape"
    finally:
        backend.close()


def _memory_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.parametrize("attention", ["batched", "per-row"])
def test_new_prompts_slots_and_positions_compile_nothing(small: TFGPT2Backend, attention: str) -> None:
    """XLA compiles a shape once, whatever the values: no input may become a compile-time constant.
    (One did: the slot indexing the cache, so each call with new values compiled anew, unseen by
    ``compiled_shapes``; every executable holds memory maps, and after a few hundred calls mmap
    failed and TensorFlow aborted.) A compilation adds ~100-200 maps; new threads and arenas a few."""
    before_mode = small._graph.per_row_attention
    small._graph.per_row_attention = attention == "per-row"
    small._graph._concrete.clear()
    try:
        ids = small.tokenize(PROMPTS[1])
        small.forward([Row(0, tuple(ids), 0)])  # compiles prefill, then the 2-row decode shape
        small.forward([Row(0, (ids[-1],), len(ids))])
        maps = _memory_maps()
        for i in range(6):
            slot = i % 3
            prompt = small.tokenize(PROMPTS[1 + i % 2])[: 2 + i]
            small.forward([Row(slot, tuple(prompt), 0)])
            small.forward([Row(slot, (prompt[-1] + i,), len(prompt))])
            small.decode_greedy([Row(slot, (prompt[-1],), len(prompt) + 1)], 3)
        assert _memory_maps() - maps < 40, "a call with new values compiled again"
    finally:
        small._graph.per_row_attention = before_mode
        small._graph._concrete.clear()
        for slot in range(3):
            small.release(slot)


def test_cache_variables_are_updated_in_place(small: TFGPT2Backend) -> None:
    """XLA aliases every KV cache variable to its updated value, so a step writes only the new cells
    instead of copying the cache (a slot of GPT-2 124M is ~50 MB)."""
    graph = small._graph
    rows = np.array([[5, 6], [0, 1], [3, 4], [3, 4], [8, 8]], np.int32)  # tokens, slots, positions, cells, steps
    window = small.info().details["buckets"]["context_windows"][0]
    graph.call("decode", rows, window=window)
    hlo = graph.optimized_hlo("decode", rows, window=window)
    assert "input_output_alias=" in hlo, "no input/output aliasing in the decode step's HLO"
    aliases = hlo.split("input_output_alias=", 1)[1].split("entry_computation_layout", 1)[0]
    assert aliases.count("may-alias") == 2 * graph.n_layer  # keys and values of every layer


def test_bad_rows_are_refused_with_a_reason(small: TFGPT2Backend) -> None:
    with pytest.raises(ValueError, match="slot 9 does not exist"):
        small.forward([Row(9, (1,), 0)])
    with pytest.raises(ValueError, match="do not fit"):
        small.forward([Row(0, (1, 2), small.limits().max_sequence_tokens - 1)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small.forward([Row(0, (50257,), 0)])
    with pytest.raises(ValueError, match="at most once"):
        small.forward([Row(0, (1,), 0), Row(0, (2,), 1)])


def test_xla_failure_falls_back_to_graphs(tiny_dir: Path, cache_dir: Path) -> None:
    backend = TFGPT2Backend.load(engine_config(tiny_dir, cache_dir))
    try:
        graph = backend._graph

        def fail(*args):
            raise RuntimeError("XLA cannot compile this")

        block = (PREFILL_BLOCK,)
        graph._concrete[(True, "prefill", None, block, (), (), ())] = fail
        out = backend.forward([Row(0, tuple(backend.tokenize("Still works")), 0)])
        assert 0 <= out.argmax(0) < backend.vocab_width
        details = backend.info().details
        assert details["xla"] is False and "XLA cannot compile this" in details["xla_note"]
    finally:
        backend.close()
