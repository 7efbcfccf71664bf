"""ITK / ANTs interoperability: LPS conversions, the ANTs affine pre-alignment (``--affine ants``) and the
ITK displacement-field export (``--itk-warp``).

Conventions (voxelmorph 0.2 ``register.py``; ITK / ANTs)
-------------------------------------------------------
* nibabel world = RAS+ mm; ITK/ANTs physical space = LPS mm: ``p_LPS = F · p_RAS`` with F = diag(−1, −1, 1)
  (2-D: diag(−1, −1)). An image with spatial affine A (voxel → RAS) is, in ITK terms, spacing = the column
  norms of A, direction = F · A / spacing, origin = F · (A's translation) (:func:`to_ants`).
* An ANTs affine transform file (``ants.registration(..., type_of_transform='Affine')``) maps **fixed**
  physical points to **moving** physical points: T(p) = M (p − c) + t + c, with parameters (M row-major, t) and
  fixed parameters c. In RAS it is ``W = F · T · F`` (:func:`ants_affine` returns W as an ``(ndim+1)²``
  matrix, the ``world`` of ``data/physical.py``).
* An ITK displacement field is a vector image on the fixed grid holding, at each fixed voxel, the LPS mm
  displacement d with moving point = fixed point + d. From this project's warp u (fixed voxels, see
  ``data/physical.py``: moving world point = A · (x + u)): d_RAS = A[:3, :3] · u, d_LPS = F · d_RAS. It is
  written as a NIfTI of shape (X, Y, Z, 1, 3), float32, intent ``vector`` (1007), with the fixed image's
  affine — the layout ``antsApplyTransforms`` / ``ants.apply_transforms`` read as a displacement field.
* ANTs affine choices: metric Mattes mutual information (32 bins, regular sampling of 20 % of the voxels;
  antspyx's defaults for 'Affine'), initialised by aligning the centres of mass (antspyx default), random
  seed fixed to 0 so repeated runs give the same transform. Images go to ANTs in memory (no temporary
  NIfTI); ANTs itself writes its transform to a temporary file, read back and deleted here.
"""
import os

import nibabel as nib
import numpy as np

from ..atomic import atomic_path
from ..errors import ContraRegInputError
from .io import Volume


def _ants():
    try:
        import ants  # lazy: optional (antspyx), heavy, and only --affine ants needs it
    except ImportError:
        raise ContraRegInputError("--affine ants needs antspyx (pip install antspyx; it comes with roiloc)") from None
    return ants


def lps_flip(ndim: int) -> np.ndarray:
    """F: RAS ↔ LPS for ``ndim`` spatial axes (its own inverse)."""
    return np.diag([-1.0, -1.0] + [1.0] * (ndim - 2))


def to_ants(data: np.ndarray, affine: np.ndarray):
    """An ``ants.ANTsImage`` of ``data`` stored with the spatial affine ``affine`` ((ndim+1)², RAS)."""
    ants = _ants()
    nd = data.ndim
    a = np.asarray(affine, np.float64)
    f = lps_flip(nd)
    spacing = np.linalg.norm(a[:nd, :nd], axis=0)
    direction = f @ a[:nd, :nd] / spacing
    origin = f @ a[:nd, nd]
    return ants.from_numpy(np.asarray(data, np.float32), origin=tuple(origin), spacing=tuple(spacing),
                           direction=direction)


def _itk_affine_matrix(params, fixed_params, nd: int) -> np.ndarray:
    m = np.asarray(params[: nd * nd], np.float64).reshape(nd, nd)
    t = np.asarray(params[nd * nd: nd * nd + nd], np.float64)
    c = np.asarray(fixed_params[:nd], np.float64)
    out = np.eye(nd + 1)
    out[:nd, :nd] = m
    out[:nd, nd] = t + c - m @ c
    return out


def ants_affine(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                ) -> np.ndarray:
    """ANTs affine registration (Mattes MI) of ``moving`` onto ``fixed`` (arrays with their spatial RAS
    affines); returns W, the ``(ndim+1)²`` map from fixed world (RAS mm) to moving world."""
    ants = _ants()
    nd = fixed.ndim
    f_img, m_img = to_ants(fixed, fixed_affine), to_ants(moving, moving_affine)
    seed = ants.config._random_seed
    ants.config._random_seed = 1
    try:
        reg = ants.registration(f_img, m_img, type_of_transform="Affine", aff_metric="mattes", verbose=False)
    except Exception as e:  # ANTs reports failures as RuntimeError with its own text
        raise ContraRegInputError(f"--affine ants: ANTs affine registration failed ({type(e).__name__}: {e})") \
            from None
    finally:
        ants.config._random_seed = seed
    paths = reg["fwdtransforms"]
    try:
        tx = ants.read_transform(paths[0])
        t_lps = _itk_affine_matrix(tx.parameters, tx.fixed_parameters, nd)
    finally:
        for p in set(paths) | set(reg.get("invtransforms", [])):
            if os.path.isfile(p) and os.path.basename(p).startswith("tmp"):
                os.remove(p)
    f = np.eye(nd + 1)
    f[:nd, :nd] = lps_flip(nd)
    w = f @ t_lps @ f
    if not np.all(np.isfinite(w)) or abs(np.linalg.det(w[:nd, :nd])) < 1e-6:
        raise ContraRegInputError(f"--affine ants: ANTs returned a degenerate affine {w.tolist()}")
    return w


def itk_displacement(warp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """LPS mm displacement (*vol, 3) of a warp in fixed voxels (``data/physical.py``) on a grid with the 4×4
    (or 3-D spatial) ``affine``."""
    u = np.asarray(warp, np.float64)
    if u.ndim != 4 or u.shape[-1] != 3:
        raise ContraRegInputError(f"ITK displacement export needs a 3-D warp (X, Y, Z, 3), got {u.shape}")
    a = np.asarray(affine, np.float64)[:3, :3]
    return (u @ (lps_flip(3) @ a).T).astype(np.float32)


def check_itk_export(fixed: Volume, arg="--itk-warp", tol=1e-4):
    """Refuse, before any work, a fixed image whose grid an ITK displacement field cannot describe: the export is
    3-D only, and ITK images have orthogonal axes (direction = rotation / reflection), so a sheared fixed affine
    would be written as a file ANTs cannot read."""
    if fixed.ndim != 3:
        raise ContraRegInputError(f"{arg}: the ITK displacement export is 3-D only")
    a = np.asarray(fixed.affine, np.float64)[:3, :3]
    d = a / np.linalg.norm(a, axis=0)
    shear = float(np.abs(d.T @ d - np.eye(3)).max())
    if shear > tol:
        raise ContraRegInputError(f"{arg}: the fixed image {fixed.path} has a sheared affine (axes not orthogonal, "
                                  f"|DᵀD − I| = {shear:.2g}); an ITK field needs orthogonal axes — resample the fixed "
                                  "image to an unsheared grid, or use --warp")


def save_itk_displacement(path, warp: np.ndarray, like: Volume) -> str:
    """Write a warp (fixed voxels) as an ITK/ANTs displacement field NIfTI (module docstring); atomic."""
    if like.ndim != 3:
        raise ContraRegInputError(f"{path}: the ITK displacement export is 3-D only (the images are {like.ndim}-D)")
    d = itk_displacement(warp, like.affine)[:, :, :, None, :]
    img = nib.Nifti1Image(d, np.asarray(like.affine, np.float64))
    img.header.set_intent("vector")
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return os.fspath(path)
