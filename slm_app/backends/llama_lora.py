"""LoRA adapters on a loaded llama.cpp model, switched at run time (llama-cpp-python's low-level API).

``llama_adapter_lora_init(model, path)`` loads an adapter GGUF beside the base weights (a few ms for a
5 MB adapter); ``llama_set_adapters_lora(ctx, adapters, n, scales)`` makes it the one the context
applies (the next decode re-reserves the graph, ~15 ms); clearing it gives the base's logits back
exactly. An adapter applies to the whole context, every sequence in it: the caller switches only
when no slot is decoding (``slm_app.finetune.serving`` does it through ``Scheduler.call_exclusive``).

Recently used adapters stay loaded (``keep`` of them, the active one always), so a rollback is a
switch, not a load. A file that is not a LoRA GGUF for this base (another architecture, other
tensor shapes, a truncated or corrupt file) is refused with ``AdapterError`` saying why, and the
active adapter is left as it was.
"""

from __future__ import annotations

import collections
import ctypes
from pathlib import Path
from typing import Any

from slm_app.provisioning.gguf import GGUFError, validate_gguf


class AdapterError(ValueError):
    """An adapter that cannot be loaded or applied; the message says why."""


class LoraAdapters:
    def __init__(self, C: Any, model: Any, ctx: Any, architecture: str | None, keep: int = 4):
        self._C, self._model, self._ctx = C, model, ctx
        self._arch = architecture
        self._keep = keep
        self._loaded: collections.OrderedDict[str, Any] = collections.OrderedDict()  # id -> handle, LRU order
        self.active: str | None = None

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def load(self, adapter_id: str, path: Path) -> None:
        """Load ``path`` as ``adapter_id`` (no-op when already loaded); the active adapter is unchanged."""
        if adapter_id in self._loaded:
            self._loaded.move_to_end(adapter_id)
            return
        try:
            summary = validate_gguf(Path(path))
        except GGUFError as exc:
            raise AdapterError(f"adapter {adapter_id}: {exc}") from None
        md = summary.metadata
        if md.get("general.type") != "adapter" or md.get("adapter.type") != "lora":
            raise AdapterError(f"adapter {adapter_id}: {path} is a GGUF but not a LoRA adapter "
                               f"(general.type={md.get('general.type')!r}, adapter.type={md.get('adapter.type')!r})")
        if self._arch and md.get("general.architecture") != self._arch:
            raise AdapterError(f"adapter {adapter_id} is for architecture {md.get('general.architecture')!r}; "
                               f"the served model is {self._arch!r}")
        handle = self._C.llama_adapter_lora_init(self._model, str(path).encode("utf-8"))
        if not handle:
            raise AdapterError(f"llama.cpp refused adapter {adapter_id} ({path}): its tensors do not match the "
                               "served model (another base model, or other shapes)")
        self._loaded[adapter_id] = handle
        self._evict()

    def set(self, adapter_id: str | None) -> None:
        """Apply ``adapter_id`` (loaded) to the context, or none (the base model)."""
        C = self._C
        if adapter_id is None:
            rc = C.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handle = self._loaded.get(adapter_id)
            if handle is None:
                raise AdapterError(f"adapter {adapter_id} is not loaded")
            adapters = (C.llama_adapter_lora_p_ctypes * 1)(handle)
            scales = (ctypes.c_float * 1)(1.0)
            rc = C.llama_set_adapters_lora(self._ctx, adapters, 1, scales)
            self._loaded.move_to_end(adapter_id)
        if rc != 0:
            raise AdapterError(f"llama_set_adapters_lora returned {rc} for {adapter_id or 'the base model'}")
        self.active = adapter_id

    def unload(self, adapter_id: str) -> None:
        if adapter_id == self.active:
            self.set(None)
        handle = self._loaded.pop(adapter_id, None)
        if handle is not None:
            self._C.llama_adapter_lora_free(handle)

    def _evict(self) -> None:
        for old in [a for a in self._loaded if a != self.active][: max(0, len(self._loaded) - self._keep)]:
            self.unload(old)

    def close(self) -> None:
        """Free every adapter (before the model they belong to)."""
        if self.active is not None:
            self.set(None)
        for adapter_id in list(self._loaded):
            self.unload(adapter_id)
