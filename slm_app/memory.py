"""Process and machine memory: what we use, and what we may use (cgroup limit, else RAM)."""

from __future__ import annotations

import gc
from pathlib import Path

import psutil

_MB = 1024 * 1024


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / _MB


def system_memory_mb() -> dict[str, float]:
    vm = psutil.virtual_memory()
    return {"total": round(vm.total / _MB, 1), "available": round(vm.available / _MB, 1)}


def cgroup_limit_mb() -> float | None:
    """The container's memory limit, if one is set (cgroup v2, then v1)."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw == "max":
            return None
        value = int(raw)
        # cgroup v1 reports "no limit" as a huge number near 2**63.
        if value < 1 << 60:
            return value / _MB
    return None


def memory_limit(override_mb: float | None = None) -> tuple[float, str]:
    """(MB this process may use, where that figure comes from): ``override_mb`` (SLM_MEMORY_LIMIT_MB)
    when given, else the cgroup limit when set, else physical RAM."""
    if override_mb is not None:
        return float(override_mb), "SLM_MEMORY_LIMIT_MB"
    limit = cgroup_limit_mb()
    total = psutil.virtual_memory().total / _MB
    if limit and limit < total:
        return limit, "the container's cgroup memory limit"
    return total, "physical RAM"


def usable_memory_mb(override_mb: float | None = None) -> float:
    """Memory this process may use: ``override_mb`` when given, else the cgroup limit when set, else RAM."""
    return memory_limit(override_mb)[0]


def collect_garbage() -> dict[str, float]:
    """Run a full collection and report RSS before and after, in MB."""
    before = rss_mb()
    collected = gc.collect()
    after = rss_mb()
    return {"rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1), "objects_collected": collected}


class MemoryGuard:
    """Refuses new work while the process's RSS is above a threshold, so a burst of requests gets a
    clear 503 instead of the kernel's OOM killer ending every request at once.

    The threshold is ``limit_mb`` when given, else ``percent`` of the usable memory (the cgroup limit
    when there is one, else physical RAM); ``percent`` 0 turns the guard off. RSS is read on every
    check (psutil: a few microseconds), not cached, so the guard lets work in again as soon as memory
    is back under the threshold."""

    def __init__(self, limit_mb: float | None = None, percent: float = 90.0, usable_mb: float | None = None):
        usable = usable_mb if usable_mb is not None else usable_memory_mb()
        if limit_mb is not None:
            self.limit_mb: float | None = float(limit_mb)
            self.source = "SLM_MEMORY_GUARD_MB"
        elif percent > 0:
            self.limit_mb = usable * percent / 100
            self.source = f"{percent:g}% of {usable:,.0f} MB usable"
        else:
            self.limit_mb, self.source = None, "off (SLM_MEMORY_GUARD_PERCENT=0)"

    def refusal(self) -> str | None:
        """Why new work is refused now, or None when it may start."""
        if self.limit_mb is None:
            return None
        rss = rss_mb()
        if rss < self.limit_mb:
            return None
        return (f"memory guard: the server uses {rss:,.0f} MB, at or above its limit of {self.limit_mb:,.0f} MB "
                f"({self.source}); new requests are refused until memory is freed")

    def status(self) -> dict[str, object]:
        reason = self.refusal()
        return {"limit_mb": None if self.limit_mb is None else round(self.limit_mb, 1), "source": self.source,
                "refusing": reason is not None, "reason": reason}
