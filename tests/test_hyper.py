"""λ-conditioned VxmDense (contrareg_tf/networks/hyper.py) and the FiLM layer (networks/layers.py)."""
import numpy as np
import pytest
import scipy.ndimage as ndi
import tensorflow as tf

import contrareg_tf
from contrareg_tf import PAPER, ContraRegInputError, get_preset
from contrareg_tf.networks import hyper
from contrareg_tf.networks.layers import FiLM, NearestUpsample

import voxelmorph as vxm
from voxelmorph.tf import networks as vxm_networks

pytestmark = pytest.mark.filterwarnings("ignore:non-integer arguments to randrange")

SHAPE2 = (32, 32)


def tiny(conditioning="film", ch=4, levels=3, ts=5, shape=SHAPE2, seed=0, **kw):
    tf.keras.utils.set_random_seed(seed)
    return hyper.FiLMVxmDense(shape, ch=ch, nb_levels=levels, int_steps=ts, hyp_units=16,
                              conditioning=conditioning, **kw)


def scale_flow_layer(model, std=0.5, seed=1):
    """Re-draw the (1e-5-initialised) flow conv so warps are visibly non-zero."""
    layer = model.get_layer(f"{model.name}_flow")
    k, b = layer.get_weights()
    layer.set_weights([np.random.default_rng(seed).normal(0, std, k.shape).astype(np.float32), b])


@pytest.fixture(scope="module")
def _shared():
    model = tiny()
    scale_flow_layer(model)
    return model, model.get_weights()


@pytest.fixture
def film_model(_shared):
    """A tiny 2-D FiLM model (flow conv re-drawn) shared by the tests; weights restored after each test."""
    model, weights = _shared
    yield model
    model.set_weights(weights)


def run(model, *inputs):
    """Eager forward pass (no per-model predict() tracing: keeps the tests fast)."""
    out = model([tf.constant(np.asarray(a, np.float32)) for a in inputs], training=False)
    return [o.numpy() for o in out]


def lam_arr(value, b=1):
    return np.full((b, 1), value, np.float32)


def blobs(shape, n=2, seed=0):
    rng = np.random.default_rng(seed)
    x = ndi.gaussian_filter(rng.random((n,) + shape), sigma=(0,) + (2.5,) * len(shape))
    x = (x - x.min()) / (x.max() - x.min())
    return x[..., None].astype(np.float32)


# ------------------------------------------------------------------------------------------------ FiLM op
@pytest.mark.parametrize("vol", [(5, 6), (3, 4, 5)])
def test_film_op_matches_numpy(vol):
    rng = np.random.default_rng(0)
    c = 3
    x = rng.normal(size=(2,) + vol + (c,)).astype(np.float32)
    gb = rng.normal(size=(2, 2 * c)).astype(np.float32)
    out = FiLM()([tf.constant(x), tf.constant(gb)]).numpy()
    expect = np.empty_like(x)
    for b in range(2):
        for ch in range(c):
            expect[b, ..., ch] = (1 + gb[b, ch]) * x[b, ..., ch] + gb[b, c + ch]
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)


def test_film_rejects_wrong_projection_width():
    with pytest.raises(ContraRegInputError, match="expected 2 x 3"):
        FiLM()([tf.zeros((1, 4, 4, 3)), tf.zeros((1, 5))])


# ------------------------------------------------------------------------------------------------ structure
def test_film_blocks_regularised_bias_free_and_restored(film_model):
    model = film_model
    assert vxm_networks._conv_block.__name__ == "_conv_block"      # vxm's own block is back after building
    blocks = model.references.film_blocks
    assert len(blocks) == 2 * (3 - 1) + 3                # enc + dec + 3 full-res convs of vxm's topology
    rng = np.random.default_rng(3)
    expect_loss = 0.0
    for blk in blocks:
        dense, conv = blk["dense"], blk["conv"]
        assert not conv.use_bias
        assert dense.units == 2 * conv.filters
        assert dense.kernel_regularizer.get_config()["l2"] == pytest.approx(PAPER.film_l2)
        assert dense.bias_regularizer.get_config()["l2"] == pytest.approx(PAPER.film_l2)
        k, b = dense.get_weights()
        b = rng.normal(size=b.shape).astype(np.float32)       # non-zero biases so the bias term counts
        dense.set_weights([k, b])
        expect_loss += PAPER.film_l2 * (np.sum(k.astype(np.float64) ** 2) + np.sum(b.astype(np.float64) ** 2))
        assert blk["film"] in model.layers
    assert len(model.losses) == 2 * len(blocks)
    np.testing.assert_allclose(float(tf.add_n(model.losses)), expect_loss, rtol=1e-5)
    # hypernetwork: 4 x 128 relu in the paper, here hyp_units=16
    hyp = [l for l in model.references.hyp_model.layers if isinstance(l, tf.keras.layers.Dense)]
    assert [l.units for l in hyp] == [16] * PAPER.hyp_layers
    assert all(l.activation is tf.keras.activations.relu for l in hyp)


def test_block_patches_restored_on_error():
    original = vxm_networks._conv_block, vxm_networks._upsample_block
    with pytest.raises(RuntimeError):
        with hyper._vxm_blocks(lambda *a, **k: None):
            assert vxm_networks._conv_block is not original[0]
            assert vxm_networks._upsample_block is not original[1]
            raise RuntimeError("boom")
    assert (vxm_networks._conv_block, vxm_networks._upsample_block) == original


@pytest.mark.parametrize("vol, factor", [((3, 4), 2), ((2, 3, 4), 2), ((5,), 3)])
def test_nearest_upsample_matches_numpy_repeat(vol, factor):
    x = np.random.default_rng(0).random((2,) + vol + (3,)).astype(np.float32)
    expect = x
    for axis in range(1, len(vol) + 1):
        expect = np.repeat(expect, factor, axis=axis)
    got = NearestUpsample(factor)(tf.constant(x)).numpy()
    np.testing.assert_array_equal(got, expect)


def test_xla_compiles_2d_training_gradient():
    """``--xla`` on a 2-D model: Keras' UpSampling2D gradient (ResizeNearestNeighborGrad) has no XLA kernel;
    with NearestUpsample the jit-compiled gradient exists and equals the graph-mode one."""
    model = tiny(levels=2, ts=2, shape=(16, 16))
    scale_flow_layer(model)
    x = blobs((16, 16), 2)
    inputs = [tf.constant(x[:1]), tf.constant(x[1:]), tf.constant(lam_arr(0.3))]

    def grads():
        with tf.GradientTape() as tape:
            ys, yt, v = model(inputs, training=True)
            loss = tf.reduce_mean(tf.square(ys - inputs[1])) + tf.reduce_mean(tf.square(v))
        return tape.gradient(loss, model.trainable_variables)

    plain = tf.function(grads)()
    jitted = tf.function(grads, jit_compile=True)()
    assert len(plain) == len(jitted) and all(g is not None for g in jitted)
    for a, b in zip(plain, jitted):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------------------ behaviour
def test_lambda_changes_warp_only_through_film(film_model):
    model = film_model
    x = blobs(SHAPE2, 2)
    src, trg = x[:1], x[1:]
    reg = model.get_registration_model()
    f0 = run(reg, src, trg, lam_arr(0))[1]
    f1 = run(reg, src, trg, lam_arr(1))[1]
    assert np.abs(f0).mean() > 1e-3
    assert np.abs(f0 - f1).mean() > 0.05 * np.abs(f0).mean()
    # zero every FiLM projection kernel: γ, β no longer depend on λ → identical warps
    for blk in model.references.film_blocks:
        k, b = blk["dense"].get_weights()
        blk["dense"].set_weights([np.zeros_like(k), b])
    g0 = run(reg, src, trg, lam_arr(0))[1]
    g1 = run(reg, src, trg, lam_arr(1))[1]
    np.testing.assert_allclose(g0, g1, atol=1e-7)


def test_outputs_and_bidirectional_uses_negative_velocity(film_model):
    model = film_model
    assert [tuple(o.shape[1:]) for o in model.outputs] == [SHAPE2 + (1,), SHAPE2 + (1,), (16, 16, 2)]
    x = blobs(SHAPE2, 2, seed=4)
    src, trg = x[:1], x[1:]
    lam = np.full((1, 1), 0.3, np.float32)
    y_src, y_trg, v = run(model, src, trg, lam)
    assert np.abs(v).max() > 0.05
    # independent path with fresh vxm layers: φ⁻¹ = exp(−v), integrated at half resolution, upsampled ×2
    neg = vxm.layers.RescaleTransform(2)(vxm.layers.VecInt(method="ss", int_steps=5)(tf.constant(-v)))
    pos = vxm.layers.RescaleTransform(2)(vxm.layers.VecInt(method="ss", int_steps=5)(tf.constant(v)))
    y_trg_ref = vxm.layers.SpatialTransformer(indexing="ij")([tf.constant(trg), neg]).numpy()
    y_src_ref = vxm.layers.SpatialTransformer(indexing="ij")([tf.constant(src), pos]).numpy()
    np.testing.assert_allclose(y_trg, y_trg_ref, atol=1e-5)
    np.testing.assert_allclose(y_src, y_src_ref, atol=1e-5)
    assert np.abs(y_trg - trg).max() > 1e-3                      # the warp actually did something
    _, pf, nf = run(model.get_registration_model(), src, trg, lam)
    np.testing.assert_allclose(pf, pos.numpy(), atol=1e-5)
    np.testing.assert_allclose(nf, neg.numpy(), atol=1e-5)


def test_integration_inverse_consistency(film_model):
    """φ∘φ⁻¹ ≈ id for a smooth random velocity pushed through the model's own integration layers (ts=5)."""
    model = film_model
    rng = np.random.default_rng(0)
    v = ndi.gaussian_filter(rng.normal(size=(1, 16, 16, 2)), sigma=(0, 3, 3, 0))
    v = (v / np.abs(v).max() * 1.5).astype(np.float32)            # ≤ 1.5 voxels at half res (3 at full)
    pos, neg = (t.numpy()[0] for t in model.integrate(v))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE2], indexing="ij"), -1).astype(np.float64)
    loc = grid + pos
    neg_at = np.stack([ndi.map_coordinates(neg[..., d], np.moveaxis(loc, -1, 0), order=1, mode="nearest")
                       for d in range(2)], -1)
    resid = np.linalg.norm(pos + neg_at, axis=-1)[6:-6, 6:-6]
    mag = np.linalg.norm(pos, axis=-1)[6:-6, 6:-6]
    assert mag.max() > 1.5
    assert resid.max() < 0.05 and resid.mean() < 0.01 * mag.mean()


def test_3d_tiny_forward():
    model = tiny(shape=(16, 16, 16), ch=4, levels=3, ts=3)
    x = blobs((16, 16, 16), 2)
    out = run(model, x[:1], x[1:], lam_arr(0.5))
    assert [o.shape for o in out] == [(1, 16, 16, 16, 1), (1, 16, 16, 16, 1), (1, 8, 8, 8, 3)]
    assert all(np.all(np.isfinite(o)) for o in out)


def test_hyperconv_option_builds_runs_and_is_lambda_conditioned():
    model = tiny("hyperconv")
    assert model.references.film_blocks == []
    assert any(isinstance(l, __import__("neurite").layers.HyperConv2DFromDense) for l in model.layers)
    scale_flow_layer(model)
    x = blobs(SHAPE2, 2)
    outs = [run(model, x[:1], x[1:], lam_arr(l)) for l in (0.0, 1.0)]
    assert [o.shape for o in outs[0]] == [(1, 32, 32, 1), (1, 32, 32, 1), (1, 16, 16, 2)]
    assert not np.allclose(outs[0][2], outs[1][2])


# ------------------------------------------------------------------------------------------------ helpers
def test_register_broadcasts_lambdas_and_validates(film_model):
    model = film_model
    x = blobs(SHAPE2, 2)
    moved, pf, nf = hyper.register(model, x[0, ..., 0], x[1], [0.0, 0.5, 1.0])
    assert moved.shape == (3, 32, 32, 1) and pf.shape == nf.shape == (3, 32, 32, 2)
    # each row equals the single-λ call; moved = moving∘φ with vxm's transformer
    m1, p1, _ = model.register(x[:1], x[1:], 0.5)
    np.testing.assert_allclose(pf[1:2], p1, atol=1e-6)
    np.testing.assert_allclose(hyper.warp(x[:1], p1), m1, atol=1e-5)
    for bad in (-0.1, 1.5, float("nan"), [0.2, 2.0]):
        with pytest.raises(ContraRegInputError, match="lam"):
            hyper.register(model, x[0], x[1], bad)
    with pytest.raises(ContraRegInputError, match="moving"):
        hyper.register(model, np.zeros((30, 32)), x[1], 0.1)
    with pytest.raises(ContraRegInputError, match="broadcast"):
        hyper.register(model, x, x[:1], [0.1, 0.2, 0.3])


def test_bad_shapes_and_options():
    with pytest.raises(ContraRegInputError, match="divisible by 4"):
        hyper.FiLMVxmDense((30, 32), ch=4, nb_levels=3)
    with pytest.raises(ContraRegInputError, match="divisible by 16"):
        hyper.FiLMVxmDense((160, 200, 168), ch=4, nb_levels=5)
    with pytest.raises(ContraRegInputError, match="conditioning"):
        hyper.FiLMVxmDense((32, 32), ch=4, nb_levels=3, conditioning="concat")
    with pytest.raises(ContraRegInputError, match="2 or 3"):
        hyper.FiLMVxmDense((32,), ch=4, nb_levels=3)


def test_warp_nearest_labels_and_linear_against_numpy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(1, 12, 10)).astype(np.int16)
    u = np.zeros((1, 12, 10, 2), np.float32)
    u[..., 0], u[..., 1] = 1.0, -2.0                        # φ(x) = x + (1, −2)
    out = hyper.warp(labels, u, interp="nearest")
    assert out.dtype == np.int16 and out.shape == labels.shape
    i, j = np.meshgrid(np.arange(12), np.arange(10), indexing="ij")
    expect = labels[0][np.clip(i + 1, 0, 11), np.clip(j - 2, 0, 9)]      # border: nearest value
    np.testing.assert_array_equal(out[0], expect)
    img = rng.random((12, 10, 1)).astype(np.float32)
    uh = np.zeros((12, 10, 2), np.float32)
    uh[..., 1] = 0.5
    lin = hyper.warp(img, uh)
    np.testing.assert_allclose(lin[:, :-1, 0], 0.5 * (img[:, :-1, 0] + img[:, 1:, 0]), atol=1e-6)
    with pytest.raises(ContraRegInputError, match="does not match"):
        hyper.warp(img, np.zeros((1, 12, 10, 2), np.float32))
    with pytest.raises(ContraRegInputError, match="interp"):
        hyper.warp(img, uh, interp="cubic")


# ------------------------------------------------------------------------------------------------ I/O
def test_h5_roundtrip_and_wrong_topology(film_model, tmp_path):
    a = film_model
    rng = np.random.default_rng(7)
    a.set_weights([w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in a.get_weights()])
    path = tmp_path / "reg.h5"
    a.save_weights(str(path))
    b = tiny(seed=1)
    x = blobs(SHAPE2, 2)
    inp = [x[:1], x[1:], lam_arr(0.25)]
    assert not np.allclose(run(a, *inp)[2], run(b, *inp)[2])
    hyper.load_registration_weights(b, path)
    for pa, pb in zip(run(a, *inp), run(b, *inp)):
        np.testing.assert_array_equal(pa, pb)
    with pytest.raises(ContraRegInputError, match=r"expected shape \(\d+, \d+(, \d+)*\), found \("):
        hyper.load_registration_weights(tiny(ch=8, ts=0), path)
    with pytest.raises(ContraRegInputError, match="not an HDF5"):
        bad = tmp_path / "x.h5"
        bad.write_text("hello")
        hyper.load_registration_weights(b, bad)


# ------------------------------------------------------------------------------------------------ paper size
def _expected_params(ch, L, ndim, hyp_layers, hyp_units, k=3):
    """Independent count of the FiLM VxmDense parameters (vxm default topology, constant width)."""
    kv = k ** ndim
    enc = [2] + [ch] * (L - 2)                                  # input channels of the encoder convs
    dec = [ch] + [2 * ch] * (L - 2)                             # decoder: bottleneck, then concat(up, skip)
    fin = [2 * ch, ch, ch]                                      # 3 full-res convs (first after last concat)
    convs = sum(kv * c_in * ch for c_in in enc + dec + fin)     # bias-free (FiLM's β is the bias)
    film = len(enc + dec + fin) * (hyp_units * 2 * ch + 2 * ch)
    hyp = (1 * hyp_units + hyp_units) + (hyp_layers - 1) * (hyp_units * hyp_units + hyp_units)
    flow = kv * ch * ndim + ndim
    return convs + film + hyp + flow


@pytest.mark.parametrize("preset", ["paper", pytest.param("paper-ch256", marks=pytest.mark.slow)])
def test_paper_configuration_builds_graph_only(preset, capsys):
    cfg = get_preset(preset)
    model = hyper.build_hyper_vxm(cfg)
    n = model.count_params()
    assert n == _expected_params(cfg.ch, cfg.nb_levels, 3, cfg.hyp_layers, cfg.hyp_units)
    hyp = sum(l.count_params() for l in model.references.hyp_model.layers)
    film = sum(b["dense"].count_params() for b in model.references.film_blocks)
    assert [tuple(o.shape[1:]) for o in model.outputs] == [
        cfg.inshape + (1,), cfg.inshape + (1,), tuple(s // 2 for s in cfg.inshape) + (3,)]
    with capsys.disabled():
        print(f"\n[{preset}] FiLMVxmDense {cfg.inshape} ch={cfg.ch} L={cfg.nb_levels} ts={cfg.int_steps}: "
              f"{n:,} parameters (hypernetwork MLP {hyp:,} + FiLM projections {film:,})")
