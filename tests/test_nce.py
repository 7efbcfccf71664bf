"""The shared masked InfoNCE kernel (losses/nce.py) against a literal numpy transcription, and its one mask constant."""
import ast
import os

import numpy as np
import tensorflow as tf

import contrareg_tf.losses
from contrareg_tf.losses import nce


def np_paired_nce(q, k, negatives, tau, ext=None, ext_negatives=None):
    """ℓ_i = −log[e^(q_i·k_i/τ) / (e^(q_i·k_i/τ) + Σ_{j≠i, admitted} e^(q_i·k_j/τ) + Σ_{m admitted} e^(q_i·e_m/τ))]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    out = np.zeros(q.shape[:2])
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            pos = np.exp(q[b, i] @ k[b, i] / tau)
            den = pos + sum(np.exp(q[b, i] @ k[b, j] / tau) for j in range(k.shape[1]) if j != i and negatives[b, i, j])
            if ext is not None:
                den += sum(np.exp(q[b, i] @ ext[b, m] / tau) for m in range(ext.shape[1])
                           if ext_negatives is None or ext_negatives[b, i, m])
            out[b, i] = -np.log(pos / den)
    return out


def unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_paired_nce_matches_numpy_with_masked_keys_and_extra_negatives():
    rng = np.random.default_rng(0)
    q, k, e = unit(rng, 2, 9, 5), unit(rng, 2, 9, 5), unit(rng, 2, 4, 5)
    neg = rng.random((2, 9, 9)) > 0.4
    ext_neg = rng.random((2, 9, 4)) > 0.5
    got = nce.paired_nce(tf.constant(q), tf.constant(k), tf.constant(neg), 0.2, tf.constant(e), tf.constant(ext_neg))
    np.testing.assert_allclose(got.numpy(), np_paired_nce(q, k, neg, 0.2, e, ext_neg), rtol=1e-10)
    got = nce.paired_nce(tf.constant(q), tf.constant(k), tf.constant(neg), 0.2, tf.constant(e))     # all ext admitted
    np.testing.assert_allclose(got.numpy(), np_paired_nce(q, k, neg, 0.2, e), rtol=1e-10)
    none = np.zeros_like(neg)                                   # only the positive admitted: ℓ = −log 1 = 0
    np.testing.assert_array_equal(nce.paired_nce(tf.constant(q), tf.constant(k), tf.constant(none), 0.2).numpy(), 0.0)


def test_nce_terms_and_valid_mean():
    """nce_terms with its own positive (CoRe's partner form) and valid_mean's empty-row rule."""
    rng = np.random.default_rng(1)
    logits, pos = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3))
    keep = rng.random((2, 3, 6)) > 0.3
    keep[..., 0] = True
    want = np.log(np.where(keep, np.exp(logits), 0.0).sum(-1)) - pos
    got = nce.nce_terms(tf.constant(logits), tf.constant(pos), tf.constant(keep)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    valid = np.array([[True, False, True], [False, False, False]])
    np.testing.assert_allclose(nce.valid_mean(tf.constant(want), tf.constant(valid)).numpy(),
                               [want[0, [0, 2]].mean(), 0.0], rtol=1e-12)


def test_the_mask_constant_is_written_once():
    """No loss module writes its own excluded-logit constant: −1e9 appears in nce.py only."""
    folder = os.path.dirname(contrareg_tf.losses.__file__)
    homes = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(folder, name)).read())
            if any(isinstance(n, ast.Constant) and n.value in (1e9, -1e9) for n in ast.walk(tree)):
                homes.append(name)
    assert homes == ["nce.py"]
