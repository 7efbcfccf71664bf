"""NIfTI input/output and volume preprocessing (nibabel + numpy + scipy.ndimage).

Every bad input raises :class:`contrareg_tf.errors.ContraRegInputError` naming the file/argument and the
problem: missing file, not a NIfTI, 4-D image, wrong dimensionality, NaN/Inf voxels, mismatched shapes,
empty mask, an all-zero (or constant) image, a label map holding non-integer values, an output path that
names an input or another output. Writes are atomic (temporary file in the same folder, then ``os.replace``).

Label maps (:func:`load_labels`) are read in float64 (exact for every integer up to 2**53), must hold integers
only, and come back as int32 (int64 when a value needs it); :func:`label_dtype` gives the integer type to write
them back with (the file's own integer type, int32 for a float-stored map).
"""
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi

from ..atomic import atomic_path
from ..config import INTENSITY_PERCENTILES, MASK_LEVEL, MASK_PERCENTILE
from ..errors import ContraRegInputError

NIFTI_EXTS = (".nii.gz", ".nii")


@dataclass
class Volume:
    """A loaded image: ``data`` (float32, spatial dims only; int32/int64 from :func:`load_labels`),
    ``affine`` (4x4), ``header``, ``path``."""
    data: np.ndarray
    affine: np.ndarray
    header: Any
    path: Optional[str] = None

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def spacing(self) -> Tuple[float, ...]:
        """Voxel size in mm (column norms of the affine), one value per spatial dim."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0)[: self.data.ndim])


def _name(path):
    return os.fspath(path) if path is not None else "<array>"


def load_nifti(path, ndim: Optional[int] = None, vector: bool = False, dtype=np.float32) -> Volume:
    """Load a NIfTI file as float32 ``Volume``.

    Trailing singleton dimensions beyond the spatial ones are squeezed (e.g. (X, Y, Z, 1) -> (X, Y, Z),
    and with ``ndim=2`` (X, Y, 1) -> (X, Y)). ``vector=True`` keeps one trailing component axis (a
    displacement field of shape (*vol, ndim)). ``ndim`` (2 or 3), if given, is enforced.
    """
    p = _name(path)
    if ndim is not None and ndim not in (2, 3):
        raise ContraRegInputError(f"ndim must be 2 or 3, got {ndim!r} (loading {p})")
    if not os.path.exists(p):
        raise ContraRegInputError(f"{p}: file not found")
    if os.path.isdir(p):
        raise ContraRegInputError(f"{p}: is a folder, expected a NIfTI file")
    try:
        img = nib.load(p)
        if not hasattr(img, "affine") or not hasattr(img, "dataobj"):
            raise TypeError(f"{type(img).__name__} is not a spatial image")
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as e:  # nibabel raises many types (ImageFileError, gzip/EOF/OSError, ...)
        raise ContraRegInputError(f"{p}: not a readable NIfTI image ({type(e).__name__}: {e})") from None

    shape = data.shape
    if vector:
        if len(shape) < 3:
            raise ContraRegInputError(f"{p}: expected a vector field of shape (*vol, ndim), got {shape}")
        body = shape[:-1]
    else:
        body = shape
    nspat = ndim if ndim is not None else 3
    while len(body) > nspat and body[-1] == 1:  # squeeze trailing singleton axes beyond the spatial ones
        body = body[:-1]
    if len(body) > 3:
        raise ContraRegInputError(f"{p}: image is {len(body)}-D with shape {shape}; expected a 2-D or 3-D "
                                  f"volume (only a trailing singleton 4th dimension is allowed)")
    if ndim is not None and len(body) != ndim:
        raise ContraRegInputError(f"{p}: expected a {ndim}-D image, got shape {shape}")
    if len(body) < 2:
        raise ContraRegInputError(f"{p}: expected a 2-D or 3-D image, got shape {shape}")
    if vector:
        data = data.reshape(tuple(body) + (shape[-1],))
    else:
        data = data.reshape(body)
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise ContraRegInputError(f"{p}: contains {bad} NaN/Inf voxels")
    return Volume(data=data, affine=_checked_affine(img, p, len(body)), header=img.header, path=p)


def _checked_affine(img, p, nspat):
    """The image's voxel-to-world affine, refused when it cannot place the image: a NIfTI with neither an sform
    nor a qform code (nibabel would fall back to a pixdim-only affine with an assumed left–right flip), or an
    affine that is not finite or whose spatial axes are degenerate (zero voxel size, collinear axes)."""
    if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        hdr = img.header
        if int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
            raise ContraRegInputError(f"{p}: no orientation in the header (sform_code = qform_code = 0): its "
                                      "voxel-to-world mapping, left–right included, is unknown; set the sform or "
                                      "qform of the file (e.g. nibabel img.set_sform(affine, code=1)) and retry")
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ContraRegInputError(f"{p}: the header's affine is not finite ({np.array2string(affine, precision=3)})")
    axes = affine[:3, :nspat]
    if np.linalg.matrix_rank(axes, tol=1e-9 * max(1.0, float(np.abs(axes).max()))) < nspat:
        raise ContraRegInputError(f"{p}: the header's affine is degenerate (zero voxel size or collinear axes): "
                                  f"{np.array2string(affine[:3, :3], precision=3)}")
    return affine


def load_labels(path, ndim: Optional[int] = None, name: Optional[str] = None) -> Volume:
    """Load a label map: integer values ≥ 0 only (0 = background; anything else is an error naming the file), returned as
    int32, or int64 when a label lies outside int32's range. ``name`` (e.g. ``--moving-labels``) prefixes
    the message."""
    vol = load_nifti(path, ndim=ndim, dtype=np.float64)
    lab = np.rint(vol.data)
    what = f"{name} {vol.path}" if name else vol.path
    bad = lab != vol.data
    if bad.any():
        raise ContraRegInputError(f"{what}: label map must hold integer labels; {int(bad.sum())} voxels are not "
                                  f"integers (e.g. {vol.data[bad].flat[0]:g})")
    if lab.size and lab.min() < 0:
        raise ContraRegInputError(f"{what}: label map must hold labels ≥ 0 (0 = background); "
                                  f"{int((lab < 0).sum())} voxels are negative (e.g. {lab[lab < 0].flat[0]:g})")
    fits = lab.size == 0 or lab.max() <= np.iinfo(np.int32).max
    vol.data = lab.astype(np.int32 if fits else np.int64)
    return vol


def label_dtype(vol: Volume):
    """Integer dtype to write a label map derived from ``vol`` with: the file's own on-disk integer type,
    widened to int32 if the data no longer fit; int32 for a map stored as float (or with scaling)."""
    disk = np.dtype(vol.header.get_data_dtype()) if vol.header is not None else np.dtype(np.float32)
    slope, inter = vol.header.get_slope_inter() if vol.header is not None else (None, None)
    scaled = (slope not in (None, 1.0) and np.isfinite(slope)) or (inter not in (None, 0.0) and np.isfinite(inter))
    if not np.issubdtype(disk, np.integer) or scaled:
        disk = np.dtype(np.int32)
    data = vol.data
    if data.size and (data.min() < np.iinfo(disk).min or data.max() > np.iinfo(disk).max):
        disk = np.dtype(np.int64 if data.dtype == np.int64 else np.int32)
    return disk


def check_not_blank(x, name: str):
    """Raise if the image ``x`` (array or Volume) is constant (e.g. all zeros): nothing to register."""
    arr, nm = _arr_and_name(x, name)
    if arr.size == 0 or float(arr.max()) == float(arr.min()):
        raise ContraRegInputError(f"{nm}: image is constant ({float(arr.flat[0]) if arr.size else 0:g} "
                                  f"everywhere): nothing to register")


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _check_writable(arg, path, folder):
    """Create and remove a file in ``folder`` now, so that a read-only folder or file system is one error before the
    registration runs, not a traceback after it (``os.access`` misses read-only mounts)."""
    if os.path.isdir(path):
        raise ContraRegInputError(f"{arg} {path}: is a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".contrareg_write_test_"):
            pass
    except OSError as e:
        raise ContraRegInputError(f"{arg} {path}: cannot write in {folder} ({e.strerror})") from None


def check_output_paths(outputs, inputs=None):
    """Validate output paths before anything is computed: ``outputs`` and ``inputs`` map an argument name
    (e.g. ``--moved``) to a path or None. Each output must end with .nii/.nii.gz, lie in an existing, writable folder,
    and differ from every input and from every other output (same real path or hard link)."""
    outs = [(k, os.fspath(p)) for k, p in outputs.items() if p is not None]
    ins = [(k, os.fspath(p)) for k, p in (inputs or {}).items() if p is not None]
    for k, p in outs:
        if not p.endswith(NIFTI_EXTS):
            raise ContraRegInputError(f"{k} {p}: output file name must end with .nii or .nii.gz")
        folder = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(folder):
            raise ContraRegInputError(f"{k} {p}: output folder {folder} does not exist")
        _check_writable(k, p, folder)
        for ki, pi in ins:
            if _same_file(p, pi):
                raise ContraRegInputError(f"{k} {p} is the input {ki}: refusing to overwrite an input")
    for i, (k, p) in enumerate(outs):
        for k2, p2 in outs[i + 1:]:
            if _same_file(p, p2):
                raise ContraRegInputError(f"{k} and {k2} name the same file {p}")


def _out_dtype(data: np.ndarray):
    if data.dtype == bool:
        return np.uint8
    if np.issubdtype(data.dtype, np.integer):
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max:
            return np.int16
        return np.int32
    return np.float32


def save_nifti(path, data, like: Optional[Volume] = None, affine=None, header=None, dtype=None) -> str:
    """Write ``data`` to ``path`` (.nii or .nii.gz) atomically; returns the path.

    Affine/header come from ``affine``/``header`` if given, else from ``like``, else identity. The
    on-disk dtype is float32 for float data, int16 (int32 if needed) for integer labels, uint8 for bool
    masks, unless ``dtype`` says otherwise; no intensity scaling is stored (slope 1, intercept 0).
    """
    p = _name(path)
    if not p.endswith(NIFTI_EXTS):
        raise ContraRegInputError(f"{p}: output file name must end with .nii or .nii.gz")
    data = np.asarray(data)
    if data.ndim not in (2, 3, 4):
        raise ContraRegInputError(f"{p}: cannot save an array of shape {data.shape} (expected 2-D to 4-D)")
    if not (data.dtype == bool or np.issubdtype(data.dtype, np.number)):
        raise ContraRegInputError(f"{p}: cannot save an array of dtype {data.dtype}")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise ContraRegInputError(f"{p}: refusing to save NaN/Inf voxels")
    if affine is None:
        affine = like.affine if like is not None else np.eye(4)
    if header is None and like is not None:
        header = like.header
    dt = np.dtype(dtype) if dtype is not None else np.dtype(_out_dtype(data))
    if header is not None and not isinstance(header, nib.Nifti1Header):
        header = None  # e.g. an MGH header: start from a fresh NIfTI header
    hdr = header.copy() if header is not None else None
    arr = data.astype(dt, copy=False)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_data_dtype(dt)
    img.header.set_slope_inter(1.0, 0.0)
    folder = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(folder):
        raise ContraRegInputError(f"{p}: output folder {folder} does not exist")
    with atomic_path(p) as tmp:
        nib.save(img, tmp)
    return p


def _arr_and_name(x, default):
    if isinstance(x, Volume):
        return x.data, x.path or default
    return np.asarray(x), default


def check_same_shape(a, b, names: Sequence[str] = ("a", "b")):
    """Raise if the spatial shapes of ``a`` and ``b`` (arrays or Volumes) differ; names go in the message."""
    xa, na = _arr_and_name(a, names[0])
    xb, nb = _arr_and_name(b, names[1])
    if xa.shape != xb.shape:
        raise ContraRegInputError(f"shape mismatch: {na} has shape {xa.shape} but {nb} has shape {xb.shape}")


def normalize_intensity(x, mask=None, lo: float = INTENSITY_PERCENTILES[0],
                        hi: float = INTENSITY_PERCENTILES[1]) -> np.ndarray:
    """Map intensities to [0, 1] by robust percentiles (``lo``/``hi``, within ``mask`` if given), clipped.
    A constant image maps to zeros."""
    x = np.asarray(x, dtype=np.float32)
    if not 0 <= lo < hi <= 100:
        raise ContraRegInputError(f"normalize_intensity: need 0 <= lo < hi <= 100, got lo={lo}, hi={hi}")
    vals = x[np.asarray(mask, dtype=bool)] if mask is not None else x.ravel()
    if vals.size == 0:
        raise ContraRegInputError("normalize_intensity: mask is empty")
    plo, phi = np.percentile(vals, [lo, hi])
    if not phi > plo:
        return np.zeros_like(x)
    return np.clip((x - plo) / (phi - plo), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class CropInfo:
    """How ``crop_or_pad`` mapped the original grid: per spatial dim, ``crop`` = voxels cut before the
    kept region (in the original), ``pad`` = voxels added before it (in the output)."""
    orig_shape: Tuple[int, ...]
    shape: Tuple[int, ...]
    crop: Tuple[int, ...]
    pad: Tuple[int, ...]

    @property
    def kept(self) -> Tuple[int, ...]:
        return tuple(min(o, s) for o, s in zip(self.orig_shape, self.shape))


def crop_or_pad(x, shape: Sequence[int], fill=0) -> Tuple[np.ndarray, CropInfo]:
    """Centre-crop or zero-pad the leading ``len(shape)`` axes of ``x`` to ``shape`` (trailing axes, e.g.
    channels, are kept). Odd differences put the extra voxel at the end."""
    x = np.asarray(x)
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if x.ndim < nd or any(s < 1 for s in shape):
        raise ContraRegInputError(f"crop_or_pad: cannot bring an array of shape {x.shape} to shape {shape}")
    orig = x.shape[:nd]
    crop, pad = [], []
    for o, s in zip(orig, shape):
        crop.append(max(o - s, 0) // 2)
        pad.append(max(s - o, 0) // 2)
    info = CropInfo(tuple(orig), shape, tuple(crop), tuple(pad))
    kept = info.kept
    src = tuple(slice(c, c + k) for c, k in zip(crop, kept))
    dst = tuple(slice(p, p + k) for p, k in zip(pad, kept))
    out = np.full(shape + x.shape[nd:], fill, dtype=x.dtype)
    out[dst] = x[src]
    return out, info


def uncrop(y, info: CropInfo, fill=0) -> np.ndarray:
    """Inverse of :func:`crop_or_pad`: place ``y`` back on the original grid (cropped-away voxels = fill)."""
    y = np.asarray(y)
    nd = len(info.shape)
    if tuple(y.shape[:nd]) != tuple(info.shape):
        raise ContraRegInputError(f"uncrop: array shape {y.shape[:nd]} does not match the cropped shape "
                                  f"{info.shape}")
    kept = info.kept
    src = tuple(slice(p, p + k) for p, k in zip(info.pad, kept))
    dst = tuple(slice(c, c + k) for c, k in zip(info.crop, kept))
    out = np.full(tuple(info.orig_shape) + y.shape[nd:], fill, dtype=y.dtype)
    out[dst] = y[src]
    return out


def foreground_mask(x, threshold: Optional[float] = None, fill_holes: bool = True,
                    largest_component: bool = True, require_nonempty: bool = False,
                    name: str = "image") -> np.ndarray:
    """Binary foreground: ``x > threshold`` (default ``config.MASK_LEVEL`` = 10 % of the
    ``config.MASK_PERCENTILE`` = 99.5th percentile), optionally hole-filled and reduced to its largest connected
    component. ``require_nonempty`` raises on an empty mask."""
    x = np.asarray(x, dtype=np.float32)
    if threshold is None:
        threshold = MASK_LEVEL * float(np.percentile(x, MASK_PERCENTILE)) if x.size else 0.0
    m = x > threshold
    if largest_component and m.any():
        lab, n = ndi.label(m)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            m = lab == (1 + int(np.argmax(sizes)))
    if fill_holes and m.any():
        m = ndi.binary_fill_holes(m)
    if require_nonempty and not m.any():
        raise ContraRegInputError(f"{name}: foreground mask is empty (threshold {threshold:g})")
    return m


def check_nonempty_mask(mask, name: str = "mask") -> np.ndarray:
    """Return ``mask`` as bool, raising if it has no foreground voxel."""
    m = np.asarray(mask) > 0
    if not m.any():
        raise ContraRegInputError(f"{name}: mask is empty (no foreground voxel)")
    return m
