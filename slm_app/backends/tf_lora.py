"""LoRA adapters on the TensorFlow GPT-2 backend, swapped by assigning variables: no retrace, no recompile.

Each block's attention projections (``c_attn``, ``c_proj``: ``TARGETS``) compute
``x·W + b + (x·A)·B`` in every compiled function (decode kernels included), where A and B are
``tf.Variable``s of a fixed rank R (``SLM_TF_LORA_RANK``) that the graphs read like any weight. With
no adapter they hold zeros, so the delta is exactly 0 and every output is the base model's, bit for
bit. An adapter of rank r <= R fills the first r ranks (the rest stay zero) with its scale alpha/r
folded into B. The factors are kept row-major, ``A_t`` [R, in] and ``B_t`` [out, R], the layout of
``tf_matvec``'s kernel, so decode rows apply them through the same batch-invariant kernel as the
base matrices.

Adapter file (written by ``slm_app.finetune.train_tf``): an ``.npz`` (read with
``allow_pickle=False``: no code in it) holding ``meta`` (JSON: format, rank, alpha, targets, n_layer,
n_embd) and, per layer i and target t, ``{i}.{t}.A`` [in, r] and ``{i}.{t}.B`` [r, out]. A file that
is not one, or whose shapes are not this model's, is refused with ``AdapterError`` saying why, and
what is applied stays as it was. Recent adapters stay in memory (``keep``), so rollback is an assign.
"""

from __future__ import annotations

import collections
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "slm-gpt2-lora/1"
TARGETS = ("attn", "proj")  # GPT-2's c_attn (x -> q, k, v) and c_proj (attention output)


class AdapterError(ValueError):
    """An adapter that cannot be loaded; the message says why."""


def target_shapes(n_embd: int) -> dict[str, tuple[int, int]]:
    """(in, out) of each target's weight in GPT-2."""
    return {"attn": (n_embd, 3 * n_embd), "proj": (n_embd, n_embd)}


def write_adapter(path: Path, factors: dict[str, np.ndarray], rank: int, alpha: float, n_layer: int,
                  n_embd: int, **extra: Any) -> None:
    """Write an adapter file: ``factors`` maps ``"{layer}.{target}.A"``/``".B"`` to float32 arrays."""
    meta = {"format": FORMAT, "rank": rank, "alpha": alpha, "targets": list(TARGETS), "n_layer": n_layer,
            "n_embd": n_embd, **extra}
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **{k: np.asarray(v, np.float32) for k, v in factors.items()})


def read_adapter(path: Path, n_layer: int, n_embd: int, max_rank: int) -> tuple[dict[str, Any], list[dict[str, tuple]]]:
    """The adapter's meta and, per layer and target, its row-major factors padded to ``max_rank``:
    ``A_t`` [max_rank, in], ``B_t`` [out, max_rank] with the scale folded in. ``AdapterError`` if the
    file is not an adapter for a GPT-2 of this width and depth."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise AdapterError(f"{Path(path).name} is not a readable adapter file ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterError(f"{Path(path).name} is not a GPT-2 LoRA adapter (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                           f"expected {FORMAT!r}; a GGUF adapter is for the llama.cpp tier)")
    if meta.get("n_layer") != n_layer or meta.get("n_embd") != n_embd:
        raise AdapterError(f"the adapter is for a GPT-2 with {meta.get('n_layer')} layers of width {meta.get('n_embd')}; "
                           f"the served model has {n_layer} of width {n_embd}")
    rank, alpha = meta.get("rank"), meta.get("alpha")
    if not isinstance(rank, int) or not 1 <= rank <= max_rank or not isinstance(alpha, (int, float)):
        raise AdapterError(f"adapter rank {rank!r} (alpha {alpha!r}): this server applies ranks 1 to {max_rank} "
                           "(SLM_TF_LORA_RANK)")
    shapes = target_shapes(n_embd)
    layers = []
    for i in range(n_layer):
        layer = {}
        for t in TARGETS:
            a, b = arrays.get(f"{i}.{t}.A"), arrays.get(f"{i}.{t}.B")
            n_in, n_out = shapes[t]
            if a is None or b is None or a.shape != (n_in, rank) or b.shape != (rank, n_out):
                raise AdapterError(f"layer {i} {t}: factors {None if a is None else a.shape} x "
                                   f"{None if b is None else b.shape}, expected ({n_in}, {rank}) x ({rank}, {n_out})")
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise AdapterError(f"layer {i} {t}: the factors hold NaN or infinite values")
            a_t = np.zeros((max_rank, n_in), np.float32)
            b_t = np.zeros((n_out, max_rank), np.float32)
            a_t[:rank] = a.T
            b_t[:, :rank] = (b * (alpha / rank)).T
            layer[t] = (a_t, b_t)
        layers.append(layer)
    return meta, layers


class TFLoraAdapters:
    """The LoRA variables of one ``_GPT2Graph`` and the adapters loaded for them (scheduler thread only)."""

    def __init__(self, tf: Any, n_layer: int, n_embd: int, rank: int, keep: int = 4):
        self.rank, self.n_layer, self.n_embd, self._keep = rank, n_layer, n_embd, keep
        shapes = target_shapes(n_embd)
        # variables[layer][target] = (A_t [R, in], B_t [out, R]): zeros, the base model.
        self.variables = [{t: (tf.Variable(tf.zeros([rank, shapes[t][0]]), trainable=False, name=f"lora_a{i}_{t}"),
                               tf.Variable(tf.zeros([shapes[t][1], rank]), trainable=False, name=f"lora_b{i}_{t}"))
                           for t in TARGETS} for i in range(n_layer)]
        self._loaded: collections.OrderedDict[str, list[dict[str, tuple]]] = collections.OrderedDict()
        self.active: str | None = None

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def load(self, adapter_id: str, path: Path) -> None:
        """Read and check ``path`` as ``adapter_id`` (no-op when already loaded); nothing is applied."""
        if adapter_id not in self._loaded:
            try:
                self._loaded[adapter_id] = read_adapter(Path(path), self.n_layer, self.n_embd, self.rank)[1]
            except AdapterError as exc:
                raise AdapterError(f"adapter {adapter_id}: {exc}") from None
            stale = [a for a in self._loaded if a not in (self.active, adapter_id)]
            for old in stale[: max(0, len(self._loaded) - self._keep)]:
                del self._loaded[old]
        self._loaded.move_to_end(adapter_id)

    def set(self, adapter_id: str | None) -> None:
        """Assign ``adapter_id``'s factors (None: zeros, the base model) to the variables."""
        if adapter_id is not None and adapter_id not in self._loaded:
            raise AdapterError(f"adapter {adapter_id} is not loaded")
        layers = self._loaded[adapter_id] if adapter_id is not None else None
        for i, layer in enumerate(self.variables):
            for t, (a_var, b_var) in layer.items():
                if layers is None:
                    a_var.assign(np.zeros(a_var.shape, np.float32))
                    b_var.assign(np.zeros(b_var.shape, np.float32))
                else:
                    a_var.assign(layers[i][t][0])
                    b_var.assign(layers[i][t][1])
        if adapter_id is not None:
            self._loaded.move_to_end(adapter_id)
        self.active = adapter_id
