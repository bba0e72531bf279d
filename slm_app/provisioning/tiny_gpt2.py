"""The free tier's offline tiny-gpt2: a randomly initialised TensorFlow GPT-2 built here.

``sshleifer/tiny-gpt2`` on the hub is itself a randomly initialised test model, so when the hub is
out of reach the same config built locally (fixed seed) is an honest stand-in; its config.json says
the weights are random (``RANDOM_WEIGHTS_KEY``) so the UI can tell users the text is meaningless.
The same builder makes random models of any GPT-2 size for tests and benchmarks.

TensorFlow reads some environment variables only at its first import, so every module that needs
TensorFlow gets it through ``configure_tensorflow_env``.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from slm_app.backends.gpt2_vocab import gpt2_tokenizer
from slm_app.provisioning.hub import TF_MODEL_FILES

TINY_GPT2_ID = "sshleifer/tiny-gpt2"
# The hub model's config: a randomly initialised test model, as meaningless as our local build.
TINY_GPT2_CONFIG: dict[str, int] = {"n_embd": 2, "n_layer": 2, "n_head": 2, "vocab_size": 50257, "n_positions": 1024}
# Written into config.json of models built here, so the backend can say their weights are random.
RANDOM_WEIGHTS_KEY = "slm_random_weights"


@functools.cache
def configure_tensorflow_env() -> Any:
    """Set TensorFlow's environment, import it, and let GPUs grow their memory. Returns ``tf``.

    The variables only work if they are set before TensorFlow's first import, so no module of the
    app imports it at the top.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    # transformers' TF models run on Keras 2 (tf-keras) only; Keras 3 cannot load them.
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # GPU already initialised by someone else; TF_FORCE_GPU_ALLOW_GROWTH covers it
            pass
    return tf


@contextmanager
def keras_policy(name: str) -> Iterator[None]:
    """A Keras dtype policy for the layers built inside, restored after so it never leaks."""
    configure_tensorflow_env()
    import tf_keras

    previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tf_keras.mixed_precision.set_global_policy(previous)


def offline_tiny_gpt2_dir(cache_dir: str | Path) -> Path:
    """Where the free tier's offline tiny-gpt2 lives inside the app's cache directory."""
    return Path(cache_dir) / "tiny-gpt2-offline"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TF_MODEL_FILES)


def build_random_gpt2(target_dir: Path, seed: int = 0, **config: Any) -> Path:
    """A randomly initialised TF GPT-2 plus the GPT-2 tokenizer, saved once into ``target_dir``.

    ``config`` goes to ``GPT2Config``. Deterministic: weights come from a numpy generator seeded
    with ``seed``, drawn in the model's variable order with GPT-2's initialisation (normal with
    ``initializer_range``, default 0.02; zero biases; unit LayerNorm scales), so TensorFlow's
    global random state plays no part. Written to a temporary sibling folder and renamed, so a
    crash never leaves a half-written model.
    """
    target_dir = Path(target_dir)
    if is_complete(target_dir):
        return target_dir
    configure_tensorflow_env()
    from transformers import GPT2Config, TFGPT2LMHeadModel

    target_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would stick to the renamed folder.
    tmp = target_dir.parent / f".{target_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        cfg = GPT2Config(**config, **{RANDOM_WEIGHTS_KEY: True})
        rng = np.random.default_rng(seed)
        with keras_policy("float32"):
            # A fixed name: Keras would otherwise number a second model in the process ("..._1"),
            # and that name prefixes every weight saved in tf_model.h5.
            model = TFGPT2LMHeadModel(cfg, name="tfgpt2lm_head_model")
            model(model.dummy_inputs)  # creates the variables
        for var in model.weights:
            leaf = var.name.rsplit("/", 1)[-1]
            if leaf.startswith("gamma"):
                value = np.ones(var.shape, np.float32)
            elif leaf.startswith(("beta", "bias")):
                value = np.zeros(var.shape, np.float32)
            else:
                value = rng.normal(0.0, cfg.initializer_range, var.shape).astype(np.float32)
            var.assign(value)
        model.save_pretrained(tmp)
        gpt2_tokenizer().save_pretrained(tmp)
        del model
        if not is_complete(tmp):
            raise RuntimeError(f"saved model in {tmp} lacks some of {TF_MODEL_FILES}")
        try:
            tmp.rename(target_dir)
        except OSError:
            if not is_complete(target_dir):  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target_dir


def build_offline_tiny_gpt2(target_dir: Path) -> Path:
    """tiny-gpt2 (same config as ``sshleifer/tiny-gpt2``, random weights, seed 0) in ``target_dir``."""
    return build_random_gpt2(target_dir, seed=0, **TINY_GPT2_CONFIG)
