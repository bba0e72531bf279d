"""Convert a TensorFlow GPT-2 checkpoint into a LiteRT (``.tflite``) model, at set-up.

The LiteRT backend (``slm_app.backends.litert_gpt2``) serves the result with no TensorFlow in the
process (TensorFlow alone is ~620 MB of RSS; LiteRT's runtime 35 MB). Only this module imports
TensorFlow, and it runs as its own process (``python -m slm_app.provisioning.litert``, called by
``slm_app.prepare`` and by ``./setup_lightweight.sh`` from a throwaway build venv), never inside the
server.

What gets converted is not transformers' Keras model but GPT-2's forward pass written here over its
weights, as a ``tf.Module`` with fixed shapes and two signatures that share the weights:

* ``decode(ids[1], pos, cache)`` → ``logits[1, vocab]``, ``kv[L, 2, H, 1, D]``;
* ``prefill(ids[CHUNK], pos, n, cache)`` → the logits after token ``n-1`` and ``kv[L, 2, H, CHUNK, D]``;
* ``score(ids[CHUNK], targets[CHUNK], pos, cache)`` → ``logprobs[CHUNK]`` of each target after its
  row (perplexity), and ``kv``.

``cache[L, 2, H, n_ctx, D]`` holds a sequence's keys and values of positions ``0..pos-1``; the step
attends to those cells and to its own tokens, and returns its new keys and values for the caller to
write into its cache (no scatter in the graph: LiteRT's builtin ops convert it poorly, and returning
only the new cells halves the copying a step costs). With these shapes every op is a LiteRT builtin,
so the runtime needs no Flex (TensorFlow) kernels.

Weights: ``float16`` stores them half-size in the file (LiteRT dequantizes them to float32 once, at
load); ``float32`` as they are; ``int8`` dynamic-range quantization (int8 weights, float activations).
A float16 tier's TensorFlow backend computes in float32 on float16-rounded weights and keeps its KV
cache in float16; the LiteRT backend does the same (it rounds the cache on the host), so both give
the same greedy tokens (``tests/test_litert.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

CHUNK = 64  # prompt tokens one prefill call carries (a fixed shape; shorter chunks are padded)
SIGNATURES = ("decode", "prefill", "score")
FORMAT_VERSION = 1  # bump when the signatures change: old files are then converted again
Weights = Literal["float16", "float32", "int8"]


@dataclass(frozen=True)
class LiteRTMeta:
    """What the backend needs besides the .tflite (written next to it as ``model.json``)."""

    format_version: int
    model: str  # the id it was converted for (hub id or local path)
    name: str
    source: str
    reason: str
    weights: str  # float16 | float32 | int8
    cache_dtype: str  # float16 | float32: what the backend keeps its KV cache in
    n_layer: int
    n_head: int
    n_embd: int
    head_dim: int
    vocab_size: int
    n_positions: int
    n_ctx: int
    chunk: int
    eos_token_id: int
    n_params: int
    random_weights: bool
    convert_s: float


def model_dir(cache_dir: str | Path, model: str, n_ctx: int, weights: str) -> Path:
    """Where the converted model for (``model``, ``n_ctx``, ``weights``) lives in the cache."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.strip("/"))[-80:]
    return Path(cache_dir).expanduser() / "litert" / f"{slug}-{weights}-ctx{n_ctx}-v{FORMAT_VERSION}"


def read_meta(folder: Path) -> LiteRTMeta | None:
    """The folder's metadata when the conversion there is complete and current, else None."""
    try:
        raw = json.loads((folder / "model.json").read_text())
        meta = LiteRTMeta(**raw)
    except (OSError, ValueError, TypeError):
        return None
    if meta.format_version != FORMAT_VERSION or not (folder / "model.tflite").is_file():
        return None
    return meta


# ---- the graph (TensorFlow; runs only in the converting process) ------------------------------------
def _gpt2_module(tf: Any, weights: dict[str, np.ndarray], cfg: dict[str, Any], n_ctx: int) -> Any:
    """GPT-2 as a tf.Module with the ``decode`` and ``prefill`` signatures described above."""
    n_layer, n_head, n_embd = cfg["n_layer"], cfg["n_head"], cfg["n_embd"]
    head_dim, n_pos, eps = n_embd // n_head, cfg["n_positions"], cfg["layer_norm_epsilon"]
    cache_spec = tf.TensorSpec([n_layer, 2, n_head, n_ctx, head_dim], tf.float32, name="cache")

    class GPT2(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = {k: tf.Variable(v, trainable=False, name=k.replace("/", "_")) for k, v in weights.items()}

        def _ln(self, x: Any, name: str) -> Any:
            mean = tf.reduce_mean(x, axis=-1, keepdims=True)
            var = tf.reduce_mean(tf.square(x - mean), axis=-1, keepdims=True)
            return (x - mean) * tf.math.rsqrt(var + eps) * self.w[f"{name}/g"] + self.w[f"{name}/b"]

        def _linear(self, x: Any, name: str) -> Any:
            return tf.matmul(x, self.w[f"{name}/w"]) + self.w[f"{name}/b"]

        def _forward(self, ids: Any, pos: Any, cache: Any) -> tuple[Any, Any]:
            """Hidden states [C, E] of ``ids`` at positions pos.., and their keys/values [L, 2, H, C, D]."""
            c = ids.shape[0]
            positions = pos + tf.range(c)
            x = tf.gather(self.w["wte"], ids) + tf.gather(self.w["wpe"], tf.minimum(positions, n_pos - 1))
            # Cell t of the cache is visible to every row when t < pos; row i sees its own rows j <= i.
            past = tf.range(n_ctx)[None, :] < pos  # [1, T]
            causal = tf.range(c)[None, :] <= tf.range(c)[:, None]  # [C, C]
            visible = tf.concat([tf.broadcast_to(past, [c, n_ctx]), causal], axis=1)  # [C, T + C]
            bias = tf.where(visible, 0.0, -1e9)[None]  # [1, C, T + C]
            new_kv = []
            for layer in range(n_layer):
                p = f"h{layer}"
                qkv = self._linear(self._ln(x, f"{p}/ln_1"), f"{p}/attn")
                q, k, v = (tf.transpose(tf.reshape(t, [c, n_head, head_dim]), [1, 0, 2]) for t in tf.split(qkv, 3, -1))
                keys = tf.concat([cache[layer, 0], k], axis=1)  # [H, T + C, D]
                values = tf.concat([cache[layer, 1], v], axis=1)
                scores = tf.matmul(q, keys, transpose_b=True) * (1.0 / math.sqrt(head_dim)) + bias
                out = tf.matmul(tf.nn.softmax(scores, axis=-1), values)  # [H, C, D]
                x = x + self._linear(tf.reshape(tf.transpose(out, [1, 0, 2]), [c, n_embd]), f"{p}/proj")
                h = self._linear(self._ln(x, f"{p}/ln_2"), f"{p}/fc")
                h = 0.5 * h * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h * h * h)))  # gelu_new
                x = x + self._linear(h, f"{p}/out")
                new_kv.append(tf.stack([k, v]))
            return x, tf.stack(new_kv)

        def _head(self, x: Any) -> Any:
            return tf.matmul(self._ln(x, "ln_f"), self.w["wte"], transpose_b=True)  # GPT-2's tied head

        @tf.function(input_signature=[tf.TensorSpec([1], tf.int32, name="ids"),
                                      tf.TensorSpec([], tf.int32, name="pos"), cache_spec])
        def decode(self, ids: Any, pos: Any, cache: Any) -> dict[str, Any]:
            x, kv = self._forward(ids, pos, cache)
            return {"logits": self._head(x), "kv": kv}

        @tf.function(input_signature=[tf.TensorSpec([CHUNK], tf.int32, name="ids"),
                                      tf.TensorSpec([], tf.int32, name="pos"),
                                      tf.TensorSpec([], tf.int32, name="n"), cache_spec])
        def prefill(self, ids: Any, pos: Any, n: Any, cache: Any) -> dict[str, Any]:
            x, kv = self._forward(ids, pos, cache)
            return {"logits": self._head(tf.gather(x, tf.reshape(n - 1, [1]))), "kv": kv}

        @tf.function(input_signature=[tf.TensorSpec([CHUNK], tf.int32, name="ids"),
                                      tf.TensorSpec([CHUNK], tf.int32, name="targets"),
                                      tf.TensorSpec([], tf.int32, name="pos"), cache_spec])
        def score(self, ids: Any, targets: Any, pos: Any, cache: Any) -> dict[str, Any]:
            x, kv = self._forward(ids, pos, cache)
            logprobs = tf.nn.log_softmax(self._head(x), axis=-1)  # [CHUNK, vocab]
            picked = tf.reduce_sum(logprobs * tf.one_hot(targets, tf.shape(logprobs)[1]), axis=-1)
            return {"logprobs": picked, "kv": kv}

    return GPT2()


def _keras_weights(lm: Any) -> dict[str, np.ndarray]:
    """The model's weights as float32 numpy arrays (float16 values stay float16-rounded)."""
    t = lm.transformer
    out = {"wte": t.wte.embeddings, "wpe": t.wpe.embeddings, "ln_f/g": t.ln_f.gamma, "ln_f/b": t.ln_f.beta}
    for i, b in enumerate(t.h):
        out.update({f"h{i}/ln_1/g": b.ln_1.gamma, f"h{i}/ln_1/b": b.ln_1.beta,
                    f"h{i}/ln_2/g": b.ln_2.gamma, f"h{i}/ln_2/b": b.ln_2.beta,
                    f"h{i}/attn/w": b.attn.c_attn.weight, f"h{i}/attn/b": b.attn.c_attn.bias,
                    f"h{i}/proj/w": b.attn.c_proj.weight, f"h{i}/proj/b": b.attn.c_proj.bias,
                    f"h{i}/fc/w": b.mlp.c_fc.weight, f"h{i}/fc/b": b.mlp.c_fc.bias,
                    f"h{i}/out/w": b.mlp.c_proj.weight, f"h{i}/out/b": b.mlp.c_proj.bias})
    return {k: np.asarray(v.numpy(), np.float32).reshape(v.shape) for k, v in out.items()}


def convert(model: str, cache_dir: str | Path, n_ctx: int, weights: Weights = "float16") -> Path:
    """Convert ``model`` (what the TensorFlow backend would load) for ``n_ctx`` cache cells; returns the
    folder with ``model.tflite``, ``model.json`` and the tokenizer. Nothing to do when it is there."""
    target = model_dir(cache_dir, model, n_ctx, weights)
    if read_meta(target) is not None:
        return target
    start = time.perf_counter()
    from slm_app.provisioning.hub import resolve_hf_model
    from slm_app.provisioning.tiny_gpt2 import (RANDOM_WEIGHTS_KEY, TINY_GPT2_ID, build_offline_tiny_gpt2,
                                                configure_tensorflow_env, keras_policy, offline_tiny_gpt2_dir)

    tf = configure_tensorflow_env()
    fallback = ((lambda: build_offline_tiny_gpt2(offline_tiny_gpt2_dir(cache_dir))) if model == TINY_GPT2_ID else None)
    resolved = resolve_hf_model(model, fallback=fallback,
                                fallback_label="tiny-gpt2 built offline (same config, random weights)")
    if resolved.path is None:
        raise RuntimeError(resolved.reason)
    from transformers import AutoTokenizer, TFGPT2LMHeadModel

    from slm_app.backends.gpt2_vocab import gpt2_tokenizer

    tokenizer = (AutoTokenizer.from_pretrained(resolved.path)
                 if (Path(resolved.path) / "tokenizer_config.json").is_file() else gpt2_tokenizer())
    # float16: the values the float16 TensorFlow tier computes with (rounded once, here).
    with keras_policy("float16" if weights == "float16" else "float32"):
        lm = TFGPT2LMHeadModel.from_pretrained(resolved.path)
    cfg = lm.config
    n_ctx = min(n_ctx, int(cfg.n_positions))
    arch = {"n_layer": int(cfg.n_layer), "n_head": int(cfg.n_head), "n_embd": int(cfg.n_embd),
            "n_positions": int(cfg.n_positions), "layer_norm_epsilon": float(cfg.layer_norm_epsilon)}
    module = _gpt2_module(tf, _keras_weights(lm), arch, n_ctx)
    n_params = int(lm.count_params())
    del lm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        saved = tmp / "saved_model"
        tf.saved_model.save(module, str(saved), signatures={name: getattr(module, name) for name in SIGNATURES})
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex: no TF at run time
        if weights in ("float16", "int8"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if weights == "float16":
            converter.target_spec.supported_types = [tf.float16]
        (tmp / "model.tflite").write_bytes(converter.convert())
        shutil.rmtree(saved)
        tokenizer.save_pretrained(tmp)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id
        meta = LiteRTMeta(
            format_version=FORMAT_VERSION, model=model, name=resolved.name, source=resolved.source,
            reason=resolved.reason, weights=weights, cache_dtype="float16" if weights == "float16" else "float32",
            n_layer=arch["n_layer"], n_head=arch["n_head"], n_embd=arch["n_embd"],
            head_dim=arch["n_embd"] // arch["n_head"], vocab_size=int(cfg.vocab_size), n_positions=arch["n_positions"],
            n_ctx=n_ctx, chunk=CHUNK, eos_token_id=int(eos), n_params=n_params,
            random_weights=model == TINY_GPT2_ID or bool(getattr(cfg, RANDOM_WEIGHTS_KEY, False)),
            convert_s=round(time.perf_counter() - start, 2))
        (tmp / "model.json").write_text(json.dumps(asdict(meta), indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_in_subprocess(model: str, cache_dir: str | Path, n_ctx: int, weights: str,
                          python: str | None = None) -> Path:
    """``convert`` in a child process (TensorFlow is imported there and dies with it)."""
    import subprocess

    cmd = [python or sys.executable, "-m", "slm_app.provisioning.litert", "--model", model,
           "--cache-dir", str(cache_dir), "--n-ctx", str(n_ctx), "--weights", weights]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"LiteRT conversion failed (exit {done.returncode}): {' | '.join(tail)}")
    return model_dir(cache_dir, model, n_ctx, weights)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a TensorFlow GPT-2 to LiteRT for the litert backend.")
    parser.add_argument("--model", default=None, help="hub id or local dir (default: the free tier's model)")
    parser.add_argument("--cache-dir", default=None, help="the app's cache dir (default: SLM_CACHE_DIR's)")
    parser.add_argument("--n-ctx", type=int, default=None, help="KV cache cells (default: the free tier's)")
    parser.add_argument("--weights", choices=["float16", "float32", "int8"], default=None)
    args = parser.parse_args(argv)
    from slm_app.settings import Settings, Tier, litert_target

    settings = Settings(tier=Tier.free, backend="litert")
    default_model, default_ctx, default_weights = litert_target(settings)
    folder = convert(args.model or default_model, args.cache_dir or settings.cache_dir,
                     args.n_ctx or default_ctx, args.weights or default_weights)
    meta = read_meta(folder)
    size = (folder / "model.tflite").stat().st_size / 2**20
    print(f"LiteRT model: {folder} ({size:.2f} MB, {meta.weights if meta else '?'} weights, "
          f"{meta.convert_s if meta else '?'} s)")


if __name__ == "__main__":
    main()
