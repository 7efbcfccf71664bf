"""MIND / MIND-SSC descriptors and loss vs an independent numpy transcription (np.pad 'edge' shifts,
scipy.ndimage.uniform_filter(mode='nearest') box filters, float64)."""
import itertools

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.losses import mind as M


# ----------------------------------------------------------------------------- numpy reference
def np_shift(x, off):
    """x(clip(v + off)) via np.pad(mode='edge')."""
    p = max(abs(o) for o in off)
    if p == 0:
        return x.copy()
    xp = np.pad(x, p, mode="edge")
    return xp[tuple(slice(p + o, p + o + n) for o, n in zip(off, x.shape))]


def np_box(x, size):
    return ndimage.uniform_filter(x, size=size, mode="nearest")


def np_clamp(v):
    m = v.mean()
    return np.clip(v, max(1e-3 * m, 1e-12), max(1e3 * m, 1e-12))


def np_mind(img, d, p):
    """Heinrich 2012: six/four neighbourhood at distance d, p-box patch SSD, V = mean, normalise by max."""
    ndim = img.ndim
    offs = []
    for ax in range(ndim):
        for s in (d, -d):
            o = [0] * ndim
            o[ax] = s
            offs.append(o)
    D = np.stack([np_box((img - np_shift(img, o)) ** 2, p) for o in offs], -1)
    V = np_clamp(D.mean(-1))
    e = np.exp(-D / V[..., None])
    return e / e.max(-1, keepdims=True)


def np_ssc_pairs(ndim):
    if ndim == 3:
        nh = [(-1, 0, 0), (0, 0, -1), (0, -1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0)]
    else:
        nh = [(-1, 0), (0, -1), (0, 1), (1, 0)]
    out = []
    for i in range(len(nh)):
        for j in range(len(nh)):
            if i > j and np.sum((np.array(nh[i]) - np.array(nh[j])) ** 2) == 2:
                out.append((nh[i], nh[j]))
    return out


def np_mind_ssc(img, delta, r):
    D = []
    for a, b in np_ssc_pairs(img.ndim):
        D.append(np_box((np_shift(img, [delta * t for t in a]) - np_shift(img, [delta * t for t in b])) ** 2,
                        2 * r + 1))
    D = np.stack(D, -1)
    D = D - D.min(-1, keepdims=True)
    V = np_clamp(D.mean(-1))
    return np.exp(-D / V[..., None])


def blobs(shape, seed, batch=2, sigma=2.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
        x = (x - x.min()) / (x.max() - x.min())
        out.append(x)
    return np.stack(out)[..., None].astype(np.float32)


SHAPES = [(32, 32), (16, 16, 16)]


# ------------------------------------------------------------------------------------- descriptors
def test_ssc_pair_counts():
    assert len(M.ssc_pairs(3)) == 12 and len(M.ssc_pairs(2)) == 4
    for a, b in M.ssc_pairs(3):
        assert sum((x - y) ** 2 for x, y in zip(a, b)) == 2 and any(a) and any(b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("d,p", [(2, 3), (1, 1), (1, 5)])
def test_mind_matches_numpy(shape, d, p):
    x = blobs(shape, 0)
    out = M.mind(x, d, p).numpy()
    assert out.shape == (2, *shape, 2 * len(shape))
    for b in range(2):
        ref = np_mind(x[b, ..., 0].astype(np.float64), d, p)
        np.testing.assert_allclose(out[b], ref, atol=1e-5)
    assert np.allclose(out.max(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("delta,r", [(2, 1), (1, 0), (1, 2)])
def test_mind_ssc_matches_numpy(shape, delta, r):
    x = blobs(shape, 1)
    out = M.mind_ssc(x, delta, r).numpy()
    assert out.shape == (2, *shape, 12 if len(shape) == 3 else 4)
    for b in range(2):
        ref = np_mind_ssc(x[b, ..., 0].astype(np.float64), delta, r)
        np.testing.assert_allclose(out[b], ref, atol=1e-5)


def test_ssc_var_clamp_active_on_constant_regions():
    # half-constant image: V is tiny on the flat half -> the clamp (not 0/0) decides the value
    x = blobs((32, 32), 2, batch=1)
    x[0, :, :16] = 0.3
    out = M.mind_ssc(x, 2, 1).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], np_mind_ssc(x[0, ..., 0].astype(np.float64), 2, 1), atol=1e-5)
    const = M.mind(np.full((1, 8, 8, 1), 0.5, np.float32)).numpy()
    assert np.isfinite(const).all() and np.allclose(const, 1.0)


@pytest.mark.parametrize("fn", [M.mind, M.mind_ssc])
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_intensity_invariance(fn, shape):
    x = blobs(shape, 3)
    ref = fn(x).numpy()
    for a, b in [(2.5, 0.3), (-0.7, 1.0), (0.01, 0.0)]:
        np.testing.assert_allclose(fn(a * x + b).numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("variant", ["mind", "ssc"])
def test_gamma_remap_nearly_invariant(variant):
    x = blobs((16, 16, 16), 4)
    loss = M.MIND(variant=variant)
    gamma = loss.loss(x, x ** 1.5).numpy()
    shifted = loss.loss(x, np.roll(x, 2, axis=1)).numpy()
    assert (gamma < 0.35 * shifted).all(), (gamma, shifted)


def test_batch_equals_single():
    x = blobs((16, 16, 16), 5, batch=3)
    for fn in (M.mind, M.mind_ssc):
        full = fn(x).numpy()
        for b in range(3):
            np.testing.assert_allclose(full[b:b + 1], fn(x[b:b + 1]).numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("variant,penalty", list(itertools.product(["mind", "ssc"], ["l1", "l2"])))
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_value_zero_and_shift(variant, penalty, shape):
    x = blobs(shape, 6)
    y = np.roll(x, 1, axis=1)
    loss = M.MIND(variant=variant, penalty=penalty)
    np.testing.assert_allclose(loss.loss(x, x).numpy(), 0.0, atol=1e-7)
    l1 = loss.loss(x, y).numpy()
    l2 = loss.loss(x, np.roll(x, 3, axis=1)).numpy()
    assert l1.shape == (2,) and (l1 > 1e-3).all() and (l2 > l1).all()
    # value vs numpy transcription
    f = (lambda im: np_mind(im, 2, 3)) if variant == "mind" else (lambda im: np_mind_ssc(im, 2, 1))
    for b in range(2):
        diff = f(x[b, ..., 0].astype(np.float64)) - f(y[b, ..., 0].astype(np.float64))
        ref = np.abs(diff).mean() if penalty == "l1" else (diff ** 2).mean()
        np.testing.assert_allclose(l1[b], ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(M.mind_loss(x, y, variant=variant, penalty=penalty).numpy(), l1, rtol=1e-6)


@pytest.mark.parametrize("variant", ["mind", "ssc"])
def test_gradient_wrt_pred(variant):
    x = blobs((16, 16, 16), 7, batch=1)
    y = tf.Variable(np.roll(x, 1, axis=2))
    with tf.GradientTape() as tape:
        val = tf.reduce_sum(M.MIND(variant=variant).loss(x, y))
    g = tape.gradient(val, y).numpy()
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_keras_layer_and_graph_mode():
    x = blobs((32, 32), 8)
    layer = M.MINDDescriptor(variant="ssc")
    np.testing.assert_allclose(layer(x).numpy(), M.mind_ssc(x).numpy(), atol=1e-7)
    f = tf.function(lambda a, b: M.MIND().loss(a, b))
    np.testing.assert_allclose(f(x, x[:, ::-1]).numpy(), M.MIND().loss(x, x[:, ::-1]).numpy(), rtol=1e-5)


def test_bad_input():
    with pytest.raises(ContraRegInputError, match="spatial"):
        M.mind(np.zeros((8, 8, 1), np.float32))
    with pytest.raises(ContraRegInputError, match="channel"):
        M.mind(np.zeros((1, 8, 8, 2), np.float32))
    with pytest.raises(ContraRegInputError, match="patch"):
        M.MIND(patch=4)
    with pytest.raises(ContraRegInputError, match="penalty"):
        M.MIND(penalty="l3")
    with pytest.raises(ContraRegInputError, match="variant"):
        M.MIND(variant="foo")
