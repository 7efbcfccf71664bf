"""contrareg_tf.metrics: analytic fields, hand-made label maps, voxelmorph and brute-force references."""
import math

import numpy as np
import pytest
from scipy import ndimage

import contrareg_tf  # noqa: F401  (compat shim before voxelmorph)
import voxelmorph as vxm
from contrareg_tf import metrics as M
from contrareg_tf.errors import ContraRegInputError


def _grid(vol):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in vol], indexing="ij"), -1)


def _smooth_field(rng, vol, amp=2.0, sigma=2.0):
    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(vol), sigma) for _ in vol], -1)
    return amp * u / np.abs(u).max()


# ------------------------------------------------------------------------------------------- Jacobian
@pytest.mark.parametrize("vol", [(12, 14), (8, 9, 10)])
def test_affine_field_has_constant_det(vol):
    rng = np.random.default_rng(1)
    nd = len(vol)
    for flip in (False, True):
        a = np.eye(nd) + 0.3 * rng.standard_normal((nd, nd))
        if flip:  # reflect one axis: det < 0 everywhere -> 100 % folding
            a[:, 0] *= -1
        t = rng.standard_normal(nd)
        x = _grid(vol)
        u = x @ (a - np.eye(nd)).T + t           # u(x) = (A - I) x + t
        jac = M.jacobian_determinant(u)
        assert jac.shape == vol
        np.testing.assert_allclose(jac, np.linalg.det(a), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(M.jacobian_determinant(u[None]), jac)   # leading batch dim of 1
        expected_folds = 100.0 if np.linalg.det(a) <= 0 else 0.0
        assert M.folding_fraction(u) == expected_folds
        assert M.folding_fraction(jac) == expected_folds


def _fold_map(n, a, b):
    """φ0 on 0..n-1: slope +1, slope -1 on [a, b], slope +1 again (continuous)."""
    i = np.arange(n, dtype=np.float64)
    return np.where(i <= a, i, np.where(i <= b, 2 * a - i, i + 2 * a - 2 * b))


@pytest.mark.parametrize("vol", [(20, 6), (20, 5, 7)])
def test_folded_slab_counted_exactly(vol):
    n, a, b = vol[0], 6, 11
    phi0 = _fold_map(n, a, b)
    u = np.zeros(vol + (len(vol),))
    u[..., 0] = (phi0 - np.arange(n)).reshape((n,) + (1,) * (len(vol) - 1))
    jac = M.jacobian_determinant(u)
    # central differences: -1 strictly inside (a, b), 0 at the kinks a and b (counted: det <= 0), +1 elsewhere
    expected = np.ones(n)
    expected[a + 1:b] = -1
    expected[[a, b]] = 0
    np.testing.assert_allclose(jac, np.broadcast_to(expected.reshape((n,) + (1,) * (len(vol) - 1)), vol))
    assert M.folding_fraction(u) == pytest.approx(100.0 * (b - a + 1) / n)
    # inside a mask covering rows 0..8: folded rows 6, 7, 8 -> 3 / 9
    mask = np.zeros(vol, bool)
    mask[:9] = True
    assert M.folding_fraction(u, mask=mask) == pytest.approx(100.0 * 3 / 9)


def test_std_log_jacobian_two_known_determinants():
    d1, d2 = 0.5, 2.0
    jac = np.full((10, 8, 6), d1)
    jac[5:] = d2
    # half the voxels at log d1, half at log d2 -> std = |log d2 - log d1| / 2
    assert M.std_log_jacobian(jac) == pytest.approx(abs(math.log(d2) - math.log(d1)) / 2, rel=1e-12)
    jac[5:] = -3.0                                  # folded half: clipped at 1e-9 before the log
    assert M.std_log_jacobian(jac) == pytest.approx(abs(math.log(1e-9) - math.log(d1)) / 2, rel=1e-12)
    assert M.std_log_jacobian(jac, clip=1e-3) == pytest.approx(abs(math.log(1e-3) - math.log(d1)) / 2)
    mask = np.zeros(jac.shape, bool)
    mask[:5] = True                                 # only the d1 half -> 0
    assert M.std_log_jacobian(jac, mask=mask) == pytest.approx(0.0, abs=1e-12)


def test_std_log_jacobian_from_piecewise_linear_field():
    n, m, s1, s2 = 16, 7, 0.5, 1.5                 # φ0 slope s1 below row m, s2 from row m on
    i = np.arange(n, dtype=np.float64)
    phi0 = np.where(i <= m, s1 * i, s1 * m + s2 * (i - m))
    u = np.zeros((n, 4, 2))
    u[..., 0] = (phi0 - i)[:, None]
    rows = [s1] * m + [(s1 + s2) / 2] + [s2] * (n - m - 1)     # central difference at the kink averages
    assert M.std_log_jacobian(u) == pytest.approx(np.std(np.log(rows)), rel=1e-12)


@pytest.mark.parametrize("vol", [(32, 32), (16, 16, 16)])
def test_jacobian_matches_voxelmorph(vol):
    u = _smooth_field(np.random.default_rng(2), vol, amp=3.0, sigma=1.5)
    ours = M.jacobian_determinant(u)
    ref = vxm.py.utils.jacobian_determinant(u)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)
    assert (ours <= 0).any() and (ours > 0).any()   # the field really folds somewhere: a non-trivial check


# ----------------------------------------------------------------------------------------------- Dice
def test_dice_hand_made():
    a = np.zeros((10, 10), np.int32)
    b = np.zeros((10, 10), np.int32)
    a[0:4, 0:4] = 1                                 # 16 voxels
    b[0:4, 2:6] = 1                                 # 16 voxels, overlap 4x2 = 8 -> 2*8/32 = 0.5
    a[6:8, 6:9] = 2                                 # only in a -> 0
    b[9, 9] = 4                                     # only in b -> 0
    a[5, 0:2] = 5
    b[5, 0:2] = 5                                   # identical -> 1
    d = M.dice(a, b)
    assert d == {1: 0.5, 2: 0.0, 4: 0.0, 5: 1.0}
    assert M.mean_dice(a, b) == pytest.approx((0.5 + 0 + 0 + 1) / 4)
    # explicit labels: 3 is absent from both -> excluded, 0 is background -> excluded
    assert M.dice(a, b, labels=[0, 1, 3, 5]) == {1: 0.5, 5: 1.0}
    assert M.mean_dice(a, b, labels=[1, 3, 5]) == pytest.approx(0.75)
    assert M.dice(a.astype(np.float32), b.astype(np.float64)) == d   # integral floats are fine
    assert np.isnan(M.mean_dice(np.zeros((3, 3), int), np.zeros((3, 3), int)))


def test_dice_3d_against_counts():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, (8, 9, 10))
    b = rng.integers(0, 4, (8, 9, 10))
    d = M.dice(a, b)
    assert sorted(d) == [1, 2, 3]
    for lab, v in d.items():
        inter = sum(1 for x, y in zip(a.ravel(), b.ravel()) if x == lab and y == lab)
        assert v == pytest.approx(2 * inter / ((a == lab).sum() + (b == lab).sum()))


def test_dice30_mean_of_lowest_30_percent():
    s = [0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 1.0]
    assert M.dice30(s) == pytest.approx((0.1 + 0.2 + 0.3) / 3)          # n=10 -> 3
    assert M.dice30(s) != pytest.approx(np.percentile(s, 30))            # not Learn2Reg's 30th percentile
    assert M.dice30(s + [0.05]) == pytest.approx((0.05 + 0.1 + 0.2 + 0.3) / 4)   # n=11 -> ceil(3.3) = 4
    assert M.dice30([0.7]) == 0.7                                        # n=1 -> at least 1
    assert M.dice30([0.9, 0.4, 0.8]) == 0.4                              # n=3 -> ceil(0.9) = 1
    sixty_four = np.linspace(0.5, 0.9, 64)
    assert M.dice30(sixty_four) == pytest.approx(sixty_four[:20].mean())  # paper's 64 test pairs -> 20


# ----------------------------------------------------------------------------------------------- HD95
@pytest.mark.parametrize("nd,shift,spacing", [(3, 3, (1.5, 1.0, 2.0)), (2, 4, (0.7, 1.3)), (3, 2, 1.0)])
def test_hd95_shifted_cube_analytic(nd, shift, spacing):
    """B = A + shift·e0, so every surface voxel of either lies exactly shift·sp0 from its copy (max = that);
    the front/back faces alone (> 5 % of all surface voxels) sit at exactly that distance -> HD95 = shift·sp0."""
    vol = (30,) * nd
    a = np.zeros(vol, np.int16)
    b = np.zeros(vol, np.int16)
    sl = (slice(6, 18),) * nd
    a[sl] = 2
    b[(slice(6 + shift, 18 + shift),) + sl[1:]] = 2
    sp0 = spacing if np.ndim(spacing) == 0 else spacing[0]
    assert M.hd95(a, b, spacing) == {2: pytest.approx(shift * sp0)}
    assert M.hd95(a, a, spacing) == {2: 0.0}


def _brute_surface(m):
    """Voxels of m with a face neighbour outside m (or outside the image)."""
    p = np.pad(m, 1, constant_values=False)
    core = tuple(slice(1, -1) for _ in m.shape)
    out = np.zeros(m.shape, bool)
    for ax in range(m.ndim):
        for d in (-1, 1):
            nb = tuple(slice(1 + d, p.shape[k] - 1 + d) if k == ax else core[k] for k in range(m.ndim))
            out |= ~p[nb]
    return m & out


def _brute_hd95(ma, mb, sp):
    pa = np.argwhere(_brute_surface(ma)) * np.asarray(sp)
    pb = np.argwhere(_brute_surface(mb)) * np.asarray(sp)
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return np.percentile(np.concatenate([dist.min(1), dist.min(0)]), 95)


@pytest.mark.parametrize("vol,sp", [((18, 20, 16), (1.0, 1.5, 0.8)), ((40, 36), (2.0, 1.0))])
def test_hd95_matches_brute_force(vol, sp):
    rng = np.random.default_rng(4)
    a = np.zeros(vol, np.int32)
    b = np.zeros(vol, np.int32)
    for lab in (1, 2):
        a[ndimage.gaussian_filter(rng.random(vol), 2) > 0.52] = lab
        b[ndimage.gaussian_filter(rng.random(vol), 2) > 0.52] = lab
    h = M.hd95(a, b, sp)
    assert sorted(h) == [1, 2]
    for lab in (1, 2):
        assert h[lab] == pytest.approx(_brute_hd95(a == lab, b == lab, sp), rel=1e-9)
        assert h[lab] > 0


def test_hd95_empty_structure_is_nan():
    a = np.zeros((10, 10, 10), int)
    b = np.zeros((10, 10, 10), int)
    a[2:5, 2:5, 2:5] = 1
    b[2:5, 2:5, 2:5] = 1
    a[7:9, 7:9, 7:9] = 3                               # label 3 only in a
    h = M.hd95(a, b, 1.0)
    assert h[1] == 0.0 and np.isnan(h[3]) and 2 not in h


# ------------------------------------------------------------------------------------------- aggregate
def test_registration_metrics_aggregate():
    rng = np.random.default_rng(5)
    vol = (16, 18, 14)
    f = np.zeros(vol, int)
    m = np.zeros(vol, int)
    f[3:10, 3:12, 2:9] = 1
    m[4:11, 3:12, 2:9] = 1
    f[11:14, 2:6, 9:12] = 2
    m[11:14, 2:6, 9:12] = 2
    u = _smooth_field(rng, vol, amp=1.0)
    jac = vxm.py.utils.jacobian_determinant(u)
    r = M.registration_metrics(f, m, u)
    assert r["dice"][1] == pytest.approx(2 * 6 * 9 * 7 / (2 * 7 * 9 * 7)) and r["dice"][2] == 1.0
    assert r["dice_mean"] == pytest.approx((r["dice"][1] + 1.0) / 2)
    assert r["folds_pct"] == pytest.approx(100.0 * np.mean(jac <= 0))
    assert r["std_log_jac"] == pytest.approx(np.std(np.log(np.clip(jac, 1e-9, None))))
    assert "hd95" not in r
    r = M.registration_metrics(f, m, u[None], spacing=(1.0, 2.0, 1.0))
    assert r["hd95"] == {1: pytest.approx(1.0), 2: 0.0} and r["hd95_mean"] == pytest.approx(0.5)
    ident = M.registration_metrics(f, f, np.zeros(vol + (3,)))
    assert ident["folds_pct"] == 0.0 and ident["std_log_jac"] == 0.0 and ident["dice_mean"] == 1.0


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_input_error():
    lab = np.zeros((8, 8), int)
    bad = [
        (lambda: M.dice(lab, np.zeros((8, 9), int)), "shape"),
        (lambda: M.hd95(lab, np.zeros((8, 8, 1), int), 1.0), "shape"),
        (lambda: M.dice(lab, lab + 0.5), "integer"),
        (lambda: M.hd95(lab, lab, spacing=(1.0, 1.0, 1.0)), "spacing"),
        (lambda: M.jacobian_determinant(np.zeros((8, 8, 3))), "displacement"),       # 2-D vol, 3 comps
        (lambda: M.jacobian_determinant(np.zeros((2, 8, 8, 2))), "displacement"),    # batch of 2
        (lambda: M.jacobian_determinant(np.zeros((8, 8, 8, 4))), "displacement"),
        (lambda: M.jacobian_determinant(np.full((8, 8, 2), np.nan)), "nan"),
        (lambda: M.folding_fraction(np.zeros((8, 8, 2)), mask=np.zeros((8, 8), bool)), "empty"),
        (lambda: M.folding_fraction(np.ones((8, 8)), mask=np.ones((8, 7), bool)), "mask shape"),
        (lambda: M.std_log_jacobian(np.ones((8, 8)), mask=np.zeros((8, 8))), "empty"),
        (lambda: M.dice30([]), "empty"),
        (lambda: M.dice30([0.5, np.nan]), "nan"),
        (lambda: M.registration_metrics(lab, lab, np.zeros((8, 9, 2))), "spatial shape"),
        (lambda: M.registration_metrics(lab, np.zeros((9, 8), int), np.zeros((8, 8, 2))), "moved_labels"),
    ]
    for fn, words in bad:
        with pytest.raises(ContraRegInputError, match=words):
            fn()
    assert issubclass(ContraRegInputError, ValueError)


def test_brute_surface_agrees_with_erosion_definition():
    """Guards the brute-force reference itself: border voxels count as surface in both."""
    m = np.zeros((6, 7), bool)
    m[0:3, 2:5] = True
    expected = m.copy()
    expected[1, 3] = False                              # the only interior voxel (all 4 neighbours inside)
    np.testing.assert_array_equal(_brute_surface(m), expected)
