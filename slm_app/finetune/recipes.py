"""How an adapter is made for each kind of backend (``Backend.adapter_kind``): which trainer process
runs, what it needs installed, whether llama.cpp's converter runs after it, the adapter's file, and
where the served base weights are (``ModelInfo.details``) for the trainer and the card's sha256.

* ``gguf-lora`` (llama.cpp, pro tier): ``train_llama`` (torch + peft on the dequantized GGUF), then
  ``convert_lora_to_gguf.py``; rank 8, alpha 16 on every attention and MLP projection.
* ``gpt2-lora-npz`` (TensorFlow GPT-2, standard tier): ``train_tf`` (TensorFlow, ``GradientTape``),
  no conversion; the rank the serving graphs were compiled for (``SLM_TF_LORA_RANK``), alpha 2x it,
  on the attention projections (``slm_app.backends.tf_lora``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Recipe:
    trainer: str  # the module run as the trainer process
    packages: tuple[str, ...]  # what that process imports beyond the server's own packages
    convert: bool  # llama.cpp's convert_lora_to_gguf.py turns the trainer's output into the adapter
    adapter_file: str  # the adapter's file name, in the job's folder and in the registry
    detail: str  # the ModelInfo.details key holding the served weights' path
    config_key: str  # how the trainer's config names that path

    def base_path(self, details: dict[str, Any]) -> Path:
        return Path(details[self.detail])

    def base_file(self, details: dict[str, Any]) -> Path:
        """The one file whose sha256 identifies the base weights on the card."""
        path = self.base_path(details)
        return path / "tf_model.h5" if path.is_dir() else path

    def rank_alpha(self, details: dict[str, Any]) -> tuple[int, int]:
        rank = int(details.get("lora_rank") or 8)
        return rank, 2 * rank


RECIPES = {
    "gguf-lora": Recipe("slm_app.finetune.train_llama", ("torch", "peft", "gguf"), True, "adapter.gguf",
                        "model_file", "gguf_path"),
    "gpt2-lora-npz": Recipe("slm_app.finetune.train_tf", (), False, "adapter.npz", "model_path", "model_path"),
}
