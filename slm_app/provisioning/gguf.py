"""GGUF files: read the header and check a file is complete before llama.cpp sees it.

llama.cpp refuses a broken file without crashing, but only says "Failed to load model from file";
``validate_gguf`` says why (empty, not a GGUF, unsupported version, corrupt table, truncated by an
interrupted download), reading only the header through a bounds-checked view of the mapped file.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class GGUFError(ValueError):
    """A model file that is missing or not a complete, readable GGUF; the message says which."""


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
    """Raise ``GGUFError`` with a clear reason unless ``path`` is a complete GGUF file.

    llama.cpp itself rejects such files without crashing (checked in a subprocess with an empty
    file, random bytes, ``GGUF`` + random bytes and copies of Gemma truncated at 100 B, 1 MB and
    200 MB: all raised ``ValueError``), but only says "Failed to load model from file"; this says why.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"model file {path} does not exist")
    try:
        return read_gguf_header(path)
    except (ValueError, OSError) as exc:
        raise GGUFError(f"model file {path} is not a usable GGUF: {exc}") from exc
