"""Inter-subject multi-modal pairs (paper §3): I1 = modality 1 (T1w) of subject a, I2 = modality 2 (T2w)
of a different subject b, with their foreground masks and label maps; optionally ``ext1``/``ext2`` = both
modalities of a third subject c (extra negatives, "ExtNegs").

- :func:`make_pairs`: the fixed, seeded list of evaluation pairs.
- :class:`PairSampler`: the one random pair sampler (training, the 2-D-from-3-D slice case, ``pair_dataset``);
  step-keyed, so a resumed run draws what the uninterrupted one would have.
- :func:`load_split_arrays`: a split's volumes, loaded by ``dataset.load_subject`` (the one per-subject
  loader) and cached in memory per (files, shape, ndim, spacing): intensities normalised to [0, 1] (robust
  percentiles), brought onto the grid ``shape`` by ``grid.fit_subject`` (centre crop/pad, or resampled to
  ``spacing`` mm), each subject's :class:`grid.FitInfo` kept. 2-D mode on 3-D volumes keeps the axial axis
  (array axis 2) and samples axial slices from the central band where the foreground is large
  (:func:`axial_band`).
"""
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf

from ..config import SLICE_BAND_FRAC
from ..errors import ContraRegInputError
from ..rng import step_rng
from .dataset import Description, Subject, load_subject
from .grid import FitInfo, fit_subject

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
    ``mask1``/``mask2`` bool, ``labels`` int32 or None, ``names``, ``affines`` (of the grid: the files' own
    when nothing was cropped, padded or resampled), ``fits`` (how each subject came onto the grid)."""
    names: List[str]
    img1: np.ndarray
    img2: np.ndarray
    mask1: np.ndarray
    mask2: np.ndarray
    labels: Optional[np.ndarray]
    affines: List[np.ndarray]
    fits: List[FitInfo] = field(default_factory=list)

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


def _key(subs, shape, ndim, spacing):
    files = []
    for s in subs:
        for p in (s.t1, s.t2, s.labels, s.mask):
            files.append((p, os.path.getmtime(p) if p and os.path.exists(p) else None))
    return tuple(files), tuple(shape), ndim, spacing


def _load_on_grid(s: Subject, shape, ndim, spacing=None):
    """:func:`dataset.load_subject` (always normalised, whole-image percentiles) brought onto the grid
    ``shape`` (``grid.fit_subject``: crop/pad in-plane, or resampled to ``spacing`` mm); a mask file whose
    foreground is empty, or lies wholly off the grid, is an error. Returns (arrays, FitInfo, grid affine)."""
    if len(shape) != ndim:
        raise ContraRegInputError(f"shape {tuple(shape)} has {len(shape)} dims but ndim={ndim}")
    sub = load_subject(s, ndim=None, with_labels=True, normalise="always", percentiles="image")
    vol_nd = sub["ndim_file"]
    if not (vol_nd == ndim or (ndim == 2 and vol_nd == 3)):
        raise ContraRegInputError(f"{s.t1}: cannot use a {vol_nd}-D image with ndim={ndim}")
    if s.mask and not sub["mask1"].any():
        raise ContraRegInputError(f"{s.mask}: mask is empty (no foreground voxel)")
    out, info, affine = fit_subject(sub, s.subject, tuple(shape), spacing)
    if s.mask and not out["mask1"].any():
        raise ContraRegInputError(f"{s.mask}: mask is empty on the {'x'.join(map(str, shape))} grid (no "
                                  f"foreground voxel inside it)")
    return out, info, affine


def load_split_arrays(desc, split: str, shape: Sequence[int], ndim: int = 3,
                      spacing: Optional[float] = None) -> SplitArrays:
    """Load (and cache in memory) every subject of ``split``: normalised to [0, 1], brought onto the grid
    ``shape`` (centre crop/pad; resampled to ``spacing`` mm when given: ``grid.fit_subject``). For ``ndim=2``
    and 3-D volumes, ``shape`` is in-plane and the arrays keep the axial axis last: (N, *shape, Z)."""
    if ndim not in (2, 3):
        raise ContraRegInputError(f"ndim must be 2 or 3, got {ndim!r}")
    subs = _subjects(desc, split)
    if not subs:
        raise ContraRegInputError(f"split {split!r} has no subjects")
    key = _key(subs, shape, ndim, spacing)
    if key in _CACHE:
        return _CACHE[key]
    items = [_load_on_grid(s, shape, ndim, spacing) for s in subs]
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
        affines=[it[2] for it in items], fits=[it[1] for it in items])
    while len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = arr
    return arr


def clear_cache():
    """Drop all cached split arrays."""
    _CACHE.clear()


def axial_band(masks: np.ndarray, frac: float = SLICE_BAND_FRAC):
    """(z_lo, z_hi) inclusive: axial slices (last axis) whose union-foreground area is >= ``frac`` of the
    largest slice area."""
    area = masks.reshape(-1, *masks.shape[-3:]).any(0).sum(axis=(0, 1))
    if area.max() == 0:
        raise ContraRegInputError("axial_band: all masks are empty")
    idx = np.nonzero(area >= frac * area.max())[0]
    return int(idx.min()), int(idx.max())


class PairSampler:
    """The one inter-subject pair sampler (paper §3), for training and for the 2-D-from-3-D slice case.

    ``batch(step)`` is a pure function of ``(seed, step)`` (``rng.step_rng(seed, step, 0)``), endless; per sample:
    subject ``a`` uniform in ``range(n)``, ``b = (a + U{1..n−1}) mod n`` (so ``b != a``), λ ~ U[0, 1]; with
    ``ext`` (ExtNegs) a third subject ``c`` uniform, moved to ``c+1 mod n`` while it equals ``a`` or ``b``; in
    slice mode one axial slice ``z`` per sample, drawn after all of these, the same for ``a``, ``b`` and ``c``,
    uniform over :func:`axial_band` of the union of all masks. (The paper samples random inter-subject pairs and
    λ ~ U[0, 1]; the draw order above is this implementation's choice and is kept fixed, so runs repeat.)

    Arrays: ``t1``, ``t2`` (N, *shape) float, optional ``mask1``/``mask2`` (default ``image > 0``), optional
    ``labels`` (N, *shape) int. ``ndim``: the spatial dims of one sample; ``None`` = all axes after N. With
    ``ndim=2`` and (N, X, Y, Z) arrays the sampler serves axial slices (``band_frac`` sets the band).

    Batch dict: ``img1`` = T1w of a, ``img2`` = T2w of b, ``mask1``, ``mask2`` float32 (B, *shape, 1), ``lam``
    float32 (B, 1); + ``ext1``/``ext2`` = T1w/T2w of c if ``ext``; + ``labels1``/``labels2`` int32 (B, *shape, 1)
    if ``with_labels``; + ``index1``/``index2`` (and ``index_ext``) int32 (B,) if ``with_indices``.
    """

    def __init__(self, t1, t2, mask1=None, mask2=None, batch_size=1, seed=0, ext=False, labels=None,
                 with_labels=False, with_indices=False, ndim=None, band_frac=SLICE_BAND_FRAC):
        t1, t2 = np.asarray(t1, np.float32), np.asarray(t2, np.float32)
        if t1.shape != t2.shape:
            raise ContraRegInputError(f"T1w stack {t1.shape} and T2w stack {t2.shape} differ in shape")
        n = t1.shape[0]
        if n < (3 if ext else 2):
            raise ContraRegInputError(f"need at least {3 if ext else 2} subjects for inter-subject pairs"
                                      f"{' with extra negatives (ExtNegs)' if ext else ''}, got {n}")
        if int(batch_size) < 1:
            raise ContraRegInputError(f"batch_size must be >= 1, got {batch_size}")
        if with_labels and labels is None:
            raise ContraRegInputError("with_labels=True but no label maps were given")
        if labels is not None and np.shape(labels) != t1.shape:
            raise ContraRegInputError(f"label stack {np.shape(labels)} and image stack {t1.shape} differ in shape")
        sdim = t1.ndim - 1 if ndim is None else int(ndim)
        if t1.ndim - 1 not in (sdim, sdim + 1):
            raise ContraRegInputError(f"image stack {t1.shape} does not hold {sdim}-D samples")
        self.slicing = t1.ndim - 1 == sdim + 1       # (N, *shape, Z): one axial slice per sample
        self.t1, self.t2 = t1[..., None], t2[..., None]
        self.m1 = (np.asarray(mask1, np.float32) if mask1 is not None else (t1 > 0).astype(np.float32))[..., None]
        self.m2 = (np.asarray(mask2, np.float32) if mask2 is not None else (t2 > 0).astype(np.float32))[..., None]
        self.labels = np.asarray(labels, np.int32)[..., None] if with_labels else None
        self.n, self.batch_size, self.seed, self.ext = n, int(batch_size), seed, ext
        self.with_indices = with_indices
        if self.slicing:
            self.band = axial_band(np.concatenate([self.m1[..., 0] > 0, self.m2[..., 0] > 0]), band_frac)

    @classmethod
    def from_split(cls, arr: "SplitArrays", ndim: int, **kwargs):
        """A sampler over :func:`load_split_arrays`' arrays (labels passed along when ``with_labels``)."""
        return cls(arr.img1, arr.img2, arr.mask1, arr.mask2, ndim=ndim,
                   labels=arr.labels if kwargs.get("with_labels") else None, **kwargs)

    def draw(self, step):
        """Subject indices ``(a, b, c)`` (``c`` None without ``ext``), λ and slice indices ``z`` (None unless
        slicing) of one step: the draws behind :meth:`batch`."""
        rng = step_rng(self.seed, step, 0)
        B, n = self.batch_size, self.n
        a = rng.integers(0, n, B)
        b = (a + rng.integers(1, n, B)) % n          # b != a
        lam = rng.uniform(0.0, 1.0, (B, 1)).astype(np.float32)
        c = None
        if self.ext:
            c = rng.integers(0, n, B)
            for i in range(B):
                while c[i] == a[i] or c[i] == b[i]:
                    c[i] = (c[i] + 1) % n
        z = rng.integers(self.band[0], self.band[1] + 1, B) if self.slicing else None
        return a, b, c, lam, z

    def batch(self, step):
        a, b, c, lam, z = self.draw(step)
        if self.slicing:
            def take(x, i):
                return x[i, ..., z, :]          # sample k: x[i[k], ..., z[k], :] (advanced indices broadcast first)
        else:
            def take(x, i):
                return x[i]
        out = {"img1": take(self.t1, a), "img2": take(self.t2, b), "mask1": take(self.m1, a),
               "mask2": take(self.m2, b), "lam": lam}
        if self.ext:
            out["ext1"], out["ext2"] = take(self.t1, c), take(self.t2, c)
        if self.labels is not None:
            out["labels1"], out["labels2"] = take(self.labels, a), take(self.labels, b)
        if self.with_indices:
            out["index1"], out["index2"] = a.astype(np.int32), b.astype(np.int32)
            if self.ext:
                out["index_ext"] = c.astype(np.int32)
        return out

    def signature(self):
        """``tf.TensorSpec`` of each key of :meth:`batch` (for ``tf.data``)."""
        shape = (self.batch_size,) + self.t1.shape[1:-1 - int(self.slicing)] + (1,)
        img = tf.TensorSpec(shape, tf.float32)
        sig = {"img1": img, "img2": img, "mask1": img, "mask2": img,
               "lam": tf.TensorSpec((self.batch_size, 1), tf.float32)}
        if self.ext:
            sig["ext1"] = sig["ext2"] = img
        if self.labels is not None:
            sig["labels1"] = sig["labels2"] = tf.TensorSpec(shape, tf.int32)
        if self.with_indices:
            sig["index1"] = sig["index2"] = tf.TensorSpec((self.batch_size,), tf.int32)
            if self.ext:
                sig["index_ext"] = sig["index1"]
        return sig


def pair_dataset(desc, split: str, shape: Sequence[int], batch_size: int, seed: int = 0, ndim: int = 3,
                 with_labels: bool = False, ext_negative: bool = False, with_indices: bool = False,
                 band_frac: float = SLICE_BAND_FRAC, spacing: Optional[float] = None):
    """``tf.data.Dataset`` view of :class:`PairSampler` over :func:`load_split_arrays`: batch ``k`` of the
    (endless) data set is ``sampler.batch(k)``, so iterating again restarts the same sequence. For one pass
    over fixed pairs (evaluation) use :func:`make_pairs`."""
    arr = load_split_arrays(desc, split, shape, ndim, spacing)
    sampler = PairSampler.from_split(arr, ndim, batch_size=batch_size, seed=seed, ext=ext_negative,
                                     with_labels=with_labels, with_indices=with_indices, band_frac=band_frac)

    def gen():
        step = 0
        while True:
            yield sampler.batch(step)
            step += 1

    return tf.data.Dataset.from_generator(gen, output_signature=sampler.signature()).prefetch(2)
