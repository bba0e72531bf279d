"""slm_app.prefix_cache's policy on its own (no model): which slot, what is reused, copied, evicted.
What the model computes with it is tested on the real models in tests/test_prompt_cache.py."""

from __future__ import annotations

from slm_app.backends.base import SlotLimits
from slm_app.prefix_cache import WAIT_MIN_TOKENS, PrefixCache


def cache(n_slots: int = 4, kv_cells: int = 1000, **kw) -> PrefixCache:
    return PrefixCache(SlotLimits(n_slots=n_slots, max_sequence_tokens=kv_cells, kv_cells=kv_cells,
                                  max_step_tokens=64), **kw)


def served(c: PrefixCache, prompt: list[int], generated: list[int] = (), reserve: int = 0) -> int:
    """Run a request to its end as the scheduler would: place, prefill, decode, finish. Its slot."""
    plan = c.plan(prompt, "base", reserve or len(prompt) + len(generated), set())
    assert plan is not None and plan.wait_for is None
    c.evicted(plan.evict)
    if plan.copy_from is not None:
        c.copied(plan.copy_from, plan.slot, plan.reuse)
    else:
        c.kept(plan.slot, plan.reuse, "base")
    c.assign(plan.slot, prompt, reserve or len(prompt) + len(generated))
    c.fed(plan.slot, plan.reuse, prompt[plan.reuse:], prompt=True)
    c.fed(plan.slot, len(prompt), list(generated), prompt=False)
    c.finish(plan.slot)
    return plan.slot


def test_a_turn_goes_to_the_slot_holding_its_conversation() -> None:
    c = cache()
    a = served(c, list(range(100)), [500, 501])
    served(c, list(range(1000, 1100)))
    plan = c.plan(list(range(100)) + [500, 501, 7, 8], "base", 200, set())
    assert plan.slot == a and plan.reuse == 102 and plan.copy_from is None


def test_the_last_prompt_token_is_always_computed() -> None:
    c = cache()
    served(c, list(range(50)))
    assert c.plan(list(range(50)), "base", 60, set()).reuse == 49


def test_decode_kv_is_not_reused_when_the_backend_says_so() -> None:
    c = cache(decode_kv_reusable=False)
    served(c, list(range(100)), [500, 501])
    assert c.plan(list(range(100)) + [500, 501, 7], "base", 200, set()).reuse == 100


def test_another_namespace_reuses_nothing() -> None:
    c = cache()
    served(c, list(range(100)))
    assert c.plan(list(range(100)) + [1], "adapter:x", 200, set()).reuse == 0
    assert c.plan(list(range(100)) + [1], "base", 200, set()).reuse == 100


def test_a_busy_slots_prefix_is_copied_and_its_cells_count_once() -> None:
    c = cache(kv_cells=300)
    prompt = list(range(200))
    plan = c.plan(prompt, "base", 210, set())
    c.kept(plan.slot, 0, "base")
    c.assign(plan.slot, prompt, 210)
    c.fed(plan.slot, 0, prompt, prompt=True)  # prefilled, now decoding
    other = c.plan(prompt[:190] + [9, 9, 9], "base", 200, set())
    assert other.copy_from == plan.slot and other.reuse == 190
    # 200 cells held + 10 growth + 13 new (the 190 copied cells are shared): fits 300.
    assert other.evict == ()


def test_a_request_waits_for_a_prefix_being_prefilled_instead_of_computing_it_again() -> None:
    c = cache()
    prompt = list(range(400))
    first = c.plan(prompt, "base", 410, set())
    c.kept(first.slot, 0, "base")
    c.assign(first.slot, prompt, 410)
    c.fed(first.slot, 0, prompt[:64], prompt=True)  # one chunk in
    second = c.plan(prompt[:380] + [1, 2], "base", 400, set())
    assert second.slot != first.slot and second.wait_for == (first.slot, 380)
    assert 380 >= WAIT_MIN_TOKENS
    # A slot that itself waits is never waited on (no chains).
    assert c.plan(prompt[:380] + [3], "base", 400, {first.slot}).wait_for is None


def test_eviction_frees_least_recently_used_prefixes_only_as_needed() -> None:
    c = cache(n_slots=4, kv_cells=1000)
    slots = [served(c, [k * 1000 + i for i in range(300)]) for k in range(3)]  # 900 cells cached
    plan = c.plan([9000 + i for i in range(300)], "base", 400, set())
    assert plan is not None and plan.evict == (slots[0],)  # the oldest; 400 + 600 fits


def test_a_request_waits_only_for_running_requests_never_for_cached_ones() -> None:
    c = cache(n_slots=2, kv_cells=500)
    busy = list(range(300))
    plan = c.plan(busy, "base", 400, set())
    c.kept(plan.slot, 0, "base")
    c.assign(plan.slot, busy, 400)
    assert c.plan(list(range(1000, 1200)), "base", 200, set()) is None  # 400 reserved + 200 > 500
    c.fed(plan.slot, 0, busy, prompt=True)
    c.finish(plan.slot)  # now only cached: evicted for the newcomer
    late = c.plan(list(range(1000, 1300)), "base", 300, set())
    assert late is not None and (late.slot == plan.slot or late.evict == (plan.slot,))


def test_a_few_common_tokens_never_overwrite_another_conversation_while_a_slot_is_empty() -> None:
    """Every chat starts with the template's few tokens: a new conversation takes an empty slot rather
    than a slot whose long cached conversation it shares only those with (llama-server's similarity)."""
    c = cache()
    opening = [1, 2, 3]
    first = served(c, opening + list(range(100, 400)))
    second = served(c, opening + list(range(1000, 1300)))
    assert second != first and len(c.entries[first].tokens) == 303
    # A long enough share (here the whole conversation so far) still goes to its slot.
    assert c.plan(opening + list(range(100, 400)) + [9], "base", 400, set()).slot == first
