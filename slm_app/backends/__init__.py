"""Backends by name. Imported lazily: TensorFlow and llama.cpp each cost seconds and hundreds of MB
(and the free tier's LiteRT process must never import TensorFlow)."""

from __future__ import annotations

import importlib

from slm_app.backends.base import Backend, BackendUnavailable
from slm_app.settings import EngineConfig

REGISTRY: dict[str, tuple[str, str]] = {
    "litert": ("slm_app.backends.litert_gpt2", "LiteRTGPT2Backend"),
    "tensorflow": ("slm_app.backends.tf_gpt2", "TFGPT2Backend"),
    "llama.cpp": ("slm_app.backends.llama_cpp_backend", "LlamaCppBackend"),
    "fake": ("slm_app.backends.fake", "FakeBackend"),
}


def load_backend(config: EngineConfig) -> Backend:
    """Load the backend ``config.backend`` names, with its model."""
    module_name, class_name = REGISTRY[config.backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"the {config.backend} backend cannot be imported here ({exc}); "
                                 f"see the README's set-up for what each tier installs") from exc
    return getattr(module, class_name).load(config)
