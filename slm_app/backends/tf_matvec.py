"""The decode-step kernels of the TensorFlow backend (``tf_matvec.cc``), called as XLA custom calls:
``matvec`` (the block matrices and the head) and ``attention`` (straight from the KV cache).

Why: XLA's CPU dot gives a lone row (matrix-vector kernel) other bits than the same row among 2+
rows, so exact batch invariance cost a dummy twin row and the slower 2-row kernel. These kernels
compute every output the same way whatever the row count and read the weights once for all rows
(numbers in ``tf_matvec.cc`` and docs/benchmarks.md).

It is compiled on first use with the machine's C++ compiler against TensorFlow's own headers (the
wheel ships them; ~10 s, once) into the cache directory, keyed by the source, TensorFlow's version
and this CPU, and loaded into the process, where it registers itself with XLA's custom-call registry.
Without a compiler (or if anything in that fails) ``load`` says why and the backend uses XLA's dot.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("tf_matvec.cc")
MATVEC_TARGET, ATTENTION_TARGET = "slm_matvec", "slm_attention"  # the names tf_matvec.cc registers
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-fvisibility=hidden")
COMPILE_TIMEOUT_S = 300


@dataclass(frozen=True)
class Loaded:
    path: Path | None  # the shared library, None when it could not be built or loaded
    reason: str  # how it was obtained, or why not


_lock = threading.Lock()
_loaded: Loaded | None = None


def _cpu_key() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))
    except OSError:
        return platform.processor() or platform.machine()


def _library_path(tf: Any, cache_dir: Path) -> Path:
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), tf.__version__.encode(), _cpu_key().encode(),
                                     " ".join(FLAGS).encode()])).hexdigest()[:16]
    return cache_dir / "kernels" / f"slm_matvec-{key}.so"


def _build(tf: Any, out: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    lib_dir = Path(tf.sysconfig.get_lib())
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: two processes building at once never load half a file.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [compiler, *FLAGS, *tf.sysconfig.get_compile_flags(), str(SOURCE), "-o", str(built),
               f"-L{lib_dir}", "-l:libtensorflow_cc.so.2", f"-Wl,-rpath,{lib_dir}", "-lpthread"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, out)


def load(tf: Any, cache_dir: Path) -> Loaded:
    """Build (once per machine) and register the kernel; never raises."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            path = _library_path(tf, Path(cache_dir).expanduser())
            how = "cached build"
            if not path.is_file():
                _build(tf, path)
                how = "built now"
            lib = ctypes.CDLL(str(path))
            # Two threads: measured on this 2-core machine, one alone does not reach the memory bandwidth.
            threads = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
            lib.slm_matvec_register(ctypes.c_int(threads))
            _loaded = Loaded(path, f"{how}, {threads} threads")
        except Exception as exc:  # no compiler, headers missing, an ABI mismatch...
            log.warning("decode kernel unavailable, using XLA's dot: %s", exc)
            _loaded = Loaded(None, f"unavailable ({type(exc).__name__}: {exc})")
        return _loaded


def matvec(tf: Any, x: Any, weight: Any) -> Any:
    """``x [B, K] @ weight[N, K]^T`` (float32, static shapes) through the kernel, inside XLA."""
    from tensorflow.compiler.tf2xla.ops import gen_xla_ops

    rows, k = int(x.shape[0]), int(x.shape[1])
    n = int(weight.shape[0])
    assert rows >= 1 and int(weight.shape[1]) == k, (x.shape, weight.shape)
    return gen_xla_ops.xla_custom_call_v2(
        [x, weight], call_target_name=MATVEC_TARGET, backend_config=f"{rows} {k} {n}", has_side_effect=False,
        result_dtypes=[tf.float32], result_shapes=[[rows, n]])[0]


def attention(tf: Any, q: Any, keys: Any, values: Any, slots: Any, positions: Any) -> Any:
    """Decode attention of B rows, q [B, H, D], each against its own slot's cells 0..position of the KV
    cache [S, H, C, D] (float32), read in place; returns [B, H, D]."""
    from tensorflow.compiler.tf2xla.ops import gen_xla_ops

    rows, heads, dim = (int(n) for n in q.shape)
    n_slots, n_cells = int(keys.shape[0]), int(keys.shape[2])
    return gen_xla_ops.xla_custom_call_v2(
        [q, keys, values, slots, positions], call_target_name=ATTENTION_TARGET,
        backend_config=f"{rows} {heads} {dim} {n_slots} {n_cells}", has_side_effect=False,
        result_dtypes=[tf.float32], result_shapes=[[rows, heads, dim]])[0]
