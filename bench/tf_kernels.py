"""The matrix products of one GPT-2 124M decode step: XLA's dot against the decode kernel (tf_matvec).

    .venv/bin/python bench/tf_kernels.py [--rounds 7]

The 48 block matrices of GPT-2 124M (12 layers x c_attn, attn c_proj, c_fc, mlp c_proj) and the
50257 x 768 head, random float32 weights, chained as in a step (each product feeds the next), in one
XLA-compiled function per variant and row count:

* XLA dot on Keras' [in, out] layout (what transformers' TF GPT-2 and its ``generate`` read);
* XLA dot on a row-major [out, in] copy (XLA's fastest matrix-vector kernel for one row);
* the decode kernel (``slm_app/backends/tf_matvec.cc``) on the row-major copy.

Rounds interleave the variants; medians are quoted. "same bits" says whether row 0 of a B-row call
equals row 0 computed alone (B = 1), the property the backend's batch invariance needs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12  # [in, out] of each block matrix
HEAD = (50257, 768)
ROWS = (1, 2, 3, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="calls per round (their mean is the round's time)")
    args = parser.parse_args()

    import numpy as np

    from slm_app.backends import tf_matvec
    from slm_app.provisioning.tiny_gpt2 import configure_tensorflow_env

    tf = configure_tensorflow_env()
    loaded = tf_matvec.load(tf, Path(os.environ.get("SLM_CACHE_DIR", Path.home() / ".cache" / "slm_app")))
    if loaded.path is None:
        sys.exit(f"the decode kernel is not available: {loaded.reason}")
    rng = np.random.default_rng(0)
    keras = [tf.Variable(rng.standard_normal(shape, dtype=np.float32) * 0.02) for shape in SHAPES]
    row_major = [tf.Variable(tf.transpose(w)) for w in keras]
    head = tf.Variable(rng.standard_normal(HEAD, dtype=np.float32) * 0.02)

    def step(product, x):
        for i, (n_in, _) in enumerate(SHAPES):
            x = product(x[:, :n_in], i) * 0.5  # x is 3072 wide after c_fc, 768 otherwise
        return tf_matvec.matvec(tf, x, head) if product is kernel else tf.matmul(x, head, transpose_b=True)

    def kernel(x, i):
        return tf_matvec.matvec(tf, x, row_major[i])

    variants = {
        "XLA dot, Keras [in, out]": lambda x: step(lambda v, i: tf.matmul(v, keras[i]), x),
        "XLA dot, row-major [out, in]": lambda x: step(lambda v, i: tf.matmul(v, row_major[i], transpose_b=True), x),
        "decode kernel, row-major": lambda x: step(kernel, x),
    }
    functions = {name: tf.function(fn, jit_compile=True) for name, fn in variants.items()}
    xs = {b: tf.constant(rng.standard_normal((b, 768), dtype=np.float32)) for b in ROWS}
    same_bits = {name: all(np.array_equal(f(xs[b]).numpy()[0], f(xs[b][:1]).numpy()[0]) for b in ROWS[1:])
                 for name, f in functions.items()}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, f in functions.items():
            for b in ROWS:
                f(xs[b]).numpy()
                start = time.perf_counter()
                for _ in range(args.calls):
                    f(xs[b]).numpy()
                times.setdefault((name, b), []).append((time.perf_counter() - start) / args.calls * 1e3)
    print(f"GPT-2 124M decode-step matrix products (48 block matrices + head), ms per step; medians of "
          f"{args.rounds} interleaved rounds; kernel: {loaded.reason}; load average {os.getloadavg()[0]:.1f}\n")
    print("| matrix products | " + " | ".join(f"{b} row{'s' if b > 1 else ''}" for b in ROWS) + " | same bits for 1 to 8 rows |")
    print("|---|" + "---:|" * len(ROWS) + "---|")
    for name in functions:
        cells = " | ".join(f"{statistics.median(times[(name, b)]):.1f}" for b in ROWS)
        print(f"| {name} | {cells} | {'yes' if same_bits[name] else 'no'} |")


if __name__ == "__main__":
    main()
