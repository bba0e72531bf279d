"""The TensorFlow backend's decode kernels (slm_app/backends/tf_matvec.cc) on generated shapes and values.

The backend's tests run them on GPT-2's shapes (multiples of 16 and 64). Here hypothesis picks any:
lengths that leave a tail after the 16-lane part, outputs too few for the helper thread or not a
multiple of the 4-row tiles, rows beyond one group of 4. Each case checks the result against numpy
and the property the backend relies on: a row's bits are the same alone as in any batch.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slm_app.backends import tf_matvec
from slm_app.provisioning.tiny_gpt2 import configure_tensorflow_env


@pytest.fixture(scope="module")
def tf(tmp_path_factory):
    tf = configure_tensorflow_env()
    loaded = tf_matvec.load(tf, tmp_path_factory.mktemp("kernel-cache"))
    assert loaded.path is not None, loaded.reason
    return tf


def _compiled(tf, fn):
    return tf.function(fn, jit_compile=True, autograph=False)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 80), n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_matvec_matches_numpy_and_rows_keep_their_bits(tf, rows: int, k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    weight = tf.constant(w)
    product = _compiled(tf, lambda v: tf_matvec.matvec(tf, v, weight))
    out = product(tf.constant(x)).numpy()
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4 * np.sqrt(k))
    for r in {0, rows - 1}:
        assert np.array_equal(product(tf.constant(x[r:r + 1])).numpy()[0], out[r])


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), heads=st.integers(1, 4), dim=st.integers(1, 40), n_slots=st.integers(1, 4),
       cells=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
def test_attention_matches_numpy_and_rows_keep_their_bits(tf, rows: int, heads: int, dim: int, n_slots: int,
                                                           cells: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((rows, heads, dim), dtype=np.float32)
    keys = rng.standard_normal((n_slots, heads, cells, dim), dtype=np.float32)
    values = rng.standard_normal((n_slots, heads, cells, dim), dtype=np.float32)
    slots = rng.integers(0, n_slots, rows).astype(np.int32)
    positions = rng.integers(0, cells, rows).astype(np.int32)
    k_t, v_t = tf.constant(keys), tf.constant(values)
    attend = _compiled(tf, lambda q_, s_, p_: tf_matvec.attention(tf, q_, k_t, v_t, s_, p_))
    out = attend(tf.constant(q), tf.constant(slots), tf.constant(positions)).numpy()
    for r in range(rows):
        seen_k = keys[slots[r], :, :positions[r] + 1].astype(np.float64)  # [H, cells seen, D]
        seen_v = values[slots[r], :, :positions[r] + 1].astype(np.float64)
        scores = np.einsum("hd,hcd->hc", q[r].astype(np.float64), seen_k) / np.sqrt(dim)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        np.testing.assert_allclose(out[r], np.einsum("hc,hcd->hd", probs, seen_v), rtol=1e-4, atol=1e-4)
    for r in {0, rows - 1}:
        alone = attend(tf.constant(q[r:r + 1]), tf.constant(slots[r:r + 1]), tf.constant(positions[r:r + 1]))
        assert np.array_equal(alone.numpy()[0], out[r])
