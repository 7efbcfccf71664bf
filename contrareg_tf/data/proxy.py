"""Built-in multi-modal proxy data set from the MNI ICBM152 2009a maps shipped inside the nilearn wheel
(REFERENCE.md §8); no download, fully deterministic from (seed, subject index).

Per subject k (``rng = default_rng([seed, k])``):
- template on the target grid: the real T1w and the GM/WM probability maps resampled to ``spacing`` mm
  (Gaussian anti-aliasing, grid centred on the brain's bounding box); CSF = brain mask − GM − WM.
  2-D mode: an axial slice (z drawn from a band of ``slice_band_mm`` around MNI z = ``slice_z_mm``) is
  taken FIRST, everything after is in-plane 2-D.
- a smooth diffeomorphism: SVF with i.i.d. N(0, 1) values on a coarse grid (control points every
  ``svf_spacing_mm``), cubic B-spline upsampled, scaled so max |v| = ``max_disp`` voxels, integrated by
  scaling and squaring. Saved as ``warp`` (voxel units, ij order, shape (*vol, ndim)): the subject is the
  template pulled back, ``subject(x) = template(x + u(x))``; ``warp_inv`` is exp(−v).
- T1w = warped real T1w; T2w rendered from the warped tissue maps with per-subject class intensities
  (CSF > GM > WM), a smooth multiplicative bias field, slight Gaussian blur and Rician noise; both
  normalised to [0, 1] by robust percentiles. Labels = argmax(CSF, GM, WM) → {1, 2, 3} (0 background) on
  the template, warped with nearest neighbour; mask = labels > 0.
"""
import functools
import hashlib
import json
import math
import os
import time
from typing import Optional, Sequence

import numpy as np
import scipy.ndimage as ndi

from ..config import PAPER
from ..atomic import write_json
from ..errors import ContraRegInputError
from .dataset import (CSV_NAME, Description, Subject, assign_splits, load_description,
                      write_description)
from .io import load_nifti, normalize_intensity, save_nifti

PROXY_VERSION = 1
PROXY_JSON = "proxy.json"
MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LABEL_NAMES = {1: "CSF", 2: "GM", 3: "WM"}
# T2w class intensity ranges (before bias/noise/normalisation): disjoint, so CSF > GM > WM always.
T2_RANGES = {"csf": (0.8, 1.0), "gm": (0.45, 0.62), "wm": (0.2, 0.35)}


def default_cache_dir() -> str:
    """``$CONTRAREG_CACHE`` or ``~/.cache/contrareg_tf``."""
    return os.path.expanduser(os.environ.get("CONTRAREG_CACHE") or os.path.join("~", ".cache", "contrareg_tf"))


def nilearn_data_dir() -> str:
    """Folder of the data files shipped inside the nilearn wheel (never a fetcher)."""
    import nilearn
    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")


@functools.lru_cache(maxsize=1)
def _mni():
    """MNI maps as float32 in [0, 1]: t1, gm, wm, brain (binary, hole-filled), plus the affine."""
    d = nilearn_data_dir()
    vols = {}
    for k, f in MNI_FILES.items():
        p = os.path.join(d, f)
        if not os.path.isfile(p):
            raise ContraRegInputError(f"{p}: MNI template file missing from the nilearn installation")
        v = load_nifti(p, ndim=3)
        vols[k] = v.data / 255.0
        affine = v.affine
    vols["brain"] = ndi.binary_fill_holes(vols["t1"] > 0).astype(np.float32)
    return vols, affine


@functools.lru_cache(maxsize=2)
def _smoothed_mni(spacing: float):
    """MNI maps Gaussian-filtered for resampling to ``spacing`` mm (FWHM = spacing, 1 mm source)."""
    vols, affine = _mni()
    sig = math.sqrt(max(spacing ** 2 - 1.0, 0.0)) / 2.3548
    if sig < 0.2:
        return vols, affine
    return {k: ndi.gaussian_filter(v, sig, mode="constant") for k, v in vols.items()}, affine


@functools.lru_cache(maxsize=1)
def _brain_centre_mm():
    """World (mm) centre of the MNI brain mask's bounding box."""
    vols, affine = _mni()
    idx = np.nonzero(vols["brain"] > 0.5)
    lo = np.array([i.min() for i in idx], float)
    hi = np.array([i.max() for i in idx], float)
    return (affine[:3, :3] @ ((lo + hi) / 2) + affine[:3, 3])


def _sample(vols, affine, world_pts):
    """Sample every map at world points (3, *grid) mm with linear interpolation."""
    inv = np.linalg.inv(affine)
    g = world_pts.reshape(3, -1)
    vox = inv[:3, :3] @ g + inv[:3, 3:4]
    out = {}
    for k, v in vols.items():
        out[k] = ndi.map_coordinates(v, vox, order=1, mode="constant", cval=0.0).reshape(
            world_pts.shape[1:]).astype(np.float32)
    return out


def _template(shape: Sequence[int], spacing: float, z_mm: Optional[float] = None):
    """Template maps on the target grid and its affine. 3-D if ``z_mm`` is None, else the 2-D axial
    slice at world z = ``z_mm``."""
    vols, affine = _smoothed_mni(float(spacing))
    c = _brain_centre_mm()
    shape = tuple(shape)
    origin = np.array(c, float)
    nd = len(shape)
    for i, n in enumerate(shape):
        origin[i] = c[i] - (n - 1) / 2.0 * spacing
    axes = [origin[i] + spacing * np.arange(n) for i, n in enumerate(shape)]
    if nd == 3:
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), 0)
    else:
        origin[2] = z_mm
        xx, yy = np.meshgrid(*axes, indexing="ij")
        pts = np.stack([xx, yy, np.full_like(xx, z_mm)], 0)
    maps = _sample(vols, affine, pts)
    brain = maps["brain"]
    maps["csf"] = np.clip(brain - maps["gm"] - maps["wm"], 0.0, 1.0)
    pv = np.stack([maps["csf"], maps["gm"], maps["wm"]], 0)
    labels = np.where(brain > 0.5, 1 + np.argmax(pv, 0), 0).astype(np.int16)
    out_aff = np.diag([spacing, spacing, spacing, 1.0])
    out_aff[:3, 3] = origin
    return maps, labels, out_aff


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), 0)


def _warp(img, disp, grid, order=1):
    """Pull-back ``img(x + disp(x))``; ``disp`` is (ndim, *vol) in voxels."""
    return ndi.map_coordinates(img, grid + disp, order=order, mode="constant", cval=0.0,
                               prefilter=False).astype(img.dtype)


def _compose_self(u, grid):
    """u + u∘(id + u) (one squaring step), border values extended."""
    coords = grid + u
    return u + np.stack([ndi.map_coordinates(c, coords, order=1, mode="nearest", prefilter=False)
                         for c in u], 0)


def integrate_svf(v, steps: Optional[int] = None, grid=None):
    """Scaling and squaring exp(v) for a stationary velocity ``v`` (ndim, *vol) in voxels; returns the
    displacement (ndim, *vol). ``steps`` defaults to enough halvings that the first step is small:
    max |v| / 2^steps <= 1/4 voxel and max |∇v| / 2^steps <= 1/20 (at least 4)."""
    v = np.asarray(v, np.float32)
    if steps is None:
        vmax = float(np.sqrt((v ** 2).sum(0)).max())
        gmax = max(float(np.abs(np.gradient(c, axis=i)).max()) for c in v for i in range(v.shape[0]))
        steps = max(4, int(math.ceil(math.log2(max(vmax * 4.0, gmax * 20.0, 1.0)))))
    grid = _grid(v.shape[1:]) if grid is None else grid
    u = v / np.float32(2.0 ** steps)
    for _ in range(steps):
        u = _compose_self(u, grid)
    return u


def _bspline_matrix(n: int, c: int) -> np.ndarray:
    """(n, c) matrix evaluating a cubic B-spline with ``c`` coefficients spread over ``n`` samples
    (end coefficients at the first/last sample), rows normalised to sum 1."""
    pos = np.linspace(0.0, c - 1.0, n)[:, None] - np.arange(c)[None, :]
    a = np.abs(pos)
    w = np.where(a < 1, 2 / 3 - a ** 2 + a ** 3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))
    return w / w.sum(1, keepdims=True)


def smooth_upsample(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Cubic B-spline upsampling of a coarse grid (*cshape) to ``shape`` (separable, C2-smooth)."""
    out = coarse
    for ax, n in enumerate(shape):
        m = _bspline_matrix(n, coarse.shape[ax])
        out = np.moveaxis(np.tensordot(m, np.moveaxis(out, ax, 0), axes=(1, 0)), 0, ax)
    return out


def random_svf(rng, shape, spacing: float, max_disp: float, svf_spacing_mm: float = 32.0):
    """Smooth SVF (ndim, *shape): N(0,1) on a coarse grid (one control point per ``svf_spacing_mm``),
    cubic B-spline upsampled, scaled so its maximal vector norm is ``max_disp`` voxels."""
    nd = len(shape)
    cshape = tuple(max(4, int(math.ceil(n * spacing / svf_spacing_mm)) + 1) for n in shape)
    coarse = rng.standard_normal((nd,) + cshape)
    v = np.stack([smooth_upsample(c, shape) for c in coarse], 0)
    norm = np.sqrt((v ** 2).sum(0)).max()
    return (v * (max_disp / max(norm, 1e-12))).astype(np.float32)


def _smooth_field(rng, shape, n_ctrl=4, std=0.15):
    coarse = rng.standard_normal((n_ctrl,) * len(shape)) * std
    return np.exp(smooth_upsample(coarse, shape)).astype(np.float32)


def render_t2(rng, csf, gm, wm, bias_std=0.15, blur=(0.3, 0.7), noise=(0.01, 0.03)):
    """Synthetic T2w from tissue maps: random class intensities (CSF > GM > WM), smooth multiplicative
    bias, Gaussian blur (sigma in voxels drawn from ``blur``), Rician noise (sigma drawn from ``noise``)."""
    ic, ig, iw = (rng.uniform(*T2_RANGES[k]) for k in ("csf", "gm", "wm"))
    img = ic * csf + ig * gm + iw * wm
    img = img * _smooth_field(rng, csf.shape, std=bias_std)
    img = ndi.gaussian_filter(img, rng.uniform(*blur))
    s = rng.uniform(*noise)
    n1 = rng.standard_normal(img.shape)
    n2 = rng.standard_normal(img.shape)
    img = np.sqrt((img + s * n1) ** 2 + (s * n2) ** 2)
    return img.astype(np.float32), dict(csf=ic, gm=ig, wm=iw, noise=s)


def _params(n_subjects, shape, spacing, seed, max_disp, ndim, svf_spacing_mm, slice_z_mm, slice_band_mm):
    p = dict(version=PROXY_VERSION, n_subjects=int(n_subjects), shape=[int(s) for s in shape],
             spacing=float(spacing), seed=int(seed), max_disp=float(max_disp), ndim=int(ndim),
             svf_spacing_mm=float(svf_spacing_mm))
    if ndim == 2:
        p.update(slice_z_mm=float(slice_z_mm), slice_band_mm=float(slice_band_mm))
    return p


def proxy_dir(params: dict, root: Optional[str] = None) -> str:
    """Cache folder for a parameter set: ``<root or default_cache_dir()>/proxy/<readable-id>-<hash>``."""
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    tag = "x".join(map(str, params["shape"]))
    name = f"{params['ndim']}d_{tag}_{params['spacing']:g}mm_n{params['n_subjects']}_s{params['seed']}_{h}"
    return os.path.join(root or default_cache_dir(), "proxy", name)


def _try_reuse(out_dir, params):
    pj = os.path.join(out_dir, PROXY_JSON)
    try:
        with open(pj) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    if old.get("params") != params or not old.get("complete", False):
        return None
    try:
        desc = load_description(os.path.join(out_dir, CSV_NAME), check_files=True)
    except ContraRegInputError:
        return None
    desc.meta.update(old)
    return desc


def build_proxy(out_dir=None, n_subjects: int = PAPER.proxy_subjects, shape: Sequence[int] = (64, 64, 64),
                spacing: float = 3.0, seed: int = 0, max_disp: float = PAPER.proxy_max_disp, ndim: int = 3,
                svf_spacing_mm: float = 32.0, slice_z_mm: float = 12.0, slice_band_mm: float = 4.0,
                verbose: bool = False) -> Description:
    """Build (or reuse) the proxy data set in ``out_dir`` (default: a folder under
    :func:`default_cache_dir` named after the parameters) and return its :class:`Description`.

    Writes ``<out_dir>/sub-XXX/{t1,t2,labels,mask}.nii.gz`` and ``{warp,warp_inv}.nii`` (float fields,
    uncompressed), ``dataset.csv`` (with a seeded train/val/test split) and ``proxy.json`` (the parameters,
    marked complete when the build ends). A complete build with identical parameters is reused as is; an
    incomplete or different one is rebuilt; a non-empty folder without ``proxy.json`` is refused.
    2-D mode (``ndim=2``, ``shape`` 2-D): one axial slice per subject, z ~ U[slice_z_mm ± slice_band_mm]
    (MNI mm), then in-plane 2-D deformations only.
    """
    shape = tuple(int(s) for s in shape)
    if ndim not in (2, 3) or len(shape) != ndim:
        raise ContraRegInputError(f"build_proxy: shape {shape} does not match ndim={ndim} (need 2 or 3 dims)")
    if n_subjects < 1 or any(s < 4 for s in shape) or spacing <= 0 or max_disp < 0:
        raise ContraRegInputError(f"build_proxy: invalid parameters n_subjects={n_subjects}, shape={shape}, "
                                  f"spacing={spacing}, max_disp={max_disp}")
    params = _params(n_subjects, shape, spacing, seed, max_disp, ndim, svf_spacing_mm, slice_z_mm,
                     slice_band_mm)
    out_dir = os.fspath(out_dir) if out_dir is not None else proxy_dir(params)
    if os.path.isdir(out_dir):
        reused = _try_reuse(out_dir, params)
        if reused is not None:
            return reused
        if os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, PROXY_JSON)):
            raise ContraRegInputError(f"{out_dir}: folder exists, is not empty and holds no proxy build; "
                                      f"refusing to write into it")
    os.makedirs(out_dir, exist_ok=True)
    # mark the folder as ours first: an interrupted build is then rebuilt, never mistaken for user data
    write_json(os.path.join(out_dir, PROXY_JSON), dict(params=params, complete=False), indent=1,
               sort_keys=True)
    t0 = time.time()
    if ndim == 3:
        tmpl3 = _template(shape, spacing)
    grid = _grid(shape)
    names = [f"sub-{k:03d}" for k in range(n_subjects)]
    splits = assign_splits(names, seed)
    subjects = []
    for k, name in enumerate(names):
        rng = np.random.default_rng([int(seed), k])
        if ndim == 3:
            maps, labels0, aff = tmpl3
        else:
            z = slice_z_mm + rng.uniform(-slice_band_mm, slice_band_mm)
            maps, labels0, aff = _template(shape, spacing, z_mm=z)
        v = random_svf(rng, shape, spacing, max_disp, svf_spacing_mm)
        u = integrate_svf(v, grid=grid)
        u_inv = integrate_svf(-v, grid=grid)
        w = {key: _warp(maps[key], u, grid) for key in ("t1", "csf", "gm", "wm")}
        labels = _warp(labels0, u, grid, order=0).astype(np.int16)
        t1 = normalize_intensity(w["t1"])
        t2, _ = render_t2(rng, w["csf"], w["gm"], w["wm"])
        t2 = normalize_intensity(t2)
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        files = {}
        for key, arr in (("t1", t1), ("t2", t2), ("labels", labels), ("mask", (labels > 0).astype(np.uint8)),
                         ("warp", np.moveaxis(u, 0, -1)), ("warp_inv", np.moveaxis(u_inv, 0, -1))):
            ext = ".nii" if key.startswith("warp") else ".nii.gz"  # float fields barely compress (~7%)
            files[key] = save_nifti(os.path.join(d, key + ext), arr, affine=aff)
        subjects.append(Subject(subject=name, t1=files["t1"], t2=files["t2"], labels=files["labels"],
                                mask=files["mask"], split=splits[k],
                                extra={"warp": files["warp"], "warp_inv": files["warp_inv"]}))
        if verbose:
            print(f"proxy {name} ({k + 1}/{n_subjects}) {time.time() - t0:.1f}s", flush=True)
    write_description(os.path.join(out_dir, CSV_NAME), subjects)
    meta = dict(params=params, complete=True, label_names={str(k): v for k, v in LABEL_NAMES.items()},
                source="nilearn MNI ICBM152 2009a (T1w, GM, WM)", warp_convention=(
                    "subject(x) = template(x + warp(x)); voxel units, ij order; warp_inv = exp(-v)"))
    write_json(os.path.join(out_dir, PROXY_JSON), meta, indent=1, sort_keys=True)
    desc = load_description(os.path.join(out_dir, CSV_NAME))
    desc.meta.update(meta, build_seconds=time.time() - t0)
    return desc


# ----------------------------------------------------------------------------------------------------
# statistics

def _load_subject(s: Subject):
    t1 = load_nifti(s.t1).data
    t2 = load_nifti(s.t2).data
    lab = load_nifti(s.labels).data.astype(np.int32)
    mask = load_nifti(s.mask).data > 0 if s.mask else lab > 0
    return t1, t2, lab, mask


def describe_proxy(desc: Description, split: str = "all") -> dict:
    """Statistics over the subjects of ``split``: per modality mean/std inside the mask and mean per
    label, label volume fractions (of the mask), all averaged over subjects."""
    subs = desc.split(split)
    if not subs:
        raise ContraRegInputError(f"describe_proxy: split {split!r} has no subjects")
    acc = {"t1": [], "t2": []}
    frac = []
    for s in subs:
        t1, t2, lab, mask = _load_subject(s)
        for key, img in (("t1", t1), ("t2", t2)):
            acc[key].append([img[mask].mean(), img[mask].std()] +
                            [img[lab == j].mean() if (lab == j).any() else np.nan for j in LABEL_NAMES])
        frac.append([(lab[mask] == j).mean() for j in LABEL_NAMES])
    out = {"n_subjects": len(subs), "shape": list(t1.shape), "modalities": {}}
    for key, rows in acc.items():
        m = np.nanmean(np.array(rows, float), 0)
        out["modalities"][key] = {"mean": float(m[0]), "std": float(m[1]),
                                  "class_mean": {LABEL_NAMES[j]: float(m[2 + i])
                                                 for i, j in enumerate(LABEL_NAMES)}}
    f = np.mean(np.array(frac, float), 0)
    out["label_fractions"] = {LABEL_NAMES[j]: float(f[i]) for i, j in enumerate(LABEL_NAMES)}
    return out


def _dice_per_label(a, b, labels):
    out = []
    for j in labels:
        x, y = a == j, b == j
        den = x.sum() + y.sum()
        out.append(2.0 * np.logical_and(x, y).sum() / den if den else np.nan)
    return np.array(out, float)


def _pairs_of(desc, pairs, n_pairs, seed, split):
    subs = desc.split(split)
    if pairs is None:
        from .pairs import make_pairs
        pairs = make_pairs(subs, n_pairs, seed)
    return subs, pairs


def dice_before(desc: Description, pairs=None, n_pairs: Optional[int] = 8, seed: int = 0,
                split: str = "all", labels=tuple(LABEL_NAMES)) -> dict:
    """Dice of the label maps of inter-subject pairs before registration (identity warp).

    ``pairs``: list of (a, b) indices into ``desc.split(split)``; default ``make_pairs(.., n_pairs, seed)``.
    Returns ``{'mean': float, 'per_label': {name: mean}, 'per_pair': [mean over labels per pair]}``."""
    subs, pairs = _pairs_of(desc, pairs, n_pairs, seed, split)
    cache = {}

    def lab(i):
        if i not in cache:
            cache[i] = load_nifti(subs[i].labels).data.astype(np.int32)
        return cache[i]

    d = np.array([_dice_per_label(lab(a), lab(b), labels) for a, b in pairs])
    return _dice_summary(d, labels)


def _dice_summary(d, labels):
    return {"mean": float(np.nanmean(d)),
            "per_label": {LABEL_NAMES.get(j, str(j)): float(np.nanmean(d[:, i])) for i, j in enumerate(labels)},
            "per_pair": [float(x) for x in np.nanmean(d, 1)]}


def true_pair_warp(desc_or_subjects, a: int, b: int, split: str = "all") -> np.ndarray:
    """Ground-truth displacement (*vol, ndim) that registers subject ``a`` (moving) to subject ``b``
    (fixed) of a 3-D proxy: φ = φ_a⁻¹ ∘ φ_b, i.e. ``a(φ(y)) ≈ b(y)``. (In 2-D mode subjects come from
    slightly different slices, so this is only the in-plane part.)"""
    subs = desc_or_subjects.split(split) if isinstance(desc_or_subjects, Description) else desc_or_subjects
    for s in (subs[a], subs[b]):
        if "warp" not in s.extra or "warp_inv" not in s.extra:
            raise ContraRegInputError(f"subject {s.subject!r}: no proxy warp files (not a proxy build?)")
    ub = np.moveaxis(load_nifti(subs[b].extra["warp"], vector=True).data, -1, 0)
    ua_inv = np.moveaxis(load_nifti(subs[a].extra["warp_inv"], vector=True).data, -1, 0)
    grid = _grid(ub.shape[1:])
    coords = grid + ub
    comp = np.stack([ndi.map_coordinates(c, coords, order=1, mode="nearest", prefilter=False)
                     for c in ua_inv], 0)
    return np.moveaxis(ub + comp, 0, -1)


def dice_ceiling(desc: Description, pairs=None, n_pairs: Optional[int] = 8, seed: int = 0,
                 split: str = "all", labels=tuple(LABEL_NAMES)) -> dict:
    """Dice after warping subject a's labels with the ground-truth :func:`true_pair_warp` (nearest
    neighbour): the best a registration can do on the proxy. Same output as :func:`dice_before`."""
    subs, pairs = _pairs_of(desc, pairs, n_pairs, seed, split)
    rows = []
    for a, b in pairs:
        phi = np.moveaxis(true_pair_warp(subs, a, b), -1, 0)
        la = load_nifti(subs[a].labels).data.astype(np.int32)
        lb = load_nifti(subs[b].labels).data.astype(np.int32)
        rows.append(_dice_per_label(_warp(la, phi, _grid(la.shape), order=0), lb, labels))
    return _dice_summary(np.array(rows), labels)
