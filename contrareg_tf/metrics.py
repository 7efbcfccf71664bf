"""Registration metrics (numpy): Dice, Dice30, Jacobian determinant, % folding, std log|J|, HD95.
Conventions: ContraReg §3 evaluation (Dice over structures, Dice30, % folds, std log|J|; the log clip
as in Learn2Reg); DNS paper for HD95.

- Label maps: integer arrays (float arrays with integral values are accepted), 0 = background, never scored.
- Displacements u: voxel units, index (ij) order, shape (*vol, ndim) (a leading batch axis of 1 is accepted);
  φ(x) = x + u(x), voxelmorph's convention.
- Dice30 is the paper's definition: the *mean of the lowest 30 %* of per-pair Dice scores, not
  Learn2Reg's 30th percentile.
"""
import math

import numpy as np
from scipy import ndimage

from .errors import ContraRegInputError

LOG_JAC_CLIP = 1e-9
"""det|J| is clipped to this before the log in ``std_log_jacobian`` (Learn2Reg convention)."""


# ----------------------------------------------------------------------------------------------- labels
def _labels(a, name):
    a = np.asarray(a)
    if a.dtype == bool:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ContraRegInputError(f"{name}: label map must hold integer labels (dtype {a.dtype})")
        a = a.astype(np.int64)
    return a


def _label_pair(a, b, names=("a", "b")):
    a, b = _labels(a, names[0]), _labels(b, names[1])
    if a.shape != b.shape:
        raise ContraRegInputError(f"label maps {names[0]} {a.shape} and {names[1]} {b.shape} differ in shape")
    return a, b


def _label_list(a, b, labels):
    """Labels to score: the given ones (or the union of labels present), minus 0 and labels absent from both."""
    present = set(np.union1d(np.unique(a), np.unique(b)).tolist())
    cand = present if labels is None else {int(x) for x in np.atleast_1d(labels)}
    return sorted(x for x in cand if x != 0 and x in present)


def _counts(a, b, ids):
    """(|A_l|, |B_l|, |A_l ∩ B_l|) for every label l of ``ids`` (one pass each via bincount)."""
    ids = np.asarray(ids, np.int64)
    lo = int(min(a.min(), b.min()))
    hi = int(max(a.max(), b.max()))
    if lo >= 0 and hi < 2 ** 20:
        n = hi + 1
        ca, cb = np.bincount(a.ravel(), minlength=n), np.bincount(b.ravel(), minlength=n)
        ci = np.bincount(a[a == b].ravel(), minlength=n)
        ok = (ids >= 0) & (ids < n)
        idx = np.where(ok, ids, 0)
        return tuple(np.where(ok, c[idx], 0) for c in (ca, cb, ci))
    ma = [np.count_nonzero(a == j) for j in ids]   # negative or huge label values: plain loop
    mb = [np.count_nonzero(b == j) for j in ids]
    mi = [np.count_nonzero((a == j) & (b == j)) for j in ids]
    return np.array(ma), np.array(mb), np.array(mi)


def dice_per_label(a, b, labels):
    """Dice 2|A∩B| / (|A|+|B|) for each label of ``labels`` -> float array aligned with ``labels``: nan where
    the label is absent from both maps, 0 where it is present in only one."""
    a, b = _label_pair(a, b)
    na, nb, ni = _counts(a, b, labels)
    den = (na + nb).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2.0 * ni / den, np.nan)


def dice(a, b, labels=None):
    """Per-label Dice 2|A∩B| / (|A|+|B|) -> {label: dice}. Background 0 is excluded; a label absent from
    both maps is excluded (also when listed in ``labels``); a label present in only one scores 0."""
    a, b = _label_pair(a, b)
    ids = _label_list(a, b, labels)
    return {lab: float(v) for lab, v in zip(ids, dice_per_label(a, b, ids))} if ids else {}


def mean_dice(a, b, labels=None):
    """Mean of ``dice(a, b, labels)`` over labels (nan when no label is scored)."""
    d = dice(a, b, labels)
    return float(np.mean(list(d.values()))) if d else float("nan")


def pair_structures(fixed, moving):
    """The structures a registered pair is scored on: labels (≠ 0) present in both the fixed and the moving
    label map *before* registration. Mean Dice over structures (the paper's "mean Dice over anatomical
    structures") averages over these; a structure the warp loses from the moved map scores 0, one that only
    one subject has (e.g. out of a 2-D slice) is not scored."""
    f, m = _label_pair(fixed, moving, ("fixed", "moving"))
    return sorted(int(x) for x in np.intersect1d(np.unique(f), np.unique(m)) if x != 0)


def structure_dice(fixed, moving, moved, labels):
    """Dice of ``moved`` against ``fixed`` for each label of ``labels``, scored on the pair's structures only
    (:func:`pair_structures` of ``fixed`` and the unregistered ``moving``): a float array aligned with
    ``labels``, nan where the label is not one of the pair's structures. One row of a (pairs × structures)
    Dice table whose nan-mean over a row is the pair's mean Dice."""
    ids = np.asarray(labels, np.int64)
    out = np.full(len(ids), np.nan)
    keep = np.isin(ids, pair_structures(fixed, moving))
    out[keep] = dice_per_label(fixed, moved, ids[keep])
    return out


def dice30(scores, fraction=0.3):
    """Dice30 (ContraReg): mean of the lowest ``fraction`` of per-pair Dice scores.

    k = ceil(fraction · n) lowest scores, at least 1 (n = 10 -> 3, n = 11 -> 4, n = 64 -> 20, n = 1 -> 1);
    fraction · n is rounded to 9 decimals before the ceil (a guard against float error adding a score
    for arbitrary fractions)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ContraRegInputError("dice30: scores is empty")
    if not np.all(np.isfinite(s)):
        raise ContraRegInputError("dice30: scores contain nan/inf")
    if not 0 < fraction <= 1:
        raise ContraRegInputError(f"dice30: fraction must be in (0, 1], got {fraction!r}")
    k = max(1, math.ceil(round(fraction * s.size, 9)))
    return float(np.mean(np.sort(s)[:k]))


# --------------------------------------------------------------------------------------------- jacobian
def _disp(u, name="u"):
    """Validate a displacement (*vol, ndim) or (1, *vol, ndim) -> (*vol, ndim) float array."""
    u = np.asarray(u)
    nd = u.shape[-1] if u.ndim else -1
    if nd in (2, 3) and u.ndim == nd + 2 and u.shape[0] == 1:
        u = u[0]
    if nd not in (2, 3) or u.ndim != nd + 1:
        raise ContraRegInputError(
            f"{name}: displacement must have shape (*vol, ndim) or (1, *vol, ndim) with ndim 2 or 3 "
            f"(last axis = number of spatial axes), got {np.shape(u)}")
    if min(u.shape[:-1]) < 2:
        raise ContraRegInputError(f"{name}: every spatial axis needs >= 2 voxels, got {u.shape}")
    if not np.issubdtype(u.dtype, np.floating):
        u = u.astype(np.float64)
    if not np.all(np.isfinite(u)):
        raise ContraRegInputError(f"{name}: displacement contains nan/inf")
    return u


def _is_disp(x):
    x = np.asarray(x)
    nd = x.shape[-1] if x.ndim else -1
    return nd in (2, 3) and (x.ndim == nd + 1 or (x.ndim == nd + 2 and x.shape[0] == 1))


def jacobian_determinant(u):
    """det ∇φ for φ(x) = x + u(x), u of shape (*vol, ndim) or (1, *vol, ndim) in voxel / ij units, ndim 2
    or 3; ∂u_k/∂x_i by central differences (np.gradient, one-sided at the border) -> (*vol,)."""
    u = _disp(u)
    nd = u.shape[-1]
    # m[k][i] = ∂φ_k / ∂x_i = δ_ki + ∂u_k / ∂x_i
    m = [[np.gradient(u[..., k], axis=i) + (k == i) for i in range(nd)] for k in range(nd)]
    if nd == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def _jac(u_or_jac, name):
    """A displacement (recognised by its shape: last axis = number of spatial axes, 2 or 3) is turned into
    its Jacobian determinant; anything else is taken as a determinant map. (A 3-D determinant map whose last
    axis has length 2 would read as a 2-D displacement: pass displacements or 2-D/3-D maps unambiguously.)"""
    if _is_disp(u_or_jac):
        return jacobian_determinant(u_or_jac)
    j = np.asarray(u_or_jac, dtype=np.float64)
    if j.ndim == 0 or j.size == 0:
        raise ContraRegInputError(f"{name}: expected a displacement or a Jacobian determinant map, got {j.shape}")
    if np.any(np.isnan(j)):
        raise ContraRegInputError(f"{name}: Jacobian determinant map contains nan")
    return j


def _select(j, mask, name):
    if mask is None:
        return j.ravel()
    m = np.asarray(mask)
    if m.shape != j.shape:
        raise ContraRegInputError(f"{name}: mask shape {m.shape} != volume shape {j.shape}")
    m = m.astype(bool)
    if not m.any():
        raise ContraRegInputError(f"{name}: mask is empty")
    return j[m]


def folding_fraction(u_or_jac, mask=None):
    """% of voxels with det|J| <= 0 (over all voxels — the paper's 0.5 % budget — or inside ``mask``).
    Accepts a displacement (see ``jacobian_determinant``) or a determinant map."""
    j = _select(_jac(u_or_jac, "folding_fraction"), mask, "folding_fraction")
    return float(100.0 * np.count_nonzero(j <= 0) / j.size)


def std_log_jacobian(jac, mask=None, clip=LOG_JAC_CLIP):
    """Standard deviation of log det|J| (over all voxels or inside ``mask``); det is clipped to ``clip``
    (1e-9, Learn2Reg) before the log so folded voxels count as log(1e-9) rather than nan.
    Accepts a determinant map or a displacement."""
    if not clip > 0:
        raise ContraRegInputError(f"std_log_jacobian: clip must be > 0, got {clip!r}")
    j = _select(_jac(jac, "std_log_jacobian"), mask, "std_log_jacobian")
    return float(np.std(np.log(np.clip(j, clip, None))))


# ------------------------------------------------------------------------------------------------- hd95
def _spacing(spacing, ndim):
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full(ndim, float(sp))
    if sp.shape != (ndim,) or not np.all(sp > 0):
        raise ContraRegInputError(f"spacing must be a positive scalar or {ndim} positive values, got {spacing!r}")
    return tuple(sp.tolist())


def _surface(m):
    """Boundary voxels: the structure minus its binary erosion (face connectivity; voxels on the image
    border count as boundary)."""
    return m & ~ndimage.binary_erosion(m)


def hd95(a, b, spacing=1.0, labels=None, percentile=95.0):
    """Per-label 95th percentile of the symmetric surface distance (mm) -> {label: hd95}.

    Surface distances from every boundary voxel of A to the nearest boundary voxel of B and vice versa
    (scipy ``distance_transform_edt`` with ``sampling=spacing``), pooled, then ``np.percentile`` (linear).
    Labels as in ``dice``; a label empty in one map scores nan."""
    a, b = _label_pair(a, b)
    sp = _spacing(spacing, a.ndim)
    out = {}
    for lab in _label_list(a, b, labels):
        sa, sb = _surface(a == lab), _surface(b == lab)
        if not sa.any() or not sb.any():
            out[lab] = float("nan")
            continue
        da = ndimage.distance_transform_edt(~sb, sampling=sp)[sa]   # A surface -> nearest B surface
        db = ndimage.distance_transform_edt(~sa, sampling=sp)[sb]
        out[lab] = float(np.percentile(np.concatenate([da, db]), percentile))
    return out


# -------------------------------------------------------------------------------------------- aggregate
def registration_metrics(fixed_labels, moved_labels, u, mask=None, spacing=None, labels=None):
    """All metrics of one registered pair -> dict with keys
    ``dice_mean``, ``dice`` ({label: dice}), ``folds_pct`` (% det ≤ 0; inside ``mask`` if given),
    ``std_log_jac`` (inside ``mask`` if given) and, only when ``spacing`` is given, ``hd95``
    ({label: mm}) and ``hd95_mean`` (nan-mean over labels)."""
    f, m = _label_pair(fixed_labels, moved_labels, ("fixed_labels", "moved_labels"))
    u = _disp(u)
    if u.shape[:-1] != f.shape:
        raise ContraRegInputError(f"u spatial shape {u.shape[:-1]} != label map shape {f.shape}")
    jac = jacobian_determinant(u)
    d = dice(f, m, labels)
    out = {"dice_mean": float(np.mean(list(d.values()))) if d else float("nan"), "dice": d,
           "folds_pct": folding_fraction(jac, mask), "std_log_jac": std_log_jacobian(jac, mask)}
    if spacing is not None:
        h = hd95(f, m, spacing, labels)
        vals = [v for v in h.values() if not np.isnan(v)]
        out["hd95"] = h
        out["hd95_mean"] = float(np.mean(vals)) if vals else float("nan")
    return out
