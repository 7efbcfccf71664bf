"""MASR-Net / DNS layout / BlurPool / contrastive loss / save-load / training script (networks/masr.py,
train_scripts/train_dns.py). Numerics are checked against numpy/scipy transcriptions written here."""
import importlib.util
import itertools
import json
import os

import numpy as np
import pytest
import scipy.ndimage as ndi
import tensorflow as tf

from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.networks import masr
from contrareg_tf.training import masr as tmasr, train_masr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ numpy references
def np_neighbours(ndim, r):
    """[+r e0, -r e0, +r e1, -r e1, ...] (the documented order)."""
    out = []
    for k in range(ndim):
        for s in (1, -1):
            o = np.zeros(ndim, int)
            o[k] = s * r
            out.append(o)
    return out


def np_pairs(ndim, r):
    """Pairs of axis neighbours whose distance is sqrt(2)·r, in combinations order."""
    nb = np_neighbours(ndim, r)
    return [(a, b) for a, b in itertools.combinations(nb, 2)
            if np.isclose(np.sum((a - b) ** 2), 2 * r * r)]


def np_shift(h, o, r):
    """h(x + o) with edge replication; h: (B, *vol, C)."""
    ndim = h.ndim - 2
    hp = np.pad(h, [(0, 0)] + [(r, r)] * ndim + [(0, 0)], mode="edge")
    sl = tuple([slice(None)] + [slice(r + oi, r + oi + n) for oi, n in zip(o, h.shape[1:-1])] + [slice(None)])
    return hp[sl]


def np_dns_layout(h, r):
    """Eq. 1 with the documented σ² clamp: (B, *vol, C) -> (B, *vol, C, P)."""
    h = h.astype(np.float64)
    ndim = h.ndim - 2
    d = np.stack([(np_shift(h, a, r) - np_shift(h, b, r)) ** 2 for a, b in np_pairs(ndim, r)], -1)
    var = d.mean(-1, keepdims=True)
    gm = var.mean(axis=tuple(range(1, ndim + 1)), keepdims=True)
    var = np.maximum(np.clip(var, 1e-3 * gm, 1e3 * gm), 1e-12)
    return np.exp(-d / var)


def np_infonce(d, d2, tau):
    """Eq. 4, mean over i: −log( e^{p_i} / (e^{p_i} + Σ_{j≠i} e^{n_ij}) )."""
    d = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-7)     # the library's one L2 rule: x / (‖x‖ + 1e-7)
    d2 = d2 / (np.linalg.norm(d2, axis=1, keepdims=True) + 1e-7)
    sim = d @ d2.T / tau
    out = []
    for i in range(len(d)):
        pos = sim[i, i]
        neg = np.delete(sim[i], i)
        m = max(pos, neg.max())
        out.append(-(pos - m) + np.log(np.exp(pos - m) + np.exp(neg - m).sum()))
    return float(np.mean(out))


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("ndim,count", [(2, 4), (3, 12)])
def test_layout_pairs_count_and_distance(ndim, count):
    for r in (1, 2, 3):
        pairs = masr.layout_pairs(ndim, r)
        assert len(pairs) == count
        ref = {(tuple(a), tuple(b)) for a, b in np_pairs(ndim, r)}
        assert {(tuple(a), tuple(b)) for a, b in pairs} == ref
        for a, b in pairs:
            assert np.isclose(np.linalg.norm(np.subtract(a, b)), np.sqrt(2) * r)
            assert np.count_nonzero(a) == 1 and np.count_nonzero(b) == 1   # no centre


@pytest.mark.parametrize("shape", [(2, 12, 10, 3), (1, 8, 9, 7, 2)])
@pytest.mark.parametrize("r", [1, 2])
def test_dns_layout_matches_numpy(shape, r):
    rng = np.random.default_rng(1)
    h = rng.normal(size=shape).astype(np.float32)
    got = masr.dns_layout(tf.constant(h), r).numpy()
    ref = np_dns_layout(h, r)
    assert got.shape == ref.shape == shape + (12 if len(shape) == 5 else 4,)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    assert (got > 0).all() and (got <= 1).all()


def test_dns_layout_clamp_on_flat_region():
    """Half the image constant: σ² hits the lower clamp there (and at the border); no NaN, matches numpy."""
    rng = np.random.default_rng(2)
    h = rng.normal(size=(1, 16, 16, 2)).astype(np.float32)
    h[:, :8] = 0.3
    h[:, 8:9] += 1e-4 * rng.normal(size=(1, 1, 16, 2)).astype(np.float32)
    got = masr.dns_layout(tf.constant(h), 1).numpy()
    ref = np_dns_layout(h, 1)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got[:, :6], 1.0)                 # deep inside the flat half: d = 0 → S = 1


def test_dns_layout_constant_features_is_one():
    got = masr.dns_layout(tf.fill((1, 8, 8, 8, 3), 2.0), 2).numpy()
    np.testing.assert_allclose(got, 1.0)


def test_dns_layout_bad_input():
    with pytest.raises(ContraRegInputError, match="spatial dims"):
        masr.dns_layout(tf.zeros((4, 3)), 1)
    with pytest.raises(ContraRegInputError, match="radius"):
        masr.dns_layout(tf.zeros((1, 8, 8, 1)), 0)


# ------------------------------------------------------------------------------------------ BlurPool / up
@pytest.mark.parametrize("shape", [(2, 16, 12, 3), (1, 8, 10, 6, 2), (1, 9, 7, 1)])
def test_blurpool_matches_numpy(shape):
    x = np.random.default_rng(3).random(shape).astype(np.float32)
    ref = x.astype(np.float64)
    for ax in range(1, len(shape) - 1):   # [1,2,1]/4, reflect padding without edge repeat (scipy 'mirror')
        ref = ndi.correlate1d(ref, np.array([1, 2, 1]) / 4.0, axis=ax, mode="mirror")
    ref = ref[(slice(None),) + (slice(None, None, 2),) * (len(shape) - 2)]
    got = masr.blur_pool(tf.constant(x)).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_blurpool_preserves_constant_and_lowpasses_checkerboard():
    c = masr.blur_pool(tf.fill((1, 8, 8, 8, 1), 0.7)).numpy()
    np.testing.assert_allclose(c, 0.7, rtol=1e-6)
    i, j = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    cb = ((i + j) % 2).astype(np.float32)[None, ..., None]
    out = masr.blur_pool(tf.constant(cb)).numpy()
    # naive stride-2 subsampling would return all zeros (aliasing); the binomial filter gives the mean
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_upsample_linear_matches_peers():
    x2 = np.random.default_rng(4).random((2, 4, 6, 3)).astype(np.float32)
    ref2 = tf.image.resize(x2, (8, 12), method="bilinear").numpy()          # half-pixel centres
    np.testing.assert_allclose(masr.upsample_linear(tf.constant(x2)).numpy(), ref2, atol=1e-6)
    x3 = np.random.default_rng(5).random((1, 4, 6, 3, 1)).astype(np.float32)
    ref3 = ndi.zoom(x3[0, ..., 0], 2, order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(masr.upsample_linear(tf.constant(x3)).numpy()[0, ..., 0], ref3, atol=1e-6)


# ------------------------------------------------------------------------------------------- network
@pytest.fixture(scope="module")
def models():
    tf.keras.utils.set_random_seed(0)
    return {2: masr.build_masr(2), 3: masr.build_masr(3)}


@pytest.mark.parametrize("ndim,shape", [(2, (2, 32, 24)), (3, (1, 16, 16, 24))])
def test_descriptor_shape_unit_norm(models, ndim, shape):
    x = np.random.default_rng(6).random(shape + (1,)).astype(np.float32)
    d = masr.dns_features(x, models[ndim]).numpy()
    assert d.shape == shape + (masr.DNS_DESC_CHANNELS,)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-5)
    assert np.isfinite(d).all()


def test_model_topology(models):
    m = models[3]
    assert m.masr_config == masr.masr_config(3)
    # 4 resolution levels: three BlurPools (max stride 8) and three up-samplings
    assert sum(isinstance(l, masr.BlurPool) for l in m.layers) == 3
    assert sum(isinstance(l, masr.LinearUpsample) for l in m.layers) == 3
    assert m.references.features.shape[-1] == masr.DNS_FEAT_CHANNELS
    assert m.references.dns.shape[-1] == masr.DNS_FEAT_CHANNELS * 24
    assert m.references.squeezed.shape[-1] == 24
    assert m.get_layer("masr_squeeze").kernel.shape == (1, 1, 1, 4 * 24, 24)     # linear 1x1 squeeze
    assert m.get_layer("masr_head0").kernel.shape[:3] == (3, 3, 3)
    assert m.get_layer("masr_dns").radii == (1, masr.DNS_DILATION)
    assert models[2].references.dns.shape[-1] == masr.DNS_FEAT_CHANNELS * 8     # 2-D: 4 pairs per layout


def test_model_dns_stage_matches_numpy(models):
    """Inside the model, h^s = [DNS_1 | DNS_dilation] of the feature map, flattened channel-major."""
    m = models[2]
    sub = tf.keras.Model(m.inputs, [m.references.features, m.references.dns])
    x = np.random.default_rng(7).random((1, 16, 24, 1)).astype(np.float32)
    h, hs = (t.numpy() for t in sub(x))
    ref = np.concatenate([np_dns_layout(h, 1), np_dns_layout(h, masr.DNS_DILATION)], -1)
    np.testing.assert_allclose(hs, ref.reshape(ref.shape[:-2] + (-1,)), rtol=2e-4, atol=2e-5)


def test_image_checks(models):
    with pytest.raises(ContraRegInputError, match="divisible by 8"):
        masr.dns_features(np.zeros((1, 20, 16, 1), np.float32), models[2])
    with pytest.raises(ContraRegInputError, match="3-D"):
        masr.dns_features(np.zeros((1, 16, 16, 1), np.float32), models[3])
    bad = np.zeros((1, 16, 16, 1), np.float32)
    bad[0, 3, 3] = np.nan
    with pytest.raises(ContraRegInputError, match="NaN"):
        masr.dns_features(bad, models[2])
    with pytest.raises(ContraRegInputError, match="ndim"):
        masr.build_masr(4)


# -------------------------------------------------------------------------------------- contrastive loss
@pytest.mark.parametrize("n,c,tau", [(64, 24, 0.07), (200, 8, 0.5)])
def test_contrastive_loss_matches_numpy(n, c, tau):
    rng = np.random.default_rng(9)
    d = rng.normal(size=(n, c))
    d2 = d + 0.5 * rng.normal(size=(n, c))
    got = float(masr.contrastive_loss(tf.constant(d), tf.constant(d2), tau))      # float64 end to end
    assert got == pytest.approx(np_infonce(d, d2, tau), rel=1e-9, abs=1e-9)


def test_contrastive_loss_analytic_limits():
    eye = np.eye(8)
    # perfectly aligned orthonormal vectors: ℓ = −log(e^{1/τ} / (e^{1/τ} + 7))
    tau = 0.5
    want = -np.log(np.exp(1 / tau) / (np.exp(1 / tau) + 7))
    # (rel 1e-6: the L2 rule x / (‖x‖ + 1e-7) shrinks unit vectors by 1e-7, the logits by 2e-7)
    assert float(masr.contrastive_loss(tf.constant(eye), tf.constant(eye), tau)) == pytest.approx(want, rel=1e-6)
    # all vectors identical: every logit equal → log N
    same = np.ones((8, 4))
    assert float(masr.contrastive_loss(tf.constant(same), tf.constant(same), 0.07)) == pytest.approx(np.log(8))


# ------------------------------------------------------------------------------------------- save / load
def test_save_load_roundtrip_and_wrong_topology(tmp_path, models):
    x = np.random.default_rng(10).random((1, 16, 16, 1)).astype(np.float32)
    p = masr.save_masr(models[2], tmp_path / "m2.h5", card={"note": "x"})
    assert json.load(open(tmp_path / "m2.json"))["note"] == "x"
    m = masr.load_masr(p)
    np.testing.assert_allclose(m(x).numpy(), models[2](x).numpy(), atol=1e-6)
    # requested dimensionality / argument disagrees with the stored config
    with pytest.raises(ContraRegInputError, match=r"m2\.h5.*ndim=2.*ndim=3"):
        masr.load_masr(p, ndim=3)
    with pytest.raises(ContraRegInputError, match="dilation=2 but dilation=3"):
        masr.load_masr(p, dilation=3)
    # plain Keras weights (no stored config) of another topology
    other = masr.build_masr(2, widths=(4, 8, 16, 32))
    q = str(tmp_path / "plain.h5")
    other.save_weights(q)
    with pytest.raises(ContraRegInputError, match=r"plain\.h5: wrong topology: layer 0 'masr_enc0_conv0'"):
        masr.load_masr(q, ndim=2)
    assert masr.load_masr(q, ndim=2, widths=(4, 8, 16, 32)) is not None
    # weights of an unrelated model
    u = tf.keras.Sequential([tf.keras.layers.Dense(3, input_shape=(2,), name="dense_x")])
    r = str(tmp_path / "unrelated.h5")
    u.save_weights(r)
    with pytest.raises(ContraRegInputError, match=r"unrelated\.h5: wrong topology.*dense_x"):
        masr.load_masr(r, ndim=2)
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(ContraRegInputError, match=r"junk\.h5: not an HDF5 weights file"):
        masr.load_masr(tmp_path / "junk.h5")
    with pytest.raises(ContraRegInputError, match="not found"):
        masr.load_masr(tmp_path / "missing.h5")


# ---------------------------------------------------------------------------------------------- training
def test_bezier_augmentation_stays_in_unit_range():
    rng = np.random.default_rng(11)
    x = np.concatenate([np.zeros(10), np.ones(10), rng.random(1000)]).astype(np.float32)
    inverted = 0
    for _ in range(50):
        y = tmasr._bezier(x, rng)
        assert y.dtype == np.float32 and y.min() >= 0.0 and y.max() <= 1.0
        # monotone one-to-one remap (increasing, or decreasing when inverted)
        order = np.argsort(x[20:])
        dy = np.diff(y[20:][order])
        assert (dy >= -1e-6).all() or (dy <= 1e-6).all()
        inverted += int(dy.sum() < 0)
    assert 10 <= inverted <= 40          # inversion with p = 0.5


def test_train_masr_validates_input():
    with pytest.raises(ContraRegInputError, match=r"\[0, 1\]"):
        train_masr([np.full((16, 16), 2.0)], iters=1, progress=False)
    with pytest.raises(ContraRegInputError, match="empty"):
        train_masr([np.zeros((16, 16))], iters=1, progress=False)
    with pytest.raises(ContraRegInputError, match="divisible by 8"):
        train_masr([np.random.rand(12, 16)], iters=1, progress=False)


def test_train_masr_resume_is_exact(tmp_path):
    """On the shared loop: 4 steps straight == 2 steps, then --resume to 4 (same weights, same losses)."""
    rng = np.random.default_rng(0)
    imgs = [ndi.gaussian_filter(rng.random((16, 16)), 1).astype(np.float32) for _ in range(3)]
    imgs = [(x - x.min()) / (x.max() - x.min()) for x in imgs]
    kw = dict(num_samples=32, seed=5, progress=False, ckpt_every=2, build_kwargs=dict(widths=(4, 4, 8, 8)))
    m4, h4 = train_masr(imgs, iters=4, out=str(tmp_path / "a.h5"), **kw)
    _, h2 = train_masr(imgs, iters=2, out=str(tmp_path / "b.h5"), **kw)
    m_r, h_r = train_masr(imgs, iters=4, out=str(tmp_path / "b.h5"), resume=True, **kw)
    assert len(h2) == 2 and len(h_r) == 2
    np.testing.assert_allclose(h2 + h_r, h4, rtol=1e-5)
    for a, b in zip(m4.get_weights(), m_r.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert json.load(open(tmp_path / "b.json"))["iterations"] == 4
    assert os.path.isdir(tmp_path / "b_work" / "ckpt")


def _load_script():
    spec = importlib.util.spec_from_file_location("train_dns", os.path.join(REPO, "train_scripts", "train_dns.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_script_three_iterations(tmp_path, monkeypatch):
    """3 steps on the tiny 2-D proxy write a loadable .h5 + JSON card (the loss need not go down)."""
    monkeypatch.setenv("CONTRAREG_CACHE", str(tmp_path / "cache"))
    script = _load_script()
    out = str(tmp_path / "w" / "dns_tiny.h5")
    assert script.main(["--preset", "tiny2d", "--iters", "3", "--num-samples", "64", "--out", out,
                        "--no-progress"]) == 0
    card = json.load(open(out[:-3] + ".json"))
    assert card["iterations"] == 3 and card["preset"] == "tiny2d" and np.isfinite(card["final_loss"])
    assert card["num_samples"] == 64 and card["tau"] == masr.DNS_TAU and card["lr"] == masr.DNS_LR
    assert "built-in data icbm2009c" in card["data"] and card["modalities"] == ["t1", "t2"]
    assert "--iters 3" in card["command"] and card["model"] == masr.masr_config(2)
    m = masr.load_masr(out, ndim=2)
    d = m(np.random.rand(1, 32, 32, 1).astype(np.float32)).numpy()
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-5)
    # bad flags → one-line error, exit 2
    from contrareg_tf.cli import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(script.main, ["--preset", "tiny2d", "--out", str(tmp_path / "x.txt")])
    assert e.value.code == 2
