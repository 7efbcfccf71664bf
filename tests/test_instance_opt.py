"""Instance optimisation (contrareg_tf.instance_opt) and its CLI (eval_scripts/instance_opt.py).

Synthetic multi-modal pairs: a label phantom rendered with two different intensity tables (so no single
intensity mapping relates fixed and moving), moving = fixed anatomy warped by a known smooth field
(scipy map_coordinates). Dice is computed here in numpy."""
import dataclasses
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from contrareg_tf import instance_opt as IO
from contrareg_tf.config import IO_PRESETS
from contrareg_tf.errors import ContraRegInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user would run it
ENV["PYTHONPATH"] = ROOT
SCRIPT = os.path.join(ROOT, "eval_scripts", "instance_opt.py")
sys.path.insert(0, os.path.join(ROOT, "eval_scripts"))


FEATURE_KEYS = ("dns_model", "ae_models", "moving_modality", "ae_layers", "mind_distance", "mind_patch")


def io_run(fixed, moving, features="mindssc", preset="paper", progress=False, deformable="on", **kw):
    """``instance_optimise`` with a preset's schedule changed by ``kw`` (the deformable stage kept unless asked:
    these tests check the optimiser) and the feature options of ``kw`` in a ``FeatureSpec``."""
    feat = {k: kw.pop(k) for k in FEATURE_KEYS if k in kw}
    if feat:
        features = IO.FeatureSpec(features, **feat)
    schedule = dataclasses.replace(IO_PRESETS[preset], deformable=deformable, **kw)
    return IO.instance_optimise(fixed, moving, features, schedule, progress=progress)


# ------------------------------------------------------------------------------------------- phantoms
def phantom(shape):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    c = (np.array(shape) - 1) / 2
    r = np.linalg.norm((grid - c) / (np.array(shape) / 2), axis=-1)
    lab = np.zeros(shape, np.int32)
    lab[r < 0.8] = 1
    lab[r < 0.5] = 2
    lab[np.all(np.abs(grid - c - np.array(shape) * 0.12) < np.array(shape) * 0.12, -1)] = 3
    return lab


def make_pair(shape, amp, seed=0):
    """fixed labels, moving labels, fixed image, moving image, true field."""
    rng = np.random.default_rng(seed)
    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 4) for _ in shape], -1)
    u = u / np.abs(u).max() * amp
    lab = phantom(shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0).astype(float)
    mlab = ndimage.map_coordinates(lab, grid + np.moveaxis(u, -1, 0), order=0, mode="nearest")
    fix = ndimage.gaussian_filter(np.array([0.05, 0.9, 0.45, 0.7])[lab], 0.7).astype(np.float32)
    mov = ndimage.gaussian_filter(np.array([0.0, 0.3, 0.95, 0.6])[mlab], 0.7).astype(np.float32)
    return lab, mlab, fix, mov, u


def mdice(a, b):
    return np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in (1, 2, 3)])


def np_warp_nearest(lab, u):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in lab.shape], indexing="ij"), 0).astype(float)
    return ndimage.map_coordinates(lab, grid + np.moveaxis(u, -1, 0), order=0, mode="nearest")


def np_jacdet(u):
    nd = u.shape[-1]
    m = [[np.gradient(u[..., k], axis=i) + (k == i) for i in range(nd)] for k in range(nd)]
    return np.linalg.det(np.moveaxis(np.array(m), (0, 1), (-2, -1)))


# ------------------------------------------------------------------------------------------ schedule
def test_level_shapes_geometric_half_to_full():
    assert IO.level_shapes((128, 96, 64)) == [(64, 48, 32), (91, 68, 45), (128, 96, 64)]
    assert IO.level_shapes((40, 40), levels=1) == [(40, 40)]
    assert IO.level_shapes((64, 64), levels=2, min_scale=0.25) == [(16, 16), (64, 64)]
    assert IO.level_shapes((64, 32), levels=2, min_scale=0.25, max_scale=0.5) == [(16, 8), (32, 16)]


def test_similarity_term_at_identity_matches_numpy():
    # levels=1: the first recorded similarity is at u = 0: 1 − mean cos of the σ-smoothed descriptors
    _, _, fix, mov, _ = make_pair((24, 20), 3.0)
    feat = lambda x: tf.concat([x, 1.0 - x, x * x], axis=-1)  # noqa: E731
    res = io_run(fix[None, ..., None], mov[None, ..., None], features=feat, levels=1, lrs=1e-2,
                               iters=1, reg_weights=0.5, smooth_sigma=1.0, progress=False)

    def np_feat(x):
        f = np.stack([x, 1 - x, x * x], -1).astype(np.float64)
        return np.stack([ndimage.gaussian_filter(f[..., c], 1.0, mode="nearest", truncate=3.0)
                         for c in range(3)], -1)

    a, b = np_feat(fix), np_feat(mov)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(res.history[0]["sim"][0, 0], 1 - cos.mean(), atol=1e-5)
    assert res.history[0]["reg"][0, 0] == 0.0


def test_paper_preset_is_table4_and_fast_preset_exists():
    paper = IO_PRESETS["paper"]
    assert (paper.levels, paper.lrs, paper.iters, paper.reg_weights) == (
        3, (1e-2, 5e-3, 3e-3), (100, 80, 50), (0.6, 0.5, 0.4))      # DNS paper, supplementary Table 4
    assert paper.grid_step == 1 and paper.sample_stride == 1 and paper.max_scale == 1.0
    assert not paper.convex_init                                     # not in the paper
    for name in ("fast", "convex"):
        assert IO.check_io(IO_PRESETS[name])[0] == IO_PRESETS[name].levels
    assert IO_PRESETS["convex"].convex_init


def _np_upsample(u, shape):
    """Align-corners linear upsampling, one axis at a time with np.interp (independent of ops.resize_linear)."""
    for ax, n in enumerate(shape):
        m = u.shape[ax]
        x_new = np.arange(n) * (m - 1) / (n - 1)
        u = np.apply_along_axis(lambda v: np.interp(x_new, np.arange(m), v), ax, u)
    return u


@pytest.mark.parametrize("shape,pshape", [((11, 9), (6, 5)), ((9, 8, 7), (5, 4, 4))])
def test_strided_control_grid_similarity_matches_numpy(shape, pshape):
    # one Adam step's similarity with sample_stride 2 on a coarse control grid: upsample u (numpy), keep the
    # points o, o+2, ... of the drawn phase o, read D_M there (scipy, border clamped), 1 − mean cosine
    rng = np.random.default_rng(7)
    ndim, nch, s = len(shape), 3, 2
    ff, fm = rng.random((1, *shape, nch)), rng.random((1, *shape, nch))
    p = rng.normal(size=(1, *pshape, ndim)) * 0.1                      # normalised parameter
    solver = IO._LevelSolver(1, shape, nch, False, 7, s, pshape)
    solver.reset(p.astype(np.float32), ff.astype(np.float32), fm.astype(np.float32), 1e-2, 0.0)
    phase = tf.random.Generator.from_seed(0).uniform([ndim], 0, s, dtype=tf.int32).numpy()
    got = float(solver._similarity(solver.disp(solver.var))[0])
    u = _np_upsample(p[0], shape) * (np.array(shape) - 1) / 2          # voxels of the level
    idx = tuple(slice(o, o + (n // s - 1) * s + 1, s) for o, n in zip(phase, shape))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    loc = (grid + u)[idx]
    moved = np.stack([ndimage.map_coordinates(fm[0, ..., c], np.moveaxis(loc, -1, 0), order=1, mode="nearest")
                      for c in range(nch)], -1)
    a = ff[0][idx]
    cos = (a * moved).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(moved, axis=-1))
    assert got == pytest.approx(1 - cos.mean(), abs=1e-5)


def _true_inverse(u, iters=30):
    """d with x + d(x) = φ⁻¹(x) for φ(y) = y + u(y): fixed point d = −u(x + d) (scipy, linear)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in u.shape[:-1]], indexing="ij"), 0).astype(float)
    d = -u.copy()
    for _ in range(iters):
        d = -np.stack([ndimage.map_coordinates(u[..., k], grid + np.moveaxis(d, -1, 0), order=1, mode="nearest")
                       for k in range(u.shape[-1])], -1)
    return d


def test_fast_preset_recovers_known_smooth_displacement():
    # moving = fixed anatomy at x + u(x) (known u), so the registration should find d ≈ φ⁻¹ − id
    flab, mlab, fix, mov, u = make_pair((40, 40, 40), 4.0, seed=3)
    res = io_run(fix[None, ..., None], mov[None, ..., None],
                               features="mindssc", progress=False, preset="fast")
    d_true = _true_inverse(u)
    edge = ndimage.morphological_gradient(flab, size=3) > 0      # only label edges constrain the field
    epe0 = np.linalg.norm(d_true, axis=-1)[edge].mean()
    epe = np.linalg.norm(res.disp[0] - d_true, axis=-1)[edge].mean()
    before, after = mdice(flab, mlab), mdice(flab, np_warp_nearest(mlab, res.disp[0]))
    assert epe < 0.9 * epe0, (epe, epe0)          # measured 0.71 vs 0.88 (paper preset: 0.74)
    assert after > before + 0.04, (before, after)  # measured 0.90 → 0.96
    assert np.mean(np_jacdet(res.disp[0]) <= 0) < 0.005


# ------------------------------------------------------------------------- coupled-convex initialisation
def _np_offsets(hw, nd):
    import itertools
    return np.array(list(itertools.product(range(-hw, hw + 1), repeat=nd)))


def _np_cost(ff, fm, hw, smooth):
    """C(x, d) = box3^smooth[Σ_c (ff(x) − fm(clip(x + d)))²], numpy (one batch element, (*cells, C))."""
    nd = ff.ndim - 1
    mp = np.pad(fm, [(hw, hw)] * nd + [(0, 0)], mode="edge")
    out = []
    for d in _np_offsets(hw, nd):
        sl = tuple(slice(hw + o, hw + o + n) for o, n in zip(d, ff.shape[:-1]))
        c = ((ff - mp[sl]) ** 2).sum(-1)
        for _ in range(smooth):
            c = ndimage.uniform_filter(c, 3, mode="nearest")
        out.append(c)
    return np.stack(out, -1)


@pytest.mark.parametrize("shape", [(9, 7), (6, 5, 7)])
def test_cost_volume_and_coupled_convex_match_numpy(shape):
    rng = np.random.default_rng(0)
    ff, fm = rng.random((1, *shape, 3)), rng.random((1, *shape, 3))
    hw, coeffs = 1, (0.1, 1.0)
    cost = IO.cost_volume(ff, fm, hw, smooth=2).numpy()[0]
    np.testing.assert_allclose(cost, _np_cost(ff[0], fm[0], hw, 2), rtol=1e-5, atol=1e-6)

    # coupled convex: d⁰ = box3[argmin C], dʲ = box3[argmin C + α_j ‖d − dʲ⁻¹‖²], numpy
    mesh = _np_offsets(hw, len(shape)).astype(float)

    def pick(c):
        d = mesh[np.argmin(c, -1)]
        return np.stack([ndimage.uniform_filter(d[..., k], 3, mode="nearest") for k in range(len(shape))], -1)

    d = pick(cost)
    for a in coeffs:
        d = pick(cost + a * ((mesh[None] - d[..., None, :]) ** 2).sum(-1).reshape(*shape, -1))
    got = IO.coupled_convex(tf.constant(cost[None], tf.float32), hw, coeffs).numpy()[0]
    np.testing.assert_allclose(got, d, atol=1e-5)


@pytest.mark.parametrize("shape,sigma,grid", [((12, 14, 10), 1.0, 2), ((16, 12), 0.0, 4)])
def test_fused_mind_maps_equal_scipy_smoothing_resizing_and_pooling(shape, sigma, grid):
    # _feature_maps' one XLA call per image = MIND-SSC (tested against numpy in test_mind), then ψ_σ (scipy
    # gaussian_filter, mode nearest, truncate 3), then align-corners linear resizing to each level (scipy zoom,
    # order 1, grid_mode False) and the convex start's grid-voxel block means (numpy reshape)
    from contrareg_tf.config import PAPER
    from contrareg_tf.losses.mind import mind_ssc

    rng = np.random.default_rng(5)
    fx, mv = (ndimage.gaussian_filter(rng.random(shape), 1).astype(np.float32)[None, ..., None] for _ in range(2))
    shapes = IO.level_shapes(shape, 2, 0.5, 1.0)
    maps, pooled = IO._feature_maps("mindssc", tf.constant(fx), tf.constant(mv), sigma, shapes, grid)
    cells = [n // grid for n in shape]
    for side, img in enumerate((fx, mv)):
        d = mind_ssc(img, PAPER.mind_distance, PAPER.mind_patch // 2).numpy()[0].astype(np.float64)
        chans = range(d.shape[-1])
        if sigma:
            d = np.stack([ndimage.gaussian_filter(d[..., c], sigma, mode="nearest", truncate=3.0) for c in chans], -1)
        for sh, pair in zip(shapes, maps):
            ref = np.stack([ndimage.zoom(d[..., c], [o / n for o, n in zip(sh, shape)], order=1, grid_mode=False,
                                         mode="nearest") for c in chans], -1)
            np.testing.assert_allclose(pair[side].numpy()[0], ref, atol=1e-4)
        crop = d[tuple(slice(0, c * grid) for c in cells)]
        blocks = crop.reshape([v for c in cells for v in (c, grid)] + [d.shape[-1]])
        ref = blocks.mean(axis=tuple(range(1, 2 * len(shape), 2)))
        np.testing.assert_allclose(pooled[side].numpy()[0], ref, atol=1e-5)


def test_inverse_consistency_fixed_point_and_symmetric_meeting():
    t = np.array([1.5, -0.5], np.float32)
    u = tf.constant(np.broadcast_to(t, (1, 8, 8, 2)).copy())
    # an exact inverse pair is a fixed point; (t, 0) meets half-way at (t/2, −t/2) after one iteration
    a, b = IO.inverse_consistent(u, -u, 5)
    np.testing.assert_allclose(a.numpy(), u.numpy(), atol=1e-6)
    np.testing.assert_allclose(b.numpy(), -u.numpy(), atol=1e-6)
    a, b = IO.inverse_consistent(u, tf.zeros_like(u), 4)
    np.testing.assert_allclose(a.numpy(), u.numpy() / 2, atol=1e-6)
    np.testing.assert_allclose(b.numpy(), -u.numpy() / 2, atol=1e-6)


def test_convex_init_recovers_a_large_translation():
    # moving(y) = fixed(y − s): the fixed→moving displacement is +s everywhere (s = 2 cells of 4 voxels = 8 voxels,
    # beyond the capture range the Adam pyramid alone has on a 48² image); the features are the images themselves
    rng = np.random.default_rng(1)
    fix = ndimage.gaussian_filter(rng.random((64, 64)), 2)
    fix = ((fix - fix.min()) / (fix.max() - fix.min())).astype(np.float32)
    s = (8, -4)
    mov = np.roll(fix, s, axis=(0, 1))
    u = IO.convex_init_fn(fix[None, ..., None], mov[None, ..., None], grid=4, hw=3).numpy()[0]
    assert u.shape == (16, 16, 2)
    inner = u[4:-4, 4:-4]
    np.testing.assert_allclose(inner.reshape(-1, 2).mean(0), s, atol=0.25)
    assert np.abs(inner - np.array(s)).max() < 1.0
    # in the full IO: the convex start is recorded and the result lands on the shift
    flab, mlab, f2, m2, _ = make_pair((48, 48), 1.0, seed=2)
    m2 = np.roll(m2, (7, 0), axis=(0, 1))
    mlab = np.roll(mlab, (7, 0), axis=(0, 1))
    kw = dict(features="mindssc", levels=2, iters=(30, 20), lrs=(0.04, 0.02), reg_weights=(0.6, 0.5),
              progress=False)
    plain = io_run(f2[None, ..., None], m2[None, ..., None], **kw)
    conv = io_run(f2[None, ..., None], m2[None, ..., None], convex_init=True, convex_grid=4,
                                convex_hw=3, **kw)
    assert conv.convex_disp.shape == (1, 12, 12, 2) and conv.convex_seconds > 0
    d_plain = mdice(flab, np_warp_nearest(mlab, plain.disp[0]))
    d_conv = mdice(flab, np_warp_nearest(mlab, conv.disp[0]))
    assert d_conv > max(d_plain, mdice(flab, mlab)) + 0.05, (mdice(flab, mlab), d_plain, d_conv)  # 0.40, 0.55, 0.96


def test_convex_init_bad_settings_raise():
    f = np.zeros((1, 16, 16, 1), np.float32)
    with pytest.raises(ContraRegInputError, match="convex_grid"):
        io_run(f, f, convex_init=True, convex_grid=0, progress=False)
    with pytest.raises(ContraRegInputError, match="fewer than 2 cells"):
        io_run(f, f, convex_init=True, convex_grid=16, progress=False, iters=(1, 1, 1))


# ------------------------------------------------------------------------------------- registration
def test_io_2d_mindssc_improves_dice_and_similarity():
    flab, mlab, fix, mov, _ = make_pair((48, 48), 4.0)
    res = io_run(fix[None, ..., None], mov[None, ..., None], features="mindssc", progress=False)
    assert res.disp.shape == (1, 48, 48, 2) and res.moved.shape == (1, 48, 48, 1)
    assert [h["sim"].shape for h in res.history] == [(1, 100), (1, 80), (1, 50)]
    moved = np_warp_nearest(mlab, res.disp[0])
    before, after = mdice(flab, mlab), mdice(flab, moved)
    assert after > before + 0.03, (before, after)
    first, last = res.history[0]["sim"][0, 0], res.history[-1]["sim"][0, -1]
    assert last < 0.8 * first
    assert np.mean(np_jacdet(res.disp[0]) <= 0) == 0.0
    # the moved image is the moving image warped by the returned field
    ref = ndimage.map_coordinates(mov, np.stack(np.meshgrid(np.arange(48), np.arange(48), indexing="ij"))
                                  + np.moveaxis(res.disp[0], -1, 0), order=1, mode="nearest")
    np.testing.assert_allclose(res.moved[0, ..., 0], ref, atol=1e-4)


def test_io_3d_mindssc_improves_dice():
    flab, mlab, fix, mov, _ = make_pair((24, 24, 24), 3.0, seed=1)
    res = io_run(fix[None, ..., None], mov[None, ..., None], features="mindssc",
                               iters=(40, 30, 20), progress=False)
    assert res.level_shapes == [(12, 12, 12), (17, 17, 17), (24, 24, 24)]
    before, after = mdice(flab, mlab), mdice(flab, np_warp_nearest(mlab, res.disp[0]))
    assert after > before + 0.01, (before, after)
    assert res.history[-1]["sim"][0, -1] < res.history[0]["sim"][0, 0]


def test_io_mind_features_and_diffeomorphic_inverse():
    flab, mlab, fix, mov, _ = make_pair((40, 40), 4.0, seed=2)
    res = io_run(fix[None, ..., None], mov[None, ..., None], features="mind",
                               diffeomorphic=True, progress=False)
    assert res.inverse.shape == res.disp.shape and res.velocity.shape == res.disp.shape
    assert mdice(flab, np_warp_nearest(mlab, res.disp[0])) > mdice(flab, mlab) + 0.02
    # φ⁻¹∘φ ≈ id: u(x) + u_inv(x + u(x)) ≈ 0 (interior)
    u, ui = res.disp[0], res.inverse[0]
    grid = np.stack(np.meshgrid(np.arange(40), np.arange(40), indexing="ij"))
    comp = u + np.stack([ndimage.map_coordinates(ui[..., k], grid + np.moveaxis(u, -1, 0), order=1,
                                                 mode="nearest") for k in range(2)], -1)
    assert np.abs(u).max() > 1.0
    assert np.abs(comp[4:-4, 4:-4]).max() < 0.15 * np.abs(u).max()
    assert np.mean(np_jacdet(u) <= 0) == 0.0


def test_batch_of_two_equals_each_alone():
    pairs = [make_pair((32, 32), 3.0, seed=s) for s in (3, 4)]
    fx = np.stack([p[2] for p in pairs])[..., None]
    mv = np.stack([p[3] for p in pairs])[..., None]
    kw = dict(features="mindssc", iters=(20, 15, 10), progress=False)
    both = io_run(fx, mv, **kw)
    for b in range(2):
        one = io_run(fx[b:b + 1], mv[b:b + 1], **kw)
        np.testing.assert_allclose(both.disp[b], one.disp[0], atol=1e-3)  # float32 reduction order; pairs differ by >0.1
        np.testing.assert_allclose(both.history[-1]["loss"][b], one.history[-1]["loss"][0], rtol=1e-3,
                                   atol=1e-6)
    assert np.abs(both.disp[0] - both.disp[1]).max() > 0.1  # the two pairs really differ


def test_callable_and_pair_features_and_ae_provider():
    _, _, fix, mov, _ = make_pair((16, 16), 2.0)
    calls = []

    def feat(x):
        calls.append(x.shape)
        return tf.concat([x, 1.0 - x], axis=-1)

    io_run(fix[None, ..., None], mov[None, ..., None], features=feat, iters=(2, 2, 2),
                         progress=False)
    assert calls == [(1, 16, 16, 1)] * 2          # computed once per image, not per level
    ff, fm = IO.feature_provider((lambda x: x, lambda x: 2 * x))
    assert np.allclose(fm(np.ones((1, 4, 4, 1))), 2)

    # AE provider: a fake autoencoder with outputs [recon, f1 (full res), f2 (half res)]
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((16, 16, 1))
    f1 = tf.keras.layers.Conv2D(3, 3, padding="same", name="c1")(inp)
    f2 = tf.keras.layers.Conv2D(2, 3, strides=2, padding="same", name="c2")(f1)
    ae_a = tf.keras.Model(inp, [inp, f1, f2])
    ae_b = tf.keras.models.clone_model(ae_a)
    x = fix[None, ..., None]
    f_fix, f_mov = IO.feature_provider("ae", ndim=2, ae_models=(ae_a, ae_b), moving_modality="t1")
    out = f_mov(x).numpy()                      # moving is T1w -> A1 = ae_a
    assert out.shape == (1, 16, 16, 5)
    o1, o2 = (t.numpy() for t in ae_a(x)[1:])
    r1 = o1[0] / np.linalg.norm(o1[0], axis=-1, keepdims=True)
    np.testing.assert_allclose(out[0, ..., :3], r1, atol=1e-5)
    up = np.stack([ndimage.zoom(o2[0, ..., c], 16 / 8, order=1, grid_mode=False, mode="nearest")
                   for c in range(2)], -1)
    # compared un-normalised (times the reference norm): where |up| is small, float32 resizing error is
    # amplified by the normalisation (measured: 1.7e-4 at 2 of 512 values for an unseeded network)
    n = np.linalg.norm(up, axis=-1, keepdims=True)
    np.testing.assert_allclose(out[0, ..., 3:] * n, up, atol=1e-5 * max(1.0, float(n.max())))
    np.testing.assert_allclose(np.linalg.norm(out[0, ..., 3:], axis=-1)[n[..., 0] > 1e-3], 1.0, atol=1e-5)
    np.testing.assert_allclose(f_fix(x).numpy()[0, ..., :3],
                               (lambda o: o / np.linalg.norm(o, axis=-1, keepdims=True))(ae_b(x)[1].numpy()[0]),
                               atol=1e-5)


def test_ae_provider_with_contrareg_autoencoder():
    from contrareg_tf.networks.autoencoder import build_autoencoder

    filters = (4, 6, 8, 6, 4, 4, 4, 1)
    a1, a2 = (build_autoencoder(2, filters, seed=s) for s in (0, 1))
    _, _, fix, mov, _ = make_pair((32, 32), 2.0)
    res = io_run(fix[None, ..., None], mov[None, ..., None], features="ae", ae_models=(a1, a2),
                               moving_modality="t2", iters=(3, 2, 2), progress=False)
    assert np.isfinite(res.disp).all()
    ff, fm = IO.feature_provider("ae", ndim=2, ae_models=(a1, a2), moving_modality="t2")
    f = fm(mov[None, ..., None]).numpy()      # moving is T2w -> A2
    assert f.shape == (1, 32, 32, sum(filters[:6]))
    # each layer's block = its activations, linearly upsampled (align corners) to 32², then x / (‖x‖ + 1e-7)
    raw = a2(mov[None, ..., None], training=False)[1:7]
    start = 0
    for c, r in zip(filters[:6], raw):
        r = r.numpy()[0]
        zoom = 32 / r.shape[0]
        up = np.stack([ndimage.zoom(r[..., k], zoom, order=1, grid_mode=False, mode="nearest")
                       for k in range(c)], -1) if zoom != 1 else r
        ref = up / (np.linalg.norm(up, axis=-1, keepdims=True) + 1e-7)
        np.testing.assert_allclose(f[0, ..., start:start + c], ref, atol=1e-4)
        start += c
    np.testing.assert_allclose(f[..., :4], IO.ae_features(a2, mov[None, ..., None], layers=[1]).numpy(),
                               atol=1e-6)


def test_dns_provider_with_masr_model():
    from contrareg_tf.networks import masr

    model = masr.build_masr(2)
    _, _, fix, mov, _ = make_pair((32, 32), 2.0)
    ff, fm = IO.feature_provider("dns", ndim=2, dns_model=model)
    x = fix[None, ..., None]
    d = ff(x).numpy()
    np.testing.assert_allclose(d, masr.dns_features(x, model).numpy(), atol=1e-6)
    assert d.shape == (1, 32, 32, 24)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-4)  # L2-normalised descriptor
    res = io_run(x, mov[None, ..., None], features="dns", dns_model=model, iters=(5, 3, 2),
                               progress=False)
    assert np.isfinite(res.disp).all() and res.history[0]["sim"].shape == (1, 5)


def test_bad_inputs_raise():
    a = np.random.default_rng(0).random((1, 16, 16, 1)).astype(np.float32)
    with pytest.raises(ContraRegInputError, match="shape mismatch"):
        io_run(a, a[:, :12], progress=False)
    bad = a.copy()
    bad[0, 3, 3, 0] = np.nan
    with pytest.raises(ContraRegInputError, match="NaN"):
        io_run(a, bad, progress=False)
    with pytest.raises(ContraRegInputError, match="spatial axes"):
        io_run(a[0], a[0], progress=False)
    with pytest.raises(ContraRegInputError, match="3-D"):
        io_run(np.zeros((1, 8, 8, 8, 1)), a, progress=False)
    with pytest.raises(ContraRegInputError, match="iters"):
        io_run(a, a, iters=(1, 2), progress=False)
    with pytest.raises(ContraRegInputError, match="unknown features"):
        io_run(a, a, features="sift", progress=False)
    with pytest.raises(ContraRegInputError, match="ae"):
        io_run(a, a, features="ae", progress=False)
    with pytest.raises(ContraRegInputError, match="not found"):
        io_run(a, a, features="dns", dns_model="/nonexistent/masr.h5", progress=False)


# --------------------------------------------------------------------------------------------- CLI
AFFINE = np.array([[-1.5, 0, 0, 40.0], [0, 1.5, 0, -12.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def nifti_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("io_cli")
    flab, mlab, fix, mov, _ = make_pair((20, 20, 16), 2.5, seed=5)
    return {"dir": d, "fixed": _save(d / "f.nii.gz", fix), "moving": _save(d / "m.nii.gz", mov * 700.0),
            "flab": _save(d / "fl.nii.gz", flab.astype(np.int16)), "mlab": _save(d / "ml.nii.gz",
                                                                                 mlab.astype(np.int16)),
            "arrays": (flab, mlab)}


def test_cli_writes_outputs_with_fixed_affine(nifti_pair, tmp_path):
    p = nifti_pair
    out = {k: str(tmp_path / f"{k}.nii.gz") for k in ("moved", "warp", "mlab")}
    cmd = [sys.executable, SCRIPT, "--fixed", p["fixed"], "--moving", p["moving"], "--features", "mindssc",
           "--moved", out["moved"], "--warp", out["warp"], "--moving-labels", p["mlab"], "--moved-labels",
           out["mlab"], "--fixed-labels", p["flab"], "--iters", "20,15,10", "--deformable", "on", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Dice before" in r.stdout
    flab, mlab = p["arrays"]
    for k, path in out.items():
        img = nib.load(path)
        np.testing.assert_allclose(img.affine, AFFINE)
    warp = nib.load(out["warp"]).get_fdata()
    assert warp.shape == (20, 20, 16, 3) and np.abs(warp).max() > 0.1
    moved_lab = nib.load(out["mlab"]).get_fdata()
    np.testing.assert_array_equal(moved_lab, np_warp_nearest(mlab, warp))  # same field, same labels
    moved = nib.load(out["moved"]).get_fdata()
    assert moved.max() > 100  # the original (un-normalised) moving intensities are warped
    dice_line = [l for l in r.stdout.splitlines() if l.startswith("Dice")][0].split()
    assert float(dice_line[-1]) == pytest.approx(mdice(flab, moved_lab), abs=1e-3)


def test_cli_io_preset_fast_with_explicit_override(nifti_pair, tmp_path, capsys, monkeypatch):
    # --io-preset picks the schedule of config.IO_PRESETS; an explicit --iters overrides only that value
    from contrareg_tf.instance_opt import files

    seen = {}
    real = files.instance_optimise

    def spy(fixed, moving, features, schedule, **kw):
        seen["schedule"] = schedule
        return real(fixed, moving, features, schedule, **kw)

    monkeypatch.setattr(files, "instance_optimise", spy)
    p = nifti_pair
    code, err = _run_main(["--fixed", p["fixed"], "--moving", p["moving"], "--io-preset", "fast", "--iters",
                           "7,5", "--warp", str(tmp_path / "w.nii.gz"), "--quiet"], capsys)
    assert code == 0, err
    fast, got = IO_PRESETS["fast"], seen["schedule"]
    assert got.iters == (7, 5)
    for k in ("levels", "lrs", "reg_weights", "grid_step", "sample_stride", "smooth_sigma", "max_scale",
              "deformable", "int_steps"):
        assert getattr(got, k) == getattr(fast, k), k
    code, err = _run_main(["--fixed", p["fixed"], "--moving", p["moving"], "--io-preset", "nope"], capsys)
    assert code == 2 and len(err) == 1 and "nope" in err[0]


def _run_main(argv, capsys, keep_out=False):
    import instance_opt as script
    from contrareg_tf.cli import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(script.main, argv)
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    return (e.value.code, err, cap.out.strip().splitlines()) if keep_out else (e.value.code, err)


@pytest.mark.parametrize("case", ["missing", "shape", "not_nifti", "labels_shape", "bad_out_ext",
                                  "inverse_needs_diffeo", "ae_weights_missing"])
def test_cli_bad_inputs_one_line_nothing_written(case, nifti_pair, tmp_path, capsys):
    p = nifti_pair
    fixed, moving, extra = p["fixed"], p["moving"], []
    if case == "missing":
        moving = str(tmp_path / "nope.nii.gz")
    elif case == "shape":
        moving = _save(tmp_path / "small.nii.gz", np.zeros((20, 20, 12), np.float32))
    elif case == "not_nifti":
        moving = str(tmp_path / "m.nii.gz")
        with open(moving, "w") as f:
            f.write("not an image")
    elif case == "labels_shape":
        extra = ["--moving-labels", _save(tmp_path / "l.nii.gz", np.zeros((20, 20, 12), np.int16)),
                 "--moved-labels", str(tmp_path / "out_l.nii.gz")]
    elif case == "bad_out_ext":
        extra = ["--warp", str(tmp_path / "warp.npy")]
    elif case == "inverse_needs_diffeo":
        extra = ["--inverse-warp", str(tmp_path / "inv.nii.gz")]
    elif case == "ae_weights_missing":
        extra = ["--features", "ae", "--ae1", str(tmp_path / "a1.h5"), "--ae2", str(tmp_path / "a2.h5")]
    before = set(os.listdir(tmp_path))
    code, err = _run_main(["--fixed", fixed, "--moving", moving, "--moved", str(tmp_path / "moved.nii.gz"),
                           "--quiet", *extra], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:")
    assert set(os.listdir(tmp_path)) == before  # nothing written


def test_cli_missing_file_subprocess(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--fixed", str(tmp_path / "a.nii.gz"), "--moving",
                        str(tmp_path / "b.nii.gz"), "--moved", str(tmp_path / "c.nii.gz")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "a.nii.gz" in lines[0]
    assert "not found" in lines[0]
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- the deformable decision
def test_keep_deformable_rule():
    s0 = np.array([0.10, 0.10, 0.10, 0.0])
    s1 = np.array([0.05, 0.07, 0.11, 0.0])                 # gains 0.5, 0.3, -0.1, none
    assert IO.keep_deformable(s0, s1, "auto", 0.4).tolist() == [True, False, False, False]
    assert IO.keep_deformable(s0, s1, "auto", 0.25).tolist() == [True, True, False, False]
    assert IO.keep_deformable(s0, s1, "on", 0.4).all() and not IO.keep_deformable(s0, s1, "off", 0.4).any()


def test_data_term_matches_numpy_for_an_integer_shift():
    rng = np.random.default_rng(3)
    ff, fm = rng.random((1, 12, 10, 3)), rng.random((1, 12, 10, 3))
    u = np.zeros((1, 12, 10, 2), np.float32)
    u[..., 0] = 2.0                                          # φ(x) = x + (2, 0): read fm two rows further on
    moved = fm[:, np.minimum(np.arange(12) + 2, 11)]        # border clamped
    cos = (ff * moved).sum(-1) / (np.linalg.norm(ff, axis=-1) * np.linalg.norm(moved, axis=-1))
    got = IO.data_term(tf.constant(ff, tf.float32), tf.constant(fm, tf.float32), tf.constant(u))
    np.testing.assert_allclose(got, 1 - cos.mean(), atol=1e-5)


def test_auto_drops_the_deformable_stage_when_nothing_is_to_be_found_and_keeps_it_when_it_helps():
    # the same image as fixed and moving: S₀ = 0 and no displacement can lower it -> dropped, u = 0 exactly;
    # a smooth phantom shifted by 3 voxels: the data term falls by far more than 40 % -> kept
    flab, mlab, fix, mov, _ = make_pair((32, 32), 3.0, seed=6)
    same = io_run(fix[None, ..., None], fix[None, ..., None], deformable="auto", iters=(10, 10, 10))
    assert not same.deformable_kept[0] and same.similarity_identity[0] < 1e-6
    assert np.all(same.disp == 0) and np.array_equal(same.moved, fix[None, ..., None].astype(np.float32))
    shifted = np.roll(fix, 3, axis=0)
    lab = np.roll(flab, 3, axis=0)
    helps = io_run(fix[None, ..., None], shifted[None, ..., None], deformable="auto", iters=(40, 30, 20))
    gain = 1 - helps.similarity_deformable[0] / helps.similarity_identity[0]
    assert helps.deformable_kept[0] and gain > 0.4, gain
    assert mdice(flab, np_warp_nearest(lab, helps.disp[0])) > mdice(flab, lab) + 0.1
    off = io_run(fix[None, ..., None], shifted[None, ..., None], deformable="off")
    assert not off.deformable_kept[0] and np.all(off.disp == 0)


# ------------------------------------------------------------------------ phases, validation, memory
def test_cli_prints_one_line_per_phase_and_names_the_dns_weights(nifti_pair, tmp_path, capsys):
    p = nifti_pair
    code, err, out = _run_main(["--fixed", p["fixed"], "--moving", p["moving"], "--features", "dns", "--iters",
                                "2,2,2", "--warp", str(tmp_path / "w.nii.gz")], capsys, keep_out=True)
    assert code == 0, err
    timed = r" … \d+\.\d s$"
    for pattern in (r"load \+ resample onto the fixed grid 20x20x16 @ 1.5x1.5x2 mm: \d+\.\d s$",
                    r"DNS weights: .*dns_proxy3d.h5 \(trained at 3x3x3 mm\)$",
                    r"descriptors \(dns, 3 level\(s\)\)" + timed, r"optimisation: 2 \+ 2 \+ 2 Adam steps on ",
                    r"optimisation done: \d+\.\d s$", "deformable stage: (kept|dropped)",
                    r"writing 1 output\(s\)" + timed):
        assert sum(bool(re.match(pattern, line)) for line in err) == 1, (pattern, err)
    # the pair is at 1.5 x 1.5 x 2 mm, 2x finer than the weights' 3 mm: one warning naming file and spacings
    warn = [line for line in err if line.startswith("warning:") and "dns_proxy3d.h5" in line]
    assert len(warn) == 1 and "3x3x3 mm" in warn[0] and "1.5x1.5x2 mm" in warn[0], err
    assert any(line.startswith("features dns") for line in out)           # the results stay on stdout
    # --quiet: no phase lines
    code, err = _run_main(["--fixed", p["fixed"], "--moving", p["moving"], "--iters", "2,2,2", "--quiet"], capsys)
    assert code == 0 and not any("…" in line for line in err), err


def test_cli_convex_zero_iterations_writes_and_exits_0(nifti_pair, tmp_path, capsys):
    p = nifti_pair
    moved = tmp_path / "x.nii.gz"
    code, err, out = _run_main(["--fixed", p["fixed"], "--moving", p["moving"], "--io-preset", "convex", "--iters",
                                "0", "--moved", str(moved), "--quiet"], capsys, keep_out=True)
    assert code == 0 and not any(line.startswith("error") for line in err), err
    assert moved.exists() and any(line.startswith("features mindssc") for line in out)


def test_cli_absurd_smoothing_one_error_line_nothing_written(nifti_pair, tmp_path, capsys):
    p = nifti_pair
    before = set(os.listdir(tmp_path))
    code, err = _run_main(["--fixed", p["fixed"], "--moving", p["moving"], "--moved", str(tmp_path / "m.nii.gz"),
                           "--smooth-sigma", "1e9", "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "smooth_sigma" in err[0], err
    assert set(os.listdir(tmp_path)) == before


def test_memory_estimate_refuses_what_cannot_fit(nifti_pair, tmp_path, capsys, monkeypatch):
    from contrareg_tf.instance_opt import memory

    gib = 2 ** 30
    paper = IO_PRESETS["paper"]
    big = memory.estimate_bytes((512, 512, 512), "mindssc", paper)
    assert big > 8 * gib                           # 12 MIND-SSC channels of 512³ float32 are 6 GiB per image alone
    assert memory.estimate_bytes((64, 64, 64), "mindssc", paper) < 4 * gib
    with pytest.raises(ContraRegInputError, match=r"512x512x512 .* needs about .* GiB"):
        memory.check_memory((512, 512, 512), "mindssc", paper, "paper", available=8 * gib)
    # through the command: refused before anything is loaded or written
    monkeypatch.setattr(memory, "available_bytes", lambda: 0.5 * gib)
    p = nifti_pair
    before = set(os.listdir(tmp_path))
    code, err = _run_main(["--fixed", p["fixed"], "--moving", p["moving"], "--moved", str(tmp_path / "m.nii.gz"),
                           "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and "GiB" in err[0] and "available" in err[0]
    assert set(os.listdir(tmp_path)) == before
