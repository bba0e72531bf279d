"""One contract, every backend: the scheduler's guarantees on the fake model, TensorFlow, LiteRT and llama.cpp.

Each test runs through ``Scheduler`` exactly as the service does. What the model says differs per
backend; what is checked here is what the core promises whatever the model: limits, stop strings,
seeds, constraint masks, cancellation (running and waiting), UTF-8 and chunked prefill.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from slm_app.backends import load_backend
from slm_app.backends.base import Backend, SamplingParams
from slm_app.scheduler import Completion, PromptTooLong, Scheduler
from slm_app.settings import EngineConfig

BACKENDS = {
    "fake": dict(backend="fake", model="fake", fake_step_ms=1.0),
    "tensorflow": dict(backend="tensorflow", model="sshleifer/tiny-gpt2", float16=False),
    "litert": dict(backend="litert", model="sshleifer/tiny-gpt2", litert_weights="float32"),
    "llama.cpp": dict(backend="llama.cpp", model="embedded:gemma-3-270m", n_ctx=2048, n_batch=256),
}
# Same seed, same sampled text alone and inside a batch: only where a multi-row step computes each
# row's logits exactly as a one-row step does. llama.cpp picks other matmul kernels and summation
# orders for a multi-row batch, so near-ties can flip; its greedy share is measured in bench/.
BATCH_EXACT = {"fake": True, "tensorflow": True, "litert": True, "llama.cpp": False}
# Text with characters every one of these vocabularies must spell in several tokens of partial UTF-8.
MULTIBYTE = "Zoë, 𓀀𓀁 and 🦜🧬 — ok"


@pytest.fixture(scope="module", params=list(BACKENDS), ids=list(BACKENDS))
def engine(request, tmp_path_factory) -> Iterator[tuple[str, Backend, Scheduler]]:
    name = request.param
    if name == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (setup_lightweight.sh)")
    cache = Path(tmp_path_factory.getbasetemp()) / "contract-cache"
    config = EngineConfig(cache_dir=cache, n_slots=3, max_prompt_tokens=256, max_new_tokens=96,
                          **BACKENDS[name])
    backend = load_backend(config)
    scheduler = Scheduler(backend, queue_size=8)
    yield name, backend, scheduler
    scheduler.close()


def run(scheduler: Scheduler, backend: Backend, prompt: str, **params) -> Completion:
    return scheduler.submit(backend.tokenize(prompt), SamplingParams(**params)).result(timeout=120)


class ForcedText:
    """A constraint that allows exactly the tokens of one text, in order, then only end-of-text.
    ``fast_forward``: it also says which tokens are forced, so the scheduler feeds them unsampled."""

    def __init__(self, backend: Backend, ids: list[int], fast_forward: bool = False):
        self.ids, self.width, self.n = ids, backend.vocab_width, 0
        self.seen: list[int] = []
        self.fast_forward = fast_forward

    def forced_tokens(self) -> list[int]:
        return list(self.ids[self.n:]) if self.fast_forward else []

    def allowed_tokens(self, remaining: int) -> np.ndarray:
        mask = np.zeros(self.width, dtype=bool)
        if self.n < len(self.ids):
            mask[self.ids[self.n]] = True
        return mask

    def consume(self, token_id: int) -> None:
        self.seen.append(token_id)
        self.n += 1

    def is_finished(self) -> bool:
        return self.n >= len(self.ids)


def text_ids(backend: Backend, text: str) -> list[int]:
    """``text``'s tokens without the BOS a tokenizer may put first."""
    ids = backend.tokenize(text)
    while ids and not backend.token_bytes(ids[0]):
        ids = ids[1:]
    assert b"".join(backend.token_bytes(t) for t in ids).decode() == text
    return ids


def test_max_tokens_ends_with_length(engine):
    name, backend, scheduler = engine
    done = run(scheduler, backend, "The weather today is", max_new_tokens=7, temperature=0)
    # A model may end on its own before the limit; a forced text cannot.
    forced = scheduler.submit(backend.tokenize("Say:"), SamplingParams(max_new_tokens=3, temperature=0),
                              ForcedText(backend, text_ids(backend, "one two three four five"))).result(60)
    assert forced.finish_reason == "length" and forced.completion_tokens == 3
    assert done.completion_tokens <= 7 and done.finish_reason in ("length", "stop")


def test_stop_strings_cut_at_the_earliest_position_and_never_stream(engine):
    name, backend, scheduler = engine
    target = "alpha beta gamma delta epsilon"
    constraint = lambda: ForcedText(backend, text_ids(backend, target))  # noqa: E731
    params = SamplingParams(max_new_tokens=40, temperature=0, stop=("delta", "beta"))  # later one listed first
    generation = scheduler.submit(backend.tokenize("Greek letters:"), params, constraint())
    snapshots = list(generation.updates(timeout=60))
    final = snapshots[-1]
    assert final.text == "alpha " and final.finish_reason == "stop"
    for snap in snapshots:  # streamed text only grows and never shows a stop string or what follows
        assert final.text.startswith(snap.text), (snap.text, final.text)


def test_constraint_mask_is_obeyed_and_multibyte_text_streams_whole(engine):
    name, backend, scheduler = engine
    ids = text_ids(backend, MULTIBYTE)
    pieces = [backend.token_bytes(t) for t in ids]
    partial = [p for p in pieces if not _valid_utf8(p)]
    assert partial, f"{name}: no token of {MULTIBYTE!r} is a partial UTF-8 character; pick rarer characters"
    constraint = ForcedText(backend, ids)
    generation = scheduler.submit(backend.tokenize("Echo:"), SamplingParams(max_new_tokens=len(ids) + 4,
                                                                              temperature=1.0, seed=1), constraint)
    snapshots = list(generation.updates(timeout=60))
    assert constraint.seen[: len(ids)] == ids
    assert snapshots[-1].text == MULTIBYTE
    for snap in snapshots:
        assert "\ufffd" not in snap.text and MULTIBYTE.startswith(snap.text)


def test_seeded_sampling_is_reproducible_alone_and_next_to_other_requests(engine):
    name, backend, scheduler = engine
    prompt, params = "Once upon a time", dict(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = run(scheduler, backend, prompt, **params)
    again = run(scheduler, backend, prompt, **params)
    assert alone.text == again.text and alone.seed == 1234
    other = run(scheduler, backend, prompt, **{**params, "seed": 99})
    assert other.seed == 99
    if not BATCH_EXACT[name]:
        pytest.skip(f"{name}: a multi-row batch computes logits in another order; see bench/ for the share")
    neighbours = [scheduler.submit(backend.tokenize(p), SamplingParams(max_new_tokens=30, temperature=0.7, seed=5))
                  for p in ("A different prompt", "Yet another one, longer than the first")]
    batched = scheduler.submit(backend.tokenize(prompt), SamplingParams(**params))
    assert batched.result(60).text == alone.text
    for n in neighbours:
        n.result(60)


class _OneStepPerCall:
    """A backend lent to a second scheduler with its several-greedy-steps-per-call decoding switched off."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def max_greedy_steps(self) -> int:
        return 0

    def close(self) -> None:
        pass


def test_greedy_steps_per_call_do_not_change_answers(engine):
    """A backend that decodes several greedy tokens per call (``decode_greedy``) gives exactly the answers,
    stop cuts and token counts of one ``forward`` per token."""
    name, backend, scheduler = engine
    if backend.max_greedy_steps() < 2:
        pytest.skip(f"{name}: decodes one step per call")
    prompts = ["The weather today is", "Once upon a time, far away"]
    first = run(scheduler, backend, prompts[0], max_new_tokens=21, temperature=0)
    stop = first.text[len(first.text) // 2:][:2]
    cases = [(prompts[0], dict(max_new_tokens=21, temperature=0)), (prompts[1], dict(max_new_tokens=13, temperature=0)),
             (prompts[0], dict(max_new_tokens=21, temperature=0, stop=(stop,)))]
    one_step = Scheduler(_OneStepPerCall(backend))
    try:
        expected = [run(one_step, backend, p, **params) for p, params in cases]
    finally:
        one_step.close()
    before = scheduler.steps
    got = [run(scheduler, backend, p, **params) for p, params in cases]
    assert [(c.text, c.completion_tokens, c.finish_reason) for c in got] == \
        [(c.text, c.completion_tokens, c.finish_reason) for c in expected]
    assert expected[2].finish_reason == "stop" and expected[0].completion_tokens == 21
    assert scheduler.steps - before < sum(c.completion_tokens for c in got) / 2


def test_cancel_while_running_frees_the_slot(engine):
    name, backend, scheduler = engine
    generation = scheduler.submit(backend.tokenize("Count:"), SamplingParams(max_new_tokens=96, temperature=1.0, seed=3),
                                  ForcedText(backend, text_ids(backend, " one" * 200)))
    for snap in generation.updates(timeout=60):
        if snap.completion_tokens >= 3:
            break  # closing the iterator early cancels the request
    final = generation.result(timeout=30)
    assert final.finish_reason == "cancelled" and 3 <= final.completion_tokens < 96
    _wait_idle(scheduler)


def test_cancel_while_waiting_and_fifo_admission(engine):
    name, backend, scheduler = engine
    long = SamplingParams(max_new_tokens=60, temperature=0)
    n_slots = scheduler.limits.n_slots
    busy = [scheduler.submit(backend.tokenize(f"Story {i}:"), long, ForcedText(backend, text_ids(backend, " la" * 80)))
            for i in range(n_slots)]
    waiting = scheduler.submit(backend.tokenize("I wait"), SamplingParams(max_new_tokens=5, temperature=0))
    after = scheduler.submit(backend.tokenize("I come next"), SamplingParams(max_new_tokens=5, temperature=0))
    # Cancelled at once: no sleep here, since a fast backend (LiteRT's tiny model) finishes the busy
    # requests' 60 tokens within tens of milliseconds and the waiting one would already be running.
    assert waiting.snapshot().completion_tokens == 0
    waiting.cancel()
    cancelled = waiting.result(timeout=10)
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 0
    assert after.result(timeout=120).finish_reason in ("stop", "length")
    for b in busy:
        assert b.result(timeout=120).completion_tokens == 60
    _wait_idle(scheduler)


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(engine):
    name, backend, scheduler = engine
    lim = scheduler.limits
    words = " lorem ipsum" * 2000
    prompt_ids = backend.tokenize(words)[: min(lim.max_sequence_tokens - 40, 3 * lim.max_step_tokens)]
    assert len(prompt_ids) > lim.max_step_tokens, "the prompt must need more than one step to prefill"
    runner = scheduler.submit(backend.tokenize("Count:"), SamplingParams(max_new_tokens=96, temperature=0),
                              ForcedText(backend, text_ids(backend, " go" * 120)))
    while (break_at := runner.snapshot().completion_tokens) < 2:  # (leaving updates() early would cancel it)
        time.sleep(0.001)
    runner_tokens_when_long_starts: list[int] = []
    long = scheduler.submit(prompt_ids, SamplingParams(max_new_tokens=2, temperature=0))
    for snap in long.updates(timeout=120):
        if snap.completion_tokens >= 1 and not runner_tokens_when_long_starts:
            runner_tokens_when_long_starts.append(runner.snapshot().completion_tokens)
    steps_needed = -(-len(prompt_ids) // lim.max_step_tokens)
    # The runner decoded a token in every step that carried a chunk of the long prompt.
    assert runner_tokens_when_long_starts[0] >= break_at + steps_needed - 1
    runner.cancel()
    _wait_idle(scheduler)


def test_prompt_longer_than_a_sequence_is_refused(engine):
    name, backend, scheduler = engine
    with pytest.raises(PromptTooLong, match="holds"):
        scheduler.submit([backend.tokenize("x")[-1]] * scheduler.limits.max_sequence_tokens,
                         SamplingParams(max_new_tokens=1))


def _valid_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _wait_idle(scheduler: Scheduler, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not scheduler.idle():
        assert time.monotonic() < deadline, scheduler.load()
        time.sleep(0.01)
    assert scheduler.load()["running"] == 0



def test_forced_tokens_are_fed_unsampled_in_one_step(engine):
    """A constraint that knows the next tokens (a JSON key, a bracket) gets them appended without
    sampling and fed to the model as one chunk: same text, fewer model steps."""
    name, backend, scheduler = engine
    ids = text_ids(backend, "alpha beta gamma delta epsilon zeta")
    params = SamplingParams(max_new_tokens=len(ids) + 2, temperature=1.0, seed=3)
    outs, steps = [], []
    for fast_forward in (False, True):
        constraint = ForcedText(backend, ids, fast_forward=fast_forward)
        before = scheduler.steps
        outs.append(scheduler.submit(backend.tokenize("Greek:"), params, constraint).result(timeout=60))
        steps.append(scheduler.steps - before)
        assert constraint.seen[: len(ids)] == ids
    assert outs[0].text == outs[1].text == "alpha beta gamma delta epsilon zeta"
    assert outs[0].completion_tokens == outs[1].completion_tokens == len(ids)
    assert steps[1] < steps[0] and steps[1] <= 4, steps  # prefill, one sampled token, the rest in one chunk
    # A request beside it is unaffected: its answer is the one it gets alone.
    alone = run(scheduler, backend, "Once upon a time", max_new_tokens=12, temperature=0)
    neighbour = scheduler.submit(backend.tokenize("Once upon a time"), SamplingParams(max_new_tokens=12, temperature=0))
    forced = scheduler.submit(backend.tokenize("Greek:"), params, ForcedText(backend, ids, fast_forward=True))
    assert forced.result(timeout=60).text == outs[0].text
    if BATCH_EXACT[name]:
        assert neighbour.result(timeout=60).text == alone.text
    else:
        neighbour.result(timeout=60)
