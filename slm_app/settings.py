"""Deployment tiers and every setting the app reads, in one typed place.

Everything comes from environment variables (prefix ``SLM_``), read once by
``load_settings()``. A tier brings default limits and a default model; each
limit can be overridden on its own (``SLM_MAX_NEW_TOKENS=16`` and so on) and
is enforced server-side by ``slm_app.service`` for every caller.
"""

from __future__ import annotations

import importlib.util
import os
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from slm_app import memory


class Tier(str, Enum):
    free = "free"
    standard = "standard"
    pro = "pro"
    auto = "auto"


class TierLimits(BaseModel):
    """What one request may ask for. Enforced for the UI, gradio_client and REST alike."""

    max_prompts: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    max_structured_tokens: int = Field(ge=1)
    max_prompt_chars: int = Field(ge=1)
    max_prompt_tokens: int = Field(ge=1)
    min_temperature: float = 0.0
    max_temperature: float = 2.0
    max_schema_chars: int = 500_000  # a memory guard only: compile cost is bounded by llguidance limits
    max_schema_depth: int = 24


class TierProfile(BaseModel):
    """A tier's defaults: which backend, which model, which limits."""

    tier: Tier
    backend: Literal["litert", "tensorflow", "llama.cpp"]
    model: str
    float16: bool = False
    aggressive_gc: bool = False
    limits: TierLimits
    # Requests decoded together (slots of the scheduler), unless SLM_PARALLEL says otherwise.
    parallel: int = Field(ge=1)
    min_memory_mb: int


TIER_PROFILES: dict[Tier, TierProfile] = {
    Tier.free: TierProfile(
        tier=Tier.free,
        # LiteRT: no TensorFlow in the serving process (~160 MB RSS instead of ~1 GB); SLM_BACKEND=tensorflow
        # serves the same model through TensorFlow.
        backend="litert",
        model="sshleifer/tiny-gpt2",
        float16=True,
        aggressive_gc=True,
        limits=TierLimits(
            max_prompts=1,
            max_new_tokens=32,
            max_structured_tokens=96,
            max_prompt_chars=1_000,
            max_prompt_tokens=256,
        ),
        parallel=4,
        min_memory_mb=0,
    ),
    Tier.standard: TierProfile(
        tier=Tier.standard,
        backend="tensorflow",
        model="openai-community/gpt2",
        limits=TierLimits(
            max_prompts=3,
            max_new_tokens=64,
            max_structured_tokens=192,
            max_prompt_chars=4_000,
            max_prompt_tokens=512,
        ),
        parallel=3,
        # Measured: TensorFlow alone ~590 MB RSS; GPT-2 124M after XLA warm-up 2.8 GB, peaks above.
        min_memory_mb=4_000,
    ),
    Tier.pro: TierProfile(
        tier=Tier.pro,
        backend="llama.cpp",
        model="Qwen/Qwen2.5-3B-Instruct-GGUF:qwen2.5-3b-instruct-q4_k_m.gguf",
        limits=TierLimits(
            max_prompts=4,
            max_new_tokens=512,
            max_structured_tokens=1_024,
            max_prompt_chars=16_000,
            max_prompt_tokens=3_072,
        ),
        parallel=4,
        # Qwen2.5-3B Q4_K_M is a 2.0 GB file; with a 4k context and the process it needs ~3.2 GB.
        min_memory_mb=6_000,
    ),
}


# "remote": no model here; requests go to an OpenAI-compatible server (slm_app.engines.remote).
BackendName = Literal["litert", "tensorflow", "llama.cpp", "fake", "remote"]
LiteRTWeights = Literal["float16", "float32", "int8"]


class Settings(BaseSettings):
    """All environment-driven configuration. Unset overrides keep the tier's default."""

    model_config = SettingsConfigDict(env_prefix="SLM_", extra="ignore")

    tier: Tier = Tier.auto
    model: str | None = None  # hub id, local dir, local .gguf, repo_id:filename, or embedded:<name>
    backend: BackendName | None = None  # default: the tier's; "fake" is the scripted test model; "remote"

    # Per-limit overrides of the tier's defaults.
    max_prompts: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    max_structured_tokens: int | None = Field(default=None, ge=1)
    max_prompt_chars: int | None = Field(default=None, ge=1)
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    min_temperature: float | None = Field(default=None, ge=0)
    max_temperature: float | None = Field(default=None, gt=0)

    # Serving.
    parallel: int | None = Field(default=None, ge=1, le=64)  # slots; default: the tier's
    queue_size: int = Field(default=16, ge=1)  # requests waiting for a slot; more are refused
    request_timeout_s: float | None = Field(default=None, gt=0)  # waiting + generating, per request
    api_key: str | None = None  # bearer token for REST and OpenAI routes; off when unset
    # With api_key set: also require it for the Gradio page (login), its API (gradio_client) and MCP.
    protect_ui: bool = False
    # Requests per minute per client (API key, else address) on the HTTP API and Gradio's queue; off when unset.
    rate_limit: int | None = Field(default=None, ge=1)
    # Refuse new work (503) while RSS is at or above this many MB, or this percent of usable memory.
    memory_guard_mb: float | None = Field(default=None, gt=0)
    memory_guard_percent: float = Field(default=90.0, ge=0, le=100)  # 0 turns the guard off
    # Memory this process may use, in MB, when the cgroup limit (else RAM) is not the figure to trust
    # (a host that kills at its plan's limit without a cgroup saying so). Drives the start-up fit check,
    # the auto tier and the guard's percent.
    memory_limit_mb: float | None = Field(default=None, gt=0)
    # At start-up, refuse a tier whose measured footprint exceeds that memory (naming the tier that fits).
    memory_fit_check: bool = True
    # On SIGTERM: stop admitting, let running generations finish for up to this long, cancel the rest.
    drain_s: float = Field(default=30.0, ge=0)
    cache_dir: str = Field(default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "slm_app"))
    warmup: bool = True  # compile XLA buckets / run one token at start-up
    # User data (the feedback database). Default: "slm_app_data" beside the cache dir, so clearing
    # the model cache never deletes feedback.
    data_dir: str | None = None

    # TensorFlow backend.
    xla: bool = True
    # A lone request runs as a row of a batch (a dummy second row), so an answer never depends on what
    # else is running. False: a lone request runs one row, matrix-vector kernels on row-major copies of
    # the weights (GPT-2 124M 32 against 49 ms a token in bench/tf_generate.py; float32 models: +340 MB
    # on 124M), and its logits may differ in the last bits from the same request run in a batch.
    batch_invariant: bool = True
    # Decode rows of float32 models (n_embd >= 256) use tf_matvec's kernel, compiled at first load:
    # the same bits for 1 to 8 rows, so a lone request runs alone, weights read once per step.
    # False: XLA's own matmul (also what happens when there is no C++ compiler).
    matvec_kernel: bool = True
    # TensorFlow backend: the rank of the LoRA factors compiled into its graphs (slm_app.backends.tf_lora),
    # zero until an adapter is applied; adapters of rank 1..this load. 0: no LoRA ops, no fine-tuning.
    tf_lora_rank: int = Field(default=8, ge=0, le=64)

    # LiteRT backend: the weights of the converted model (default: float16 on tiers with float16 weights,
    # else float32; int8 is dynamic-range quantization). Converted at set-up (slm_app.provisioning.litert).
    litert_weights: LiteRTWeights | None = None
    # LiteRT's XNNPACK delegate: faster kernels (tiny-gpt2: half the time a step), but it repacks the
    # weights once per signature (GPT-2 124M float32: 1.6 GB instead of 0.6 GB RSS). Default: on for
    # models whose file is small (the repacking costs little), off for the others.
    litert_xnnpack: bool | None = None

    # Prompt cache (local backends): a finished request's KV stays in its slot for the next request
    # that starts the same way, and slots share common prefixes (docs/prompt-cache.md).
    prompt_cache: bool = True

    # llama.cpp backend.
    n_ctx: int = Field(default=4096, ge=256)
    # llama.cpp's and LiteRT's threads. Default: the cores this process may use (LiteRT with a small model
    # file: 1, its ops being too small to share; slm_app/backends/litert_gpt2.py).
    n_threads: int | None = Field(default=None, ge=1)
    n_batch: int = Field(default=512, ge=1)
    use_mmap: bool = True
    use_mlock: bool = False
    chat_template: bool = True  # use the GGUF's chat template when it has one
    # llama.cpp's flash attention: "auto" (llama-server's default) lets llama.cpp use it where it can.
    flash_attn: Literal["auto", "on", "off"] = "auto"
    # The KV cells: shared by every slot (true: one sequence may use all of SLM_N_CTX), or SLM_N_CTX /
    # SLM_PARALLEL per slot as llama-server -np does (false: attention reads only the slot's own cells,
    # not those of the other slots' cached conversations; docs/prompt-cache.md measures both).
    kv_unified: bool = True

    # Remote backend: an OpenAI-compatible server (llama-server, vLLM, TGI, Ollama...) does the work.
    remote_url: str | None = None  # base URL of its /v1, e.g. http://127.0.0.1:8080/v1
    remote_api_key: SecretStr | None = None  # sent as "Authorization: Bearer"; never shown or logged
    remote_model: str | None = None  # default: the first model the server lists
    remote_connect_timeout_s: float = Field(default=5.0, gt=0)
    remote_read_timeout_s: float = Field(default=120.0, gt=0)  # longest silence between two bytes
    remote_retries: int = Field(default=2, ge=0, le=10)  # on connect errors only (nothing was sent yet)
    remote_health_interval_s: float = Field(default=5.0, gt=0)  # reachability probe (1 s while down)

    # Fine-tuning (slm_app.finetune): LoRA jobs in a subprocess at low priority, gated promotion.
    finetune_after: int = Field(default=50, ge=1)  # new qualifying feedback items that start a job by itself
    finetune_auto: bool = True  # False: jobs start only when asked (API, Fine-tune tab)
    finetune_max_regression: float = Field(default=0.05, ge=0)  # allowed rise of the regression perplexity
    # Required relative fall of the held-out loss: a candidate that learnt nothing (a poisoned or noise
    # set moves it ~2 %) is refused; a taught fact moves it by far more.
    finetune_min_improvement: float = Field(default=0.1, ge=0, lt=1)
    finetune_threads: int = Field(default=1, ge=1)  # trainer threads: the rest of the machine keeps serving
    finetune_nice: int = Field(default=10, ge=0, le=19)  # the trainer's scheduling priority (nice)
    finetune_max_file_bytes: int = Field(default=1_000_000, ge=1)  # an uploaded training file

    # Fake backend (tests): milliseconds each decode step takes.
    fake_step_ms: float = Field(default=0.0, ge=0)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir or Path(self.cache_dir).expanduser().parent / "slm_app_data").expanduser()

    @model_validator(mode="after")
    def _temperature_range(self) -> "Settings":
        lo = self.min_temperature if self.min_temperature is not None else 0.0
        hi = self.max_temperature if self.max_temperature is not None else 2.0
        if lo > hi:
            raise ValueError(f"SLM_MIN_TEMPERATURE ({lo}) is above SLM_MAX_TEMPERATURE ({hi})")
        return self


class EngineConfig(BaseModel):
    """What a backend needs to load, and nothing else (backends never see the whole ``Settings``)."""

    backend: BackendName
    model: str
    cache_dir: Path
    n_slots: int = Field(ge=1)
    # The longest prompt and generation the tier admits: TensorFlow compiles its shapes for them.
    max_prompt_tokens: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    float16: bool = False
    xla: bool = True
    batch_invariant: bool = True
    matvec_kernel: bool = True
    lora_rank: int = 0
    warmup: bool = True
    n_ctx: int = 4096
    n_threads: int | None = None
    n_batch: int = 512
    use_mmap: bool = True
    use_mlock: bool = False
    chat_template: bool = True
    flash_attn: Literal["auto", "on", "off"] = "auto"
    kv_unified: bool = True
    fake_step_ms: float = 0.0
    litert_weights: LiteRTWeights = "float32"
    litert_xnnpack: bool | None = None
    prompt_cache: bool = True


class ResolvedTier(BaseModel):
    """The tier in force, its limits after overrides, and why it was chosen."""

    profile: TierProfile
    limits: TierLimits
    model: str
    backend: BackendName
    parallel: int
    reason: str

    @property
    def tier(self) -> Tier:
        return self.profile.tier

    def engine_config(self, settings: "Settings") -> EngineConfig:
        lim = self.limits
        return EngineConfig(
            backend=self.backend, model=self.model, cache_dir=Path(settings.cache_dir).expanduser(),
            n_slots=self.parallel, max_prompt_tokens=lim.max_prompt_tokens,
            max_new_tokens=max(lim.max_new_tokens, lim.max_structured_tokens),
            float16=self.profile.float16, xla=settings.xla, batch_invariant=settings.batch_invariant,
            matvec_kernel=settings.matvec_kernel, lora_rank=settings.tf_lora_rank,
            warmup=settings.warmup, n_ctx=settings.n_ctx,
            n_threads=settings.n_threads, n_batch=settings.n_batch, use_mmap=settings.use_mmap,
            use_mlock=settings.use_mlock, chat_template=settings.chat_template, flash_attn=settings.flash_attn,
            kv_unified=settings.kv_unified,
            fake_step_ms=settings.fake_step_ms, litert_weights=litert_weights(self.profile, settings),
            litert_xnnpack=settings.litert_xnnpack, prompt_cache=settings.prompt_cache)


def litert_weights(profile: TierProfile, settings: Settings) -> LiteRTWeights:
    return settings.litert_weights or ("float16" if profile.float16 else "float32")


def litert_target(settings: Settings) -> tuple[str, int, LiteRTWeights]:
    """(model, KV cells, weights) of the LiteRT model ``settings`` serve: what set-up converts."""
    resolved = resolve_tier(settings)
    config = resolved.engine_config(settings)
    return resolved.model, config.max_prompt_tokens + config.max_new_tokens, config.litert_weights


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def pick_auto_tier(memory_mb: float, has_llama: bool, has_tensorflow: bool = True) -> tuple[Tier, str]:
    """The largest tier that is installed and fits the memory this process may use."""
    pro, std = TIER_PROFILES[Tier.pro], TIER_PROFILES[Tier.standard]
    mem = f"{memory_mb:,.0f} MB usable"
    if has_llama and memory_mb >= pro.min_memory_mb:
        return Tier.pro, f"auto: llama-cpp-python installed and {mem} >= {pro.min_memory_mb:,} MB"
    if not has_tensorflow:  # ./setup_lightweight.sh: the free tier's packages only
        return Tier.free, "auto: TensorFlow not installed (the lightweight set-up serves the free tier)"
    if memory_mb >= std.min_memory_mb:
        why = "llama-cpp-python not installed" if not has_llama else f"{mem} < {pro.min_memory_mb:,} MB for pro"
        return Tier.standard, f"auto: {why}; {mem} >= {std.min_memory_mb:,} MB for standard"
    return Tier.free, f"auto: {mem} < {std.min_memory_mb:,} MB for standard"


def effective_limits(profile: TierProfile, settings: Settings) -> TierLimits:
    """The tier's limits after the SLM_* overrides that are set."""
    overrides = {k: v for k in TierLimits.model_fields if (v := getattr(settings, k, None)) is not None}
    return profile.limits.model_copy(update=overrides)


def resolve_tier(settings: Settings) -> ResolvedTier:
    if settings.tier is Tier.auto and settings.backend == "remote":
        # The model lives on the upstream: this machine's memory and packages say nothing about it.
        tier, reason = Tier.pro, "auto: remote backend (the upstream holds the model); pro limits"
    elif settings.tier is Tier.auto:
        tier, reason = pick_auto_tier(memory.usable_memory_mb(settings.memory_limit_mb), llama_cpp_installed(),
                                      tensorflow_installed())
    else:
        tier, reason = settings.tier, f"SLM_TIER={settings.tier.value}"
    profile = TIER_PROFILES[tier]
    limits = effective_limits(profile, settings)
    if limits.min_temperature > limits.max_temperature:
        raise ValueError("temperature range is empty after SLM_* overrides")
    backend = settings.backend or profile.backend
    if backend == "remote":  # "remote" is an alias of whatever model the upstream serves
        model = settings.remote_model or settings.model or "remote"
    else:
        # LiteRT serves the same GPT-2 checkpoints as TensorFlow (converted at set-up).
        same_models = backend == profile.backend or {backend, profile.backend} == {"litert", "tensorflow"}
        model = settings.model or (profile.model if same_models else backend)
    return ResolvedTier(profile=profile, limits=limits, model=model, backend=backend,
                        parallel=settings.parallel or profile.parallel, reason=reason)


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    return Settings()
