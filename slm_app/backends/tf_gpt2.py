"""TensorFlow GPT-2 with slots: our own XLA-compiled forward over a loaded TFGPT2LMHeadModel's weights.

transformers' Keras model is only the weight loader. The forward pass is written here (GPT-2 is a
small architecture) so that its KV cache can live in ``tf.Variable``s of shape
``[n_slots, heads, n_ctx + 1, head_dim]`` per layer, written in place inside the compiled functions
at each row's own position (``scatter_nd_update``), and so that a step returns an in-graph argmax
next to its logits: greedy decoding never copies a vocabulary row to Python.

A decode call is a ``tf.while_loop`` of up to ``DECODE_STEPS`` steps, each feeding every row its own
argmax (``decode_greedy``); ``forward`` runs the same compiled loop for one step. A call costs
~0.7 ms of dispatch (Python, TensorFlow, XLA's launch) before any arithmetic, six tiny-gpt2 steps,
so a greedy stream with nothing to do in Python between its tokens pays it once per call, and a
call runs as many steps as fit in ``CALL_SECONDS`` (measured at warmup). A token costs the same
loop body however many steps share the call, so decoding k at a time and one at a time give the
same tokens, bit for bit.

Shapes never change at run time; every shape is compiled at load (``warmup``):

* decode: ``B`` rows of one token each (``B`` up to ``MAX_DECODE_ROWS``; from 1 with the decode
  kernel, else from 2) attending to the first ``W`` cells of their slot (``W`` in the context windows
  up to ``n_ctx``, enough for the call's last step); the number of steps is an argument, not a shape;
* prefill: blocks of exactly ``PREFILL_BLOCK`` tokens of one slot, attending to all ``n_ctx`` cells;
  the scheduler's chunks (up to ``limits().max_step_tokens``) run as several blocks.

Cell ``n_ctx`` of every slot is a bin: padding rows write their keys and values there and no query
ever reads it, so padding needs no out-of-range writes and no masking of writes.

Why these shapes: a request's greedy output must not depend on its neighbours. Measured on this
CPU (XLA, float32): a matmul row gives bit-identical results for 2 to 16 rows, and again for 17 to
512 rows, but a 1-row matmul (a matrix-vector kernel) differs from both; prefill attention changes
with the number of query rows and the window; batched decode attention changes once the batch is
large (4 rows x 704 cells). Hence: decode matmuls of float32 models at least MATVEC_MIN_EMBD wide
run tf_matvec's kernels, whose bits do not depend on the row count, so a lone row runs alone (GPT-2
124M: 19.5 against 38 ms a step with a twin on XLA's matmul); without them (float16, narrow models, no
compiler, ``SLM_MATVEC_KERNEL=false``) decode runs >= 2 rows, a lone row beside a dummy twin
(``SLM_BATCH_INVARIANT=false`` gives up that guarantee for XLA's faster 1-row kernel); decode
attention is computed per row, and prefill always runs 32-token blocks over the whole slot, so
however the scheduler splits a prompt each token sees the same arithmetic.

Size: over 500 lines on purpose: the compiled forward, its fixed shapes and their warm-up must agree
with each other, so they stay one unit.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slm_app.backends import tf_matvec
from slm_app.backends.base import Backend, BackendUnavailable, ModelInfo, Row, SlotLimits, StepLogits, check_row
from slm_app.backends.gpt2_vocab import gpt2_tokenizer, token_byte_table
from slm_app.backends.tf_lora import TFLoraAdapters
from slm_app.provisioning.hub import ResolvedModel, resolve_hf_model
from slm_app.provisioning.tiny_gpt2 import (RANDOM_WEIGHTS_KEY, TINY_GPT2_ID, build_offline_tiny_gpt2,
                                            configure_tensorflow_env, keras_policy, offline_tiny_gpt2_dir)
from slm_app.settings import EngineConfig

log = logging.getLogger(__name__)

PREFILL_BLOCK = 32  # tokens per prefill call (>= 17 rows: the matmul regime that does not depend on row count)
PREFILL_BLOCKS_PER_STEP = 4  # max_step_tokens = 4 blocks: a long prompt never stalls decoding rows for long
MAX_DECODE_ROWS = 8  # rows of one decode call; more decoding slots run as several calls
DECODE_STEPS = 32  # most greedy decode steps one call can run (``decode_greedy``): a compiled shape
# How many of them a call runs is measured at warmup: as many as take about CALL_SECONDS. A call's ~0.7 ms
# of dispatch is more than 6 tiny-gpt2 steps (~0.11 ms each), so tiny runs 32 a call; GPT-2 124M
# (~50 ms a step) runs 3-5, so a stream still gets its tokens, and a new request its slot, within a
# quarter of a second. Without warmup (tests), GREEDY_STEPS_UNMEASURED.
CALL_SECONDS = 0.25
GREEDY_STEPS_UNMEASURED = 8
# Decode attention windows below n_ctx (n_ctx itself is the last). Few, because each is a compiled
# shape per row bucket (124M: ~15 s each); a window of 512 instead of 128 costs 124M ~1 ms per row.
CONTEXT_WINDOWS = (128, 512)
# The decode kernel (tf_matvec) for models at least this wide. Narrower ones (tiny-gpt2: 2) are bound by
# per-op overhead, not by reading weights, and XLA fuses their small matmuls with the ops around them.
MATVEC_MIN_EMBD = 256
HEAD_COPY_MAX_BYTES = 16 * 2**20  # a transposed float32 copy of the head below this size; see _GPT2Graph
BATCHED_ATTENTION_MAX = 2**20  # values in one batched decode attention (rows x window x n_embd); see _GPT2Graph


class _TFStepLogits(StepLogits):
    """Logits of one ``forward``: per output row, the step output holding it and its index there.

    ``argmax`` reads the in-graph argmax (a few bytes); ``row`` copies a vocabulary row only when
    sampling or a constraint needs one."""

    def __init__(self, parts: list[tuple[Any, Any, int]]):
        self._parts = parts  # (argmax tensor, logits tensor, index)
        self._argmax: dict[int, np.ndarray] = {}
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._parts)

    def argmax(self, i: int) -> int:
        arg, _, j = self._parts[i]
        key = id(arg)
        if key not in self._argmax:
            picks = arg.numpy()
            self._argmax[key] = picks if picks.ndim == 1 else picks[0]  # a decode call: its first (only) step
        return int(self._argmax[key][j])

    def row(self, i: int) -> np.ndarray:
        _, logits, j = self._parts[i]
        key = id(logits)
        if key not in self._rows:
            self._rows[key] = logits.numpy()
        return self._rows[key][j]


class _GPT2Graph:
    """GPT-2's forward pass in TensorFlow over the Keras model's own variables, with a slot KV cache."""

    def __init__(self, tf: Any, model: Any, n_slots: int, n_ctx: int, xla: bool, row_major_copies: bool = False,
                 matvec: bool = False, lora_rank: int = 0):
        self.tf = tf
        cfg = model.config
        gpt2 = model.transformer
        self.n_layer, self.n_head = int(cfg.n_layer), int(cfg.n_head)
        self.n_embd = int(cfg.n_embd)
        self.head_dim = self.n_embd // self.n_head
        self.n_positions = int(cfg.n_positions)
        self.eps = float(cfg.layer_norm_epsilon)
        self.vocab = int(cfg.vocab_size)
        self.n_slots, self.n_ctx = n_slots, n_ctx
        # The Keras variables themselves (no copy): float16 on the free tier, cast to float32 in the graph
        # because this CPU has no float16 arithmetic.
        self.wte, self.wpe = gpt2.wte.embeddings, gpt2.wpe.embeddings
        self.blocks = [dict(ln1=(b.ln_1.gamma, b.ln_1.beta), attn=(b.attn.c_attn.weight, b.attn.c_attn.bias),
                            proj=(b.attn.c_proj.weight, b.attn.c_proj.bias), ln2=(b.ln_2.gamma, b.ln_2.beta),
                            fc=(b.mlp.c_fc.weight, b.mlp.c_fc.bias), out=(b.mlp.c_proj.weight, b.mlp.c_proj.bias))
                       for b in gpt2.h]
        self.ln_f = (gpt2.ln_f.gamma, gpt2.ln_f.beta)
        self.cache_dtype = self.wte.dtype
        # GPT-2's head is the transposed token embedding. With a narrow hidden state XLA's matmul against
        # a transposed operand is slow (tiny-gpt2, n_embd 2: ~150 us of a ~300 us step); a float32 copy
        # laid out [n_embd, vocab] halves that. Only while the copy is small: a wide model's head is
        # compute-bound either way, and 124M's copy would be 150 MB.
        self.head_t = (tf.Variable(tf.transpose(self._f32(self.wte)), trainable=False, name="head_t")
                       if self.wte.shape[0] * self.wte.shape[1] * 4 <= HEAD_COPY_MAX_BYTES else None)
        # [slot, head, cell, dim]: attention reads a head's cells as one [cells, dim] matrix, with no
        # transposed copy (measured on [slot, cell, head, dim]: GPT-2 124M, 2 rows at a 704-cell window,
        # 71 against 61 ms a step). Cell n_ctx: the bin for padding rows.
        shape = [n_slots, self.n_head, n_ctx + 1, self.head_dim]
        self.keys = [tf.Variable(tf.zeros(shape, self.cache_dtype), trainable=False, name=f"k{i}")
                     for i in range(self.n_layer)]
        self.values = [tf.Variable(tf.zeros(shape, self.cache_dtype), trainable=False, name=f"v{i}")
                       for i in range(self.n_layer)]
        # Batched decode attention is one op per layer instead of one per row (the tiny model's step is
        # mostly per-op overhead) and gave bit-identical rows for any row count while B x W x n_embd
        # stayed at or below 1.6M values here; above that, XLA changed its arithmetic (4 x 704 x 768).
        self.per_row_attention = MAX_DECODE_ROWS * n_ctx * self.n_embd > BATCHED_ATTENTION_MAX
        self.xla = xla
        self.xla_note: str | None = None if xla else "off (SLM_XLA=0)"
        # Decode rows read float32 row-major [out, in] copies of the block weights (124M: +340 MB), where
        # each output is one contiguous dot product: the layout of tf_matvec's kernel (``matvec``), and of
        # XLA's fastest matrix-vector kernel for a lone row when batch invariance is off (GPT-2 124M 40
        # against 54 ms a step on Keras' [in, out] layout). XLA's matmul for 2+ rows is faster on
        # [in, out] (63 against 72 ms a step), so without the kernel only 1-row calls read the copies.
        self.matvec = matvec
        self.row_major = row_major_copies or matvec
        if self.row_major:
            for block in self.blocks:
                for name in ("attn", "proj", "fc", "out"):
                    block[f"{name}_t"] = tf.Variable(tf.transpose(self._f32(block[name][0])), trainable=False)
                    if matvec:
                        # Prefill blocks read the copies too (XLA's 32-row matmul is faster on them: a 124M
                        # prefill block 73 against 86 ms), so Keras' matrices are dropped, freed with the model.
                        block[name] = (None, block[name][1])
        # LoRA factors (tf_lora) on the attention projections: zero until an adapter is assigned.
        self.lora = TFLoraAdapters(tf, self.n_layer, self.n_embd, lora_rank) if lora_rank > 0 else None
        if self.lora is not None:
            for block, factors in zip(self.blocks, self.lora.variables):
                block.update({f"lora_{t}": ab for t, ab in factors.items()})
        self._concrete: dict[tuple, Any] = {}
        self._functions: dict[tuple, Any] = {}

    # ---- the model, traced into the compiled functions -------------------------------------------
    def _f32(self, x: Any) -> Any:
        return self.tf.cast(x, self.tf.float32)

    def _ln(self, x: Any, params: tuple) -> Any:
        tf = self.tf
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        var = tf.reduce_mean(tf.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + self.eps) * self._f32(params[0]) + self._f32(params[1])

    def _uses_matvec(self, x: Any) -> bool:
        """Decode rows (prefill blocks have 32) go through the kernel, which only XLA can call. After an
        XLA failure (graphs without XLA) a lone row runs TensorFlow's own matmul: other bits than in a batch."""
        return self.matvec and self.xla and x.shape[0] <= MAX_DECODE_ROWS

    def _linear(self, x: Any, block: dict, name: str) -> Any:
        y = self._base_linear(x, block, name)
        lora = block.get(f"lora_{name}")
        if lora is None:
            return y
        # (x·A)·B through the same kind of kernel as x·W: decode rows keep their batch invariance.
        a_t, b_t = lora
        if self._uses_matvec(x):
            return y + tf_matvec.matvec(self.tf, tf_matvec.matvec(self.tf, x, a_t), b_t)
        return y + self.tf.matmul(self.tf.matmul(x, a_t, transpose_b=True), b_t, transpose_b=True)

    def _base_linear(self, x: Any, block: dict, name: str) -> Any:
        weight, bias = block[name]
        if self._uses_matvec(x):
            return tf_matvec.matvec(self.tf, x, block[f"{name}_t"]) + self._f32(bias)
        if weight is None or (self.row_major and x.shape[0] == 1):  # only the copies, or a lone decode row
            return self.tf.matmul(x, block[f"{name}_t"], transpose_b=True) + self._f32(bias)
        return self.tf.matmul(x, self._f32(weight)) + self._f32(bias)

    def _gelu(self, x: Any) -> Any:  # GPT-2's "gelu_new" (tanh approximation)
        tf = self.tf
        return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))

    def _embed(self, tokens: Any, positions: Any) -> Any:
        tf = self.tf
        positions = tf.minimum(positions, self.n_positions - 1)
        return self._f32(tf.gather(self.wte, tokens)) + self._f32(tf.gather(self.wpe, positions))

    def _mlp_and_residual(self, x: Any, attn_out: Any, block: dict) -> Any:
        x = x + self._linear(attn_out, block, "proj")
        return x + self._linear(self._gelu(self._linear(self._ln(x, block["ln2"]), block, "fc")), block, "out")

    def _qkv(self, x: Any, block: dict) -> tuple[Any, Any, Any]:
        tf = self.tf
        qkv = self._linear(self._ln(x, block["ln1"]), block, "attn")
        q, k, v = tf.split(qkv, 3, axis=-1)
        shape = [-1, self.n_head, self.head_dim]
        return tf.reshape(q, shape), tf.reshape(k, shape), tf.reshape(v, shape)

    def _write(self, layer: int, index: Any, k: Any, v: Any) -> None:
        """Keys and values [T, H, D] of some rows into their (slot, cell), ``index`` [T, 2]: in place."""
        tf = self.tf
        each_head = [1, self.n_head]
        at = tf.stack([tf.tile(index[:, :1], each_head), tf.tile(tf.range(self.n_head)[None], [tf.shape(index)[0], 1]),
                       tf.tile(index[:, 1:], each_head)], axis=-1)  # [T, H, 3]: (slot, head, cell)
        self.keys[layer].scatter_nd_update(at, tf.cast(k, self.cache_dtype))
        self.values[layer].scatter_nd_update(at, tf.cast(v, self.cache_dtype))

    def _attend(self, q: Any, keys: Any, values: Any, query_pos: Any) -> Any:
        """q [T, H, D] against cells [H, W, D]; cell c is visible to a query at position p if c <= p."""
        tf = self.tf
        scores = tf.einsum("thd,hcd->htc", q, self._f32(keys)) * (1.0 / math.sqrt(self.head_dim))
        visible = tf.range(tf.shape(keys)[1])[None, :] <= query_pos[:, None]  # [T, W]
        scores = tf.where(visible[None], scores, tf.constant(-1e9, tf.float32))
        probs = tf.nn.softmax(scores, axis=-1)
        return tf.reshape(tf.einsum("htc,hcd->thd", probs, self._f32(values)), [-1, self.n_embd])

    def _attend_rows(self, q: Any, keys: Any, values: Any, positions: Any) -> Any:
        """Decode attention of B rows at once: q [B, H, D] against their own cells [B, H, W, D]."""
        tf = self.tf
        scores = tf.einsum("bhd,bhcd->bhc", q, self._f32(keys)) * (1.0 / math.sqrt(self.head_dim))
        visible = tf.range(tf.shape(keys)[2])[None, :] <= positions[:, None]  # [B, W]
        scores = tf.where(visible[:, None], scores, tf.constant(-1e9, tf.float32))
        probs = tf.nn.softmax(scores, axis=-1)
        return tf.reshape(tf.einsum("bhc,bhcd->bhd", probs, self._f32(values)), [-1, self.n_embd])

    def _logits(self, x: Any) -> Any:
        if self._uses_matvec(x):  # the head [vocab, n_embd] is row-major already
            return tf_matvec.matvec(self.tf, self._ln(x, self.ln_f), self.wte)
        if self.head_t is not None:
            return self.tf.matmul(self._ln(x, self.ln_f), self.head_t)
        return self.tf.matmul(self._ln(x, self.ln_f), self._f32(self.wte), transpose_b=True)

    def _head(self, x: Any) -> tuple[Any, Any]:
        """Logits (GPT-2's head is the transposed token embedding) and their argmax, in the graph."""
        tf = self.tf
        logits = self._logits(x)
        # argmax as the first index holding the maximum: two plain reductions, which XLA's CPU backend
        # runs faster than its (index, value) reduction for tf.argmax (measured: ~100 us of tiny's step).
        top = tf.reduce_max(logits, axis=-1, keepdims=True)
        first = tf.reduce_min(tf.where(logits == top, tf.range(self.vocab)[None], self.vocab), axis=-1)
        return tf.minimum(first, self.vocab - 1), logits  # (NaN logits match nothing: stay in the vocabulary)

    def _decode_step(self, tokens: Any, slots: Any, positions: Any, cells: Any, window: int) -> tuple[Any, Any]:
        """One token for each of B rows: ``cells`` is where each row's keys go (``n_ctx`` for dummies)."""
        tf = self.tf
        x = self._embed(tokens, positions)
        index = tf.stack([slots, cells], axis=1)
        rows = tokens.shape[0]
        for layer, block in enumerate(self.blocks):
            q, k, v = self._qkv(x, block)
            self._write(layer, index, k, v)
            if self._uses_matvec(x):
                # The kernel reads each row's cells in place: no gathered copy of the windows, and
                # the same bits for any row count and window (GPT-2 124M, 3 rows: 22-25 against 31 ms a
                # step with XLA's batched attention, 35 per row).
                out = tf.reshape(tf_matvec.attention(tf, q, self.keys[layer], self.values[layer], slots, positions),
                                 [-1, self.n_embd])
            elif self.per_row_attention:
                # Per row, so a row's arithmetic does not depend on how many rows share the step.
                # The rows' cells by one gather (``keys[slots[r]]`` would make the slots a compile-time
                # constant: a compilation for every call, each holding memory maps until mmap failed).
                keys = tf.gather(self.keys[layer][:, :, :window], slots)
                values = tf.gather(self.values[layer][:, :, :window], slots)
                out = tf.concat([self._attend(q[r:r + 1], keys[r], values[r], positions[r:r + 1])
                                 for r in range(rows)], axis=0)
            else:
                out = self._attend_rows(q, tf.gather(self.keys[layer][:, :, :window], slots),
                                        tf.gather(self.values[layer][:, :, :window], slots), positions)
            x = self._mlp_and_residual(x, out, block)
        return self._head(x)

    def _decode(self, rows: Any, window: int) -> tuple[Any, Any]:
        """``steps`` greedy decode steps of B rows in one call, each step feeding every row its own
        argmax of the step before. ``rows`` [5, B]: tokens, slots, positions, cells (``n_ctx`` for
        dummies, which stay in the bin), steps (the same in every column, 1..DECODE_STEPS).

        Returns the argmax of every step [DECODE_STEPS, B] (rows past ``steps`` are zero) and the
        logits of the last step. One step is one iteration of the same loop body whatever ``steps``
        is, so a token decoded k at a time is computed exactly as one decoded alone."""
        tf = self.tf
        tokens, slots, positions, cells, steps = rows[0], rows[1], rows[2], rows[3], rows[4, 0]
        in_bin = cells >= self.n_ctx
        width = tokens.shape[0]

        def body(j: Any, tokens: Any, positions: Any, cells: Any, picks: Any, logits: Any) -> tuple:
            arg, logits = self._decode_step(tokens, slots, positions, cells, window)
            picks = tf.tensor_scatter_nd_update(picks, [[j]], arg[None])
            return j + 1, arg, positions + 1, tf.where(in_bin, cells, cells + 1), picks, logits

        start = (tf.constant(0), tokens, positions, cells, tf.zeros([DECODE_STEPS, width], tf.int32),
                 tf.zeros([width, self.vocab], tf.float32))
        _, _, _, _, picks, logits = tf.while_loop(lambda j, *_: j < steps, body, start,
                                                  maximum_iterations=DECODE_STEPS)
        return picks, logits

    def _block(self, tokens: Any, slot: Any, start: Any, n: Any) -> tuple[Any, Any]:
        """Hidden states of a prefill block: ``tokens[:n]`` at positions ``start..``; the rest is padding."""
        tf = self.tf
        offsets = tf.range(PREFILL_BLOCK)
        positions = start + offsets
        cells = tf.where(offsets < n, positions, self.n_ctx)
        index = tf.stack([tf.fill([PREFILL_BLOCK], slot), cells], axis=1)
        x = self._embed(tokens, positions)
        for layer, block in enumerate(self.blocks):
            q, k, v = self._qkv(x, block)
            self._write(layer, index, k, v)
            # A gather, not ``keys[slot]``: TensorFlow's XLA bridge needs a strided slice's start as a
            # compile-time constant, so the slot would be part of the compilation key (each slot's first
            # prompt compiled anew at run time; measured as new memory maps after warm-up).
            out = self._attend(q, tf.gather(self.keys[layer], slot)[:, :self.n_ctx],
                               tf.gather(self.values[layer], slot)[:, :self.n_ctx], positions)
            x = self._mlp_and_residual(x, out, block)
        return x

    def _prefill(self, tokens: Any, slot: Any, start: Any, n: Any) -> tuple[Any, Any]:
        x = self._block(tokens, slot, start, n)
        return self._head(self.tf.gather(x, [n - 1]))

    def _score(self, tokens: Any, slot: Any, start: Any, n: Any, targets: Any) -> Any:
        """Log-probability of ``targets[i]`` after ``tokens[:i+1]``, for each row of a block."""
        tf = self.tf
        x = self._block(tokens, slot, start, n)
        logits = self._logits(x)
        logprobs = tf.nn.log_softmax(logits, axis=-1)
        return tf.gather(logprobs, targets, axis=1, batch_dims=1)

    # ---- calling the compiled functions --------------------------------------------------------------
    def call(self, which: str, *args: Any, window: int | None = None) -> Any:
        """Run one function as a concrete function of its exact shapes (traced once per shape: that
        skips tf.function's signature matching on every call). If XLA cannot compile a shape that
        runs as a plain graph, XLA is switched off for good and ``xla_note`` says why."""
        if not self.xla:
            return self._run(False, which, args, window)
        try:
            return self._run(True, which, args, window)
        except Exception as xla_error:
            self.xla = False  # before tracing: graphs without XLA cannot run the decode kernel (_uses_matvec)
            try:
                result = self._run(False, which, args, window)
            except Exception:  # the inputs, not XLA, are at fault
                self.xla = True
                raise
            self.xla_note = f"off: XLA compilation failed ({type(xla_error).__name__}: {str(xla_error)[:300]})"
            log.warning("XLA disabled, running TF graphs without it: %s", xla_error)
            return result

    def _run(self, jit: bool, which: str, args: tuple, window: int | None) -> Any:
        tf = self.tf
        key = (jit, which, window, *(np.shape(a) for a in args))
        fn = self._concrete.get(key)
        if fn is None:
            python_fn = getattr(self, f"_{which}")
            if window is not None:
                # A closure, not functools.partial: a keyword left in the signature makes every call fail
                # tf's structured argument binding first (an exception per step) before the flat call.
                # One packed [5, B] argument: one tensor conversion and a cheap argument binding per step.
                def python_fn(rows: Any) -> Any:
                    return self._decode(rows, window=window)
            specs = [tf.TensorSpec(np.shape(a), tf.int32) for a in args]
            # No autograph: the model has no tensor-dependent Python control flow to convert.
            self._functions[key] = tf.function(python_fn, jit_compile=jit, autograph=False)
            fn = self._concrete[key] = self._functions[key].get_concrete_function(*specs)
        return fn(*(tf.convert_to_tensor(a, tf.int32) for a in args))

    def compiled_shapes(self) -> set[tuple]:
        return set(self._concrete)

    def copy_slot(self, src: int, dst: int) -> None:
        """Every cell of slot ``src`` into slot ``dst``, bit for bit (cells past a request's own
        positions are never read, so copying them too is harmless)."""
        tf = self.tf
        for var in (*self.keys, *self.values):
            var.scatter_nd_update(tf.constant([[dst]]), tf.gather(var, [src]))

    def optimized_hlo(self, which: str, *args: Any, window: int | None = None) -> str:
        """XLA's optimised HLO of one compiled shape (tests read its input/output aliasing)."""
        key = (True, which, window, *(np.shape(a) for a in args))
        tensors = [self.tf.convert_to_tensor(a, self.tf.int32) for a in args]
        return self._functions[key].experimental_get_compiler_ir(*tensors)(stage="optimized_hlo")


def _smallest(n: int, ladder: Sequence[int]) -> int:
    return next(b for b in ladder if b >= n)


class TFGPT2Backend(Backend):
    name = "tensorflow"
    # Decode rows run other kernels than 32-token prefill blocks: their keys and values differ in the
    # last bits, so the prompt cache reuses only what prefill wrote (a cached answer is a cold one, bit for bit).
    decode_kv_reusable = False

    def __init__(self, model: Any, tokenizer: Any, resolved: ResolvedModel, config: EngineConfig):
        self._tf = configure_tensorflow_env()
        self._model: Any = None  # set below while the graph reads the Keras model's block matrices
        self._tokenizer = tokenizer
        self._resolved = resolved
        self._config = config
        cfg = model.config
        self._n_positions = int(cfg.n_positions)
        self._vocab_width = int(cfg.vocab_size)
        self._eos = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id)
        self._bytes = token_byte_table(tokenizer, self._vocab_width)
        self._random_weights = config.model == TINY_GPT2_ID or bool(getattr(cfg, RANDOM_WEIGHTS_KEY, False))
        self._n_params = int(model.count_params())
        self._dtype = model.weights[0].dtype.name
        # One sequence holds the longest prompt plus the longest answer the tier admits.
        self._n_ctx = min(self._n_positions, config.max_prompt_tokens + config.max_new_tokens)
        self._n_slots = config.n_slots
        # The decode kernels: float32 weights (float32 copies would cost twice the memory a float16 tier
        # chose to save), under XLA, for a model wide enough to gain.
        matvec, self._matvec_note = self._matvec(config, int(cfg.n_embd))
        # Context windows bound the cells XLA's attention reads; the attention kernel reads only the cells
        # a row can see, so with it one window (a third of the compiled shapes: ~30 s less warm-up on 124M).
        self._windows = [self._n_ctx] if matvec else [w for w in CONTEXT_WINDOWS if w < self._n_ctx] + [self._n_ctx]
        # Row buckets: the slot count, 4 and 8 below it, and the smallest: 1 with the kernel (a lone row
        # gets the bits it gets in any batch); else 2 (XLA's matmul gives 2 to 16 rows the same bits, and
        # a lone row a dummy twin), and also 1 when batch invariance is off (XLA's faster 1-row kernel).
        top = min(config.n_slots, MAX_DECODE_ROWS)
        smallest = {1} if matvec else {2} | (set() if config.batch_invariant else {1})
        self._decode_rows = sorted(smallest | {max(top, min(smallest))} | {b for b in (4, 8) if b < top})
        self._graph = _GPT2Graph(self._tf, model, self._n_slots, self._n_ctx, config.xla,
                                 row_major_copies=not config.batch_invariant and not config.float16, matvec=matvec,
                                 lora_rank=config.lora_rank)
        # With the decode kernels the graph reads only its own row-major copies of the block matrices:
        # the Keras model is not kept, so Keras' layout of them (340 MB on 124M) is freed for the
        # process's later allocations. (RSS after load does not drop: the allocator keeps the pages.)
        self._model = None if matvec else model
        self._llg: Any = None
        self._greedy_steps = GREEDY_STEPS_UNMEASURED
        self.load_time_s = 0.0
        self.warmup_s = 0.0

    def _matvec(self, config: EngineConfig, n_embd: int) -> tuple[bool, str]:
        """Whether decode rows use tf_matvec's kernels, and a note for ``info``: "on (how)" or "off (why)"."""
        if not config.matvec_kernel:
            return False, "off (SLM_MATVEC_KERNEL=false)"
        if config.float16 or not config.xla:
            return False, "off (float16 weights)" if config.float16 else "off (SLM_XLA=0)"
        if n_embd < MATVEC_MIN_EMBD:
            return False, f"off (n_embd {n_embd} < {MATVEC_MIN_EMBD}: XLA's fused matmuls are faster)"
        loaded = tf_matvec.load(self._tf, config.cache_dir)
        return loaded.path is not None, f"{'on' if loaded.path else 'off'} ({loaded.reason})"

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig) -> "TFGPT2Backend":
        configure_tensorflow_env()
        start = time.perf_counter()
        # Only tiny-gpt2 may be replaced by a local build: it is random on the hub as well.
        # Any other model silently swapped for it would be a lie.
        fallback = ((lambda: build_offline_tiny_gpt2(offline_tiny_gpt2_dir(config.cache_dir)))
                    if config.model == TINY_GPT2_ID else None)
        resolved = resolve_hf_model(config.model, fallback=fallback,
                                    fallback_label="tiny-gpt2 built offline (same config, random weights)")
        if resolved.path is None:
            raise BackendUnavailable(resolved.reason)
        from transformers import AutoTokenizer, TFGPT2LMHeadModel

        try:
            tokenizer = (AutoTokenizer.from_pretrained(resolved.path)
                         if (Path(resolved.path) / "tokenizer_config.json").is_file() else gpt2_tokenizer())
            # "float16" (not "mixed_float16", which keeps float32 variables) stores the weights in fp16.
            with keras_policy("float16" if config.float16 else "float32"):
                lm = TFGPT2LMHeadModel.from_pretrained(resolved.path)
        except Exception as exc:  # wrong architecture, missing tf_model.h5, corrupt files...
            raise BackendUnavailable(f"{config.model}: cannot load a TensorFlow GPT-2 from {resolved.path} "
                                     f"({type(exc).__name__}: {exc})") from exc
        if not tokenizer.is_fast:
            raise BackendUnavailable(f"{config.model}: needs a fast tokenizer (tokenizer.json) for constrained decoding")
        backend = cls(lm, tokenizer, resolved, config)
        backend.load_time_s = time.perf_counter() - start
        if config.warmup:
            backend.warmup()
        log.info("tensorflow backend ready: %s", backend.info())
        return backend

    def warmup(self) -> None:
        """Compile every shape a request can reach, so no request ever waits for XLA."""
        start = time.perf_counter()
        g = self._graph
        block = np.full(PREFILL_BLOCK, self._eos, np.int32)
        zero = np.int32(0)
        g.call("prefill", block, zero, zero, np.int32(1))
        g.call("score", block, zero, zero, np.int32(1), block)
        for rows in self._decode_rows:
            for window in self._windows:
                dummy = np.zeros(rows, np.int32)
                g.call("decode", np.stack([dummy + self._eos, dummy, dummy, dummy + self._n_ctx, dummy + 1]),
                       window=window)
        self.size_greedy_calls()
        self.warmup_s += time.perf_counter() - start

    def size_greedy_calls(self) -> int:
        """Set (and return) the steps a greedy call runs: as many as take about CALL_SECONDS (one call
        of 4 steps of the smallest shape, dispatch included, best of two; in the bin cell, so nothing is
        written). Part of ``warmup``; a benchmark that skips warmup calls it itself."""
        dummy = np.zeros(self._decode_rows[0], np.int32)
        packed = np.stack([dummy + self._eos, dummy, dummy, dummy + self._n_ctx, dummy + 4])
        best = math.inf
        for _ in range(2):
            start = time.perf_counter()
            self._graph.call("decode", packed, window=self._windows[0])[0].numpy()
            best = min(best, (time.perf_counter() - start) / 4)
        self._greedy_steps = int(min(DECODE_STEPS, max(2, CALL_SECONDS // best)))
        return self._greedy_steps

    # ---- facts -----------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        r, g = self._resolved, self._graph
        cache_mb = self.kv_bytes_per_slot() / 2**20
        return ModelInfo(
            backend=self.name, model_id=self._config.model, name=r.name, source=r.source, reason=r.reason,
            license="MIT (GPT-2)" if not self._random_weights else None, random_weights=self._random_weights,
            chat_template=False, vocab_size=self._vocab_width, n_ctx=self._n_ctx, n_slots=self._n_slots,
            details={
                "model_path": str(r.path), "n_params": self._n_params, "dtype": self._dtype,
                "float16": self._config.float16, "xla": g.xla if g else None,
                "batch_invariant": self._config.batch_invariant,
                "matvec_kernel": self._matvec_note if g is None or g.xla else "off (XLA failed: see xla_note)",
                "lora_rank": g.lora.rank if g is not None and g.lora is not None else 0,
                "greedy_steps_per_call": self._greedy_steps,
                "xla_note": g.xla_note if g else "closed",
                "buckets": {"decode_rows": self._decode_rows, "context_windows": self._windows,
                            "prefill_block": PREFILL_BLOCK},
                "kv_cache_mb_per_slot": round(cache_mb, 2), "n_positions": self._n_positions,
                "load_time_s": round(self.load_time_s, 3), "warmup_s": round(self.warmup_s, 3)})

    def kv_bytes_per_slot(self) -> int:
        g = self._graph
        if g is None:
            return 0
        return 2 * g.n_layer * (self._n_ctx + 1) * g.n_embd * np.dtype(g.cache_dtype.as_numpy_dtype).itemsize

    def limits(self) -> SlotLimits:
        return SlotLimits(n_slots=self._n_slots, max_sequence_tokens=self._n_ctx,
                          kv_cells=self._n_slots * self._n_ctx,
                          max_step_tokens=PREFILL_BLOCKS_PER_STEP * PREFILL_BLOCK)

    @property
    def vocab_width(self) -> int:
        return self._vocab_width

    # ---- text ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        # GPT-2 needs at least one token; an empty prompt starts from <|endoftext|>, as GPT-2 was trained.
        return self._tokenizer.encode(text) or [self._eos]

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token] if 0 <= token < self._vocab_width else b""

    def is_end(self, token: int) -> bool:
        return token == self._eos

    def llguidance_tokenizer(self) -> Any:
        if self._llg is None:
            import llguidance.hf

            self._llg = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_width, eos_token=self._eos)
        return self._llg

    # ---- the model -------------------------------------------------------------------------
    def _check(self, row: Row) -> None:
        check_row(row, self._n_slots, self._n_ctx, self._vocab_width)

    def forward(self, rows: Sequence[Row]) -> StepLogits:
        g = self._graph
        if g is None:
            raise BackendUnavailable("the TensorFlow backend was closed")
        if len({r.slot for r in rows}) != len(rows):
            raise ValueError("each slot may appear at most once in a step")
        for row in rows:
            self._check(row)
        results: dict[int, tuple[Any, Any, int]] = {}
        # Prompt tokens always run as prefill blocks, even one: a prompt's last token gets the same
        # arithmetic however the prompt was split (or how much of it the prompt cache served).
        decode = [i for i, r in enumerate(rows) if len(r.tokens) == 1 and not r.prompt]
        prefill = [i for i, r in enumerate(rows) if len(r.tokens) > 1 or r.prompt]
        for group, picks, logits in self._decode_calls([rows[i] for i in decode], 1):
            for j, k in enumerate(group):
                results[decode[k]] = (picks, logits, j)
        for i in prefill:
            r = rows[i]
            out = None
            for lo in range(0, len(r.tokens), PREFILL_BLOCK):
                chunk = r.tokens[lo: lo + PREFILL_BLOCK]
                block = np.full(PREFILL_BLOCK, self._eos, np.int32)
                block[:len(chunk)] = chunk
                out = g.call("prefill", block, np.int32(r.slot), np.int32(r.pos + lo), np.int32(len(chunk)))
            results[i] = (out[0], out[1], 0)
        return _TFStepLogits([results[i] for i, r in enumerate(rows) if r.logits])

    def _decode_calls(self, rows: Sequence[Row], steps: int) -> list[tuple[list[int], Any, Any]]:
        """Run one-token ``rows`` for ``steps`` greedy steps, at most ``MAX_DECODE_ROWS`` rows per call.
        Per call: the indices of its rows in ``rows``, its argmax of every step [DECODE_STEPS, B] and
        its last step's logits [B, vocab] (tensors: read only what is needed)."""
        g = self._graph
        out = []
        biggest = self._decode_rows[-1]
        for lo in range(0, len(rows), biggest):
            group = list(range(lo, min(lo + biggest, len(rows))))
            n = _smallest(len(group), self._decode_rows)
            lead = rows[group[0]]
            # Dummy rows repeat the first row's slot and token and write to its bin cell.
            packed = np.empty((5, n), np.int32)
            packed[0], packed[1], packed[2], packed[3], packed[4] = lead.tokens[0], lead.slot, lead.pos, self._n_ctx, steps
            for j, i in enumerate(group):
                r = rows[i]
                packed[0, j], packed[1, j], packed[2, j], packed[3, j] = r.tokens[0], r.slot, r.pos, r.pos
            window = _smallest(int(packed[2].max()) + steps, self._windows)
            picks, logits = g.call("decode", packed, window=window)
            out.append((group, picks, logits))
        return out

    def max_greedy_steps(self) -> int:
        return self._greedy_steps

    def decode_greedy(self, rows: Sequence[Row], steps: int) -> np.ndarray:
        g = self._graph
        if g is None:
            raise BackendUnavailable("the TensorFlow backend was closed")
        if not 1 <= steps <= DECODE_STEPS:
            raise ValueError(f"steps must be 1..{DECODE_STEPS}, not {steps}")
        if len({r.slot for r in rows}) != len(rows):
            raise ValueError("each slot may appear at most once in a step")
        for row in rows:
            if len(row.tokens) != 1:
                raise ValueError(f"slot {row.slot}: greedy decoding takes rows of one token")
            self._check(Row(row.slot, row.tokens, row.pos + steps - 1))  # every step's cell must fit
        tokens = np.empty((len(rows), steps), np.int64)
        for group, picks, _ in self._decode_calls(rows, steps):
            tokens[group] = picks.numpy()[:steps, :len(group)].T
        return tokens

    def keep_prefix(self, slot: int, n: int) -> bool:
        # Nothing to drop: the next request writes its cells from ``n`` on before any query reads them.
        if not 0 <= slot < self._n_slots:
            raise ValueError(f"slot {slot} does not exist")
        return 0 <= n <= self._n_ctx

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        if self._graph is None:
            raise BackendUnavailable("the TensorFlow backend was closed")
        if not (0 <= src < self._n_slots and 0 <= dst < self._n_slots and 0 <= n <= self._n_ctx):
            raise ValueError(f"cannot copy {n} cells from slot {src} to slot {dst}")
        if src != dst:
            self._graph.copy_slot(src, dst)
        return True

    def release(self, slot: int) -> None:
        # Nothing to clear: a slot's next request overwrites its cells from position 0, and attention
        # never looks past a query's own position.
        if not 0 <= slot < self._n_slots:
            raise ValueError(f"slot {slot} does not exist")

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        g = self._graph
        if g is None:
            raise BackendUnavailable("the TensorFlow backend was closed")
        tokens = [int(t) for t in tokens][: self._n_ctx]
        if any(not 0 <= t < self._vocab_width for t in tokens):
            raise ValueError(f"token id outside the vocabulary (0..{self._vocab_width - 1})")
        out = []
        for lo in range(0, len(tokens) - 1, PREFILL_BLOCK):
            chunk = tokens[lo: lo + PREFILL_BLOCK]
            targets = tokens[lo + 1: lo + 1 + PREFILL_BLOCK]
            n = len(targets)
            block = np.full(PREFILL_BLOCK, self._eos, np.int32)
            block[:len(chunk)] = chunk
            target_block = np.zeros(PREFILL_BLOCK, np.int32)
            target_block[:n] = targets
            logprobs = g.call("score", block, np.int32(0), np.int32(lo), np.int32(len(chunk)), target_block)
            out.append(logprobs.numpy()[:n].astype(np.float64))
        self.release(0)
        return np.concatenate(out) if out else np.zeros(0)

    # ---- LoRA adapters (tf_lora): applying one assigns variables, nothing is traced or compiled ----
    adapter_kind = "gpt2-lora-npz"

    @property
    def supports_adapters(self) -> bool:  # type: ignore[override]
        return self._graph is not None and self._graph.lora is not None

    def _lora(self) -> TFLoraAdapters:
        if self._graph is None or self._graph.lora is None:
            raise NotImplementedError("LoRA is off (SLM_TF_LORA_RANK=0) or the backend is closed")
        return self._graph.lora

    def load_adapter(self, adapter_id: str, path: str) -> None:
        self._lora().load(adapter_id, Path(path))

    def set_adapter(self, adapter_id: str | None) -> None:
        self._lora().set(adapter_id)

    def active_adapter(self) -> str | None:
        return self._graph.lora.active if self.supports_adapters else None

    def end_of_turn_token(self) -> int | None:
        return self._eos  # GPT-2 ends a text with <|endoftext|>

    def compiled_shapes(self) -> set[tuple]:
        """Shapes compiled so far (tests check that serving adds none after warm-up)."""
        return self._graph.compiled_shapes() if self._graph is not None else set()

    def close(self) -> None:
        self._graph = None
        self._model = self._llg = None
        gc.collect()
