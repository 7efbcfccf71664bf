"""DNS similarity loss (losses/dns.py): numerics against a numpy/scipy transcription, frozen network,
gradients, contrast invariance (monotone remap vs shift) with random and shipped MASR-Net weights."""
import dataclasses
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import tensorflow as tf

from contrareg_tf import instance_opt as IO
from contrareg_tf.config import IO_PAPER
from contrareg_tf.errors import ContraRegInputError, ContraRegWarning
from contrareg_tf.losses import dns as D
from contrareg_tf.networks import masr


def np_smoothed_cosine(a, b, sigma, mask=None):
    """mean_x cos(G_σ a, G_σ b) per sample; G_σ = scipy Gaussian, replicate border, radius 3σ."""
    def g(x):
        return np.stack([ndi.gaussian_filter(x[..., c], sigma, mode="nearest", truncate=3.0)
                         for c in range(x.shape[-1])], -1)
    out = []
    for i in range(a.shape[0]):
        sa, sb = g(a[i].astype(np.float64)), g(b[i].astype(np.float64))
        cos = (sa * sb).sum(-1) / np.sqrt((sa ** 2).sum(-1) * (sb ** 2).sum(-1))
        out.append(cos.mean() if mask is None else cos[mask[i, ..., 0] > 0].mean())
    return np.array(out)


def phantom(shape, seed=0):
    """Piecewise-smooth 'anatomy' in [0, 1]: smoothed noise quantised into 4 tissue levels + blur."""
    rng = np.random.default_rng(seed)
    f = ndi.gaussian_filter(rng.normal(size=shape), 2.5)
    q = np.digitize(f, np.quantile(f, [0.25, 0.5, 0.75])).astype(np.float64)
    img = ndi.gaussian_filter(np.array([0.1, 0.8, 0.4, 0.6])[q.astype(int)], 0.7)
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


@pytest.fixture(scope="module")
def models():
    tf.keras.utils.set_random_seed(0)
    return {2: masr.build_masr(2), 3: masr.build_masr(3)}


@pytest.mark.parametrize("sigma", [1.0, 0.0])
@pytest.mark.parametrize("shape", [(2, 16, 24, 5), (1, 8, 16, 8, 3)])
def test_descriptor_similarity_matches_numpy(shape, sigma):
    rng = np.random.default_rng(0)
    a = rng.normal(size=shape).astype(np.float32)
    b = a + rng.normal(size=shape).astype(np.float32)
    got = D.descriptor_similarity(a, b, sigma).numpy()
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got, np_smoothed_cosine(a, b, sigma), atol=1e-5)
    mask = (rng.random(shape[:-1] + (1,)) > 0.5).astype(np.float32)
    got_m = D.descriptor_similarity(a, b, sigma, mask=mask).numpy()
    np.testing.assert_allclose(got_m, np_smoothed_cosine(a, b, sigma, mask), atol=1e-5)


def test_dns_loss_equals_io_similarity_at_identity(models):
    """One ψ_σ: the DNS loss of a pair is IO's similarity term (1 − mean cos) at u = 0, minus 1."""
    fix, mov = (phantom((32, 40), s)[None, ..., None] for s in (1, 2))
    loss = float(D.DNS(models[2]).loss(fix, mov)[0])
    schedule = dataclasses.replace(IO_PAPER, levels=1, lrs=(1e-3,), iters=(1,), reg_weights=(0.0,),
                                   smooth_sigma=D.DNS_SMOOTH_SIGMA)
    res = IO.instance_optimise(fix, mov, IO.FeatureSpec("dns", dns_model=models[2]), schedule, progress=False)
    assert abs(res.history[0]["sim"][0, 0] - (1.0 + loss)) < 1e-5
    assert -1.0 < loss < -0.1


def test_loss_identity_and_range(models):
    x = np.stack([phantom((32, 32), s) for s in (1, 2)])[..., None]
    loss = D.DNS(models[2]).loss(x, x).numpy()
    assert loss.shape == (2,)
    np.testing.assert_allclose(loss, -1.0, atol=1e-5)
    y = x[:, ::-1].copy()
    l2 = D.DNS(models[2]).loss(x, y).numpy()
    assert (l2 > -1.0 + 1e-3).all() and (l2 <= 1.0).all()
    # functional form, Keras-loss call form and per-sample independence
    np.testing.assert_allclose(D.dns_loss(x, y, models[2]).numpy(), l2, atol=1e-6)
    np.testing.assert_allclose(D.DNS(models[2])(x[:1], y[:1]).numpy(), l2[:1], atol=1e-6)


def test_frozen_network_gradient_to_moved_image(models):
    loss = D.DNS(models[2])
    assert loss.model_for(2).trainable_variables == []
    x = tf.constant(phantom((32, 32), 3)[None, ..., None])
    y = tf.Variable(phantom((32, 32), 4)[None, ..., None])
    with tf.GradientTape() as tape:
        val = tf.reduce_sum(loss.loss(x, y))
    g = tape.gradient(val, y)
    assert g is not None and float(tf.reduce_max(tf.abs(g))) > 0
    # one gradient step on the moved image lowers the loss (descent direction is valid)
    y2 = y - 5.0 * g / float(tf.reduce_max(tf.abs(g)))
    assert float(loss.loss(x, y2)[0]) < float(val)


def test_input_errors(models, tmp_path):
    loss = D.DNS(models[2])
    with pytest.raises(ContraRegInputError, match="2-D but the images are 3-D"):
        loss.loss(np.zeros((1, 16, 16, 16, 1), np.float32), np.zeros((1, 16, 16, 16, 1), np.float32))
    with pytest.raises(ContraRegInputError, match="divisible by 8"):
        loss.loss(np.zeros((1, 20, 16, 1), np.float32), np.zeros((1, 20, 16, 1), np.float32))
    with pytest.raises(ContraRegInputError, match="MASR-Net"):
        D.DNS(tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(3,))]))
    with pytest.raises(ContraRegInputError, match="smooth_sigma"):
        D.DNS(models[2], smooth_sigma=-1)
    with pytest.raises(ContraRegInputError, match="descriptor shapes differ"):
        D.descriptor_similarity(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 16, 3)))
    # a path works like the model it stores
    p = masr.save_masr(models[2], tmp_path / "m.h5")
    x = phantom((32, 32), 5)[None, ..., None]
    y = phantom((32, 32), 6)[None, ..., None]
    np.testing.assert_allclose(D.DNS(p).loss(x, y).numpy(), D.DNS(models[2]).loss(x, y).numpy(), atol=1e-6)


def test_similarity_registry_builds_dns(models):
    """``--loss dns`` path: BidirSimilarity('dns', dns_model=...) gives per-sample terms."""
    from contrareg_tf.losses.similarity import BidirSimilarity

    sim = BidirSimilarity("dns", dns_model=models[2])
    x = np.stack([phantom((32, 32), s) for s in (7, 8)])[..., None]
    out = sim(x, x, x, x)
    assert out["sim"].shape == (2,)
    np.testing.assert_allclose(out["sim"].numpy(), -1.0, atol=1e-5)


def _remap_vs_shift(loss, img, shift):
    """(loss vs a monotone non-linear remap of img, loss vs a shifted copy of img)."""
    x = img[None, ..., None]
    remap = (1.0 - img) ** 2                         # inverted, non-linear, one-to-one on [0, 1]
    shifted = np.roll(img, shift, axis=tuple(range(len(shift))))
    return (float(loss.loss(x, remap[None, ..., None])[0]), float(loss.loss(x, shifted[None, ..., None])[0]))


@pytest.mark.parametrize("ndim,shape,shift", [(2, (64, 64), (3, 2)), (3, (32, 32, 32), (2, 2, 0))])
def test_contrast_invariance_shipped_weights(ndim, shape, shift):
    path = D.default_weights_path(ndim)
    if not os.path.isfile(path):
        pytest.skip(f"no shipped weights at {path}")
    loss = D.DNS()                                   # default: loads the shipped weights by dimensionality
    l_remap, l_shift = _remap_vs_shift(loss, phantom(shape, 10), shift)
    assert loss.model_for(ndim).masr_config["ndim"] == ndim
    assert l_remap < l_shift


def test_loss_inside_tf_function(models):
    """The training loops call the loss inside ``tf.function`` (unknown batch size)."""
    loss = D.DNS(models[2])
    x = np.stack([phantom((32, 32), s) for s in (11, 12)])[..., None]
    y = np.roll(x, 2, axis=1)
    spec = tf.TensorSpec((None, 32, 32, 1), tf.float32)
    f = tf.function(loss.loss, input_signature=[spec, spec])
    np.testing.assert_allclose(f(x, y).numpy(), loss.loss(x, y).numpy(), atol=1e-6)


# ------------------------------------------------------------------------------- where weights apply
def test_shipped_cards_state_training_spacing_and_data():
    for ndim, sp in ((2, 2.5), (3, 3.0)):
        path = masr.default_weights_path(ndim)
        with open(masr.card_path(path)) as f:
            card = json.load(f)
        assert card["spacing_mm"] == [sp] * ndim and f"@ {sp:g} mm" in card["data"]   # the card's own data line
        assert masr.training_spacing(path) == [sp] * ndim


@pytest.mark.parametrize("spacing,warns", [(3.0, False), (4.4, False), (2.05, False), (4.6, True), (1.9, True),
                                           ((3.0, 3.0, 6.0), True)])
def test_dns_weights_warn_more_than_1p5x_from_training_spacing(tmp_path, spacing, warns):
    # a copy of the shipped 3-D weights with its card (trained at 3 mm): 4.5 / 3 = 1.5 is the edge
    path = str(tmp_path / "w.h5")
    shutil.copy(masr.default_weights_path(3), path)
    shutil.copy(masr.card_path(masr.default_weights_path(3)), masr.card_path(path))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        ratio = masr.check_training_spacing(path, spacing)
    msgs = [str(w.message) for w in got if issubclass(w.category, ContraRegWarning)]
    expect = max(max(s / 3.0, 3.0 / s) for s in np.atleast_1d(spacing))
    assert ratio == pytest.approx(expect)
    assert bool(msgs) == warns
    if warns:
        assert path in msgs[0] and "3x3x3 mm" in msgs[0]
        assert "x".join(f"{s:g}" for s in np.broadcast_to(spacing, (3,))) + " mm" in msgs[0]


def test_dns_weights_without_card_spacing_do_not_warn(tmp_path):
    path = str(tmp_path / "w.h5")
    shutil.copy(masr.default_weights_path(3), path)           # no card beside it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert masr.check_training_spacing(path, 0.5) is None


def test_io_feature_provider_warns_for_dns_at_another_resolution():
    with pytest.warns(ContraRegWarning, match="dns_proxy3d.h5"):
        IO.feature_provider("dns", ndim=3, spacing=(6.0, 6.0, 6.0))
