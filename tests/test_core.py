"""CoRe (--loss core): the equivariance InfoNCE (eq. 3) against a numpy transcription, its ordering for an
equivariant vs a random encoder, the JointSimilarity protocol in 2-D / 3-D, and a short training run."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from contrareg_tf.config import CORE, get_preset
from contrareg_tf.losses import core
from contrareg_tf.losses.joint import JointSimilarity
from contrareg_tf.networks.encoders import feature_encoder
from contrareg_tf.training.registration import setup_registration
from contrareg_tf.losses.similarity import build_similarity


def _np_infonce(u, v, tau):
    """Eq. 3 as written: each vector's positive is its partner, its negatives the other vectors of both sets."""
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    n, total = len(u), 0.0
    for a, b in ((u, v), (v, u)):
        for i in range(n):
            num = np.exp(a[i] @ b[i] / tau)
            den = sum(np.exp(a[i] @ b[k] / tau) for k in range(n)) + sum(
                np.exp(a[i] @ a[k] / tau) for k in range(n) if k != i)
            total += -np.log(num / den)
    return total / (2 * n)


def _affine_shift(mat, shape):
    return core.dense_shift(tf.constant(np.asarray(mat, np.float32)[None]), shape)


def test_infonce_matches_numpy_exact_rotation():
    """90° rotation about the centre: A(E(x)) is a voxel permutation; 20 foreground locations = the whole sample
    set (drawing more than 20 leaves the extra picks invalid: same value)."""
    rs = np.random.default_rng(0)
    shape, c = (8, 8), 3.5
    feat = rs.normal(size=(1, *shape, 5)).astype(np.float32)
    feat_aug = rs.normal(size=(1, *shape, 5)).astype(np.float32)
    mask = np.zeros((1, *shape), bool)
    mask.reshape(-1)[rs.choice(64, 20, replace=False)] = True
    mat = [[0, -1, 0], [1, 0, 0]]
    shift = _affine_shift(mat, shape)
    pts = np.argwhere(mask[0])
    src = np.rint((pts - c) @ np.array(mat)[:, :2].T + c).astype(int)       # T(p) = M (p − c) + c
    want = _np_infonce(feat_aug[0][tuple(pts.T)], feat[0][tuple(src.T)], CORE.tau)
    for ns in (20, 50):
        got = core.equivariance_infonce(tf.constant(feat_aug), tf.constant(feat), shift, tf.constant(mask),
                                        num_samples=ns, tau=CORE.tau, seed=3)
        np.testing.assert_allclose(got.numpy()[0], want, rtol=1e-4)


def test_infonce_matches_numpy_general_affine():
    """Rotation + scale + translation, warped features by scipy (order 1); interior locations only."""
    rs = np.random.default_rng(1)
    shape, c = (7, 9), np.array([3.0, 4.0])
    feat = rs.normal(size=(1, *shape, 4)).astype(np.float32)
    feat_aug = rs.normal(size=(1, *shape, 4)).astype(np.float32)
    th, s = np.deg2rad(17.0), 0.9
    m = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    t = np.array([0.4, -0.7])
    shift = _affine_shift(np.concatenate([m, t[:, None]], 1), shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 2)
    loc = (grid - c) @ m.T + c + t
    inside = np.all((loc >= -1e-5) & (loc <= np.array(shape) - 1 + 1e-5), 1)
    assert 20 < inside.sum() < 63
    warped = np.stack([ndimage.map_coordinates(feat[0, ..., k], loc[inside].T, order=1) for k in range(4)], 1)
    want = _np_infonce(feat_aug[0].reshape(-1, 4)[inside], warped, 0.2)
    got = core.equivariance_infonce(tf.constant(feat_aug), tf.constant(feat), shift, num_samples=100, tau=0.2,
                                    seed=5)
    np.testing.assert_allclose(got.numpy()[0], want, rtol=1e-4)


def test_random_affine_ranges():
    cfg = dataclasses.replace(CORE, scale=0.0, shear=0.0, translate=0.0)
    mat = core.random_affine(tf.random.Generator.from_seed(0), 64, (16, 16), cfg).numpy()
    np.testing.assert_allclose(mat[..., :2] @ np.swapaxes(mat[..., :2], 1, 2), np.broadcast_to(np.eye(2), (64, 2, 2)),
                               atol=1e-5)                       # pure rotations
    ang = np.degrees(np.abs(np.arctan2(mat[:, 1, 0], mat[:, 0, 0])))
    assert ang.max() <= cfg.rot_deg + 1e-3 and ang.max() > 0.5 * cfg.rot_deg
    full = core.random_affine(tf.random.Generator.from_seed(1), 64, (16, 20), CORE).numpy()
    assert np.all(np.abs(full[:, :, 2]) <= CORE.translate * np.array([16, 20]) + 1e-5)


def _smooth_image(rs, shape):
    x = ndimage.gaussian_filter(rs.random(shape), 2.0)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def test_equivariant_encoder_scores_lower():
    """A pointwise encoder (Fourier features of the intensity: commutes with any warp, and distinct intensities
    get distinct directions, unlike the image repeated, whose vectors all point the same way) vs a randomly
    initialised convolutional encoder (oriented kernels: not equivariant to a rotation)."""
    rs = np.random.default_rng(2)
    x = tf.constant(np.stack([_smooth_image(rs, (24, 24)) for _ in range(2)])[..., None])
    pointwise = lambda im: tf.concat([f(2 * np.pi * k * im) for k in (1, 2, 3) for f in (tf.cos, tf.sin)], -1)
    tf.keras.utils.set_random_seed(0)
    conv = feature_encoder(2, (8, 8), 6, norm=False)
    shift = tf.concat([_affine_shift([[0, -1, 0], [1, 0, 0]], (24, 24))] * 2, 0)
    aug = core.ops.warp(x, shift)
    losses = {name: core.equivariance_infonce(enc(aug), enc(x), shift, num_samples=200, seed=0).numpy()
              for name, enc in (("pointwise", pointwise), ("conv", conv))}
    assert np.all(losses["pointwise"] < losses["conv"] - 0.5), losses


@pytest.mark.parametrize("preset", ["tiny2d", "tiny3d"])
def test_protocol_terms_and_gradients(preset):
    cfg = get_preset(preset)
    sim = build_similarity("core", cfg, seed=tf.random.Generator.from_seed(0))
    assert set(sim.checkpoint_items()) == {"core_enc1", "core_enc2"}
    # satisfies the protocol by structure, without inheriting from it
    assert isinstance(sim.d12, JointSimilarity) and JointSimilarity not in type(sim.d12).__mro__
    rs = np.random.default_rng(0)
    shape = (2, *cfg.inshape, 1)
    i1, i2 = (tf.constant(_smooth_image(rs, shape)) for _ in range(2))
    moved2, moved1 = (tf.Variable(_smooth_image(rs, shape)) for _ in range(2))
    with tf.GradientTape() as tape:
        terms = sim.training_terms({"img1": i1, "img2": i2}, moved2, moved1, None, None)
        loss = tf.reduce_sum(terms["sim"])
    for k in ("d12", "d21", "sim"):
        assert terms[k].shape == (2,) and np.all(np.isfinite(terms[k].numpy()))
    grads = tape.gradient(loss, sim.trainable_variables + [moved1, moved2])
    assert len(sim.trainable_variables) > 0 and all(g is not None for g in grads)
    for enc in sim.checkpoint_items().values():      # each encoder gets a nonzero gradient
        assert any(float(tf.reduce_max(tf.abs(gr))) > 0 for gr, v in zip(grads, sim.trainable_variables)
                   if any(v is w for w in enc.trainable_variables))
    assert float(tf.reduce_max(tf.abs(grads[-1]))) > 0     # the warp is what the similarity drives
    out = sim(i1, i2, moved2, moved1)                       # the evaluation-style call
    assert out["sim"].shape == (2,) and np.all(np.isfinite(out["sim"].numpy()))


def test_fixed_side_is_stop_gradient_and_shared_option():
    """With the InfoNCE off, d12 = D(sg[E1(I1)], E2(I2∘φ)) gives E1 no gradient and E2 one (and d21 the reverse);
    ``shared_encoder`` = one encoder, one checkpoint item."""
    rs = np.random.default_rng(3)
    obj = core.CoRe(2, dataclasses.replace(CORE, equiv_weight=0.0, num_samples=64), seed=0)
    i1, i2, m2, m1 = (tf.constant(_smooth_image(rs, (2, 16, 16, 1))) for _ in range(4))
    e1, e2 = obj.encoders["core_enc1"], obj.encoders["core_enc2"]
    with tf.GradientTape(persistent=True) as tape:
        d12, d21 = obj.pair_terms({"img1": i1, "img2": i2}, m2, m1)
    for d, frozen, live in ((d12, e1, e2), (d21, e2, e1)):
        g_frozen = tape.gradient(d, frozen.trainable_variables)
        g_live = tape.gradient(d, live.trainable_variables)
        assert all(g is None or float(tf.reduce_max(tf.abs(g))) == 0.0 for g in g_frozen)
        assert any(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in g_live)
    shared = core.CoRe(2, dataclasses.replace(CORE, shared_encoder=True, num_samples=64), seed=0)
    assert list(shared.checkpoint_items()) == ["core_enc"]
    d12, d21 = shared.pair_terms({"img1": i1, "img2": i2}, m2, m1)
    assert np.all(np.isfinite(d12.numpy())) and np.all(np.isfinite(d21.numpy()))


@pytest.mark.slow
def test_end_to_end_three_steps(tmp_path):
    rs = np.random.default_rng(0)
    arrays = {k: np.stack([_smooth_image(rs, (32, 32)) for _ in range(4)]) for k in ("t1", "t2")}
    arrays.update(mask1=arrays["t1"] > 0.1, mask2=arrays["t2"] > 0.1)
    s = setup_registration(get_preset("tiny2d"), "core", arrays)
    for k in range(3):
        out = s.step(s.sampler.batch(k))
        assert all(np.isfinite(float(v)) for v in out.values()), out
    path = s.ckpt.save(str(tmp_path / "ckpt"))
    names = [n for n, _ in tf.train.list_variables(path)]
    for enc in ("core_enc1", "core_enc2"):
        assert any(n.startswith(enc + "/") for n in names), enc
