"""The LoRA trainer for the TensorFlow GPT-2 tier: run only as its own process (``slm_app.finetune.jobs``
starts it with ``nice`` and a thread limit), so training never slows the server's own graphs.

    python -m slm_app.finetune.train_tf CONFIG.json

It loads the served weights the way the server does (``TFGPT2LMHeadModel.from_pretrained`` of the
same folder, float32), freezes them, and gives each block's attention projections (``c_attn``,
``c_proj``: ``slm_app.backends.tf_lora.TARGETS``) a rank-r LoRA, ``x·W + b + (alpha/r)·(x·A)·B``, A
initialised like peft's (uniform ±1/sqrt(in)), B zeros, so training starts from the base model. The
model's own forward (causal attention, padding mask) runs with the factors added; ``GradientTape``
takes the gradient of the answer tokens' mean cross-entropy with respect to A and B only, Adam with a
linear warm-down to 10 % and a global norm clip of 1 updates them. Examples, batches and progress
lines are ``slm_app.finetune.training``'s, the same as the llama.cpp tier's trainer.

Output: ``adapter.npz`` in ``out_dir`` (``tf_lora.write_adapter``), which the serving backend
assigns to its LoRA variables.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from slm_app.finetune.training import batches, done, emit, examples, run_epochs, run_main, total_steps

PAD_TO = 16  # batch widths rounded up to a multiple: fewer distinct shapes for TensorFlow's kernels


def _with_lora(layer: Any, a: Any, b: Any, scale: float) -> None:
    """Make a transformers ``TFConv1D`` compute ``x·W + b + scale·(x·A)·B`` (its weights untouched)."""
    base_call = layer.call

    def call(x: Any) -> Any:
        import tensorflow as tf

        return base_call(x) + scale * tf.matmul(tf.matmul(x, a), b)

    layer.call = call


def main(config_path: str) -> int:
    # Before transformers is imported: the job's environment turns TensorFlow off for it (that is
    # what the torch trainer wants); this trainer is TensorFlow's.
    os.environ.update(USE_TF="1", USE_TORCH="0")
    cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))
    threads = int(cfg.get("threads", 1))
    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cancelled: end now, write nothing more
    from slm_app.backends.tf_lora import TARGETS, target_shapes, write_adapter
    from slm_app.provisioning.tiny_gpt2 import configure_tensorflow_env, keras_policy

    tf = configure_tensorflow_env()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tf_keras
    import transformers
    from transformers import TFGPT2LMHeadModel

    seed = int(cfg.get("seed", 0))
    tf.random.set_seed(seed)
    folder = Path(cfg["model_path"])
    emit("status", message=f"loading the TensorFlow GPT-2 in {folder.name} (float32)")
    with keras_policy("float32"):
        model = TFGPT2LMHeadModel.from_pretrained(str(folder))
    model.trainable = False
    n_layer, n_embd = int(model.config.n_layer), int(model.config.n_embd)
    rank, alpha = int(cfg.get("rank", 8)), float(cfg.get("alpha", 16))
    rng = np.random.default_rng(seed)
    factors: dict[str, Any] = {}
    for i, block in enumerate(model.transformer.h):
        layers = {"attn": block.attn.c_attn, "proj": block.attn.c_proj}
        for t in TARGETS:
            n_in, n_out = target_shapes(n_embd)[t]
            bound = 1.0 / np.sqrt(n_in)
            a = factors[f"{i}.{t}.A"] = tf.Variable(rng.uniform(-bound, bound, (n_in, rank)).astype(np.float32))
            b = factors[f"{i}.{t}.B"] = tf.Variable(np.zeros((rank, n_out), np.float32))
            _with_lora(layers[t], a, b, alpha / rank)
    weights = list(factors.values())
    trainable = int(sum(np.prod(w.shape) for w in weights))
    load_s = time.perf_counter() - t_start
    if (data := examples(cfg, trainable, t_start)) is None:
        return 2
    train, val = data
    epochs, batch_size = int(cfg.get("epochs", 3)), int(cfg.get("batch_size", 4))
    lr = float(cfg.get("learning_rate", 1e-3))
    total = total_steps(len(train), batch_size, epochs)
    optimizer = tf_keras.optimizers.Adam(
        learning_rate=tf_keras.optimizers.schedules.PolynomialDecay(lr, max(total, 1), lr * 0.1, power=1.0),
        global_clipnorm=1.0)
    spec = tf.TensorSpec([None, None], tf.int32)

    def collate(batch: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Right-padded ids, attention mask, and the weight of each position as a target (1 on the answer)."""
        width = -(-max(len(e["ids"]) for e in batch) // PAD_TO) * PAD_TO
        ids, mask, target = (np.zeros((len(batch), width), np.int32) for _ in range(3))
        for row, e in enumerate(batch):
            n = len(e["ids"])
            ids[row, :n], mask[row, :n], target[row, e["start"]:n] = e["ids"], 1, 1
        return ids, mask, target

    def summed_loss(ids: Any, mask: Any, target: Any) -> tuple[Any, Any]:
        logits = model(input_ids=ids, attention_mask=mask, training=False).logits[:, :-1]
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=ids[:, 1:], logits=logits)
        w = tf.cast(target[:, 1:], tf.float32)
        return tf.reduce_sum(ce * w), tf.reduce_sum(w)

    @tf.function(input_signature=[spec, spec, spec])
    def train_step(ids: Any, mask: Any, target: Any) -> Any:
        with tf.GradientTape() as tape:
            total_ce, count = summed_loss(ids, mask, target)
            loss = total_ce / tf.maximum(count, 1.0)
        optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))
        return loss

    evaluate = tf.function(summed_loss, input_signature=[spec, spec, spec])

    def validation_loss() -> float | None:
        if not val:
            return None
        sums = [evaluate(*collate(b)) for b in batches(val, batch_size, None)]
        return float(sum(float(s) for s, _ in sums) / max(sum(float(c) for _, c in sums), 1.0))

    result = run_epochs(train, epochs, batch_size, seed, lambda b: float(train_step(*collate(b))), validation_loss,
                        t_start)

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    write_adapter(out / "adapter.npz", {k: v.numpy() for k, v in factors.items()}, rank, alpha, n_layer, n_embd,
                  base=folder.name)
    done(result, train, val, trainable, load_s, threads, epochs=epochs,
         versions={"tensorflow": tf.__version__, "transformers": transformers.__version__})
    return 0


if __name__ == "__main__":
    run_main(main, "slm_app.finetune.train_tf")
