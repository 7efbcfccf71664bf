"""Register a NIfTI pair with a trained λ-conditioned model (``eval_scripts/register.py``).

All inputs are loaded and validated before anything is written; outputs keep the fixed image's affine and
header. Warps follow voxelmorph's ``register.py`` convention: displacement in voxel units, index (ij) order,
shape (*vol, ndim), saved with the fixed image's affine.

The networks are trained with source = T2w and target = T1w (``losses/similarity.py``). A pair whose moving
image is the T1w (``moving_modality='t1'``) is run the other way round and its inverse outputs (I1∘φ⁻¹, the
warp from integrating −v) are used, so either direction uses what the model learned.
"""
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import ContraRegInputError


@dataclass
class RegistrationResult:
    moved: np.ndarray                     # moving image resampled onto the fixed grid
    warp: np.ndarray                      # (*vol, ndim) displacement, voxel units, moving → fixed
    inverse_warp: np.ndarray
    lam: float
    folds: float                          # % folding voxels of the warp
    moved_labels: Optional[np.ndarray] = None


def _check_outputs(paths):
    for p in paths:
        if p is None:
            continue
        d = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(d):
            raise ContraRegInputError(f"{p}: output folder {d} does not exist")
        if not (p.endswith(".nii") or p.endswith(".nii.gz")):
            raise ContraRegInputError(f"{p}: outputs are NIfTI; use a .nii or .nii.gz name")


def _prep(x, shape):
    from .data.io import crop_or_pad, normalize_intensity

    return crop_or_pad(normalize_intensity(x), shape)


def _validate_request(fixed, moving, moving_labels, lam, max_folds, moving_modality):
    """Cheap checks first (before a model is built or anything is written)."""
    from .data.io import check_same_shape

    check_same_shape(fixed, moving, ("fixed", "moving"))
    if moving_labels is not None:
        check_same_shape(moving, moving_labels, ("moving", "moving labels"))
    if (lam is None) == (max_folds is None):
        raise ContraRegInputError("give exactly one of --lambda or --max-folds")
    if lam is not None and not (0.0 <= float(lam) <= 1.0):
        raise ContraRegInputError(f"--lambda must lie in [0, 1], got {lam}")
    if max_folds is not None and not (0.0 <= float(max_folds) <= 100.0):
        raise ContraRegInputError(f"--max-folds is a percentage in [0, 100], got {max_folds}")
    if moving_modality not in ("t1", "t2"):
        raise ContraRegInputError(f"moving modality must be 't1' or 't2', got {moving_modality!r}")


def register_arrays(model, fixed, moving, lam=None, max_folds=None, moving_modality="t2", moving_labels=None):
    """Register numpy arrays (same shape) with a λ-conditioned model; crop/pad to the model's grid and back."""
    from . import metrics
    from .data.io import uncrop
    from .evaluation import choose_lambda
    from .networks.hyper import register, warp

    _validate_request(fixed, moving, moving_labels, lam, max_folds, moving_modality)
    shape = tuple(model.inputs[0].shape[1:-1])
    if len(shape) != fixed.ndim:
        raise ContraRegInputError(f"model is {len(shape)}-D but the images are {fixed.ndim}-D")
    (f, info), (m, _) = _prep(fixed, shape), _prep(moving, shape)
    # source must be the T2w: swap when the moving image is the T1w and use the inverse outputs
    src, trg = (m, f) if moving_modality == "t2" else (f, m)
    if max_folds is not None:
        lam, _, _ = choose_lambda(model, src, trg, max_folds)
    y_src, pos, neg = register(model, src, trg, lam)
    if moving_modality == "t2":
        fwd, inv = pos[0], neg[0]
        moved = y_src[0, ..., 0]
    else:
        fwd, inv = neg[0], pos[0]
        moved = np.asarray(warp(m[None, ..., None], fwd[None], interp="linear"))[0, ..., 0]
    folds = metrics.folding_fraction(metrics.jacobian_determinant(fwd))
    out_labels = None
    if moving_labels is not None:
        from .data.io import crop_or_pad

        lab, _ = crop_or_pad(np.asarray(moving_labels), shape)
        out_labels = np.asarray(warp(lab[None, ..., None], fwd[None], interp="nearest"))[0, ..., 0]
        out_labels = uncrop(out_labels, info).astype(np.int16)
    return RegistrationResult(moved=uncrop(moved, info), warp=uncrop(fwd, info), inverse_warp=uncrop(inv, info),
                              lam=float(lam), folds=float(folds), moved_labels=out_labels)


def register_files(run_dir, fixed, moving, moved_out, lam=None, max_folds=None, warp_out=None,
                   inverse_warp_out=None, moving_labels=None, moved_labels_out=None, moving_modality="t2"):
    """File-level registration: validate everything, then write the requested outputs."""
    from .data.io import load_nifti, save_nifti
    from .training import load_trained

    _check_outputs([moved_out, warp_out, inverse_warp_out, moved_labels_out])
    if (moving_labels is None) != (moved_labels_out is None):
        raise ContraRegInputError("--moving-labels and --moved-labels go together")
    fv = load_nifti(fixed)
    mv = load_nifti(moving, ndim=fv.ndim)
    lv = load_nifti(moving_labels, ndim=fv.ndim) if moving_labels else None
    _validate_request(fv.data, mv.data, None if lv is None else lv.data, lam, max_folds, moving_modality)
    model, _ = load_trained(run_dir)
    res = register_arrays(model, fv.data, mv.data, lam=lam, max_folds=max_folds,
                          moving_modality=moving_modality, moving_labels=None if lv is None else lv.data)
    save_nifti(moved_out, res.moved.astype(np.float32), like=fv)
    if warp_out:
        save_nifti(warp_out, res.warp.astype(np.float32), like=fv)
    if inverse_warp_out:
        save_nifti(inverse_warp_out, res.inverse_warp.astype(np.float32), like=fv)
    if moved_labels_out:
        save_nifti(moved_labels_out, res.moved_labels, like=fv)
    return res
