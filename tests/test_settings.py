"""Tiers, limits and their environment overrides."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from slm_app.settings import TIER_PROFILES, Settings, Tier, llama_cpp_installed, pick_auto_tier, resolve_tier


def test_tier_defaults_match_the_product() -> None:
    free, std, pro = (resolve_tier(Settings(tier=t)) for t in ("free", "standard", "pro"))
    assert (free.limits.max_prompts, free.limits.max_new_tokens) == (1, 32)
    assert free.profile.float16 and free.profile.aggressive_gc and free.model == "sshleifer/tiny-gpt2"
    assert (std.limits.max_prompts, std.limits.max_new_tokens) == (3, 64)
    assert std.model == "openai-community/gpt2" and std.profile.backend == "tensorflow"
    assert pro.limits.max_prompts >= 4 and pro.limits.max_new_tokens >= 512
    assert pro.profile.backend == "llama.cpp" and pro.model.endswith("qwen2.5-3b-instruct-q4_k_m.gguf")


def test_env_overrides_each_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_TIER", "standard")
    monkeypatch.setenv("SLM_MAX_NEW_TOKENS", "16")
    monkeypatch.setenv("SLM_MAX_PROMPT_CHARS", "50")
    monkeypatch.setenv("SLM_MAX_TEMPERATURE", "1.0")
    monkeypatch.setenv("SLM_MODEL", "/models/my-gpt2")
    r = resolve_tier(Settings())
    assert r.tier is Tier.standard and r.reason == "SLM_TIER=standard"
    assert r.limits.max_new_tokens == 16 and r.limits.max_prompt_chars == 50 and r.limits.max_temperature == 1.0
    assert r.limits.max_prompts == 3  # untouched limits keep the tier default
    assert r.model == "/models/my-gpt2"
    assert TIER_PROFILES[Tier.standard].limits.max_new_tokens == 64  # defaults are not mutated


@pytest.mark.parametrize("env, value", [("SLM_TIER", "gold"), ("SLM_MAX_NEW_TOKENS", "0"),
                                        ("SLM_MAX_PROMPTS", "many")])
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError):
        Settings()


def test_empty_temperature_range_is_refused() -> None:
    with pytest.raises(ValidationError, match="above SLM_MAX_TEMPERATURE"):
        Settings(min_temperature=1.5, max_temperature=1.0)


@pytest.mark.parametrize(
    "memory_mb, has_llama, expected",
    [(24_000, True, Tier.pro), (24_000, False, Tier.standard), (4_500, True, Tier.standard),
     (3_000, True, Tier.free), (512, False, Tier.free)],
)
def test_auto_tier_follows_memory_and_installs(memory_mb: float, has_llama: bool, expected: Tier) -> None:
    tier, reason = pick_auto_tier(memory_mb, has_llama)
    assert tier is expected and reason.startswith("auto:") and f"{memory_mb:,.0f} MB" in reason


def test_auto_on_this_machine_explains_itself() -> None:
    r = resolve_tier(Settings(tier="auto"))
    assert r.reason.startswith("auto:")
    if not llama_cpp_installed():
        assert r.tier is not Tier.pro
