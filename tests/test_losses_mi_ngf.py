"""Global MI, local MI and NGF: analytic cases and independent numpy transcriptions written here."""
import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import contrareg_tf  # noqa: F401
from contrareg_tf.config import PAPER
from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.losses.mi import (LocalMutualInformation, MutualInformation, local_mutual_information,
                                    mutual_information)
from contrareg_tf.losses.ngf import NGF, ngf_loss


def _smooth(rng, shape, sigma=2.0):
    """(B, *vol, 1) smooth image in [0, 1]."""
    out = []
    for _ in range(shape[0]):
        x = ndimage.gaussian_filter(rng.random(shape[1:-1]), sigma)
        out.append((x - x.min()) / (x.max() - x.min()))
    return np.stack(out)[..., None].astype(np.float32)


# ------------------------------------------------------------------------------ numpy transcriptions
def np_soft_weights(v, bins, sigma_ratio):
    """Per-voxel Gaussian weights over linspace(0, 1, bins), normalised to sum 1 (float64)."""
    c = np.linspace(0.0, 1.0, bins)
    s = sigma_ratio / (bins - 1)
    w = np.exp(-(np.asarray(v, np.float64).reshape(-1, 1) - c[None, :]) ** 2 / (2 * s * s))
    return w / w.sum(axis=1, keepdims=True)


def np_mi(x, y, bins, sigma_ratio=0.5, eps=1e-10):
    wx, wy = np_soft_weights(x, bins, sigma_ratio), np_soft_weights(y, bins, sigma_ratio)
    pxy = np.einsum("vi,vj->ij", wx, wy) / wx.shape[0]
    px = wx.mean(0)[:, None]
    py = wy.mean(0)[None, :]
    return float(np.sum(pxy * np.log((pxy + eps) / (px * py + eps))))


def np_local_mi(x, y, bins, patch, sigma_ratio=0.5):
    """Per-patch MI on a grid of ``patch``-sized cells offset by -floor(pad/2) per axis (cells clipped to the
    image, i.e. padded voxels ignored), mean over cells. x, y: (*vol,)."""
    vol = x.shape
    starts = []
    for n in vol:
        pad = (-n) % patch
        starts.append(range(-(pad // 2), n, patch))
    vals = []
    for corner in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(vol)):
        sl = tuple(slice(max(c, 0), min(c + patch, n)) for c, n in zip(corner, vol))
        vals.append(np_mi(x[sl], y[sl], bins, sigma_ratio))
    return float(np.mean(vals))


def np_ngf(s, t, eps):
    """1 - mean((∇S·∇T)² / ((|∇S|²+ε²)(|∇T|²+ε²))) with np.gradient, one-voxel border dropped. (*vol,)."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    gs, gt = np.gradient(s), np.gradient(t)
    inner = tuple(slice(1, -1) for _ in s.shape)
    gs = [g[inner] for g in gs]
    gt = [g[inner] for g in gt]
    dot = sum(a * b for a, b in zip(gs, gt))
    ns = sum(a * a for a in gs) + eps ** 2
    nt = sum(b * b for b in gt) + eps ** 2
    return float(1.0 - np.mean(dot ** 2 / (ns * nt)))


# ----------------------------------------------------------------------------------------- global MI
@pytest.mark.parametrize("bins", [16, PAPER.mi_bins])
def test_mi_self_equals_marginal_entropy_on_bin_centres(bins):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(bins))
    k = rng.choice(bins, size=(1, 40, 50, 1), p=p)
    a = (k / (bins - 1)).astype(np.float32)               # every value exactly on a bin centre
    counts = np.bincount(k.ravel(), minlength=bins) / k.size
    entropy = -sum(q * math.log(q) for q in counts if q > 0)
    # σ = 0.1 bin spacing: neighbouring-kernel weight exp(-50), negligible
    assert mutual_information(a, a, bins=bins, sigma_ratio=0.1).numpy()[0] == pytest.approx(entropy, abs=1e-4)
    # with the default σ = 0.5 spacing the kernels overlap and MI(a, a) drops below the entropy
    assert mutual_information(a, a, bins=bins).numpy()[0] < entropy - 0.1


def test_mi_with_shuffled_copy_is_near_zero():
    rng = np.random.default_rng(1)
    a = _smooth(rng, (1, 256, 256, 1), sigma=4.0)          # 65 536 voxels
    shuffled = rng.permutation(a.ravel()).reshape(a.shape)
    mi_self = mutual_information(a, a).numpy()[0]
    mi_shuf = mutual_information(a, shuffled).numpy()[0]
    assert abs(mi_shuf) < 1e-2
    assert mi_self > 1.0


@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (2, 16, 16, 16, 1)])
@pytest.mark.parametrize("bins,sigma_ratio", [(PAPER.mi_bins, 0.5), (12, 1.0)])
def test_mi_matches_numpy(shape, bins, sigma_ratio):
    rng = np.random.default_rng(2)
    x = _smooth(rng, shape)
    y = np.clip(0.3 * x + 0.7 * _smooth(rng, shape) + 0.05 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    got = mutual_information(x, y, bins=bins, sigma_ratio=sigma_ratio).numpy()
    assert got.shape == (2,) and got.dtype == np.float32
    for i in range(2):
        assert got[i] == pytest.approx(np_mi(x[i], y[i], bins, sigma_ratio), abs=1e-5)
    loss = MutualInformation(bins=bins, sigma_ratio=sigma_ratio).loss(x, y).numpy()
    np.testing.assert_allclose(loss, -got, rtol=1e-6)


def test_mi_fixed_range_not_data_range():
    """An image using only [0, 0.5] is binned on the fixed [0, 1] centres (neurite would stretch it)."""
    rng = np.random.default_rng(3)
    x = _smooth(rng, (1, 24, 24, 1))
    y = _smooth(rng, (1, 24, 24, 1))
    got = mutual_information(0.5 * x, y).numpy()[0]
    assert got == pytest.approx(np_mi(0.5 * x, y, PAPER.mi_bins), abs=1e-5)
    assert abs(got - np_mi(x, y, PAPER.mi_bins)) > 1e-2


def test_mi_invariant_to_monotone_remap_of_bin_centres():
    bins = PAPER.mi_bins
    rng = np.random.default_rng(4)
    k = rng.integers(0, 7, size=(1, 48, 48, 1))            # bin indices 0..6
    noise = rng.integers(-1, 2, size=k.shape)
    j = np.clip(3 * k + noise + 5, 0, bins - 1)             # a dependent image, also on bin centres
    a, b = k / (bins - 1), j / (bins - 1)
    remapped = (k ** 2) / (bins - 1)                        # monotone, nonlinear: centre k -> centre k²
    inverted = 1.0 - a                                      # monotone decreasing: centre k -> centre 47 - k
    f = lambda x, y: mutual_information(x.astype(np.float32), y.astype(np.float32), sigma_ratio=0.2).numpy()[0]
    base = f(a, b)
    assert base > 0.5
    assert f(remapped, b) == pytest.approx(base, abs=1e-4)
    assert f(inverted, b) == pytest.approx(base, abs=1e-4)
    assert f(a, b) == pytest.approx(f(b, a), abs=1e-5)      # symmetric


# ------------------------------------------------------------------------------------------ local MI
@pytest.mark.parametrize("shape,bins,patch", [((2, 20, 23, 1), PAPER.lmi_bins, PAPER.lmi_patch),
                                              ((2, 10, 11, 12, 1), 16, 4),
                                              ((1, 18, 18, 1), 8, 9)])
def test_local_mi_matches_numpy_per_patch(shape, bins, patch):
    rng = np.random.default_rng(5)
    x = _smooth(rng, shape, sigma=1.5)
    y = np.clip(1.0 - x + 0.1 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    got = local_mutual_information(x, y, bins=bins, patch=patch).numpy()
    assert got.shape == (shape[0],)
    for i in range(shape[0]):
        assert got[i] == pytest.approx(np_local_mi(x[i, ..., 0], y[i, ..., 0], bins, patch), abs=1e-5)


def test_local_mi_batch_equals_single_samples_and_dynamic_batch():
    rng = np.random.default_rng(6)
    x = _smooth(rng, (2, 16, 19, 1))
    y = _smooth(rng, (2, 16, 19, 1))
    lmi = LocalMutualInformation()
    both = lmi.loss(x, y).numpy()
    singles = np.array([lmi.loss(x[i:i + 1], y[i:i + 1]).numpy()[0] for i in range(2)])
    np.testing.assert_allclose(both, singles, rtol=1e-6, atol=1e-7)
    assert abs(both[0] - both[1]) > 1e-3                    # the two samples really differ
    # unknown batch / spatial sizes (Keras-style symbolic shapes)
    spec = tf.TensorSpec([None, None, None, 1], tf.float32)
    fn = tf.function(lambda a, b: lmi.loss(a, b), input_signature=[spec, spec])
    np.testing.assert_allclose(fn(x, y).numpy(), both, rtol=1e-6, atol=1e-7)


def test_local_mi_shuffled_is_not_zero_but_below_self():
    """Small patches carry a large sampling bias (few voxels per joint histogram): shuffled MI > 0 but far below self-MI."""
    rng = np.random.default_rng(7)
    a = _smooth(rng, (1, 36, 36, 1))
    shuffled = rng.permutation(a.ravel()).reshape(a.shape)
    self_mi = local_mutual_information(a, a).numpy()[0]
    shuf_mi = local_mutual_information(a, shuffled).numpy()[0]
    assert 0 < shuf_mi < self_mi


# ----------------------------------------------------------------------------------------------- NGF
@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (2, 12, 14, 16, 1)])
@pytest.mark.parametrize("eps", [0.01, 0.2])
def test_ngf_matches_numpy(shape, eps):
    rng = np.random.default_rng(8)
    s = _smooth(rng, shape, sigma=1.5)
    t = _smooth(rng, shape, sigma=1.5)
    got = ngf_loss(s, t, eps=eps).numpy()
    assert got.shape == (shape[0],)
    for i in range(shape[0]):
        assert got[i] == pytest.approx(np_ngf(s[i, ..., 0], t[i, ..., 0], eps), abs=1e-5)
    np.testing.assert_allclose(NGF(eps).loss(s, t).numpy(), got, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 32, 32, 1), (1, 16, 16, 16, 1)])
def test_ngf_self_is_minimal(shape):
    rng = np.random.default_rng(9)
    a = _smooth(rng, shape, sigma=1.0)
    other = _smooth(rng, shape, sigma=1.0)
    shifted = np.roll(a, 2, axis=1)
    self_ = ngf_loss(a, a).numpy()[0]
    # equals 1 - mean(|∇a|⁴ / (|∇a|² + ε²)²): only the ε effect keeps it above 0
    assert self_ == pytest.approx(np_ngf(a[0, ..., 0], a[0, ..., 0], 0.01), abs=1e-5)
    assert self_ < ngf_loss(a, shifted).numpy()[0] - 0.1
    assert self_ < ngf_loss(a, other).numpy()[0] - 0.1
    assert self_ < 0.2
    assert ngf_loss(a, 1.0 - a).numpy()[0] == pytest.approx(self_, abs=1e-5)   # contrast inversion invariant
    # with a tiny ε and gradients everywhere (noise image), NGF(a, a) -> 0
    noise = rng.random(shape).astype(np.float32)
    assert ngf_loss(noise, noise, eps=1e-6).numpy()[0] < 1e-3


# --------------------------------------------------------------------------------------- gradients
_NP_LOSS = {  # float64 numpy transcriptions of each loss for one sample (*vol,)
    "mi": lambda x, y: -np_mi(x, y, PAPER.mi_bins),
    "lmi": lambda x, y: -np_local_mi(x, y, PAPER.lmi_bins, PAPER.lmi_patch),
    "ngf": lambda x, y: np_ngf(x, y, 0.01),
}


@pytest.mark.parametrize("name,loss", [("mi", MutualInformation()), ("lmi", LocalMutualInformation()),
                                       ("ngf", NGF())], ids=["mi", "lmi", "ngf"])
@pytest.mark.parametrize("shape", [(2, 24, 24, 1), (1, 12, 12, 12, 1)])
def test_gradients_flow_to_y_pred(name, loss, shape):
    rng = np.random.default_rng(10)
    x = tf.constant(_smooth(rng, shape))
    y = tf.Variable(_smooth(rng, shape))
    with tf.GradientTape() as tape:
        val = loss.loss(x, y)
        total = tf.reduce_sum(val)
    g = tape.gradient(total, y).numpy()
    assert val.shape == (shape[0],) and val.dtype == tf.float32
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # directional derivative vs a central finite difference of the float64 numpy transcription
    d = rng.standard_normal(shape)
    h = 1e-6
    xn, yn = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    fd = sum(_NP_LOSS[name](xn[i, ..., 0], yn[i, ..., 0] + h * d[i, ..., 0])
             - _NP_LOSS[name](xn[i, ..., 0], yn[i, ..., 0] - h * d[i, ..., 0]) for i in range(shape[0])) / (2 * h)
    assert float(np.sum(g * d)) == pytest.approx(fd, rel=2e-3, abs=1e-5)


# ----------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_input_error():
    a = np.zeros((1, 8, 8, 1), np.float32)
    cases = [
        (lambda: mutual_information(a, np.zeros((1, 8, 9, 1), np.float32)), "shape"),
        (lambda: mutual_information(np.zeros((8, 8, 1), np.float32), np.zeros((8, 8, 1), np.float32)), "B, \\*vol"),
        (lambda: local_mutual_information(np.zeros((1, 8, 8, 2)), np.zeros((1, 8, 8, 2))), "expected 1 channel"),
        (lambda: MutualInformation(bins=1), "bins"),
        (lambda: MutualInformation(sigma_ratio=0), "sigma_ratio"),
        (lambda: MutualInformation(eps=0), "eps"),
        (lambda: LocalMutualInformation(patch=0), "patch"),
        (lambda: ngf_loss(a, np.zeros((1, 8, 7, 1), np.float32)), "shape"),
        (lambda: ngf_loss(np.zeros((1, 8, 2, 1)), np.zeros((1, 8, 2, 1))), ">= 3 voxels"),
        (lambda: NGF(eps=0), "eps"),
    ]
    for fn, words in cases:
        with pytest.raises(ContraRegInputError, match=words):
            fn()
