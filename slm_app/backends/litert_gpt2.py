"""GPT-2 on LiteRT (TensorFlow Lite's runtime, PyPI ``ai-edge-litert``): the free tier without TensorFlow.

The model is converted at set-up by ``slm_app.provisioning.litert`` (which says what its signatures
compute); this module never imports TensorFlow, so a free-tier process holds LiteRT's ~35 MB instead
of TensorFlow's ~620 MB. When the converted file is missing and TensorFlow is installed, the
conversion runs in a child process; without TensorFlow, loading fails and says which command converts.

Each slot keeps its KV cache here, as a numpy array ``[L, 2, H, n_ctx, D]``: a step reads a slot's
cache from the signature's cache input, gets the new cells' keys and values back and writes them at
the row's positions, in the slot's cache and in that input (``_Signature``: a slot decoding step
after step never copies its whole cache again). Rows run one at a time (LiteRT's shapes are fixed at
conversion; one-row calls need no padding rows).

Greedy decoding (``decode_greedy``) is a Python loop over the decode signature with the argmax taken
in numpy on LiteRT's logits buffer: measured on tiny-gpt2, an argmax inside the graph (LiteRT's
ARG_MAX over 50,257 logits, ~30 us) costs more than the loop's Python and numpy's argmax (~10 us a
step), so a multi-step greedy signature (a WHILE loop or unrolled steps, the cache written in the
graph) was slower, not faster.

LiteRT's default XNNPACK delegate repacks the weights for each signature (GPT-2 124M float32: 1.6 GB
RSS instead of 0.6 GB), so large models run on the builtin kernels unless ``SLM_LITERT_XNNPACK=true``;
small ones (tiny-gpt2) on XNNPACK, twice as fast there, and on one thread.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slm_app.backends.base import (
    ArrayLogits, Backend, BackendUnavailable, ModelInfo, Row, SlotLimits, StepLogits, check_row,
)
from slm_app.backends.gpt2_vocab import token_byte_table
from slm_app.provisioning.litert import LiteRTMeta, convert_in_subprocess, model_dir, read_meta
from slm_app.settings import EngineConfig

log = logging.getLogger(__name__)

# Greedy steps one ``decode_greedy`` call runs, sized at warm-up like the TensorFlow backend's: as many as
# take about GREEDY_CALL_SECONDS, so a stream still gets its tokens, and a new request its slot, within a
# quarter of a second (tiny-gpt2: all 32, ~3 ms; GPT-2 124M: 2-3). Without warm-up: GREEDY_STEPS_UNMEASURED.
MAX_GREEDY_STEPS = 32
GREEDY_CALL_SECONDS = 0.25
GREEDY_STEPS_UNMEASURED = 8
PREFILL_CHUNKS_PER_STEP = 2  # max_step_tokens = 2 chunks: a long prompt never stalls decoding rows for long
# Small models (file up to this size, tiny-gpt2's is 0.26 MB) run on XNNPACK (LiteRT's default delegate;
# its per-signature weight repacking is what costs large models their memory), on one thread: their ops
# take microseconds, less than handing work to a second thread and waiting for it (tiny-gpt2, measured:
# 1 thread ~0.6x the time of 2 a decode step, ~0.4x a prefill chunk). Large ones run on the builtin
# kernels, on every core.
SMALL_MODEL_MAX_MB = 32
CONVERT_COMMAND = ".venv/bin/python -m slm_app.provisioning.litert  (needs TensorFlow; ./setup_lightweight.sh does it)"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def locate(config: EngineConfig) -> tuple[Path, LiteRTMeta]:
    """The converted model for ``config``: a folder given as the model, else the cache's conversion
    (converted now, in a child process, when TensorFlow is installed here)."""
    given = Path(config.model).expanduser()
    if (given / "model.tflite").is_file():
        meta = read_meta(given)
        if meta is None:
            raise BackendUnavailable(f"{given}: model.json is missing or from another version; convert again")
        return given, meta
    n_ctx = config.max_prompt_tokens + config.max_new_tokens
    folder = model_dir(config.cache_dir, config.model, n_ctx, config.litert_weights)
    if (meta := read_meta(folder)) is not None:
        return folder, meta
    if importlib.util.find_spec("tensorflow") is None:
        raise BackendUnavailable(f"{config.model}: no LiteRT conversion for {n_ctx} cache cells and "
                                 f"{config.litert_weights} weights in {folder.parent}, and TensorFlow is not "
                                 f"installed here to make one; run {CONVERT_COMMAND}")
    log.info("converting %s to LiteRT (%s weights, %d cells) in a child process", config.model,
             config.litert_weights, n_ctx)
    try:
        folder = convert_in_subprocess(config.model, config.cache_dir, n_ctx, config.litert_weights)
    except RuntimeError as exc:
        raise BackendUnavailable(f"{config.model}: {exc}") from exc
    if (meta := read_meta(folder)) is None:
        raise BackendUnavailable(f"{config.model}: the conversion left no usable model in {folder}")
    return folder, meta


class _Tokenizer:
    """The model's ``tokenizer.json`` through the ``tokenizers`` library alone. Not transformers: its
    import alone is ~300 MB of RSS where PyTorch is installed (it imports it), most of a 512 MB host."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(path))
        self.backend.no_padding()
        self.backend.no_truncation()
        added = self.backend.get_added_tokens_decoder()
        self.all_special_ids = [i for i, token in added.items() if token.special]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)


class _Signature:
    """One signature of the interpreter, its tensors allocated once (the shapes are fixed at conversion)
    and read and written in place through numpy views of LiteRT's own buffers: a step sets two scalars,
    invokes, and reads its outputs without a copy.

    The ``cache`` input holds one slot's KV cache (``cache_slot``); it stays there between calls, so a
    slot decoding step after step pays for its new cell only, not for copying its whole cache in at each
    step (GPT-2 124M: 28 MB a step at 704 cells). LiteRT never writes a graph input, and its arena never
    lends an input's memory to another tensor, so the buffer holds what was last written to it.

    Why views are safe to hold across ``Invoke``: LiteRT moves a tensor only when it reallocates (a
    resize, or a dynamic shape), and these signatures have neither; the first call allocates, then the
    buffers stay where they are (``tests/test_litert.py`` checks tokens and logits step by step)."""

    def __init__(self, interpreter: Any, key: str):
        runner = interpreter.get_signature_runner(key)
        wrapper, subgraph = runner._interpreter_wrapper, runner._subgraph_index
        wrapper.AllocateTensors(subgraph)
        self._wrapper, self._subgraph = wrapper, subgraph
        # Views keep the Interpreter (their base) alive; it is never resized, so never refuses to run.
        # A scalar tensor comes back as a numpy scalar, a copy: those are set with SetTensor.
        self.inputs = {name: wrapper.tensor(interpreter, index, subgraph) for name, index in runner._inputs.items()
                       if runner.get_input_details()[name]["shape"].size}
        self._scalars = {name: index for name, index in runner._inputs.items() if name not in self.inputs}
        self.outputs = {name: wrapper.tensor(interpreter, index, subgraph) for name, index in runner._outputs}
        self.cache_slot: int | None = None  # whose KV cache ``inputs["cache"]`` holds; None: nobody's

    def __call__(self, **scalars: int) -> dict[str, np.ndarray]:
        """Set the given scalar inputs (the caller writes the arrays into ``inputs``), run; returns the
        output views, valid until the next call."""
        for name, value in scalars.items():
            if name in self._scalars:
                self._wrapper.SetTensor(self._scalars[name], np.array(value, np.int32), self._subgraph)
            else:
                self.inputs[name][...] = value
        self._wrapper.Invoke(self._subgraph)
        return self.outputs


class LiteRTGPT2Backend(Backend):
    name = "litert"

    def __init__(self, folder: Path, meta: LiteRTMeta, tokenizer: Any, config: EngineConfig):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self._folder, self._meta, self._config = folder, meta, config
        self._tokenizer = tokenizer
        small = (folder / "model.tflite").stat().st_size / 2**20 <= SMALL_MODEL_MAX_MB
        self._threads = config.n_threads or (1 if small else _cores())
        self._xnnpack = config.litert_xnnpack if config.litert_xnnpack is not None else small
        resolver = OpResolverType.AUTO if self._xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self._interpreter = Interpreter(model_path=str(folder / "model.tflite"), num_threads=self._threads,
                                        experimental_op_resolver_type=resolver)
        self._signatures = [_Signature(self._interpreter, key) for key in ("decode", "prefill", "score")]
        self._decode, self._prefill, self._score = self._signatures
        self._n_ctx, self._chunk = meta.n_ctx, meta.chunk
        self._n_slots = config.n_slots
        self._vocab_width = meta.vocab_size
        self._eos = meta.eos_token_id
        self._bytes = token_byte_table(tokenizer, self._vocab_width)
        # float16 like the TensorFlow backend's cache on a float16 tier: the same rounding, the same tokens.
        self._cache = np.zeros((self._n_slots, meta.n_layer, 2, meta.n_head, self._n_ctx, meta.head_dim),
                               np.dtype(meta.cache_dtype))
        self._llg: Any = None
        self._greedy_steps = GREEDY_STEPS_UNMEASURED
        self.load_time_s = 0.0
        self.warmup_s = 0.0

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig) -> "LiteRTGPT2Backend":
        start = time.perf_counter()
        folder, meta = locate(config)
        try:
            tokenizer = _Tokenizer(folder / "tokenizer.json")
            backend = cls(folder, meta, tokenizer, config)
        except Exception as exc:  # a corrupt or missing file: tokenizers and LiteRT raise several kinds
            raise BackendUnavailable(f"{config.model}: cannot load the LiteRT model in {folder} "
                                     f"({type(exc).__name__}: {exc})") from exc
        backend.load_time_s = time.perf_counter() - start
        if config.warmup:
            backend.warmup()
        log.info("litert backend ready: %s", backend.info())
        return backend

    def warmup(self) -> None:
        """A call of each signature (XNNPACK prepares its kernels at the first one), and the size of a
        greedy call: a few decode steps timed (in slot 0, which no request holds yet)."""
        start = time.perf_counter()
        self.forward([Row(0, [self._eos] * 2, 0)])
        self.score([self._eos] * 2)
        best = math.inf
        for pos in range(2, 6):
            t0 = time.perf_counter()
            self._decode_one(0, self._eos, pos)
            best = min(best, time.perf_counter() - t0)
        self._greedy_steps = int(min(MAX_GREEDY_STEPS, max(2, GREEDY_CALL_SECONDS // best)))
        self.release(0)
        self.warmup_s += time.perf_counter() - start

    # ---- facts -----------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        m = self._meta
        return ModelInfo(
            backend=self.name, model_id=self._config.model, name=f"{m.name} (LiteRT, {m.weights})", source=m.source,
            reason=m.reason, license=None if m.random_weights else "MIT (GPT-2)", random_weights=m.random_weights,
            chat_template=False, vocab_size=self._vocab_width, n_ctx=self._n_ctx, n_slots=self._n_slots,
            details={"model_path": str(self._folder / "model.tflite"), "n_params": m.n_params, "weights": m.weights,
                     "file_mb": round((self._folder / "model.tflite").stat().st_size / 2**20, 2),
                     "kv_cache_dtype": m.cache_dtype, "n_threads": self._threads,
                     "xnnpack": self._xnnpack, "prefill_chunk": self._chunk,
                     "greedy_steps_per_call": self._greedy_steps,
                     "kv_cache_mb_per_slot": round(self._cache[0].nbytes / 2**20, 2),
                     "n_positions": m.n_positions, "convert_s": m.convert_s,
                     "load_time_s": round(self.load_time_s, 3), "warmup_s": round(self.warmup_s, 3)})

    def limits(self) -> SlotLimits:
        return SlotLimits(n_slots=self._n_slots, max_sequence_tokens=self._n_ctx,
                          kv_cells=self._n_slots * self._n_ctx, max_step_tokens=PREFILL_CHUNKS_PER_STEP * self._chunk)

    @property
    def vocab_width(self) -> int:
        return self._vocab_width

    # ---- text ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text) or [self._eos]  # an empty prompt starts from <|endoftext|>

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token] if 0 <= token < self._vocab_width else b""

    def is_end(self, token: int) -> bool:
        return token == self._eos

    def llguidance_tokenizer(self) -> Any:
        if self._llg is None:
            import llguidance

            # What llguidance.hf.from_tokenizer does with a transformers tokenizer, from tokenizers' JSON.
            self._llg = llguidance.LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self._vocab_width,
                                               eos_token=self._eos)
        return self._llg

    # ---- the model -------------------------------------------------------------------------
    def _check(self, row: Row) -> None:
        if self._interpreter is None:
            raise BackendUnavailable("the LiteRT backend was closed")
        check_row(row, self._n_slots, self._n_ctx, self._vocab_width)

    def _hold(self, sig: _Signature, slot: int) -> np.ndarray:
        """``sig``'s cache input holding ``slot``'s cache (copied in only when it held another's)."""
        if sig.cache_slot != slot:
            sig.inputs["cache"][...] = self._cache[slot]
            sig.cache_slot = slot
        return sig.inputs["cache"]

    def _keep(self, slot: int, pos: int, kv: np.ndarray, n: int) -> None:
        """The step's new keys and values [L, 2, H, C, D] (first ``n`` cells) into the slot at ``pos``,
        and into every signature's cache input that holds this slot (as rounded in the slot's cache)."""
        cells = self._cache[slot, :, :, :, pos:pos + n]
        cells[...] = kv[:, :, :, :n]
        for sig in self._signatures:
            if sig.cache_slot == slot:
                sig.inputs["cache"][:, :, :, pos:pos + n] = cells

    def _run_row(self, row: Row) -> np.ndarray:
        """Feed the row; returns a view of its last token's logits (valid until the next call)."""
        tokens = [int(t) for t in row.tokens]
        if len(tokens) == 1:
            return self._decode_one(row.slot, tokens[0], row.pos)
        sig = self._prefill
        self._hold(sig, row.slot)
        ids = sig.inputs["ids"]
        for lo in range(0, len(tokens), self._chunk):
            part = tokens[lo: lo + self._chunk]
            ids[...] = self._eos
            ids[:len(part)] = part
            out = sig(pos=row.pos + lo, n=len(part))
            self._keep(row.slot, row.pos + lo, out["kv"], len(part))
        return out["logits"][0]

    def _decode_one(self, slot: int, token: int, pos: int) -> np.ndarray:
        sig = self._decode
        self._hold(sig, slot)
        out = sig(ids=token, pos=pos)
        self._keep(slot, pos, out["kv"], 1)
        return out["logits"][0]

    def forward(self, rows: Sequence[Row]) -> StepLogits:
        if len({r.slot for r in rows}) != len(rows):
            raise ValueError("each slot may appear at most once in a step")
        for row in rows:
            self._check(row)
        wanted = []
        for row in rows:
            logits = self._run_row(row)
            if row.logits:
                wanted.append(logits.copy())  # the view is the next call's output
        return ArrayLogits(np.stack(wanted) if wanted else np.zeros((0, self._vocab_width), np.float32))

    def max_greedy_steps(self) -> int:
        return self._greedy_steps

    def decode_greedy(self, rows: Sequence[Row], steps: int) -> np.ndarray:
        """Each row fed its own argmax ``steps`` times: the same calls as ``forward`` then ``argmax``,
        without the scheduler's Python between two tokens nor a copy of the logits."""
        if len({r.slot for r in rows}) != len(rows):
            raise ValueError("each slot may appear at most once in a step")
        for row in rows:
            if len(row.tokens) != 1:
                raise ValueError(f"slot {row.slot}: greedy decoding takes rows of one token")
            self._check(Row(row.slot, row.tokens, row.pos + steps - 1))  # every step's cell must fit
        picks = np.empty((len(rows), steps), np.int64)
        for i, row in enumerate(rows):
            token = int(row.tokens[0])
            for j in range(steps):
                token = picks[i, j] = int(self._decode_one(row.slot, token, row.pos + j).argmax())
        return picks

    def release(self, slot: int) -> None:
        # Nothing to clear: a slot's next request writes its cells from position 0, and a step reads only
        # the cells before its own position.
        if not 0 <= slot < self._n_slots:
            raise ValueError(f"slot {slot} does not exist")

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = [int(t) for t in tokens][: self._n_ctx]
        self._check(Row(0, tokens or [self._eos], 0))
        out = []
        sig = self._score
        self._hold(sig, 0)
        ids, target_ids = sig.inputs["ids"], sig.inputs["targets"]
        for lo in range(0, len(tokens) - 1, self._chunk):
            part, targets = tokens[lo: lo + self._chunk], tokens[lo + 1: lo + 1 + self._chunk]
            ids[...] = self._eos
            ids[:len(part)] = part
            target_ids[...] = 0
            target_ids[:len(targets)] = targets
            step = sig(pos=lo)
            self._keep(0, lo, step["kv"], len(part))
            out.append(step["logprobs"][:len(targets)].astype(np.float64))
        self.release(0)
        return np.concatenate(out) if out else np.zeros(0)

    def close(self) -> None:
        self._interpreter = self._decode = self._prefill = self._score = None
        self._signatures = []
        self._llg = None
        gc.collect()
