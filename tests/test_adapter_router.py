"""The adapter router's rule, with many requests at once: every request decodes entirely under the
adapter it asked for (or the one promoted when it was submitted), requests for different adapters
never share a step, and a promotion lets running requests finish on theirs.

The scripted fake model stands in for llama.cpp here (what is tested is the layer above the
backend); it records which adapter was applied at every step of every slot. The real backend's
switching is tested in test_finetune_pro.py."""

from __future__ import annotations

import random
import threading
from typing import Sequence

import pytest

from slm_app.backends.base import Row, SamplingParams, StepLogits
from slm_app.backends.fake import FakeBackend
from slm_app.engines.base import ModelPrompt
from slm_app.engines.local import LocalEngine
from slm_app.finetune.serving import AdapterRouter

pytestmark = pytest.mark.timeout(120)


class AdapterFake(FakeBackend):
    supports_adapters = True

    def __init__(self) -> None:
        super().__init__(n_slots=3, step_ms=2.0)
        self.applied: str | None = None
        self.loaded: set[str] = set()
        self.steps: list[set[str | None]] = []  # adapters of the rows of each step
        self.slot_log: dict[int, list[str | None]] = {}
        self.finished: list[list[str | None]] = []

    def load_adapter(self, adapter_id: str, path: str) -> None:
        if path == "corrupt":
            raise ValueError("corrupt adapter")
        self.loaded.add(adapter_id)

    def set_adapter(self, adapter_id: str | None) -> None:
        assert adapter_id is None or adapter_id in self.loaded
        self.applied = adapter_id

    def active_adapter(self) -> str | None:
        return self.applied

    def forward(self, rows: Sequence[Row]) -> StepLogits:
        for row in rows:
            self.slot_log.setdefault(row.slot, []).append(self.applied)
        return super().forward(rows)

    def release(self, slot: int) -> None:
        if slot in self.slot_log:
            self.finished.append(self.slot_log.pop(slot))
        super().release(slot)


def make_engine() -> tuple[LocalEngine, AdapterFake, AdapterRouter]:
    backend = AdapterFake()
    engine = LocalEngine(backend, queue_size=64)
    router = engine.use_adapters(
        lambda scheduler: AdapterRouter(scheduler, lambda a: "corrupt" if a == "bad" else f"/adapters/{a}.gguf"))
    return engine, backend, router


def run(engine: LocalEngine, adapter: str | None, tokens: int, out: list) -> None:
    prompt = engine.prepare(ModelPrompt("hi"))
    params = SamplingParams(max_new_tokens=tokens, temperature=0, adapter=adapter)
    final = engine.submit(prompt, params).result(timeout=60)
    out.append((adapter, final.finish_reason))


def test_requests_for_different_adapters_never_mix():
    engine, backend, router = make_engine()
    try:
        rng = random.Random(0)
        wants = [rng.choice(["a", "b", "base", None]) for _ in range(40)]
        out: list = []
        threads = [threading.Thread(target=run, args=(engine, w, rng.randint(2, 12), out)) for w in wants]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(out) == 40 and all(reason in ("length", "stop") for _, reason in out)
        # A finished request's slot is released when a later request takes it (the prompt cache keeps
        # it until then): the logs still in slots are requests too.
        logs = backend.finished + list(backend.slot_log.values())
        assert len(logs) == 40
        for log in logs:  # every request: one adapter from its first step to its last
            assert len(set(log)) == 1
        assert router.switches >= 2
    finally:
        engine.close()


def test_promotion_lets_running_requests_finish_on_theirs():
    engine, backend, router = make_engine()
    try:
        out: list = []
        long = threading.Thread(target=run, args=(engine, None, 60, out))  # promoted: the base model
        long.start()
        while not backend.slot_log:  # it is decoding
            threading.Event().wait(0.005)
        router.promote("a")  # returns at once
        assert long.is_alive()
        after = threading.Thread(target=run, args=(engine, None, 4, out))
        after.start()
        long.join(30)
        after.join(30)
        first, second = backend.finished + list(backend.slot_log.values())  # see the test above
        assert set(first) == {None} and len(first) > 1  # finished on the base, where it started
        assert set(second) == {"a"}  # the next request got the promoted adapter
    finally:
        engine.close()


def test_an_adapter_that_fails_to_load_fails_only_its_request():
    engine, backend, router = make_engine()
    try:
        with pytest.raises(ValueError, match="corrupt"):
            router.preload("bad")
        with pytest.raises(ValueError, match="corrupt"):
            run(engine, "bad", 3, [])
        out: list = []
        run(engine, None, 3, out)  # serving goes on, on what was applied
        assert out == [(None, "length")] and backend.applied is None
    finally:
        engine.close()
