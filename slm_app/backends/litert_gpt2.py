"""GPT-2 on LiteRT (TensorFlow Lite's runtime, PyPI ``ai-edge-litert``): the free tier without TensorFlow.

The model is converted at set-up by ``slm_app.provisioning.litert`` (which says what its signatures
compute); this module never imports TensorFlow, so a free-tier process holds LiteRT's ~35 MB instead
of TensorFlow's ~620 MB. When the converted file is missing and TensorFlow is installed, the
conversion runs in a child process; without TensorFlow, loading fails and says which command converts.

Each slot keeps its KV cache here, as a numpy array ``[L, 2, H, n_ctx, D]``: a step passes the slot's
cache in, gets the new cells' keys and values back and writes them at the row's positions. Rows run
one at a time (LiteRT's shapes are fixed at conversion; one-row calls need no padding rows).

LiteRT's default XNNPACK delegate repacks the weights for each signature (GPT-2 124M float32: 1.6 GB
RSS instead of 0.6 GB), so large models run on the builtin kernels unless ``SLM_LITERT_XNNPACK=true``;
small ones (tiny-gpt2) on XNNPACK, twice as fast there.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
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

# Greedy steps one ``decode_greedy`` call runs: a stream still gets its tokens, and a new request its
# slot, within a few steps (tiny-gpt2: ~3 ms; GPT-2 124M on LiteRT: ~0.7 s).
GREEDY_STEPS = 8
PREFILL_CHUNKS_PER_STEP = 2  # max_step_tokens = 2 chunks: a long prompt never stalls decoding rows for long
# XNNPACK (LiteRT's default delegate) by default below this file size: tiny-gpt2 0.19 against 0.41 ms a
# decode step; its per-signature weight repacking is what costs large models their memory.
XNNPACK_AUTO_MAX_MB = 32
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
    """One signature of the interpreter, called with fixed shapes. LiteRT's ``SignatureRunner`` resizes
    and re-allocates every input tensor at every call; shapes never change here, so after the first
    call only the inputs are set, the graph invoked and the outputs copied."""

    def __init__(self, interpreter: Any, key: str):
        self._runner = interpreter.get_signature_runner(key)
        self._wrapper, self._subgraph = self._runner._interpreter_wrapper, self._runner._subgraph_index
        self._inputs, self._outputs = dict(self._runner._inputs), dict(self._runner._outputs)
        self._allocated = False

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        if not self._allocated:
            self._allocated = True
            return self._runner(**inputs)
        for name, value in inputs.items():
            self._wrapper.SetTensor(self._inputs[name], value, self._subgraph)
        self._wrapper.Invoke(self._subgraph)
        return {name: self._wrapper.GetTensor(index, self._subgraph) for name, index in self._outputs.items()}


class LiteRTGPT2Backend(Backend):
    name = "litert"

    def __init__(self, folder: Path, meta: LiteRTMeta, tokenizer: Any, config: EngineConfig):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self._folder, self._meta, self._config = folder, meta, config
        self._tokenizer = tokenizer
        self._threads = config.n_threads or _cores()
        file_mb = (folder / "model.tflite").stat().st_size / 2**20
        self._xnnpack = config.litert_xnnpack if config.litert_xnnpack is not None else file_mb <= XNNPACK_AUTO_MAX_MB
        resolver = OpResolverType.AUTO if self._xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self._interpreter = Interpreter(model_path=str(folder / "model.tflite"), num_threads=self._threads,
                                        experimental_op_resolver_type=resolver)
        self._decode, self._prefill, self._score = (_Signature(self._interpreter, key)
                                                    for key in ("decode", "prefill", "score"))
        self._n_ctx, self._chunk = meta.n_ctx, meta.chunk
        self._n_slots = config.n_slots
        self._vocab_width = meta.vocab_size
        self._eos = meta.eos_token_id
        self._bytes = token_byte_table(tokenizer, self._vocab_width)
        # float16 like the TensorFlow backend's cache on a float16 tier: the same rounding, the same tokens.
        self._cache = np.zeros((self._n_slots, meta.n_layer, 2, meta.n_head, self._n_ctx, meta.head_dim),
                               np.dtype(meta.cache_dtype))
        self._llg: Any = None
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
        """One call of each signature: LiteRT allocates its tensors at the first invoke."""
        start = time.perf_counter()
        self.forward([Row(0, [self._eos] * 2, 0)])
        self.forward([Row(0, [self._eos], 2)])
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

    def _slot_cache(self, slot: int) -> np.ndarray:
        cache = self._cache[slot]
        return cache if cache.dtype == np.float32 else cache.astype(np.float32)

    def _keep(self, slot: int, pos: int, kv: np.ndarray, n: int) -> None:
        """The step's new keys and values [L, 2, H, C, D] (first ``n`` cells) into the slot at ``pos``."""
        self._cache[slot, :, :, :, pos:pos + n] = kv[:, :, :, :n]

    def _run_row(self, row: Row) -> np.ndarray:
        tokens = [int(t) for t in row.tokens]
        if len(tokens) == 1:
            out = self._decode(ids=np.array(tokens, np.int32), pos=np.array(row.pos, np.int32),
                               cache=self._slot_cache(row.slot))
            self._keep(row.slot, row.pos, out["kv"], 1)
            return out["logits"][0]
        for lo in range(0, len(tokens), self._chunk):
            part = tokens[lo: lo + self._chunk]
            ids = np.full(self._chunk, self._eos, np.int32)
            ids[:len(part)] = part
            out = self._prefill(ids=ids, pos=np.array(row.pos + lo, np.int32), n=np.array(len(part), np.int32),
                                cache=self._slot_cache(row.slot))
            self._keep(row.slot, row.pos + lo, out["kv"], len(part))
        return out["logits"][0]

    def forward(self, rows: Sequence[Row]) -> StepLogits:
        if len({r.slot for r in rows}) != len(rows):
            raise ValueError("each slot may appear at most once in a step")
        for row in rows:
            self._check(row)
        logits = [(row, self._run_row(row)) for row in rows]
        wanted = [v for row, v in logits if row.logits]
        return ArrayLogits(np.stack(wanted) if wanted else np.zeros((0, self._vocab_width), np.float32))

    def max_greedy_steps(self) -> int:
        return GREEDY_STEPS

    def decode_greedy(self, rows: Sequence[Row], steps: int) -> np.ndarray:
        """Each row fed its own argmax ``steps`` times: the same calls as ``forward`` then ``argmax``,
        without the scheduler's Python between two tokens."""
        if len({r.slot for r in rows}) != len(rows):
            raise ValueError("each slot may appear at most once in a step")
        for row in rows:
            if len(row.tokens) != 1:
                raise ValueError(f"slot {row.slot}: greedy decoding takes rows of one token")
            self._check(Row(row.slot, row.tokens, row.pos + steps - 1))  # every step's cell must fit
        picks = np.empty((len(rows), steps), np.int64)
        for i, row in enumerate(rows):
            token = row.tokens[0]
            for j in range(steps):
                token = picks[i, j] = int(np.argmax(self._run_row(Row(row.slot, [token], row.pos + j))))
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
        for lo in range(0, len(tokens) - 1, self._chunk):
            part, targets = tokens[lo: lo + self._chunk], tokens[lo + 1: lo + 1 + self._chunk]
            ids = np.full(self._chunk, self._eos, np.int32)
            ids[:len(part)] = part
            target_ids = np.zeros(self._chunk, np.int32)
            target_ids[:len(targets)] = targets
            step = self._score(ids=ids, targets=target_ids, pos=np.array(lo, np.int32), cache=self._slot_cache(0))
            self._keep(0, lo, step["kv"], len(part))
            out.append(step["logprobs"][:len(targets)].astype(np.float64))
        self.release(0)
        return np.concatenate(out) if out else np.zeros(0)

    def close(self) -> None:
        self._interpreter = self._decode = self._prefill = self._score = None
        self._llg = None
        gc.collect()
