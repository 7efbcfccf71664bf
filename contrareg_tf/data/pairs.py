"""Inter-subject multi-modal pairs (paper §3): I1 = modality 1 (T1w) of subject a, I2 = modality 2 (T2w)
of a different subject b, with their foreground masks and label maps; optionally ``img_ext`` = modality 2
of a third subject c (extra negatives, "ExtNegs").

Volumes are loaded once per (files, shape, ndim) and cached in memory: intensities normalised to [0, 1]
(robust percentiles), centre-cropped/padded to ``shape``. 2-D mode on 3-D volumes yields axial slices
(array axis 2 is taken as the axial axis) drawn from the central band where the foreground is large.
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..errors import ContraRegInputError
from .dataset import Description, Subject
from .io import check_same_shape, crop_or_pad, foreground_mask, load_labels, load_nifti, normalize_intensity

_CACHE = {}
_CACHE_MAX = 4


def _subjects(desc_or_subjects, split: Optional[str] = None) -> List[Subject]:
    if isinstance(desc_or_subjects, Description):
        return desc_or_subjects.split(split or "all")
    return list(desc_or_subjects)


def make_pairs(desc_or_subjects, n_pairs: Optional[int] = None, seed: int = 0, split: Optional[str] = None):
    """Deterministic list of ordered index pairs (a, b), a != b, into the subject list (``desc.split(split)``
    or all subjects of a Description). ``n_pairs=None``: all n(n−1) pairs in lexicographic order; else
    ``n_pairs`` distinct pairs drawn with ``seed`` (cycling through fresh permutations if more are asked
    for than exist). An int instead of subjects means that many subjects."""
    n = desc_or_subjects if isinstance(desc_or_subjects, (int, np.integer)) else len(
        _subjects(desc_or_subjects, split))
    if n < 2:
        raise ContraRegInputError(f"make_pairs: need at least 2 subjects for inter-subject pairs, got {n}")
    total = n * (n - 1)
    if n_pairs is None:
        return [(a, b) for a in range(n) for b in range(n) if a != b]
    if n_pairs < 0:
        raise ContraRegInputError(f"make_pairs: n_pairs must be >= 0, got {n_pairs}")
    rng = np.random.default_rng(seed)
    ks = []
    while len(ks) < n_pairs:
        m = min(total, n_pairs - len(ks))
        ks.extend(int(k) for k in rng.choice(total, m, replace=False))
    out = []
    for k in ks:
        a, r = divmod(k, n - 1)
        out.append((a, r + (r >= a)))
    return out


@dataclass
class SplitArrays:
    """In-memory volumes of one split: ``img1``/``img2`` float32 (N, *shape[, Z]) in [0, 1],
    ``mask1``/``mask2`` bool, ``labels`` int32 or None, ``names``, ``affines`` (of the original files)."""
    names: List[str]
    img1: np.ndarray
    img2: np.ndarray
    mask1: np.ndarray
    mask2: np.ndarray
    labels: Optional[np.ndarray]
    affines: List[np.ndarray]

    _ALIASES = {"t1": "img1", "t2": "img2"}

    def __len__(self):
        return len(self.names)

    def __getitem__(self, key):
        """Dict-style access: ``arr['t1']`` (= img1), ``arr['t2']`` (= img2), ``'mask1'``, ``'mask2'``,
        ``'labels'``, ``'names'``, ``'affines'``."""
        if not isinstance(key, str):
            raise TypeError(f"SplitArrays keys are strings, got {key!r}")
        key = self._ALIASES.get(key, key)
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return ("img1", "img2", "mask1", "mask2", "labels", "names", "affines")

    def get(self, key, default=None):
        """``self[key]``, or ``default`` for a key it does not have (dict-style)."""
        try:
            return self[key]
        except KeyError:
            return default


def _key(subs, shape, ndim):
    files = []
    for s in subs:
        for p in (s.t1, s.t2, s.labels, s.mask):
            files.append((p, os.path.getmtime(p) if p and os.path.exists(p) else None))
    return tuple(files), tuple(shape), ndim


def _load_subject(s: Subject, shape, ndim):
    vol_nd = None
    vols = {}
    for key in ("t1", "t2", "labels", "mask"):
        p = getattr(s, key)
        if not p:
            continue
        v = load_labels(p) if key == "labels" else load_nifti(p)   # labels: int32, non-integer rejected
        vols[key] = v
        if vol_nd is None:
            vol_nd = v.ndim
    for key in ("t2", "labels", "mask"):
        if key in vols:
            check_same_shape(vols["t1"], vols[key], ("t1", key))
    if len(shape) != ndim:
        raise ContraRegInputError(f"shape {tuple(shape)} has {len(shape)} dims but ndim={ndim}")
    if not (vol_nd == ndim or (ndim == 2 and vol_nd == 3)):
        raise ContraRegInputError(f"{s.t1}: cannot use a {vol_nd}-D image with ndim={ndim}")
    inplane = tuple(shape)
    out = {}
    for key in ("t1", "t2"):
        out[key] = crop_or_pad(normalize_intensity(vols[key].data), inplane)[0]
    if "mask" in vols:
        m = crop_or_pad(vols["mask"].data > 0, inplane)[0]
        if not m.any():
            raise ContraRegInputError(f"{s.mask}: mask is empty (no foreground voxel)")
        out["mask1"] = out["mask2"] = m
    else:
        out["mask1"] = crop_or_pad(foreground_mask(normalize_intensity(vols["t1"].data), require_nonempty=True,
                                                   name=s.t1), inplane)[0]
        out["mask2"] = crop_or_pad(foreground_mask(normalize_intensity(vols["t2"].data), require_nonempty=True,
                                                   name=s.t2), inplane)[0]
    out["labels"] = (crop_or_pad(vols["labels"].data, inplane)[0]
                     if "labels" in vols else None)
    return out, vols["t1"].affine


def load_split_arrays(desc, split: str, shape: Sequence[int], ndim: int = 3) -> SplitArrays:
    """Load (and cache in memory) every subject of ``split``: normalised to [0, 1], crop/padded to
    ``shape``. For ``ndim=2`` and 3-D volumes, ``shape`` is in-plane and the arrays keep the axial axis
    last: (N, *shape, Z)."""
    if ndim not in (2, 3):
        raise ContraRegInputError(f"ndim must be 2 or 3, got {ndim!r}")
    subs = _subjects(desc, split)
    if not subs:
        raise ContraRegInputError(f"split {split!r} has no subjects")
    key = _key(subs, shape, ndim)
    if key in _CACHE:
        return _CACHE[key]
    items = [_load_subject(s, shape, ndim) for s in subs]
    z = {it[0]["t1"].shape for it in items}
    if len(z) > 1:
        raise ContraRegInputError(f"split {split!r}: volumes have different shapes after crop/pad {sorted(z)} "
                                  f"(2-D mode on 3-D volumes needs the same number of axial slices)")
    has_labels = all(it[0]["labels"] is not None for it in items)
    arr = SplitArrays(
        names=[s.subject for s in subs],
        img1=np.stack([it[0]["t1"] for it in items]).astype(np.float32),
        img2=np.stack([it[0]["t2"] for it in items]).astype(np.float32),
        mask1=np.stack([it[0]["mask1"] for it in items]).astype(bool),
        mask2=np.stack([it[0]["mask2"] for it in items]).astype(bool),
        labels=np.stack([it[0]["labels"] for it in items]) if has_labels else None,
        affines=[it[1] for it in items])
    while len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = arr
    return arr


def clear_cache():
    """Drop all cached split arrays."""
    _CACHE.clear()


def axial_band(masks: np.ndarray, frac: float = 0.5):
    """(z_lo, z_hi) inclusive: axial slices (last axis) whose union-foreground area is >= ``frac`` of the
    largest slice area."""
    area = masks.reshape(-1, *masks.shape[-3:]).any(0).sum(axis=(0, 1))
    if area.max() == 0:
        raise ContraRegInputError("axial_band: all masks are empty")
    idx = np.nonzero(area >= frac * area.max())[0]
    return int(idx.min()), int(idx.max())


def _others(rng, n, exclude):
    """A random index in range(n) not in ``exclude`` (a small set)."""
    ex = sorted(exclude)
    r = int(rng.integers(n - len(ex)))
    for e in ex:
        if r >= e:
            r += 1
    return r


def pair_dataset(desc, split: str, shape: Sequence[int], batch_size: int, seed: int = 0, ndim: int = 3,
                 with_labels: bool = False, repeat: bool = True, ext_negative: bool = False,
                 n_pairs: Optional[int] = None, with_indices: bool = False, band_frac: float = 0.5):
    """``tf.data.Dataset`` of inter-subject pair batches: dicts with ``img1``, ``img2``, ``mask1``,
    ``mask2`` of shape (B, *shape, 1) float32 [+ ``labels1``, ``labels2`` int32 (B, *shape, 1)]
    [+ ``img_ext``, ``mask_ext`` (modality 2 / mask of a third subject) if ``ext_negative``]
    [+ ``index1``, ``index2`` (and ``index_ext``) int32 (B,) if ``with_indices``].

    ``repeat=True``: endless, a fresh random pair (a != b) per sample from ``np.random.default_rng(seed)``
    (iterating the data set again restarts the same sequence). ``repeat=False``: one pass over
    ``make_pairs(split, n_pairs, seed)`` (last batch may be smaller). 2-D mode on 3-D volumes: one axial
    slice per sample, the same z for a, b (and c), drawn from the :func:`axial_band`.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ContraRegInputError(f"batch_size must be >= 1, got {batch_size}")
    arr = load_split_arrays(desc, split, shape, ndim)
    n = len(arr)
    if n < 2:
        raise ContraRegInputError(f"split {split!r} has {n} subject(s); inter-subject pairs need >= 2")
    if ext_negative and n < 3:
        raise ContraRegInputError(f"split {split!r} has {n} subjects; ext_negative needs >= 3")
    if with_labels and arr.labels is None:
        raise ContraRegInputError(f"split {split!r}: with_labels=True but some subjects have no label map")
    slicing = arr.img1.ndim == ndim + 2  # (N, *shape, Z)
    if slicing:
        zlo, zhi = axial_band(np.concatenate([arr.mask1, arr.mask2]), band_frac)
    shape = tuple(shape)

    def take(x, i, z):
        return x[i, ..., z] if slicing else x[i]

    def sample(a, b, c, z):
        d = {"img1": take(arr.img1, a, z), "img2": take(arr.img2, b, z),
             "mask1": take(arr.mask1, a, z), "mask2": take(arr.mask2, b, z)}
        if with_labels:
            d["labels1"] = take(arr.labels, a, z)
            d["labels2"] = take(arr.labels, b, z)
        if ext_negative:
            d["img_ext"] = take(arr.img2, c, z)
            d["mask_ext"] = take(arr.mask2, c, z)
        return d

    def collate(items, idx):
        out = {}
        for k in items[0]:
            dt = np.int32 if k.startswith("labels") else np.float32
            out[k] = np.stack([it[k] for it in items]).astype(dt)[..., None]
        if with_indices:
            out["index1"] = np.array([i[0] for i in idx], np.int32)
            out["index2"] = np.array([i[1] for i in idx], np.int32)
            if ext_negative:
                out["index_ext"] = np.array([i[2] for i in idx], np.int32)
        return out

    def gen():
        rng = np.random.default_rng(seed)
        if repeat:
            while True:
                items, idx = [], []
                for _ in range(batch_size):
                    a = int(rng.integers(n))
                    b = _others(rng, n, {a})
                    c = _others(rng, n, {a, b}) if ext_negative else None
                    z = int(rng.integers(zlo, zhi + 1)) if slicing else None
                    items.append(sample(a, b, c, z))
                    idx.append((a, b, c))
                yield collate(items, idx)
        else:
            pairs = make_pairs(n, n_pairs, seed)
            for s in range(0, len(pairs), batch_size):
                items, idx = [], []
                for a, b in pairs[s:s + batch_size]:
                    c = _others(rng, n, {a, b}) if ext_negative else None
                    z = int(rng.integers(zlo, zhi + 1)) if slicing else None
                    items.append(sample(a, b, c, z))
                    idx.append((a, b, c))
                yield collate(items, idx)

    bdim = batch_size if repeat else None
    img = tf.TensorSpec((bdim,) + shape + (1,), tf.float32)
    sig = {"img1": img, "img2": img, "mask1": img, "mask2": img}
    if with_labels:
        sig["labels1"] = sig["labels2"] = tf.TensorSpec((bdim,) + shape + (1,), tf.int32)
    if ext_negative:
        sig["img_ext"] = sig["mask_ext"] = img
    if with_indices:
        sig["index1"] = sig["index2"] = tf.TensorSpec((bdim,), tf.int32)
        if ext_negative:
            sig["index_ext"] = tf.TensorSpec((bdim,), tf.int32)
    return tf.data.Dataset.from_generator(gen, output_signature=sig).prefetch(2)
