"""Register a NIfTI pair with a trained λ-conditioned model (``eval_scripts/register.py``).

Physical space (``data/physical.py``): both images are loaded by ``physical.load_pair`` — the fixed image
reoriented to canonical RAS order, the moving image (and labels) resampled onto that grid through world
coordinates, optionally after an ANTs affine (``affine='ants'``). Outputs are written on the fixed image's
own grid with its affine and header: ``moved`` = the original moving image resampled once through the full
warp (its own intensities, not the network's normalised input), ``moved_labels`` = the moving labels, nearest
neighbour, in the label file's own integer type. Warps follow voxelmorph's convention (voxel units of the fixed
grid, ij order, (*vol, ndim)) and include the affine pre-alignment; ``itk_warp_out`` writes the same warp as
an ITK/ANTs displacement field (LPS mm, ``data/itk.py``).

Any grid (the model window): the network runs at the spacing it was trained at (``spacing`` of the run's
``config.json``, or ``model_spacing``), on a window of the canonical fixed grid resampled to that spacing
(Gaussian anti-aliasing, σ = (r − 1)/2 fixed voxels for a down-sampling factor r > 1), axis-aligned with it and
covering the bounding box of both images' foreground (intensity above 5 % of the robust range after
percentile normalisation, fixed ∪ moving) plus ``MODEL_MARGIN`` model voxels, rounded up to a size the U-Net
accepts (divisible by 2**(nb_levels−1), and by int_resolution when integrating). The window's displacement is
interpolated back onto the full fixed grid (linear, scaled by r to fixed voxels). Outside the window the warp
continues the window border's displacement (constant extension, so it is continuous); no foreground voxel lies
outside the window by construction, so nothing of the brain is cut off.

The networks are trained with source = T2w and target = T1w (``losses/similarity.py``). A pair whose moving
image is the T1w (``moving_modality='t1'``) is run the other way round and its inverse outputs (I1∘φ⁻¹, the
warp from integrating −v) are used, so either direction uses what the model learned.
"""
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.ndimage as ndi

from . import metrics
from .atomic import atomic_paths
from .config import FOREGROUND_LEVEL  # noqa: F401  (foreground for the model window)
from .data.io import (check_output_paths, check_same_shape, foreground_mask, label_dtype, normalize_intensity,
                      save_nifti)
from .data.itk import check_itk_export, save_itk_displacement
from .data.physical import load_pair, sample
from .errors import ContraRegInputError, ContraRegWarning
from .networks.hyper import register
from .runs import load_trained, read_run

MODEL_MARGIN = 2           # model-grid voxels of background kept around the foreground bounding box
FOLD_WARNING = 20.0        # % folding voxels above which a written result is flagged


@dataclass
class RegistrationResult:
    moved: np.ndarray                     # moving image resampled onto the fixed grid (its own intensities)
    warp: np.ndarray                      # (*vol, ndim) displacement, fixed voxels (incl. any affine)
    inverse_warp: np.ndarray
    lam: float
    folds: float                          # % folding voxels of the warp
    moved_labels: Optional[np.ndarray] = None
    window: Optional["Window"] = None


@dataclass(frozen=True)
class Window:
    """The model's input grid: ``shape``; ``affine`` maps window voxels to canonical fixed voxels
    (scale ``scale`` fixed voxels per window voxel, then a shift)."""
    shape: Tuple[int, ...]
    affine: np.ndarray
    scale: Tuple[float, ...]


def warn_if_folding(folds: float, cause: str) -> bool:
    """Warn (``ContraRegWarning``) when a written warp folds more than ``FOLD_WARNING`` % of its voxels."""
    if folds > FOLD_WARNING:
        warnings.warn(f"the warp folds {folds:.1f} % of the voxels (> {FOLD_WARNING:g} %): the result is not a "
                      f"plausible deformation; likely cause: {cause}", ContraRegWarning, stacklevel=2)
        return True
    return False


def unet_divisor(cfg) -> int:
    """The size every model input axis must be divisible by (the rule of ``networks.hyper._validate``)."""
    div = 2 ** (int(cfg.nb_levels) - 1)
    return int(np.lcm(div, int(cfg.int_resolution))) if int(cfg.int_steps) > 0 else div


def _foreground(x: np.ndarray) -> np.ndarray:
    """Every voxel above ``FOREGROUND_LEVEL`` of the normalised intensity (no hole filling / components:
    the window must cover every bit of both foregrounds)."""
    return foreground_mask(normalize_intensity(x), FOREGROUND_LEVEL, fill_holes=False, largest_component=False)


def model_window(fixed_c: np.ndarray, moving_c: np.ndarray, spacing_c: Sequence[float], model_spacing: float,
                 divisor: int, margin: int = MODEL_MARGIN) -> Window:
    """The window (module docstring) for a pair on the canonical fixed grid of voxel size ``spacing_c``."""
    if not (np.isfinite(model_spacing) and model_spacing > 0):
        raise ContraRegInputError(f"model spacing must be a positive number of mm, got {model_spacing}")
    r = np.asarray(model_spacing, np.float64) / np.asarray(spacing_c, np.float64)
    fg = _foreground(fixed_c) | _foreground(moving_c)
    idx = np.argwhere(fg)
    if idx.size == 0:
        raise ContraRegInputError("the fixed and moving images have no foreground")
    lo = np.floor(idx.min(0) / r).astype(int) - margin
    hi = np.ceil(idx.max(0) / r).astype(int) + margin
    size = hi - lo + 1
    shape = tuple(int(math.ceil(s / divisor) * divisor) for s in size)
    start = lo - (np.array(shape) - size) // 2
    aff = np.diag(list(r) + [1.0])
    aff[:-1, -1] = r * start
    return Window(shape=shape, affine=aff, scale=tuple(float(v) for v in r))


def to_window(x: np.ndarray, win: Window) -> np.ndarray:
    """Resample a canonical-grid image into the window (linear, anti-aliased when down-sampling)."""
    sig = [max(0.0, (s - 1.0) / 2.0) for s in win.scale]
    x = ndi.gaussian_filter(np.asarray(x, np.float32), sig, mode="nearest") if max(sig) > 0 else x
    return sample(x, np.eye(x.ndim + 1), win.shape, win.affine).astype(np.float32)


def warp_from_window(u_w: np.ndarray, win: Window, shape: Sequence[int]) -> np.ndarray:
    """A window displacement (window voxels) as a displacement of the canonical fixed grid ``shape``
    (fixed voxels): linear interpolation, constant extension outside the window."""
    u = sample(np.asarray(u_w, np.float32), win.affine, shape, np.eye(len(shape) + 1), mode="nearest")
    return (u * np.asarray(win.scale, np.float32)).astype(np.float32)


def _validate_request(lam, max_folds, moving_modality):
    """Cheap checks first (before a model is built or anything is written)."""
    if (lam is None) == (max_folds is None):
        raise ContraRegInputError("give exactly one of --lambda or --max-folds")
    if lam is not None and not (0.0 <= float(lam) <= 1.0):
        raise ContraRegInputError(f"--lambda must lie in [0, 1], got {lam}")
    if max_folds is not None and not (0.0 <= float(max_folds) <= 100.0):
        raise ContraRegInputError(f"--max-folds is a percentage in [0, 100], got {max_folds}")
    if moving_modality not in ("t1", "t2"):
        raise ContraRegInputError(f"moving modality must be 't1' or 't2', got {moving_modality!r}")


def register_arrays(model, fixed, moving, lam=None, max_folds=None, moving_modality="t2"):
    """Register two arrays of the model's input shape (already on one grid, any intensities: each is
    percentile-normalised here). Returns ``(fwd, inv, lam)``: displacements (*vol, ndim) in voxels of that
    grid, moving → fixed and back."""
    _validate_request(lam, max_folds, moving_modality)
    check_same_shape(fixed, moving, ("fixed", "moving"))
    shape = tuple(model.inputs[0].shape[1:-1])
    if tuple(np.shape(fixed)) != shape:
        raise ContraRegInputError(f"images of shape {np.shape(fixed)} do not match the model input {shape}")
    f, m = normalize_intensity(fixed), normalize_intensity(moving)
    # source must be the T2w: swap when the moving image is the T1w and use the inverse outputs
    src, trg = (m, f) if moving_modality == "t2" else (f, m)
    if max_folds is not None:
        lam, _, _ = choose_lambda(model, src, trg, max_folds)
    _, pos, neg = register(model, src, trg, lam)
    fwd, inv = (pos[0], neg[0]) if moving_modality == "t2" else (neg[0], pos[0])
    return fwd, inv, float(lam)


def register_files(run_dir, fixed, moving, moved_out, lam=None, max_folds=None, warp_out=None,
                   inverse_warp_out=None, moving_labels=None, moved_labels_out=None, moving_modality="t2",
                   affine="none", itk_warp_out=None, model_spacing=None):
    """File-level registration: validate every argument and input, then compute, then write the outputs."""
    if (moving_labels is None) != (moved_labels_out is None):
        raise ContraRegInputError("--moving-labels and --moved-labels go together")
    inputs = {"--fixed": fixed, "--moving": moving, "--moving-labels": moving_labels,
              "--model config.json": os.path.join(run_dir, "config.json"),
              "--model model.h5": os.path.join(run_dir, "model.h5")}
    check_output_paths({"--moved": moved_out, "--warp": warp_out, "--inverse-warp": inverse_warp_out,
                        "--moved-labels": moved_labels_out, "--itk-warp": itk_warp_out}, inputs)
    _validate_request(lam, max_folds, moving_modality)
    meta, cfg = read_run(run_dir)
    spacing = float(model_spacing if model_spacing is not None else meta.get("data_spacing", cfg.spacing))
    pair = load_pair(fixed, moving, moving_labels=moving_labels, affine=affine, ndim=len(cfg.inshape))
    if itk_warp_out:
        check_itk_export(pair.fixed)
    win = model_window(pair.fixed_c, pair.moving_c, pair.spacing_c, spacing, unet_divisor(cfg))
    model, _ = load_trained(run_dir, inshape=win.shape)
    fwd, inv, lam = register_arrays(model, to_window(pair.fixed_c, win), to_window(pair.moving_c, win),
                                    lam=lam, max_folds=max_folds, moving_modality=moving_modality)
    shape_c = pair.fixed_c.shape
    warp = pair.total_warp(warp_from_window(fwd, win, shape_c))
    folds = float(metrics.folding_fraction(metrics.jacobian_determinant(warp)))
    res = RegistrationResult(moved=pair.moved(warp), warp=warp, inverse_warp=None, lam=lam, folds=folds,
                             window=win)
    if inverse_warp_out:
        res.inverse_warp = pair.total_inverse_warp(warp_from_window(inv, win, shape_c))
    if moving_labels is not None:
        res.moved_labels = pair.moved_labels(warp)
    write_outputs(pair, res, moved_out, warp_out, inverse_warp_out, moved_labels_out, itk_warp_out)
    warn_if_folding(folds, "too small a λ for this pair (use --max-folds, or a larger --lambda)")
    return res


def write_outputs(pair, res: RegistrationResult, moved_out=None, warp_out=None, inverse_warp_out=None,
                  moved_labels_out=None, itk_warp_out=None):
    """Write a result on the fixed image's own grid, affine and header (call after every check has passed), as a
    set: a failure while writing (a full disk, Ctrl-C) leaves every earlier output file as it was."""
    writers = {moved_out: lambda p: save_nifti(p, res.moved, like=pair.fixed),
               warp_out: lambda p: save_nifti(p, res.warp.astype(np.float32), like=pair.fixed),
               inverse_warp_out: lambda p: save_nifti(p, res.inverse_warp.astype(np.float32), like=pair.fixed),
               moved_labels_out: lambda p: save_nifti(p, res.moved_labels, like=pair.fixed,
                                                      dtype=label_dtype(pair.moving_labels)),
               itk_warp_out: lambda p: save_itk_displacement(p, res.warp, pair.fixed)}
    writers.pop(None, None)
    with atomic_paths(list(writers)) as tmps:
        for tmp, write in zip(tmps, writers.values()):
            write(tmp)


# ----------------------------------------------------------------------------------------------------------
# per-pair λ choice under a folding budget (register.py --max-folds)
# ----------------------------------------------------------------------------------------------------------
def choose_lambda(model, moving, fixed, max_folds, lambdas=None):
    """Smallest-regularisation λ whose warp keeps % folds ≤ ``max_folds`` for this pair. Accuracy rises as λ
    falls (less regularisation) while folding grows, so the best admissible λ is the smallest one under the
    budget; we scan a fine grid (41 values) from 0 upwards and stop at the first admissible λ. Returns
    ``(lam, folds, outputs)``."""
    lambdas = np.linspace(0.0, 1.0, 41) if lambdas is None else lambdas
    for lam in lambdas:
        out = register(model, moving, fixed, lam)
        folds = metrics.folding_fraction(metrics.jacobian_determinant(out[1][0]))
        if folds <= max_folds:
            return float(lam), float(folds), out
    raise ContraRegInputError(f"no λ in [0, 1] keeps folds ≤ {max_folds}% for this pair")
