"""Physical (world) space for registration inputs and outputs: one loader for a fixed/moving pair.

Conventions and choices
-----------------------
* **World** coordinates are nibabel's: RAS+ millimetres, ``world = A · [i, j, k, 1]`` with ``A`` the affine
  nibabel resolves from the NIfTI header (sform, else qform). Affines are handled in their spatial part
  (:func:`spatial_affine`, ``(ndim+1)²``). A 2-D image is an axial-like slice: its in-plane world axes are
  the affine's first two rows and columns; the through-plane row/column is ignored.
* **Canonical orientation**: the fixed image is reoriented to the closest RAS+ voxel order (nibabel
  ``io_orientation`` / ``apply_orientation``, what ``nib.as_closest_canonical`` does): flips and axis
  permutations only, no interpolation, so the canonical copy holds exactly the stored voxels. Registration
  (network or instance optimisation) runs on that canonical grid, because the networks were trained on
  RAS-ordered volumes; every output is mapped back to the fixed image's *original* voxel order and written
  with the fixed image's own affine and header.
* **Moving image onto the fixed grid**: the moving image, and its labels, are resampled onto the canonical
  fixed grid through world space: moving voxel = A_m⁻¹ · W · A_f · x, where ``W`` (fixed world → moving world)
  is the identity unless an affine pre-alignment was estimated (``--affine ants``, ``data/itk.py``; an
  ``(ndim+1)²`` matrix like the spatial affines).
  Linear interpolation for images, nearest neighbour for labels (labels keep their integer dtype), and 0
  outside the moving image's field of view (no data there; the field of view ends half a voxel beyond the
  outer voxel centres, the voxels' own extent). The moving image keeps its own intensities.
* **Warps** (voxelmorph's ``register.py`` convention): displacement ``u`` in voxel units of the
  fixed image's own grid (original voxel order, not the canonical one), index (ij) order, shape
  (*vol, ndim). The moving point matching fixed voxel ``x`` has world coordinates ``A_f · (x + u(x))``;
  so ``u`` *includes* any affine pre-alignment, and moved(x) = moving(A_m⁻¹ · A_f · (x + u(x))). With a
  fixed and a moving image on one grid and no pre-alignment this is exactly voxelmorph's
  moved(x) = moving(x + u(x)). Outputs are made by **one** resampling of the original moving image through
  the composed warp (:meth:`Pair.moved`), never by resampling a resampled image.
* Inverse warps use the same convention from the other side: for a world point ``A_f · y`` of the moving
  image, the matching fixed voxel is ``y + v(y)``.
"""
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import nibabel.orientations as no
import numpy as np
import scipy.ndimage as ndi

from ..config import ALIGN_TOL_COM, ALIGN_TOL_EXTENT
from ..errors import ContraRegInputError, ContraRegWarning
from .io import (Volume, check_nonempty_mask, check_not_blank, check_same_shape, foreground_mask, load_labels,
                 load_nifti)
from .itk import ants_affine


# ------------------------------------------------------------------------------------------ affines and grids
def spatial_affine(affine, ndim: int) -> np.ndarray:
    """The ``(ndim+1)²`` spatial part of a 4×4 NIfTI affine (2-D: rows/columns x, y and the translation)."""
    a = np.asarray(affine, dtype=np.float64)
    idx = list(range(ndim)) + [3]
    return a[np.ix_(idx, idx)]


def voxel_spacing(affine) -> Tuple[float, ...]:
    """Voxel size (mm) per axis of an ``(ndim+1)²`` affine: the norms of its columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(s) for s in np.linalg.norm(a[:-1, :-1], axis=0))


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(ornt)
    for i, (ax, flip) in enumerate(ornt):
        inv[int(ax)] = (i, flip)
    return inv


def canonical_orientation(affine, ndim: int, name: str = "image") -> np.ndarray:
    """nibabel orientation transform (``ndim`` × 2) from the stored voxel order to the closest RAS+ order."""
    a = spatial_affine(affine, ndim)
    if abs(np.linalg.det(a[:-1, :-1])) < 1e-12:
        raise ContraRegInputError(f"{name}: affine is singular" + (" in-plane (a 2-D image must be an axial-like "
                                                                    "slice)" if ndim == 2 else ""))
    return no.io_orientation(a)


def to_canonical(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Reorder the leading ``len(ornt)`` axes of ``data`` to canonical order (exact: flips/permutations)."""
    return np.ascontiguousarray(no.apply_orientation(data, ornt))


def canonical_affine(affine, shape: Sequence[int], ornt: np.ndarray) -> np.ndarray:
    """Spatial affine of the canonical copy of an image of ``shape`` stored with ``affine``."""
    nd = len(ornt)
    return spatial_affine(affine, nd) @ no.inv_ornt_aff(ornt, tuple(shape)[:nd])


def from_canonical(data: np.ndarray, ornt: np.ndarray, vector: bool = False) -> np.ndarray:
    """Inverse of :func:`to_canonical`. ``vector=True``: ``data`` is a displacement (*vol, ndim) in canonical
    voxel units; its components are permuted and sign-flipped into the original voxel axes too."""
    out = no.apply_orientation(data, _inverse_ornt(ornt))
    if vector:
        out = np.stack([float(ornt[i, 1]) * out[..., int(ornt[i, 0])] for i in range(len(ornt))], axis=-1)
    return np.ascontiguousarray(out)


def identity_grid(shape: Sequence[int]) -> np.ndarray:
    """Voxel index coordinates (*shape, ndim), float64, ij order."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply an ``(n+1)²`` homogeneous matrix to points (..., n)."""
    return pts @ m[:-1, :-1].T + m[:-1, -1]


def sample(src: np.ndarray, src_affine, dst_shape: Sequence[int], dst_affine, disp: Optional[np.ndarray] = None,
           world: Optional[np.ndarray] = None, order: int = 1, mode: str = "constant") -> np.ndarray:
    """Resample ``src`` (stored with ``src_affine``) on the grid ``dst_shape``/``dst_affine``: destination
    voxel x reads ``src`` at voxel ``src_affine⁻¹ · world · dst_affine · (x + disp(x))`` (``world``: an
    ``(n+1)²`` map from destination world to source world, default identity; ``disp``: (*dst_shape, n) in
    destination voxels). ``order`` 1 = linear, 0 = nearest neighbour (integer ``src`` keeps its dtype).
    ``mode``: 'constant' (0 outside ``src``'s field of view, which ends half a voxel beyond its outer voxel
    centres) or 'nearest' (border clamp everywhere). Trailing axes of ``src`` beyond the spatial ones (vector components) are sampled one by one."""
    src = np.asarray(src)
    n = len(dst_shape)
    m = np.linalg.inv(np.asarray(src_affine, np.float64))
    if world is not None:
        m = m @ np.asarray(world, np.float64)
    m = m @ np.asarray(dst_affine, np.float64)
    pts = identity_grid(dst_shape)
    if disp is not None:
        pts += np.asarray(disp, np.float64)
    coords = np.moveaxis(apply_affine(m, pts), -1, 0)
    del pts
    if src.ndim > n:
        return np.stack([sample(src[..., c], src_affine, dst_shape, dst_affine, disp, world, order, mode)
                         for c in range(src.shape[-1])], axis=-1)
    integer = not np.issubdtype(src.dtype, np.floating)
    if integer and order != 0:
        raise ContraRegInputError("sample: integer data (labels) must be resampled with order=0")
    data = src if integer or src.dtype == np.float64 else src.astype(np.float32)
    if mode != "constant":
        return ndi.map_coordinates(data, coords, order=order, mode=mode, prefilter=False, output=data.dtype)
    # 'constant': the image covers its voxels' extent, up to half a voxel beyond the outer voxel centres
    # (values there = the border voxel's); beyond that, 0
    out = ndi.map_coordinates(data, coords, order=order, mode="nearest", prefilter=False, output=data.dtype)
    outside = np.zeros(out.shape, bool)
    for ax, c in enumerate(coords):
        outside |= (c < -0.5) | (c > src.shape[ax] - 0.5)
    out[outside] = 0
    return out


# ------------------------------------------------------------------------------------------ the pair
@dataclass
class Pair:
    """A fixed/moving pair in physical space (module docstring). ``fixed``/``moving`` are the volumes as
    loaded (outputs use the fixed one's affine and header); ``*_c`` arrays live on the canonical fixed grid
    whose spatial affine is ``affine_c``; ``ornt`` maps the fixed image's voxel order to canonical;
    ``world`` maps fixed world to moving world (``(ndim+1)²``, identity without pre-alignment)."""
    fixed: Volume
    moving: Volume
    ornt: np.ndarray
    affine_c: np.ndarray
    fixed_c: np.ndarray
    moving_c: np.ndarray
    world: np.ndarray
    moving_labels: Optional[Volume] = None
    moving_labels_c: Optional[np.ndarray] = None
    fixed_labels: Optional[Volume] = None
    fixed_labels_c: Optional[np.ndarray] = None

    @property
    def ndim(self) -> int:
        return self.fixed.ndim

    @property
    def spacing_c(self) -> Tuple[float, ...]:
        """Voxel size (mm) of the canonical fixed grid, per canonical axis."""
        return voxel_spacing(self.affine_c)

    def _voxel_world(self) -> np.ndarray:
        """``world`` expressed in canonical fixed voxels: y = S · x."""
        return np.linalg.inv(self.affine_c) @ self.world @ self.affine_c

    def total_warp(self, u_c: Optional[np.ndarray] = None) -> np.ndarray:
        """The written warp (module docstring: fixed original voxels, includes the pre-alignment) of a
        deformable displacement ``u_c`` found on the canonical fixed grid (None = identity)."""
        grid = identity_grid(self.fixed_c.shape)
        y = grid if u_c is None else grid + np.asarray(u_c, np.float64)
        total = apply_affine(self._voxel_world(), y) - grid
        return from_canonical(total.astype(np.float32), self.ornt, vector=True)

    def total_inverse_warp(self, inv_c: np.ndarray) -> np.ndarray:
        """The written inverse warp of the deformable inverse ``inv_c`` (canonical grid): for the moving
        world point ``A_f·y``, the matching fixed voxel is ``y + v(y)``; v(y) = S⁻¹y + inv_c(S⁻¹y) − y."""
        shape = self.fixed_c.shape
        s_inv = np.linalg.inv(self._voxel_world())
        inv_at = sample(np.asarray(inv_c, np.float32), np.eye(self.ndim + 1), shape, s_inv, mode="nearest")
        grid = identity_grid(shape)
        v = apply_affine(s_inv, grid) + inv_at - grid
        return from_canonical(v.astype(np.float32), self.ornt, vector=True)

    def _fixed_sp(self) -> np.ndarray:
        return spatial_affine(self.fixed.affine, self.ndim)

    def moved(self, warp: np.ndarray) -> np.ndarray:
        """The original moving image resampled once through a written warp (:meth:`total_warp`), on the fixed
        image's own grid (float32, moving intensities, 0 outside the moving field of view)."""
        return sample(self.moving.data, spatial_affine(self.moving.affine, self.ndim), self.fixed.shape,
                      self._fixed_sp(), disp=warp, order=1).astype(np.float32)

    def moved_labels(self, warp: np.ndarray) -> np.ndarray:
        """The moving labels through a written warp, nearest neighbour, integer dtype kept."""
        if self.moving_labels is None:
            raise ContraRegInputError("no moving labels were given")
        return sample(self.moving_labels.data, spatial_affine(self.moving_labels.affine, self.ndim),
                      self.fixed.shape, self._fixed_sp(), disp=warp, order=0)

    def to_fixed(self, canonical: np.ndarray) -> np.ndarray:
        """A scalar array on the canonical grid back in the fixed image's voxel order."""
        return from_canonical(canonical, self.ornt)


def _check_companion(img: Volume, lab: Volume, names):
    check_same_shape(img, lab, names)
    if not np.allclose(img.affine, lab.affine, atol=1e-3):
        raise ContraRegInputError(f"{names[1]} {lab.path} and {names[0]} {img.path} have different affines: a "
                                  f"label map must lie on its image's grid")


def alignment_report(fixed_c: np.ndarray, moving_c: np.ndarray) -> Tuple[float, np.ndarray, float]:
    """(distance of the foreground masks' centres of mass, per-axis difference of their bounding-box
    extents, mean bounding-box extent of the fixed foreground), in canonical fixed voxels, for the moving image
    already on the fixed grid."""
    mf, mm = foreground_mask(fixed_c), foreground_mask(moving_c)
    if not mf.any() or not mm.any():
        return float("inf"), np.full(fixed_c.ndim, np.inf), 1.0

    def extent(m):
        idx = np.argwhere(m)
        return idx.max(0) - idx.min(0) + 1

    com = np.linalg.norm(np.array(ndi.center_of_mass(mf)) - np.array(ndi.center_of_mass(mm)))
    return float(com), np.abs(extent(mf) - extent(mm)).astype(float), float(extent(mf).mean())


def warn_if_misaligned(fixed_c: np.ndarray, moving_c: np.ndarray, tol_com: float = ALIGN_TOL_COM,
                       tol_extent: float = ALIGN_TOL_EXTENT) -> bool:
    """``--affine none``: warn (``ContraRegWarning``) when the brain masks' centres of mass lie further apart
    than ``tol_com`` × the fixed foreground's mean extent, or an extent differs by more than ``tol_extent`` ×
    it (relative, so one rule serves every grid size; ``config.ALIGN_TOL_COM``). Returns whether it warned."""
    com, ext, size = alignment_report(fixed_c, moving_c)
    if com > tol_com * size or ext.max() > tol_extent * size:
        warnings.warn(f"fixed and moving images look mis-aligned (foreground centres of mass {com:.1f} voxels "
                      f"apart, extents differ by up to {ext.max():.0f} voxels, of a {size:.0f}-voxel brain); the "
                      f"deformable model expects affinely aligned pairs: try --affine ants", ContraRegWarning,
                      stacklevel=2)
        return True
    return False


def load_pair(fixed, moving, moving_labels=None, fixed_labels=None, affine: str = "none",
              names: Tuple[str, str, str, str] = ("--fixed", "--moving", "--moving-labels", "--fixed-labels"),
              ndim: Optional[int] = None) -> Pair:
    """Load and validate a registration pair and bring it into physical space (module docstring): the one
    loader of both CLIs. ``affine``: 'none' (warn when the pair looks mis-aligned) or 'ants' (ANTs affine,
    mutual information, ``data/itk.py``). Raises ``ContraRegInputError`` naming the file on any bad input:
    unreadable/NaN image, dimensionality mismatch, a constant (e.g. all-zero) image, an empty foreground,
    non-integer labels, labels not on their image's grid. ``ndim`` (2 or 3) enforces the images'
    dimensionality (a 2-D model reads an (X, Y, 1) file as 2-D)."""
    if affine not in ("none", "ants"):
        raise ContraRegInputError(f"--affine must be 'none' or 'ants', got {affine!r}")
    fv = load_nifti(fixed, ndim=ndim)
    mv = load_nifti(moving, ndim=fv.ndim)
    mlab = load_labels(moving_labels, ndim=fv.ndim, name=names[2]) if moving_labels is not None else None
    flab = load_labels(fixed_labels, ndim=fv.ndim, name=names[3]) if fixed_labels is not None else None
    for vol, nm in ((fv, names[0]), (mv, names[1])):
        check_not_blank(vol.data, f"{nm} {vol.path}")
        check_nonempty_mask(foreground_mask(vol.data), f"{nm} {vol.path}: foreground")
    if mlab is not None:
        _check_companion(mv, mlab, (names[1], names[2]))
    if flab is not None:
        _check_companion(fv, flab, (names[0], names[3]))
    nd = fv.ndim
    ornt = canonical_orientation(fv.affine, nd, f"{names[0]} {fv.path}")
    canonical_orientation(mv.affine, nd, f"{names[1]} {mv.path}")  # same affine checks for the moving image
    fixed_c = to_canonical(fv.data, ornt)
    aff_c = canonical_affine(fv.affine, fv.shape, ornt)
    world = np.eye(nd + 1)
    mv_sp = spatial_affine(mv.affine, nd)
    if affine == "ants":
        world = ants_affine(fixed_c, aff_c, mv.data, mv_sp)
    moving_c = sample(mv.data, mv_sp, fixed_c.shape, aff_c, world=world)
    if not moving_c.any():
        raise ContraRegInputError(f"{names[1]} {mv.path}: no part of the moving image overlaps the fixed image's "
                                  f"field of view in world coordinates (check both affines, or use --affine ants)")
    if affine == "none":
        warn_if_misaligned(fixed_c, moving_c)
    pair = Pair(fixed=fv, moving=mv, ornt=ornt, affine_c=aff_c, fixed_c=fixed_c, moving_c=moving_c, world=world,
                moving_labels=mlab, fixed_labels=flab)
    if mlab is not None:
        pair.moving_labels_c = sample(mlab.data, spatial_affine(mlab.affine, nd), fixed_c.shape, aff_c,
                                      world=world, order=0)
    if flab is not None:
        pair.fixed_labels_c = to_canonical(flab.data, ornt)
    return pair
