"""Does the tier fit this host's memory? Checked at start-up, before any model loads.

A host with a memory limit (a 512 MB free web service, a container's cgroup) kills a process that goes
over it, with no message a user would find. So at start-up the tier's measured footprint (the
whole-process RSS after 1,000 requests, ``bench/memory.py``; table in docs/bench-memory.md) is compared
with the memory this process may use (``SLM_MEMORY_LIMIT_MB``, else the cgroup limit, else RAM); when
it does not fit the app refuses to start, says so, and names the largest tier that fits.
``SLM_MEMORY_FIT_CHECK=false`` starts anyway.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

from slm_app import memory
from slm_app.settings import ResolvedTier, Settings, Tier

# Whole-process RSS in MB a tier's default model reaches while serving, rounded up, by backend. Free tier:
# bench/memory.py after 1,000 requests (LiteRT 218, TensorFlow 1,237; docs/bench-memory.md). Standard on
# TensorFlow: bench/memory.py 2,310 MB flat over 100 requests (GPT-2 124M); 3,000 leaves room for XLA's
# compile peaks (2.8 GB measured earlier). LiteRT 124M float32: 635 MB without XNNPACK (earlier probe)
# plus Gradio and the app ~150. Pro: Qwen2.5-3B Q4_K_M ~3.2 GB with a 4k context (its offline fallback,
# SmolLM2-135M, holds 382 MB).
FOOTPRINT_MB: dict[tuple[Tier, str], int] = {
    (Tier.free, "litert"): 250,
    (Tier.free, "tensorflow"): 1_300,
    (Tier.standard, "litert"): 900,
    (Tier.standard, "tensorflow"): 3_000,
    (Tier.pro, "llama.cpp"): 3_400,
}
# Largest first: the tier suggested is the first one that fits and is installed.
_CANDIDATES = [(Tier.pro, "llama.cpp"), (Tier.standard, "tensorflow"), (Tier.standard, "litert"),
               (Tier.free, "litert"), (Tier.free, "tensorflow")]
_PACKAGES = {"llama.cpp": "llama_cpp", "tensorflow": "tensorflow", "litert": "ai_edge_litert"}


class MemoryDoesNotFit(RuntimeError):
    """The tier needs more memory than this process may use; the message names the tier that fits."""


@dataclass(frozen=True)
class FitReport:
    needed_mb: int | None  # None: no measured footprint (a custom model, the remote or fake backend)
    usable_mb: float
    source: str  # where usable_mb comes from
    fits: bool
    message: str

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "usable_mb": round(self.usable_mb, 1)}


def _installed(backend: str) -> bool:
    return importlib.util.find_spec(_PACKAGES[backend]) is not None


def _suggestion(usable_mb: float) -> str:
    for tier, backend in _CANDIDATES:
        need = FOOTPRINT_MB[(tier, backend)]
        if need <= usable_mb and _installed(backend):
            return (f"SLM_TIER={tier.value} SLM_BACKEND={backend} fits (about {need:,} MB); start with that")
    return "no tier fits: the smallest, SLM_TIER=free on LiteRT, needs about " \
           f"{FOOTPRINT_MB[(Tier.free, 'litert')]:,} MB"


def check_fit(resolved: ResolvedTier, settings: Settings) -> FitReport:
    """The fit of ``resolved`` on this host; raises ``MemoryDoesNotFit`` when it does not fit and
    ``SLM_MEMORY_FIT_CHECK`` is on."""
    usable, source = memory.memory_limit(settings.memory_limit_mb)
    # Only the tier's own model has a measured footprint; another model's is unknown here.
    default_model = resolved.model == resolved.profile.model
    needed = FOOTPRINT_MB.get((resolved.tier, resolved.backend)) if default_model else None
    if needed is None:
        return FitReport(None, usable, source, True, "no measured footprint for this model and backend: not checked")
    name = f"SLM_TIER={resolved.tier.value} on {resolved.backend}"
    if needed <= usable:
        return FitReport(needed, usable, source, True, f"{name} needs about {needed:,} MB; {usable:,.0f} MB usable")
    message = (f"{name} needs about {needed:,} MB, but this process may use {usable:,.0f} MB ({source}): it "
               f"would be killed for memory. {_suggestion(usable)}. (SLM_MEMORY_FIT_CHECK=false starts anyway.)")
    if settings.memory_fit_check:
        raise MemoryDoesNotFit(message)
    return FitReport(needed, usable, source, False, message)
