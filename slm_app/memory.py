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


def usable_memory_mb() -> float:
    """Memory this process may use: the cgroup limit when set, else physical RAM."""
    limit = cgroup_limit_mb()
    total = psutil.virtual_memory().total / _MB
    return min(limit, total) if limit else total


def collect_garbage() -> dict[str, float]:
    """Run a full collection and report RSS before and after, in MB."""
    before = rss_mb()
    collected = gc.collect()
    after = rss_mb()
    return {"rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1), "objects_collected": collected}
