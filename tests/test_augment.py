"""Augmentation (contrareg_tf.data.augment): crops, flips, intensity jitter, DNS Bézier transform."""
import numpy as np
import pytest

from contrareg_tf.data import augment as aug


def _de_casteljau(ctrl, t):
    """Independent Bézier evaluation (de Casteljau), ctrl (K, 2), t scalar."""
    pts = np.array(ctrl, float)
    while len(pts) > 1:
        pts = (1 - t) * pts[:-1] + t * pts[1:]
    return pts[0]


def test_bezier_curve_matches_de_casteljau():
    ctrl = aug.random_bezier_ctrl(np.random.default_rng(0), n_ctrl=3)
    assert ctrl.shape == (5, 2)
    np.testing.assert_array_equal(ctrl[0], [0, 0])
    np.testing.assert_array_equal(ctrl[-1], [1, 1])
    assert np.all(np.diff(ctrl[:, 0]) >= 0) and np.all(np.diff(ctrl[:, 1]) >= 0)
    assert np.all((ctrl >= 0) & (ctrl <= 1))
    xs, ys = aug.bezier_curve(ctrl, n=11)
    for i, t in enumerate(np.linspace(0, 1, 11)):
        np.testing.assert_allclose([xs[i], ys[i]], _de_casteljau(ctrl, t), atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_bezier_intensity_monotone(seed):
    x = np.linspace(0, 1, 257)
    y, inverted = aug.bezier_intensity(x, np.random.default_rng(seed), return_inverted=True)
    assert y.dtype == np.float32 and y.min() >= -1e-6 and y.max() <= 1 + 1e-6
    d = np.diff(y)
    if inverted:
        assert np.all(d <= 1e-6)  # reversed: sorted input -> sorted output, reversed
        assert y[0] == pytest.approx(1, abs=1e-5) and y[-1] == pytest.approx(0, abs=1e-5)
    else:
        assert np.all(d >= -1e-6)
        assert y[0] == pytest.approx(0, abs=1e-5) and y[-1] == pytest.approx(1, abs=1e-5)
    # the curve really is a Bézier of the drawn control points: re-draw them with the same seed
    ctrl = aug.random_bezier_ctrl(np.random.default_rng(seed), 3)
    t = 0.3
    px, py = _de_casteljau(ctrl, t)
    xin = 1 - px if inverted else px
    np.testing.assert_allclose(aug.bezier_intensity(np.array([xin]), np.random.default_rng(seed)), [py], atol=2e-3)


def test_bezier_inversion_rate_and_determinism():
    flags = [aug.bezier_intensity(np.zeros(3), np.random.default_rng(s), return_inverted=True)[1] for s in range(200)]
    assert 0.35 < np.mean(flags) < 0.65  # invert_prob = 0.5
    never = [aug.bezier_intensity(np.zeros(3), s, invert_prob=0.0, return_inverted=True)[1] for s in range(20)]
    assert not any(never)
    x = np.random.default_rng(1).random((5, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(aug.bezier_intensity(x, 42), aug.bezier_intensity(x, 42))
    assert not np.array_equal(aug.bezier_intensity(x, 42), aug.bezier_intensity(x, 43))


def test_bezier_lut_numpy_and_tf_agree():
    import tensorflow as tf
    x = np.random.default_rng(2).random((4, 9, 9)).astype(np.float32)
    for seed in range(4):
        lut, inv = aug.bezier_lut(np.random.default_rng(seed))
        direct, inv2 = aug.bezier_intensity(x, np.random.default_rng(seed), return_inverted=True)
        assert inv == inv2
        np.testing.assert_allclose(aug.apply_lut(x, lut), direct, atol=2e-3)
        np.testing.assert_allclose(aug.apply_lut(tf.constant(x), lut).numpy(), aug.apply_lut(x, lut), atol=1e-5)


def test_random_crop():
    x = np.arange(10 * 12 * 8).reshape(10, 12, 8)
    m = x % 7
    for seed in range(5):
        cx, cm = aug.random_crop([x, m], (4, 5, 6), seed)
        assert cx.shape == (4, 5, 6)
        i, j, k = np.unravel_index(cx[0, 0, 0], x.shape)  # the window's corner in x
        np.testing.assert_array_equal(cx, x[i:i + 4, j:j + 5, k:k + 6])
        np.testing.assert_array_equal(cm, m[i:i + 4, j:j + 5, k:k + 6])  # same window for the list
    starts = {tuple(np.unravel_index(aug.random_crop(x, (4, 5, 6), s)[0, 0, 0], x.shape)) for s in range(30)}
    assert len(starts) > 5
    # larger than the array along an axis: centred zero padding there
    y = aug.random_crop(np.ones((4, 6)), (6, 3), 0)
    assert y.shape == (6, 3) and y[0].sum() == 0 and y[-1].sum() == 0 and y[1:5].min() == 1
    # channels kept
    assert aug.random_crop(np.zeros((9, 9, 2)), (5, 5), 0).shape == (5, 5, 2)


def test_random_flip():
    x = np.random.default_rng(0).random((3, 4, 5))
    m = x > 0.5
    assert np.array_equal(aug.random_flip(x, 0, p=0.0), x)
    np.testing.assert_array_equal(aug.random_flip(x, 0, p=1.0), x[::-1, ::-1, ::-1])
    seen = set()
    for s in range(40):
        fx, fm = aug.random_flip([x, m], s)
        matches = [ax for ax in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
                   if np.array_equal(fx, np.flip(x, ax) if ax else x)]
        assert len(matches) == 1
        np.testing.assert_array_equal(fm, np.flip(m, matches[0]) if matches[0] else m)
        seen.add(matches[0])
    assert len(seen) >= 6


def test_intensity_jitter():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.3, 0.6, (8, 8, 8)).astype(np.float32)
    b = aug.random_brightness(x, 1, max_delta=0.1)
    delta = b - x
    assert np.ptp(delta) < 1e-6 and abs(delta.mean()) <= 0.1
    c = aug.random_contrast(x, 2, 0.8, 1.2)
    np.testing.assert_allclose(c.mean(), x.mean(), atol=1e-5)  # contrast keeps the mean (no clipping here)
    ratio = np.std(c) / np.std(x)
    assert 0.8 <= ratio <= 1.2
    g = aug.random_gamma(x, 3, 0.7, 1.5)
    gamma = np.log(g.ravel()[0]) / np.log(x.ravel()[0])
    np.testing.assert_allclose(g, x ** gamma, rtol=1e-4)  # one power law for every voxel
    assert 0.7 <= gamma <= 1.5
    for s in range(10):
        j = aug.intensity_jitter(rng.random((6, 6)), s)
        assert j.dtype == np.float32 and j.min() >= 0 and j.max() <= 1
    np.testing.assert_array_equal(aug.intensity_jitter(x, 5), aug.intensity_jitter(x, 5))
