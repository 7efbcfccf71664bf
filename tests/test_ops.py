"""Spatial primitives (contrareg_tf/ops.py) against independent numpy / scipy / voxelmorph computations."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from contrareg_tf import ops
from contrareg_tf.errors import ContraRegInputError


def rand(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# -------------------------------------------------------------------------------------------- vectors
def test_l2_normalize_is_cut_normalize_with_finite_gradient_at_zero():
    x = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(ops.l2_normalize(x).numpy(),
                               x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-7), rtol=1e-6)
    z = tf.zeros((2, 4))
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = tf.reduce_sum(ops.l2_normalize(z))
    assert np.all(np.isfinite(tape.gradient(y, z).numpy()))


def test_cosine_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 6, 5, 4)), rng.normal(size=(2, 6, 5, 4))
    ref = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(ops.cosine(a, b).numpy(), ref, rtol=1e-6)


# ----------------------------------------------------------------------------------- shifts, filters
@pytest.mark.parametrize("shape,offset", [((2, 7, 9, 3), (2, -1)), ((1, 5, 6, 7, 2), (0, 3, -2))])
def test_replicate_shift_and_pad_match_numpy_edge_padding(shape, offset):
    x = rand(shape)
    r = max(abs(o) for o in offset)
    xp = np.pad(x, [(0, 0)] + [(r, r)] * len(offset) + [(0, 0)], mode="edge")
    np.testing.assert_array_equal(ops.replicate_pad(x, r).numpy(), xp)
    idx = (slice(None),) + tuple(slice(r + o, r + o + n) for o, n in zip(offset, shape[1:-1])) + (slice(None),)
    np.testing.assert_array_equal(ops.replicate_shift(x, offset).numpy(), xp[idx])


@pytest.mark.parametrize("shape", [(2, 9, 8, 2), (1, 6, 7, 5, 1)])
def test_box_filter_matches_scipy_uniform_filter_nearest(shape):
    x = rand(shape, 2)
    ref = ndimage.uniform_filter(x.astype(np.float64), size=[1] + [3] * (len(shape) - 2) + [1], mode="nearest")
    np.testing.assert_allclose(ops.box_filter(x, 3).numpy(), ref, atol=1e-6)


def test_clamp_variance_bounds_by_mean_over_axes():
    v = np.array([[0.0, 1e-9, 1.0, 5e3]], np.float32).reshape(1, 4, 1)
    m = v.mean()
    ref = np.clip(v, max(1e-3 * m, 1e-12), max(1e3 * m, 1e-12))
    np.testing.assert_allclose(ops.clamp_variance(v, (1, 2)).numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(ops.clamp_variance(np.zeros((1, 3, 1), np.float32), (1, 2)).numpy(), 1e-12)


@pytest.mark.parametrize("sigma", [1.0, 1.5])
def test_gaussian_smooth_matches_scipy_nearest(sigma):
    x = rand((2, 12, 14, 10, 2), 1)
    y = ops.gaussian_smooth(x, sigma).numpy()
    for b in range(2):
        for c in range(2):
            ref = ndimage.gaussian_filter(x[b, ..., c].astype(np.float64), sigma, mode="nearest", truncate=3.0)
            np.testing.assert_allclose(y[b, ..., c], ref, atol=1e-5)
    np.testing.assert_array_equal(ops.gaussian_smooth(x, 0).numpy(), x)


# ------------------------------------------------------------------------------------------ resampling
@pytest.mark.parametrize("shape,out", [((32, 32), (16, 23)), ((9, 12, 10), (18, 6, 10))])
def test_resize_linear_matches_scipy_zoom(shape, out):
    x = rand((2, *shape, 3))
    y = ops.resize_linear(x, out).numpy()
    assert y.shape == (2, *out, 3)
    for b in range(2):
        for c in range(3):
            ref = ndimage.zoom(x[b, ..., c], [o / s for o, s in zip(out, shape)], order=1, grid_mode=False,
                               mode="nearest")
            np.testing.assert_allclose(y[b, ..., c], ref, atol=1e-5)


def _field(shape, amp, seed=0):
    rng = np.random.default_rng(seed)
    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 3) for _ in shape], -1)
    return (u / np.abs(u).max() * amp).astype(np.float32)


@pytest.mark.parametrize("shape", [(24, 20), (10, 12, 9)])
def test_warp_array_matches_scipy_map_coordinates(shape):
    u = _field(shape, 3.0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0) + np.moveaxis(u, -1, 0)
    img = rand(shape, 3)
    np.testing.assert_allclose(ops.warp_array(img, u), ndimage.map_coordinates(img, grid, order=1, mode="nearest"),
                               atol=1e-5)
    lab = np.random.default_rng(4).integers(0, 40000, shape).astype(np.int32)
    out = ops.warp_array(lab[None], u[None], interp="nearest")[0]
    assert out.dtype == np.int32
    # ties at exactly .5 may round differently
    assert np.mean(out == ndimage.map_coordinates(lab, grid, order=0, mode="nearest")) > 0.99
    with pytest.raises(ContraRegInputError, match="interp"):
        ops.warp_array(img, u, interp="cubic")


@pytest.mark.parametrize("shape", [(2, 9, 7, 3), (1, 6, 7, 5, 2)])
def test_sample_matches_scipy_map_coordinates_at_arbitrary_points(shape):
    # points anywhere, outside the volume too (border clamped = scipy mode 'nearest'), any point layout
    rng = np.random.default_rng(3)
    vol = rand(shape, seed=4)
    ndim = len(shape) - 2
    pts = (rng.random((shape[0], 5, 4, ndim)) * 1.4 - 0.2) * (np.array(shape[1:-1]) - 1)
    got = ops.sample(tf.constant(vol), tf.constant(pts.astype(np.float32))).numpy()
    for b in range(shape[0]):
        for c in range(shape[-1]):
            ref = ndimage.map_coordinates(vol[b, ..., c], np.moveaxis(pts[b], -1, 0), order=1, mode="nearest")
            np.testing.assert_allclose(got[b, ..., c], ref, atol=1e-5)


def test_linear_weights_interpolate_a_linear_function_exactly():
    m = ops.linear_weights(7, 4)          # align corners: output i sits at input i·3/6
    np.testing.assert_allclose(m @ np.arange(4.0), np.arange(7) * 3 / 6, atol=1e-6)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)


def test_integrate_of_constant_field_is_the_field():
    v = np.zeros((1, 8, 9, 2), np.float32)
    v[..., 0], v[..., 1] = 1.5, -0.5   # translation: exp(v) = v exactly (border-clamped interpolation inside)
    np.testing.assert_allclose(ops.integrate(tf.constant(v), 5).numpy()[:, 2:-2, 2:-2], v[:, 2:-2, 2:-2], atol=1e-5)


@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_grad_matches_voxelmorph_grad(penalty):
    import voxelmorph as vxm

    for shape in [(2, 7, 9, 2), (2, 5, 6, 7, 3)]:
        u = tf.random.stateless_normal(shape, seed=(1, 2))
        np.testing.assert_allclose(ops.grad(u, penalty).numpy(), vxm.losses.Grad(penalty).loss(None, u).numpy(),
                                   rtol=1e-5)


# ------------------------------------------------------------------------------------------ validation
def test_check_image_errors_name_the_argument():
    ok = np.zeros((1, 8, 8, 1), np.float32)
    assert ops.check_image(ok, "x", channels=1, ndim=2, multiple=8).dtype == tf.float32
    assert ops.check_image(ok.astype(np.float64), "x").dtype == tf.float64
    bad = ok.copy()
    bad[0, 1, 1] = np.nan
    cases = [(lambda: ops.check_image(ok[0], "fixed"), "fixed: expected a \\(B, \\*vol, C\\)"),
             (lambda: ops.check_image(ok, "fixed", ndim=3), "fixed: 2-D.*expected 3-D"),
             (lambda: ops.check_image(np.zeros((1, 8, 8, 2)), "m", channels=1), "m: expected 1 channel"),
             (lambda: ops.check_image(np.zeros((1, 12, 8, 1)), "m", multiple=8), "divisible by 8"),
             (lambda: ops.check_image(np.zeros((1, 3, 8, 1)), "m", min_size=4), ">= 4 voxels"),
             (lambda: ops.check_image(bad, "moving"), "moving: contains 1 NaN/Inf"),
             (lambda: ops.check_image(np.array([[["a"]]], object), "m"), "numeric")]
    for fn, words in cases:
        with pytest.raises(ContraRegInputError, match=words):
            fn()
    ops.check_image(bad, "moving", finite=False)   # traced-code mode: static checks only
