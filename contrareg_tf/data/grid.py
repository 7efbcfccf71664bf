"""A user's scans on the model grid: how they are brought there, and the one line that says so.

The networks run on one fixed grid (``Config.inshape``). A data set's scans reach it in one of two ways:

- **crop/pad** (``spacing`` None; the paper's convention: dHCP volumes preprocessed to 160×192×160 and
  cropped/padded to the grid): centre crop / zero pad in voxel space, the files' voxel size kept
  (``io.crop_or_pad``). A 2-D grid on 3-D scans crops/pads in-plane and keeps every axial slice.
- **resample** (``spacing`` s mm): each subject is resampled in physical space (nibabel world, RAS mm) onto
  ``inshape`` voxels of s mm, axes in the closest RAS order of the scan (``physical.canonical_orientation``),
  the grid centred on the centre of the bounding box of the subject's foreground (its brain mask file, else
  the T1w and T2w foreground estimates). Intensities: a Gaussian anti-aliasing filter where a voxel grows
  (σ = √(s² − s₀²) / 2.3548 mm per axis, FWHM = the new voxel size, the rule of the built-in data), then
  linear interpolation; masks and labels by nearest neighbour; 0 outside the scan. Only grids of the scans'
  dimensionality (3-D grid on 3-D scans, 2-D on 2-D).

Either way the share of each subject's foreground that falls outside the grid is counted, and
:func:`fit_line` states what was done in ONE line per data set: the files' shapes and voxel sizes → the
grid, and the foreground outside it (mean, worst subject). :func:`fit_warning` gives the
``ContraRegWarning`` text when the worst subject loses more than ``config.GRID_OUTSIDE_WARN`` of its
foreground, with the voxel size that would fit it. The choices the paper leaves open (it only crops/pads
preprocessed dHCP volumes): the centring on the foreground, the anti-aliasing rule and the RAS axis order.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import scipy.ndimage as ndi

from ..config import GRID_OUTSIDE_WARN
from ..errors import ContraRegInputError
from .io import crop_or_pad
from .physical import apply_affine, canonical_affine, canonical_orientation, sample, spatial_affine

FWHM_PER_SIGMA = 2.3548      # 2·√(2 ln 2)


@dataclass(frozen=True)
class FitInfo:
    """How one subject came onto the grid: the files' ``shape`` and voxel ``spacing`` (mm), the foreground's
    bounding-box ``extent_mm`` per axis and the fraction ``outside`` of its foreground voxels that the grid
    does not hold."""
    subject: str
    shape: Tuple[int, ...]
    spacing: Tuple[float, ...]
    extent_mm: Tuple[float, ...]
    outside: float


def check_grid(inshape: Sequence[int], ndim: int, multiple: int = 1, spacing: Optional[float] = None,
               name: str = "--inshape") -> Tuple[int, ...]:
    """``inshape`` as a tuple, refused unless it has ``ndim`` positive sizes divisible by ``multiple`` (the
    U-Net's 2^(levels−1)); ``spacing``, if given, must be positive."""
    shape = tuple(int(n) for n in inshape)
    if len(shape) != ndim:
        raise ContraRegInputError(f"{name} {' '.join(map(str, shape))}: the preset's networks are {ndim}-D, "
                                  f"give {ndim} sizes")
    bad = [n for n in shape if n < 1 or n % multiple]
    if bad:
        raise ContraRegInputError(f"{name} {' '.join(map(str, shape))}: every size must be a positive multiple "
                                  f"of {multiple} (the U-Net halves the grid {int(math.log2(multiple))} times)")
    if spacing is not None and not spacing > 0:
        raise ContraRegInputError(f"--spacing {spacing}: must be > 0 mm")
    return shape


def _spacing_of(affine, nd):
    return tuple(float(v) for v in np.linalg.norm(spatial_affine(affine, nd)[:-1, :-1], axis=0))


def _foreground(sub):
    m = np.asarray(sub["mask1"], bool) | np.asarray(sub["mask2"], bool)
    if not m.any():
        raise ContraRegInputError("empty foreground")
    return m


def _extent_mm(m, spacing):
    idx = np.argwhere(m)
    return tuple(float((hi - lo + 1) * s) for lo, hi, s in zip(idx.min(0), idx.max(0), spacing))


def crop_pad_subject(sub: dict, shape: Sequence[int]) -> Tuple[dict, float, np.ndarray]:
    """``dataset.load_subject``'s arrays centre-cropped/zero-padded to ``shape`` (the leading axes: in-plane
    for a 2-D grid on 3-D scans). Returns (arrays, fraction of the foreground cut away, affine of the grid)."""
    shape = tuple(shape)
    out = {k: (crop_or_pad(sub[k], shape)[0] if sub[k] is not None else None)
           for k in ("t1", "t2", "mask1", "mask2", "labels")}
    fg = _foreground(sub)
    kept, info = crop_or_pad(fg, shape)
    shift = np.zeros(4)
    shift[:len(shape)] = np.subtract(info.crop, info.pad)
    affine = np.array(sub["affine"], np.float64)
    affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ shift[:3]
    return out, 1.0 - float(kept.sum()) / float(fg.sum()), affine


def grid_affine(sub: dict, shape: Sequence[int], spacing: float) -> np.ndarray:
    """``(nd+1)²`` affine of the resampling grid of one subject: ``spacing`` mm voxels, the axes of the scan's
    closest RAS order, the grid's centre on the centre of the foreground's bounding box (world mm)."""
    nd = len(shape)
    aff = spatial_affine(sub["affine"], nd)
    ornt = canonical_orientation(sub["affine"], nd)
    axes = canonical_affine(sub["affine"], sub["t1"].shape, ornt)[:-1, :-1]
    axes = axes / np.linalg.norm(axes, axis=0) * float(spacing)
    idx = np.argwhere(_foreground(sub))
    centre = apply_affine(aff, (idx.min(0) + idx.max(0)) / 2.0)
    out = np.eye(nd + 1)
    out[:-1, :-1] = axes
    out[:-1, -1] = centre - axes @ ((np.asarray(shape, float) - 1) / 2.0)
    return out


def _antialias(x, src_spacing, spacing):
    sig = [math.sqrt(max(spacing ** 2 - s ** 2, 0.0)) / FWHM_PER_SIGMA / s for s in src_spacing]
    return ndi.gaussian_filter(x, sig, mode="constant") if max(sig) >= 0.2 else x


def resample_subject(sub: dict, shape: Sequence[int], spacing: float) -> Tuple[dict, float, np.ndarray]:
    """``dataset.load_subject``'s arrays resampled onto ``shape`` voxels of ``spacing`` mm (module docstring).
    Returns (arrays, fraction of the foreground outside the grid, 4×4 affine of the grid)."""
    shape = tuple(int(n) for n in shape)
    nd = len(shape)
    if sub["t1"].ndim != nd:
        raise ContraRegInputError(f"--spacing resamples {nd}-D scans onto a {nd}-D grid; these scans are "
                                  f"{sub['t1'].ndim}-D (give a {sub['t1'].ndim}-D --inshape, or leave --spacing "
                                  f"out to crop/pad)")
    src = spatial_affine(sub["affine"], nd)
    src_sp = _spacing_of(sub["affine"], nd)
    dst = grid_affine(sub, shape, spacing)
    out = {}
    for k in ("t1", "t2"):
        x = _antialias(np.asarray(sub[k], np.float32), src_sp, spacing)
        out[k] = np.clip(sample(x, src, shape, dst, order=1), 0.0, 1.0).astype(np.float32)
    for k in ("mask1", "mask2"):
        out[k] = sample(np.asarray(sub[k], np.uint8), src, shape, dst, order=0) > 0
    out["labels"] = sample(sub["labels"], src, shape, dst, order=0) if sub["labels"] is not None else None
    fg = np.argwhere(_foreground(sub)).astype(np.float64)
    vox = apply_affine(np.linalg.inv(dst) @ src, fg)
    inside = np.all((vox > -0.5) & (vox < np.asarray(shape) - 0.5), axis=1)
    affine = np.eye(4)
    idx = list(range(nd)) + [3]
    affine[np.ix_(idx, idx)] = dst
    return out, 1.0 - float(inside.mean()), affine


def fit_subject(sub: dict, name: str, shape: Sequence[int], spacing: Optional[float] = None):
    """One subject's ``dataset.load_subject`` arrays on the grid: crop/pad (``spacing`` None) or resampled.
    Returns (arrays, :class:`FitInfo`, 4×4 affine of the grid)."""
    nd_file = sub["t1"].ndim
    sp = _spacing_of(sub["affine"], nd_file)
    ext = _extent_mm(_foreground(sub), sp)
    if spacing is None:
        out, outside, affine = crop_pad_subject(sub, shape)
    else:
        out, outside, affine = resample_subject(sub, shape, spacing)
    return out, FitInfo(name, tuple(sub["t1"].shape), sp, ext, outside), affine


def _fmt_shape(shape):
    return "x".join(str(int(n)) for n in shape)


def _fmt_spacing(sp):
    return "x".join(f"{v:.3g}" for v in sp)


def _variants(values, fmt, most=3):
    uniq = list(dict.fromkeys(fmt(v) for v in values))
    return ", ".join(uniq) if len(uniq) <= most else f"{', '.join(uniq[:most])} and {len(uniq) - most} more"


def fit_line(infos: List[FitInfo], shape: Sequence[int], spacing: Optional[float], source: str) -> str:
    """The one line per data set: the files' shapes and voxel sizes → the grid, how, and the share of the
    foreground outside the grid (mean over subjects, the worst subject)."""
    if not infos:
        raise ContraRegInputError(f"{source}: no subjects")
    how = (f"resampled to {spacing:g} mm, centred on the foreground" if spacing is not None
           else "centre crop/pad, voxels kept")
    out = np.array([i.outside for i in infos])
    worst = infos[int(np.argmax(out))]
    return (f"{source}: {len(infos)} subjects {_variants([i.shape for i in infos], _fmt_shape)} @ "
            f"{_variants([i.spacing for i in infos], _fmt_spacing)} mm -> grid {_fmt_shape(shape)} ({how}); "
            f"foreground outside the grid: mean {100 * out.mean():.1f} %, max {100 * worst.outside:.1f} % "
            f"({worst.subject})")


def fitting_spacing(infos: List[FitInfo], shape: Sequence[int]) -> float:
    """The smallest voxel size (mm, rounded up to 0.5) at which ``shape`` holds every subject's foreground."""
    need = max(e / n for i in infos for e, n in zip(i.extent_mm, shape))
    return math.ceil(need * 2.0) / 2.0


def fit_warning(infos: List[FitInfo], shape: Sequence[int], spacing: Optional[float], source: str,
                threshold: float = GRID_OUTSIDE_WARN) -> Optional[str]:
    """The warning text when a subject loses more than ``threshold`` of its foreground to the grid, else None."""
    worst = max(infos, key=lambda i: i.outside)
    if worst.outside <= threshold:
        return None
    return (f"{source}: {100 * worst.outside:.1f} % of {worst.subject}'s foreground falls outside the "
            f"{_fmt_shape(shape)} grid (more than {100 * threshold:g} %); give --inshape covering the brain, or "
            f"--spacing {fitting_spacing(infos, shape[:len(worst.extent_mm)]):g} to resample so that it fits")


# ------------------------------------------------------------------------------------------------------------
# command-line arguments (the commands that train or evaluate on --data)
# ------------------------------------------------------------------------------------------------------------
def check_needs_data(args):
    """``--inshape`` / ``--spacing`` describe a user's scans (``--data``): refused without it, before anything runs."""
    given = any(getattr(args, n, None) is not None for n in ("inshape", "spacing"))
    if given and getattr(args, "data", None) is None:
        raise ContraRegInputError("--inshape / --spacing apply to --data; the built-in data is built on its own grid")


def grid_config(cfg, args):
    """``(cfg, spacing)`` from the ``--inshape`` / ``--spacing`` options (``cli.add_grid_options``): the preset with
    ``inshape`` replaced (checked against its dimensionality and U-Net depth) and the resampling voxel size (None:
    crop/pad). Both options need ``--data`` (:func:`check_needs_data`)."""
    check_needs_data(args)
    inshape, spacing = getattr(args, "inshape", None), getattr(args, "spacing", None)
    if inshape is not None:
        shape = check_grid(inshape, len(cfg.inshape), 2 ** (cfg.nb_levels - 1), spacing)
        cfg = dataclasses.replace(cfg, inshape=shape, ae_crop=tuple(min(a, b) for a, b in zip(cfg.ae_crop, shape)))
    elif spacing is not None:
        check_grid(cfg.inshape, len(cfg.inshape), 1, spacing)
    return cfg, spacing
