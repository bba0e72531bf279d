"""The pro tier's backend: a GGUF model run in-process by llama.cpp (llama-cpp-python's C API).

One llama.cpp context serves every slot: it is created with ``n_seq_max`` = the scheduler's slots
(a slot is a llama.cpp sequence id) and ``n_ctx`` KV cells, either *unified* (``SLM_KV_UNIFIED``
true, the default: the slots share the cells, so one sequence may grow to the whole context while the
others are short) or split into one stream of ``n_ctx / slots`` cells per slot, as ``llama-server
-np N`` runs. Attention reads every used cell of the stream a row's slot is in, masked or not: in the
unified cache that includes the cells other slots' cached prefixes hold (measured in
docs/prompt-cache.md), in a slot's own stream only its own. ``forward`` puts every
row of a scheduler step (one token per decoding slot, a prompt chunk per prefilling slot) into ONE
``llama_batch`` and runs one ``llama_decode``; the logits of a row are read in place from llama.cpp's
output buffer (a numpy view, never copied). This is how ``llama-server`` runs its slots.

Sampling runs in llama.cpp's native sampler chain (penalties → temperature → top-k → top-p → dist,
or greedy), the C code ``create_completion`` uses, so a step costs no Python work over a
262,144-wide row. A token constraint (structured output) writes ``-inf`` into the row of disallowed
tokens right before the chain samples it; llama.cpp's own grammars are never used (user regexes in
them crash the process, see MODELS.md).

Greedy output of a request beside others can differ from the same request alone after some tokens:
a multi-row batch runs other matmul kernels and summation orders than a one-row batch, so near-ties
between two tokens may flip (measured in bench/llama_generate.py).

Finding and checking the model file is ``slm_app.provisioning``'s work (hub, embedded models, GGUF
header checks); this module only loads what it is given.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slm_app.backends.base import (
    Backend,
    BackendUnavailable,
    ModelInfo,
    NativeSampler,
    Row,
    SamplingParams,
    SlotLimits,
    StepLogits,
)
from slm_app.backends.llama_lora import LoraAdapters
from slm_app.provisioning.embedded import EmbeddedModel, EmbeddedModelMissing, GEMMA_TERMS, resolve_llama_model
from slm_app.provisioning.gguf import GGUFError, GGUFSummary, validate_gguf
from slm_app.provisioning.hub import ResolvedModel
from slm_app.sampling import PENALTY_LAST_N
from slm_app.settings import EngineConfig

log = logging.getLogger(__name__)

# ``score`` asks for the logits of every token; llama.cpp keeps an output buffer as large as the
# largest such request for the context's life (Gemma: 1 MB per row, 512 MB for a 512-token batch).
# Chunks of at most this many bytes of logits keep that buffer small.
SCORE_LOGITS_BYTES = 64 * 2**20


class _Logits(StepLogits):
    """The logits of one ``forward``, read in place from llama.cpp's output buffer.

    ``batch_index[i]`` is the position in the llama_batch of output row ``i``'s token: llama.cpp
    addresses logits (``llama_get_logits_ith``, ``llama_sampler_sample``) by batch position, the
    scheduler by output row (rows without logits are not counted)."""

    def __init__(self, backend: "LlamaCppBackend", batch_index: list[int]):
        self._backend, self.batch_index = backend, batch_index

    def row(self, i: int) -> np.ndarray:
        b = self._backend
        ptr = b._C.llama_get_logits_ith(b._ctx.ctx, self.batch_index[i])
        if not ptr:
            raise IndexError(f"no logits for output row {i}")
        return np.ctypeslib.as_array(ptr, shape=(b._n_vocab,))

    def argmax(self, i: int) -> int:
        return int(np.argmax(self.row(i)))


class _ChainSampler(NativeSampler):
    """llama.cpp's sampler chain for one request: its own seed and repeat-penalty history."""

    def __init__(self, backend: "LlamaCppBackend", params: SamplingParams, seed: int):
        C = backend._C
        self._backend, self._C = backend, C
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        if params.repeat_penalty != 1.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_penalties(
                backend._n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0))
        if params.greedy:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
        else:
            # Temperature before top-k/top-p, as in slm_app.sampling and transformers: top_p cuts
            # the tempered distribution.
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(params.temperature))
            if params.top_k > 0:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(params.top_p, 1))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self._chain = chain

    def sample(self, logits: StepLogits, i: int, allowed: np.ndarray | None) -> int:
        if self._chain is None:
            raise RuntimeError("sampler used after close()")
        if not isinstance(logits, _Logits):
            raise TypeError("a llama.cpp sampler samples only from this backend's logits")
        if allowed is not None:
            row = logits.row(i)  # llama.cpp's own buffer: the chain reads the masked row next
            width = min(allowed.shape[0], row.shape[0])
            ids = np.flatnonzero(allowed[:width])
            if ids.size == 1:
                # A forced token (a key, a bracket): any sampler picks it with probability 1, so the
                # chain's pass over 262k candidates is skipped; it still records the token (penalties).
                token = int(ids[0])
                self._C.llama_sampler_accept(self._chain, token)
                return token
            if ids.size < width // 2:  # JSON allows few tokens most of the time: rewrite only those
                kept = row[ids]
                row.fill(-np.inf)
                row[ids] = kept
            else:
                np.copyto(row[:width], -np.inf, where=~allowed[:width])
                row[width:] = -np.inf
        # Samples and accepts the token (the penalty sampler remembers it).
        return int(self._C.llama_sampler_sample(self._chain, self._backend._ctx.ctx, logits.batch_index[i]))

    def close(self) -> None:
        if self._chain is not None:
            self._C.llama_sampler_free(self._chain)
            self._chain = None


class LlamaCppBackend(Backend):
    """A GGUF model and one llama.cpp context with ``n_slots`` sequences over a shared KV cache."""

    def __init__(self, model: Any, ctx: Any, resolved: ResolvedModel, embedded: EmbeddedModel | None,
                 summary: GGUFSummary, config: EngineConfig, n_threads: int, load_time_s: float):
        from llama_cpp import llama_cpp as C

        self._C = C
        self._model, self._ctx = model, ctx
        self._lora: LoraAdapters | None = None  # created at the first adapter call
        self._resolved, self._embedded, self._summary = resolved, embedded, summary
        self._config = config
        self._n_threads = n_threads
        self._load_time_s = load_time_s
        self._vocab = model.vocab
        self._n_vocab = model.n_vocab()
        self._n_ctx = C.llama_n_ctx(ctx.ctx)
        self._n_ctx_seq = C.llama_n_ctx_seq(ctx.ctx)  # = n_ctx when unified; n_ctx / slots otherwise
        self._unified = config.kv_unified
        self._n_batch = C.llama_n_batch(ctx.ctx)
        self._n_slots = config.n_slots
        self._memory = C.llama_get_memory(ctx.ctx)
        self._batch_cap = max(self._n_batch, self._n_slots)
        self._batch = C.llama_batch_init(self._batch_cap, 0, 1)
        # numpy views over the batch's arrays: filling a 512-token prefill chunk is a few slice
        # assignments instead of thousands of ctypes item writes.
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(self._batch_cap,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(self._batch_cap,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self._batch_cap,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(self._batch_cap,))
        self._b_nseq[:] = 1
        self._b_seq = [self._batch.seq_id[i] for i in range(self._batch_cap)]
        self._metadata = model.metadata()
        self._bos = C.llama_vocab_bos(self._vocab)
        self._add_bos = bool(C.llama_vocab_get_add_bos(self._vocab)) and self._bos != -1
        self._bos_text = model.token_get_text(self._bos) if self._bos != -1 else ""
        self._pieces: dict[int, bytes] = {}
        self._llg_lock = threading.Lock()
        self._llg_tokenizer: Any = None
        self._template = self._metadata.get("tokenizer.chat_template")
        self._chat_formatter = None
        if self._template and config.chat_template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = C.llama_vocab_eos(self._vocab)
            self._chat_formatter = Jinja2ChatFormatter(
                template=self._template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=self._bos_text,
                add_generation_prompt=True,
            )

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, config: EngineConfig) -> "LlamaCppBackend":
        """Resolve, check and load ``config.model``; ``BackendUnavailable`` says why not."""
        try:
            import llama_cpp
            from llama_cpp import _internals, _logger
            from llama_cpp import llama_cpp as C
        except ImportError as exc:
            raise BackendUnavailable(
                "llama-cpp-python is not installed (the pro tier needs it; it compiles from source, see README)"
            ) from exc
        try:
            resolved, embedded = resolve_llama_model(config.model, Path(config.cache_dir))
        except EmbeddedModelMissing as exc:
            raise BackendUnavailable(str(exc)) from exc
        if resolved.path is None:
            raise BackendUnavailable(f"no GGUF model for {config.model!r}: {resolved.reason}")
        log.info("llama.cpp model %s from %s: %s", resolved.name, resolved.source, resolved.reason)
        try:
            summary = validate_gguf(resolved.path)
        except GGUFError as exc:
            raise BackendUnavailable(str(exc)) from exc

        n_threads = config.n_threads or _usable_cores()
        _logger.set_verbose(False)  # llama.cpp logs every load to stderr otherwise
        C.llama_backend_init()
        t0 = time.perf_counter()
        mparams = C.llama_model_default_params()
        mparams.use_mmap, mparams.use_mlock = config.use_mmap, config.use_mlock
        try:
            model = _internals.LlamaModel(path_model=str(resolved.path), params=mparams, verbose=False)
        except ValueError as exc:
            raise BackendUnavailable(
                f"llama.cpp could not load {resolved.path} ({exc}); the file is a complete GGUF, so its "
                f"architecture ({summary.metadata.get('general.architecture', '?')}) or tensor types may be "
                f"unsupported by llama-cpp-python {llama_cpp.__version__}, or memory ran out") from exc
        if not config.kv_unified and config.n_ctx // config.n_slots < 256:
            model.close()
            raise BackendUnavailable(f"SLM_KV_UNIFIED=false gives each of {config.n_slots} slots "
                                     f"{config.n_ctx // config.n_slots} cells; raise SLM_N_CTX or lower SLM_PARALLEL")
        cparams = C.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        # Every decoding slot adds a token to a step: the batch must hold one per slot at least.
        cparams.n_batch = max(config.n_batch, config.n_slots)
        cparams.n_ubatch = cparams.n_batch
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.n_seq_max = config.n_slots
        # Unified: the slots share n_ctx cells instead of having n_ctx / n_slots each (SLM_KV_UNIFIED).
        cparams.kv_unified = config.kv_unified
        # SLM_FLASH_ATTN: "auto" as llama-server does (llama.cpp enables it where the backend supports it).
        cparams.flash_attn_type = {"auto": C.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": C.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   "off": C.LLAMA_FLASH_ATTN_TYPE_DISABLED}[config.flash_attn]
        try:
            ctx = _internals.LlamaContext(model=model, params=cparams, verbose=False)
        except ValueError as exc:
            model.close()
            raise BackendUnavailable(f"llama.cpp could not create a context of {config.n_ctx} cells for "
                                     f"{config.n_slots} slots ({exc}); lower SLM_N_CTX or SLM_PARALLEL") from exc

        backend = cls(model, ctx, resolved, embedded, summary, config, n_threads, time.perf_counter() - t0)
        if config.warmup:
            backend.forward([Row(0, backend.tokenize("Hello")[:1], 0, True)])  # fault the weights in
            backend.release(0)
        log.info("llama.cpp loaded %s in %.2f s (%d slots, %d cells, %d threads)", resolved.path,
                 backend._load_time_s, config.n_slots, backend._n_ctx, n_threads)
        return backend

    # ------------------------------------------------------------------ facts

    def info(self) -> ModelInfo:
        import llama_cpp

        md, path, r = self._metadata, self._resolved.path, self._resolved
        details: dict[str, Any] = {
            "llama_cpp_python": llama_cpp.__version__,
            "model_file": str(path),
            "size_mb": round(path.stat().st_size / 2**20, 1) if path and path.exists() else None,
            "quantization": _file_type_name(md.get("general.file_type")),
            "model_name": md.get("general.name"),
            "architecture": md.get("general.architecture"),
            "gguf": f"v{self._summary.version}, {self._summary.n_tensors} tensors",
            "gguf_chat_template": bool(self._template),
            "n_threads": self._n_threads,
            "n_batch": self._n_batch,
            "kv_unified": self._unified,
            "kv_cells": self._n_ctx,
            "use_mmap": self._config.use_mmap,
            "use_mlock": self._config.use_mlock,
            "load_time_s": round(self._load_time_s, 3),
        }
        if self._model is not None:
            desc = ctypes.create_string_buffer(256)
            self._C.llama_model_desc(self._model.model, desc, len(desc))
            details["model_desc"] = desc.value.decode("utf-8", errors="replace")
            details["parameters"] = self._C.llama_model_n_params(self._model.model)
        else:
            details["status"] = "closed"
        return ModelInfo(
            backend="llama.cpp",
            model_id=r.name,
            name=self._embedded.label if self._embedded else (md.get("general.name") or r.name),
            source=r.source,
            reason=r.reason,
            license=self._license(),
            random_weights=False,
            chat_template=self._chat_formatter is not None,
            vocab_size=self._n_vocab,
            n_ctx=self._n_ctx_seq,
            n_slots=self._n_slots,
            details=details,
        )

    def _license(self) -> str:
        if self._embedded is not None:
            return self._embedded.license
        declared = (self._metadata.get("general.license") or "").strip()
        if declared.lower() == "gemma" or self._metadata.get("general.architecture", "").startswith("gemma"):
            return f"{GEMMA_TERMS}: a Gemma model" + (f" (the GGUF says {declared!r})" if declared else "")
        if declared:
            return f"{declared} (as declared in the GGUF; see the model's card)"
        return "not declared in the GGUF: see the model's card"

    def limits(self) -> SlotLimits:
        return SlotLimits(n_slots=self._n_slots, max_sequence_tokens=self._n_ctx_seq, kv_cells=self._n_ctx,
                          max_step_tokens=self._n_batch)

    @property
    def vocab_width(self) -> int:
        return self._n_vocab

    # ------------------------------------------------------------------ text and tokens

    def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        """The conversation through the GGUF's chat template; None when it has none (or
        ``SLM_CHAT_TEMPLATE`` is off). A template that refuses the conversation (Gemma's refuses a
        system turn, for one) is a ``ValueError`` saying so."""
        if self._chat_formatter is None:
            return None
        import jinja2

        try:
            return self._chat_formatter(messages=messages).prompt
        except jinja2.TemplateError as exc:
            raise ValueError(f"the model's chat template cannot render this conversation: {exc}") from exc

    def tokenize(self, text: str) -> list[int]:
        # special=True parses control tokens written out in the text, as create_completion does:
        # a chat template's <start_of_turn> / <|im_start|> must become control tokens. BOS is added
        # where the vocabulary asks for it, unless the text (a rendered template) starts with it.
        self._check_open()
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        ids = self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        if not ids:
            if self._bos == -1:
                raise ValueError("the text is empty and the model has no BOS token to start from")
            ids = [self._bos]
        return ids

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            self._check_open()
            if not 0 <= token < self._n_vocab:
                return b""
            C = self._C
            buf = ctypes.create_string_buffer(64)  # per call: text methods run on several threads
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:  # longer than the buffer: -n is the size needed
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def is_end(self, token: int) -> bool:
        return bool(self._C.llama_vocab_is_eog(self._vocab, token))

    def llguidance_tokenizer(self) -> Any:
        with self._llg_lock:  # building it walks the whole vocabulary (~1 s): once
            if self._llg_tokenizer is None:
                self._check_open()
                from llguidance.llamacpp import lltokenizer_from_vocab

                # It calls llama_cpp's deprecated llama_token_get_attr once per token: 262k warnings.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._llg_tokenizer = lltokenizer_from_vocab(self._vocab, n_vocab=self._n_vocab)
            return self._llg_tokenizer

    def _check_open(self) -> None:
        # Every native pointer dies with the model: using one after close() would crash.
        if self._model is None:
            raise BackendUnavailable("the llama.cpp model has been closed")

    # ------------------------------------------------------------------ the model

    def forward(self, rows: Sequence[Row]) -> StepLogits:
        """One llama_batch with every row (sequence id = slot), one llama_decode.

        With a stream per slot llama.cpp splits a batch into micro-batches of consecutive sequence
        ids: rows go in slot order so that one step stays one micro-batch where it can."""
        self._check_open()
        n = 0
        batch_index: list[int] = [0] * sum(row.logits for row in rows)
        outputs = list(itertools.accumulate((row.logits for row in rows), initial=0))  # output row of each row
        order = range(len(rows)) if self._unified else sorted(range(len(rows)), key=lambda r: rows[r].slot)
        seen: set[int] = set()
        for r in order:
            row = rows[r]
            if not 0 <= row.slot < self._n_slots or row.slot in seen:
                raise ValueError(f"bad slot {row.slot} in a step (slots 0..{self._n_slots - 1}, each once)")
            seen.add(row.slot)
            k = len(row.tokens)
            if k == 0 or n + k > self._n_batch:
                raise ValueError(f"a step carries 1..{self._n_batch} tokens; this row would make it {n + k}")
            end = n + k
            self._b_token[n:end] = row.tokens
            self._b_pos[n:end] = np.arange(row.pos, row.pos + k)
            self._b_logits[n:end] = 0
            for i in range(n, end):
                self._b_seq[i][0] = row.slot
            if row.logits:
                self._b_logits[end - 1] = 1
                batch_index[outputs[r]] = end - 1
            n = end
        self._batch.n_tokens = n
        rc = self._C.llama_decode(self._ctx.ctx, self._batch)
        if rc != 0:
            why = {1: "no room left in the KV cache", 2: "aborted"}.get(
                rc, "an invalid batch: a token outside the vocabulary, or positions that do not follow the slot's cache")
            raise RuntimeError(f"llama_decode returned {rc}: {why}")
        return _Logits(self, batch_index)

    def release(self, slot: int) -> None:
        self._check_open()
        self._C.llama_memory_seq_rm(self._memory, slot, -1, -1)

    def keep_prefix(self, slot: int, n: int) -> bool:
        """Drop the slot's cells from position ``n`` on (``llama_memory_seq_rm``)."""
        self._check_open()
        if n <= 0:
            self.release(slot)
            return True
        if not self._holds(slot, n):
            return False
        return bool(self._C.llama_memory_seq_rm(self._memory, slot, n, -1))

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """``dst`` gets ``src``'s cells 0..n-1 (``llama_memory_seq_cp``): in the unified cache the
        cells are shared, not duplicated, and each sequence writes its own cells from ``n`` on. Between
        streams llama.cpp copies only whole streams (a memory copy at the next decode; anything else
        aborts the process): the whole of ``src`` is copied, then ``dst`` drops what follows ``n``."""
        self._check_open()
        if not self._holds(src, n):
            return False
        self.release(dst)
        if self._unified:
            self._C.llama_memory_seq_cp(self._memory, src, dst, 0, n)
            return True
        self._C.llama_memory_seq_cp(self._memory, src, dst, -1, -1)
        return bool(self._C.llama_memory_seq_rm(self._memory, dst, n, -1))

    def _holds(self, slot: int, n: int) -> bool:
        """The slot has every position 0..n-1. A sliding-window cache that is not full-size
        (``swa_full`` off) drops old positions; llama-server then recomputes, and so does this."""
        C, mem = self._C, self._memory
        return C.llama_memory_seq_pos_min(mem, slot) == 0 and C.llama_memory_seq_pos_max(mem, slot) >= n - 1

    def native_sampler(self, params: SamplingParams, seed: int) -> NativeSampler:
        self._check_open()
        return _ChainSampler(self, params, seed)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Log-probabilities of ``tokens[1:]``: one pass over the sequence in slot 0, every
        position's logits requested, as llama-perplexity decodes a window (in chunks of the
        batch size, or fewer rows when the vocabulary is wide: see ``SCORE_LOGITS_BYTES``)."""
        self._check_open()
        tokens = [int(t) for t in tokens]
        if len(tokens) > self._n_ctx_seq:
            raise ValueError(f"{len(tokens):,} tokens to score; one sequence holds {self._n_ctx_seq:,}")
        out = np.empty(max(len(tokens) - 1, 0), dtype=np.float64)
        if len(tokens) < 2:
            return out
        step = max(1, min(self._n_batch, SCORE_LOGITS_BYTES // (4 * self._n_vocab)))
        self.release(0)
        try:
            # The last token predicts nothing that is scored: only tokens[:-1] are decoded.
            last = len(tokens) - 1
            for start in range(0, last, step):
                chunk = tokens[start:min(start + step, last)]
                logits = self._decode_all(chunk, start)
                for j in range(len(chunk)):
                    row = logits.row(j)
                    top = float(row.max())
                    lse = top + float(np.log(np.exp(row - top, dtype=np.float32).sum(dtype=np.float64)))
                    out[start + j] = float(row[tokens[start + j + 1]]) - lse
        finally:
            self.release(0)
        return out

    def _decode_all(self, chunk: list[int], start: int) -> _Logits:
        """Decode ``chunk`` in slot 0 with logits for every token."""
        k = len(chunk)
        self._b_token[:k] = chunk
        self._b_pos[:k] = np.arange(start, start + k)
        self._b_logits[:k] = 1
        for i in range(k):
            self._b_seq[i][0] = 0
        self._batch.n_tokens = k
        rc = self._C.llama_decode(self._ctx.ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} while scoring")
        return _Logits(self, list(range(k)))

    # ------------------------------------------------------------------ LoRA adapters (llama_lora)

    supports_adapters = True
    adapter_kind = "gguf-lora"

    def _adapters(self) -> LoraAdapters:
        self._check_open()
        if self._lora is None:
            self._lora = LoraAdapters(self._C, self._model.model, self._ctx.ctx,
                                      self._metadata.get("general.architecture"))
        return self._lora

    def load_adapter(self, adapter_id: str, path: str) -> None:
        self._adapters().load(adapter_id, Path(path))

    def set_adapter(self, adapter_id: str | None) -> None:
        self._adapters().set(adapter_id)

    def active_adapter(self) -> str | None:
        return self._lora.active if self._lora is not None else None

    def end_of_turn_token(self) -> int | None:
        eot = self._C.llama_vocab_eot(self._vocab)
        eos = self._C.llama_vocab_eos(self._vocab)
        return eot if eot != -1 else (eos if eos != -1 else None)

    def close(self) -> None:
        if self._model is None:
            return
        if self._lora is not None:
            self._lora.close()  # before the model the adapters belong to
        self._C.llama_batch_free(self._batch)
        self._ctx.close()  # the context before its model
        self._model.close()
        self._model = None


def _file_type_name(file_type: str | None) -> str | None:
    """general.file_type (an enum number) → "Q4_K_M", from llama_cpp's LLAMA_FTYPE_* names."""
    if file_type is None:
        return None
    from llama_cpp import llama_cpp as C

    names = {v: k.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_")
             for k, v in vars(C).items() if k.startswith("LLAMA_FTYPE_") and isinstance(v, int)}
    try:
        return names.get(int(file_type), f"file_type {file_type}")
    except (TypeError, ValueError):
        return str(file_type)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset/cgroup cpusets, unlike cpu_count()
    except AttributeError:  # macOS
        return os.cpu_count() or 1
