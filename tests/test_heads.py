"""PatchNCE projection heads (contrareg_tf/networks/heads.py) and L2Normalize (networks/layers.py)."""
import numpy as np
import pytest
import tensorflow as tf

import contrareg_tf
from contrareg_tf import PAPER, ContraRegInputError
from contrareg_tf.networks import heads
from contrareg_tf.networks.batched_heads import apply_heads
from contrareg_tf.networks.layers import L2Normalize

pytestmark = pytest.mark.filterwarnings("ignore:non-integer arguments to randrange")

CHANS = [32, 64, 128, 64, 32, 32]


def _numpy_head(head, x):
    """Independent numpy transcription: Dense-ReLU-Dense-ReLU-Dense, then x / (||x|| + 1e-7)."""
    h = x.astype(np.float64)
    for i, layer in enumerate(head.dense_layers):
        k, b = layer.get_weights()
        h = h @ k + b
        if i < len(head.dense_layers) - 1:
            h = np.maximum(h, 0)
    return h / (np.linalg.norm(h, axis=-1, keepdims=True) + 1e-7)


def test_shapes_unit_norm_and_numpy_reference():
    hs = heads.build_heads(CHANS)
    assert [h.name for h in hs] == [f"heads1_{k}" for k in range(1, 7)]
    rng = np.random.default_rng(0)
    for head, c in zip(hs, CHANS):
        assert len(head.dense_layers) == PAPER.head_layers
        assert [l.units for l in head.dense_layers] == [PAPER.head_units] * PAPER.head_layers
        # the default init is tiny (gain 0.02): scale weights up so the numpy check is not trivially ~0
        head.set_weights([w * 30 + rng.normal(0, 0.01, w.shape).astype(np.float32) for w in head.get_weights()])
        x = rng.normal(size=(50, c)).astype(np.float32)
        y = head(x).numpy()
        assert y.shape == (50, PAPER.head_units)
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(y, _numpy_head(head, x), atol=2e-5)
        xb = rng.normal(size=(2, 7, c)).astype(np.float32)          # (B, N, C) also accepted
        yb = head(xb).numpy()
        assert yb.shape == (2, 7, PAPER.head_units)
        np.testing.assert_allclose(yb, _numpy_head(head, xb), atol=2e-5)


def test_trainable_and_param_count():
    (head,) = heads.build_heads([64], units=32, nb_layers=3, name="heads2")
    assert len(head.trainable_weights) == 6
    assert head.count_params() == (64 * 32 + 32) + 2 * (32 * 32 + 32)
    x = tf.random.normal((10, 64))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(head(x)[:, 0])
    grads = tape.gradient(loss, head.trainable_weights)
    assert all(g is not None for g in grads)


def test_cut_init_statistics():
    """CUT init: xavier-normal, gain 0.02 → std = 0.02 * sqrt(2 / (fan_in + fan_out)); zero bias."""
    tf.keras.utils.set_random_seed(0)
    (head,) = heads.build_heads([128], units=256)
    for layer in head.dense_layers:
        k, b = layer.get_weights()
        expect = 0.02 * np.sqrt(2.0 / (k.shape[0] + k.shape[1]))
        assert abs(k.std() / expect - 1) < 0.05
        assert abs(k.mean()) < 0.1 * expect
        np.testing.assert_array_equal(b, 0)


def test_l2normalize_eps_and_bad_input():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    y = L2Normalize()(x).numpy()
    np.testing.assert_allclose(y[0], [3 / (5 + 1e-7), 4 / (5 + 1e-7)], rtol=1e-6)
    np.testing.assert_array_equal(y[1], [0.0, 0.0])            # eps keeps zero vectors finite
    (head,) = heads.build_heads([16])
    with pytest.raises(ContraRegInputError, match="16 input channels"):
        head(np.zeros((4, 8), np.float32))
    with pytest.raises(ContraRegInputError):
        heads.build_heads([])


def test_h5_roundtrip(tmp_path):
    (a,) = heads.build_heads([32], units=16, name="h")
    a.set_weights([np.random.default_rng(1).normal(size=w.shape).astype(np.float32) for w in a.get_weights()])
    a.save_weights(str(tmp_path / "h.h5"))
    (b,) = heads.build_heads([32], units=16, name="h")
    b.load_weights(str(tmp_path / "h.h5"))
    x = np.random.default_rng(2).normal(size=(5, 32)).astype(np.float32)
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())


def test_l2_normalize_gradient_is_finite_at_zero_and_underflowing_vectors():
    """CUT's gain-0.02 heads can output vectors whose squared norm underflows float32 (or exact zeros on
    constant background): with x / (tf.norm(x) + eps) the gradient there is inf/NaN (measured: a CR step with
    random autoencoders went NaN at the cpu-demo preset). The clamped norm keeps it finite."""
    x = tf.constant([[0.0, 0.0, 0.0], [1e-23, 0.0, 0.0], [3.0, 4.0, 0.0]])
    c = tf.constant([[1.0, 2.0, 3.0]] * 3)
    with tf.GradientTape() as t:
        t.watch(x)
        y = L2Normalize()(x)
        s = tf.reduce_sum(y * c)
    g = t.gradient(s, x).numpy()
    assert np.isfinite(g).all()
    np.testing.assert_allclose(y.numpy()[2], [0.6, 0.8, 0.0], atol=1e-6)
    np.testing.assert_allclose(y.numpy()[:2], 0.0, atol=1e-15)
    # the naive form (what the layer used to compute) is not finite on the underflowing row
    with tf.GradientTape() as t:
        t.watch(x)
        s = tf.reduce_sum(x / (tf.norm(x, axis=-1, keepdims=True) + 1e-7) * c)
    assert not np.isfinite(t.gradient(s, x).numpy()[1]).all()


def test_apply_heads_batched_equals_numpy_per_head():
    """PatchNCE's batched projection (one call per head, deeper Dense layers as one batched matmul over heads,
    rows of several calls to the same head concatenated) gives each call the numpy head's output."""
    chans = [4, 6, 8, 6]
    h1 = heads.build_heads(chans, units=16, name="h1")
    h2 = heads.build_heads(chans, units=16, name="h2")
    rng = np.random.default_rng(3)
    for h in h1 + h2:
        h.set_weights([w * 30 + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in h.get_weights()])
    calls = []
    for k, c in enumerate(chans):
        n = 5 if k < 3 else 3                      # layer 4: fewer rows → its own group
        calls += [(h1[k], rng.normal(size=(2, n, c)).astype(np.float32)),
                  (h2[k], rng.normal(size=(2, n, c)).astype(np.float32)),
                  (h1[k], rng.normal(size=(2, n, c)).astype(np.float32))]   # 2nd use of h1[k]: rows concatenated
    got = apply_heads([(h, tf.constant(g)) for h, g in calls])
    for (h, g), y in zip(calls, got):
        assert y.shape == (2, g.shape[1], 16)
        want = _numpy_head(h, g.reshape(-1, g.shape[-1])).reshape(2, g.shape[1], 16)
        np.testing.assert_allclose(y.numpy(), want, atol=2e-5)
