"""Autoencoders A1/A2 (contrareg_tf/networks/autoencoder.py)."""
import os

import numpy as np
import pytest
import tensorflow as tf

import contrareg_tf
import contrareg_tf.assets
import contrareg_tf.config
from contrareg_tf import PAPER, ContraRegInputError
from contrareg_tf.networks import autoencoder as ae

pytestmark = pytest.mark.filterwarnings("ignore:non-integer arguments to randrange")


def test_feature_helpers():
    assert ae.feature_channels() == [32, 64, 128, 64, 32, 32]
    assert ae.feature_strides() == [2, 4, 8, 4, 2, 1]
    assert ae.feature_channels((8, 16, 24, 16, 8, 8, 8, 1), 3) == [8, 16, 24]
    with pytest.raises(ContraRegInputError):
        ae.feature_channels((8, 16, 1), 6)


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_features_channels_and_resolutions(shape):
    ndim = len(shape)
    model = ae.build_autoencoder(ndim)
    assert tuple(model.inputs[0].shape) == (None,) * (ndim + 1) + (1,)       # fully convolutional
    x = np.random.default_rng(0).random((2,) + shape + (1,)).astype(np.float32)
    recon, *feats = [o.numpy() for o in model(x)]
    assert recon.shape == x.shape
    assert len(feats) == PAPER.ae_nb_feature_layers == 6
    chans, strides = ae.feature_channels(), ae.feature_strides()
    for f, c, s in zip(feats, chans, strides):
        assert f.shape == (2,) + tuple(n // s for n in shape) + (c,)
    # f1 is the post-convolution (pre-norm) output: stride-2 'same' conv of the input + bias (tf.nn peer)
    conv1 = model.get_layer("ae_conv_1")
    k, b = conv1.get_weights()
    ref = tf.nn.convolution(x, k, strides=2, padding="SAME").numpy() + b
    np.testing.assert_allclose(feats[0], ref, rtol=1e-5, atol=1e-5)
    # ... and not normalised: instance-norm output would have per-channel mean 0 / std 1 over space
    axes = tuple(range(1, ndim + 1))
    assert np.abs(feats[0].mean(axes)).max() > 1e-2 or np.abs(feats[0].std(axes) - 1).max() > 1e-2


def test_instance_norm_matches_numpy():
    """GroupNormalization(groups=-1) is instance norm: per-sample, per-channel over space, eps 1e-3."""
    model = ae.build_autoencoder(2)
    x = np.random.default_rng(1).random((2, 16, 16, 1)).astype(np.float32)
    f1 = model(x)[1].numpy()
    norm = model.get_layer("ae_norm_1")
    gamma, beta = norm.get_weights()
    gamma, beta = gamma + 0.5, beta - 0.25
    norm.set_weights([gamma, beta])
    y = norm(tf.constant(f1)).numpy()
    mu, var = f1.mean((1, 2), keepdims=True), f1.var((1, 2), keepdims=True)
    np.testing.assert_allclose(y, gamma * (f1 - mu) / np.sqrt(var + 1e-3) + beta, atol=1e-4)


def test_h5_roundtrip_and_wrong_topology(tmp_path):
    a = ae.build_autoencoder(2, seed=1)
    path = ae.save_autoencoder(a, tmp_path / "sub" / "a1.h5")
    b = ae.load_autoencoder(path, 2)
    x = np.random.default_rng(2).random((1, 32, 32, 1)).astype(np.float32)
    for oa, ob in zip(a(x), b(x)):
        np.testing.assert_array_equal(oa.numpy(), ob.numpy())
    frozen = ae.load_autoencoder(path, 2, frozen=True)
    assert not frozen.trainable_weights and frozen.non_trainable_weights
    # wrong topology: third block 96 instead of 128 filters
    with pytest.raises(ContraRegInputError, match=r"ae_conv_3.*expected shape \(3, 3, 64, 96\), found \(3, 3, 64, 128\)"):
        ae.load_autoencoder(path, 2, filters=(32, 64, 96, 64, 32, 32, 32, 1))
    with pytest.raises(ContraRegInputError, match=r"ae_conv_1.*expected shape \(3, 3, 3, 1, 32\)"):
        ae.load_autoencoder(path, 3)
    with pytest.raises(ContraRegInputError, match="layers with weights"):
        ae.load_autoencoder(path, 2, filters=(32, 64, 128, 64, 32, 32, 32))   # 6 blocks + 32-ch output
    notes = tmp_path / "notes.h5"
    notes.write_text("not hdf5")
    with pytest.raises(ContraRegInputError, match="not an HDF5 weights file"):
        ae.load_autoencoder_weights(a, notes)
    with pytest.raises(ContraRegInputError, match="not found"):
        ae.load_autoencoder_weights(a, tmp_path / "missing.h5")
    with pytest.raises(ContraRegInputError, match=r"\.h5"):
        ae.save_autoencoder(a, tmp_path / "a1.ckpt")


def _tfa_autoencoder(ndim):
    """Independent tfa-InstanceNormalization model of the paper topology (default Keras layer names)."""
    tfa = pytest.importorskip("tensorflow_addons")
    L = tf.keras.layers
    Conv, Up = getattr(L, f"Conv{ndim}D"), getattr(L, f"UpSampling{ndim}D")
    x = inp = tf.keras.Input((None,) * ndim + (1,))
    feats = []
    for i, f in enumerate(PAPER.ae_filters[:-1]):
        if 3 <= i < 6:
            x = Up(2)(x)
        x = Conv(f, 3, strides=2 if i < 3 else 1, padding="same")(x)
        feats.append(x)
        x = L.LeakyReLU(0.2)(tfa.layers.InstanceNormalization()(x))
    return tf.keras.Model(inp, [Conv(1, 3, padding="same")(x)] + feats[:6])


def test_tfa_instance_norm_weights_load(tmp_path):
    t = _tfa_autoencoder(2)
    rng = np.random.default_rng(3)
    t.set_weights([w + rng.normal(0, 0.1, w.shape).astype(np.float32) for w in t.get_weights()])
    path = tmp_path / "tfa.h5"
    t.save_weights(str(path))
    model = ae.load_autoencoder(path, 2)
    x = rng.random((1, 32, 32, 1)).astype(np.float32)
    for ot, om in zip(t(x), model(x)):
        np.testing.assert_allclose(om.numpy(), ot.numpy(), rtol=1e-4, atol=1e-4)


def test_freeze_and_random_autoencoder():
    r1, r2, r3 = ae.random_autoencoder(2, 5), ae.random_autoencoder(2, 5), ae.random_autoencoder(2, 6)
    assert not r1.trainable_weights and len(r1.non_trainable_weights) == len(r1.weights) > 0
    for w1, w2 in zip(r1.get_weights(), r2.get_weights()):
        np.testing.assert_array_equal(w1, w2)
    assert not np.allclose(r1.get_weights()[0], r3.get_weights()[0])
    m = ae.build_autoencoder(2)
    assert len(m.trainable_weights) == len(m.weights)
    assert ae.freeze(m) is m and not m.trainable_weights


def test_bad_input():
    with pytest.raises(ContraRegInputError, match="divisible by 8"):
        ae.build_autoencoder(2, inshape=(32, 36))
    with pytest.raises(ContraRegInputError, match="ndim"):
        ae.build_autoencoder(4)
    with pytest.raises(ContraRegInputError, match="filters"):
        ae.build_autoencoder(2, filters=(32, 64, 1))
    m = ae.build_autoencoder(3, inshape=(16, 16, 24))
    assert tuple(m.inputs[0].shape[1:]) == (16, 16, 24, 1)


def test_layout_check(tmp_path):
    """A weights file of the paper's shapes trained in another layout (pooling / up-sampling after the conv;
    tests/data/make_ae_layout_fixtures.py) loads by shape but is refused by the reconstruction probe on held-out
    data; the shipped paper-layout cpu-demo AE passes it on the same images; random weights are refused."""
    data = os.path.join(os.path.dirname(__file__), "data")
    probe = np.load(os.path.join(data, "ae_probe_t1_2d.npy"))
    filters = contrareg_tf.config.get_preset("cpu-demo").ae_filters
    wrong = os.path.join(data, "ae_wrong_layout_2d.h5")
    ae.load_autoencoder(wrong, 2, filters=filters)                     # the shape check alone lets it through
    with pytest.raises(ContraRegInputError, match="ae_wrong_layout_2d.h5: in the paper autoencoder layout"):
        ae.load_autoencoder(wrong, 2, filters=filters, probe=probe)
    shipped = contrareg_tf.assets.shipped("ae_t1_cpu-demo.h5")
    model = ae.load_autoencoder(shipped, 2, filters=filters, probe=probe)
    # the probe's correlation is numpy's Pearson r of image and reconstruction
    rec = model(probe[..., None])[0].numpy()[..., 0]
    r = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(rec, probe)]
    np.testing.assert_allclose(ae.reconstruction_corr(model, probe), r, rtol=1e-5)
    assert min(r) >= contrareg_tf.config.AE_LAYOUT_MIN_CORR
    rand = ae.build_autoencoder(2, filters=filters, seed=3)
    rand.save_weights(str(tmp_path / "random.h5"))                     # a file written elsewhere
    with pytest.raises(ContraRegInputError, match="random.h5"):
        ae.load_autoencoder(str(tmp_path / "random.h5"), 2, filters=filters, probe=probe)
    # a file this package wrote is in its layout by construction (however briefly trained): not probed
    path = ae.save_autoencoder(rand, tmp_path / "ours.h5")
    assert ae.written_here(path) and not ae.written_here(shipped)
    ae.load_autoencoder(path, 2, filters=filters, probe=probe)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failing save (full disk, Ctrl-C) leaves the previous file whole and no temporary file."""
    path = ae.save_autoencoder(ae.build_autoencoder(2, seed=1), tmp_path / "a1.h5")
    before = open(path, "rb").read()
    model = ae.build_autoencoder(2, seed=2)

    def boom(p, *a, **k):
        open(p, "wb").write(b"partial")
        raise OSError("No space left on device")
    monkeypatch.setattr(model, "save_weights", boom)
    with pytest.raises(OSError):
        ae.save_autoencoder(model, path)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["a1.h5"]


def test_training_refuses_a_wrong_layout_autoencoder():
    """The registration trainer probes each autoencoder file with its training images (setup_registration hands
    build_components the first AE_LAYOUT_PROBES of each modality)."""
    from contrareg_tf.training.registration import build_components

    data = os.path.join(os.path.dirname(__file__), "data")
    probe = np.load(os.path.join(data, "ae_probe_t1_2d.npy"))
    cfg = contrareg_tf.config.get_preset("cpu-demo")
    wrong, t2 = os.path.join(data, "ae_wrong_layout_2d.h5"), contrareg_tf.assets.shipped("ae_t2_cpu-demo.h5")
    with pytest.raises(ContraRegInputError, match="ae_wrong_layout_2d.h5: in the paper autoencoder layout"):
        build_components(cfg, "cr", wrong, t2, probes=(probe, None))
