"""Data-set description: which files make up each subject, and the train/val/test split.

Two sources (paper §3: dHCP T1w/T2w, 405/23/64 train/val/test):
- a CSV with columns ``subject,t1,t2,labels[,mask][,split]`` (paths may be relative to the CSV's folder;
  other columns are kept in ``Subject.extra``), UTF-8 with or without a byte-order mark (spreadsheets write one);
- a folder ``ROOT/<subject>/{t1,t2,labels[,mask]}.nii.gz`` (``.nii`` also accepted).
Without a split column, subjects get a deterministic split from a seed with the paper's 405/23/64 ratios
scaled to the count (at least 1 val and 1 test subject when n >= 3).
"""
import csv
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..atomic import atomic_path
from ..config import PAPER_SPLIT
from ..errors import ContraRegInputError
from .io import check_same_shape, crop_or_pad, foreground_mask, load_labels, load_nifti, normalize_intensity

REQUIRED_COLUMNS = ("subject", "t1", "t2", "labels")
OPTIONAL_COLUMNS = ("mask", "split")
SPLITS = ("train", "val", "test")
CSV_NAME = "dataset.csv"
FILE_KEYS = ("t1", "t2", "labels", "mask")


@dataclass
class Subject:
    """One subject: absolute paths of modality 1 (``t1``), modality 2 (``t2``), ``labels``, optional
    ``mask``; ``split`` in {train, val, test}; ``extra`` holds any other CSV columns (e.g. proxy warps)."""
    subject: str
    t1: str
    t2: str
    labels: str
    mask: Optional[str] = None
    split: Optional[str] = None
    extra: Dict[str, str] = field(default_factory=dict)

    def files(self) -> Dict[str, str]:
        return {k: getattr(self, k) for k in FILE_KEYS if getattr(self, k)}


@dataclass
class Description:
    """A data set: ``subjects`` (list of :class:`Subject`, every one with a split), ``source`` (CSV or
    folder it came from), ``seed`` used for any derived split, ``meta`` (free-form, e.g. proxy params)."""
    subjects: List[Subject]
    source: Optional[str] = None
    seed: int = 0
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> List[Subject]:
        """Subjects of split ``name`` ('train', 'val' or 'test'; 'all' gives every subject)."""
        if name == "all":
            return list(self.subjects)
        if name not in SPLITS:
            raise ContraRegInputError(f"unknown split {name!r}; choose one of {SPLITS + ('all',)}")
        return [s for s in self.subjects if s.split == name]

    @property
    def names(self) -> List[str]:
        return [s.subject for s in self.subjects]

    def __len__(self):
        return len(self.subjects)

    def __getitem__(self, i) -> Subject:
        return self.subjects[i]


def split_counts(n: int, ratios: Sequence[int] = PAPER_SPLIT):
    """(n_train, n_val, n_test) for ``n`` subjects with the paper's ratios; >= 1 val and test if n >= 3."""
    if n < 3:
        return n, 0, 0
    tot = float(sum(ratios))
    n_val = max(1, int(round(n * ratios[1] / tot)))
    n_test = max(1, int(round(n * ratios[2] / tot)))
    return n - n_val - n_test, n_val, n_test


def assign_splits(names: Sequence[str], seed: int = 0) -> List[str]:
    """Deterministic split labels for ``names`` (depends on the set of names and ``seed`` only)."""
    names = list(names)
    n_tr, n_va, n_te = split_counts(len(names))
    order = sorted(range(len(names)), key=lambda i: names[i])
    perm = np.random.default_rng(seed).permutation(len(names))
    labels = ["train"] * n_tr + ["val"] * n_va + ["test"] * n_te
    out = [None] * len(names)
    for rank, j in enumerate(perm):
        out[order[j]] = labels[rank]
    return out


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path.strip())
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def _check_files(subjects: List[Subject], where: str):
    for s in subjects:
        for key, p in s.files().items():
            if not os.path.isfile(p):
                raise ContraRegInputError(f"{where}: subject {s.subject!r}: {key} file not found: {p}")


def _finish(subjects: List[Subject], where: str, seed: int, check_files: bool, meta=None) -> Description:
    if not subjects:
        raise ContraRegInputError(f"{where}: no subjects found")
    seen = set()
    for s in subjects:
        if s.subject in seen:
            raise ContraRegInputError(f"{where}: duplicate subject {s.subject!r}")
        seen.add(s.subject)
        if s.split is not None and s.split not in SPLITS:
            raise ContraRegInputError(f"{where}: subject {s.subject!r}: invalid split {s.split!r} "
                                      f"(expected one of {SPLITS})")
    todo = [s for s in subjects if s.split is None]
    if todo:
        for s, lab in zip(todo, assign_splits([s.subject for s in todo], seed)):
            s.split = lab
    if check_files:
        _check_files(subjects, where)
    return Description(subjects=subjects, source=where, seed=seed, meta=dict(meta or {}))


def _read_csv(path: str, seed: int, check_files: bool) -> Description:
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's UTF-8 BOM is dropped
            rows = list(csv.DictReader(f))
            cols = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ContraRegInputError(f"{path}: cannot read CSV ({e})") from None
    if not rows:
        raise ContraRegInputError(f"{path}: CSV has no rows (expected a header and one row per subject)")
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise ContraRegInputError(f"{path}: missing column(s) {missing}; required {list(REQUIRED_COLUMNS)}, "
                                  f"found {cols}")
    subjects = []
    for i, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        for c in REQUIRED_COLUMNS:
            if not row.get(c):
                raise ContraRegInputError(f"{path}: line {i}: empty value in column {c!r}")
        extra = {k: _resolve(v, base) if v and k.startswith(("warp", "file_")) else v
                 for k, v in row.items() if k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS and k}
        subjects.append(Subject(
            subject=row["subject"], t1=_resolve(row["t1"], base), t2=_resolve(row["t2"], base),
            labels=_resolve(row["labels"], base),
            mask=_resolve(row["mask"], base) if row.get("mask") else None,
            split=row.get("split") or None, extra=extra))
    return _finish(subjects, path, seed, check_files)


def _find(folder: str, stem: str) -> Optional[str]:
    for ext in (".nii.gz", ".nii"):
        p = os.path.join(folder, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def _read_folder(root: str, seed: int, check_files: bool) -> Description:
    subjects = []
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(d):
            continue
        found = {k: _find(d, k) for k in FILE_KEYS}
        if not any(found.values()):
            continue  # not a subject folder
        for k in ("t1", "t2", "labels"):
            if found[k] is None:
                raise ContraRegInputError(f"{root}: subject {name!r}: missing {k}.nii.gz in {d}")
        subjects.append(Subject(subject=name, t1=found["t1"], t2=found["t2"], labels=found["labels"],
                                mask=found["mask"]))
    if not subjects:
        raise ContraRegInputError(f"{root}: no subject folders with t1/t2/labels .nii.gz found (and no "
                                  f"{CSV_NAME})")
    return _finish(subjects, root, seed, check_files)


def load_description(path, seed: int = 0, check_files: bool = True) -> Description:
    """Load a data-set description from a CSV file, a folder holding ``dataset.csv``, or a folder layout
    ``ROOT/<subject>/{t1,t2,labels[,mask]}.nii.gz``. Subjects without a split get a seeded one."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ContraRegInputError(f"{p}: data-set description not found")
    if os.path.isdir(p):
        csv_path = os.path.join(p, CSV_NAME)
        if os.path.isfile(csv_path):
            return _read_csv(csv_path, seed, check_files)
        return _read_folder(p, seed, check_files)
    return _read_csv(p, seed, check_files)


def write_description(csv_path, records, relative: bool = True) -> str:
    """Write subjects (a :class:`Description` or a list of :class:`Subject`) to ``csv_path`` atomically;
    paths are stored relative to the CSV's folder when ``relative``. Returns the path."""
    subjects = records.subjects if isinstance(records, Description) else list(records)
    if not subjects:
        raise ContraRegInputError(f"{csv_path}: no subjects to write")
    csv_path = os.fspath(csv_path)
    base = os.path.dirname(os.path.abspath(csv_path))

    def rel(p):
        if not p:
            return ""
        return os.path.relpath(os.path.abspath(p), base) if relative else os.path.abspath(p)

    cols = list(REQUIRED_COLUMNS)
    if any(s.mask for s in subjects):
        cols.append("mask")
    if any(s.split for s in subjects):
        cols.append("split")
    extra_cols = sorted({k for s in subjects for k in s.extra})
    cols += extra_cols
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for s in subjects:
            row = [s.subject, rel(s.t1), rel(s.t2), rel(s.labels)]
            if "mask" in cols:
                row.append(rel(s.mask))
            if "split" in cols:
                row.append(s.split or "")
            for k in extra_cols:
                v = s.extra.get(k, "")
                row.append(rel(v) if v and k.startswith(("warp", "file_")) else v)
            w.writerow(row)
    return csv_path


# ------------------------------------------------------------------------------------------------------------
# one subject, single images
# ------------------------------------------------------------------------------------------------------------
def load_subject(s: Subject, ndim: Optional[int] = None, with_labels: bool = True, normalise: str = "always",
                 percentiles: str = "image") -> dict:
    """The one per-subject loader: T1w and T2w normalised to [0, 1], their foreground masks, the label map.

    Files: ``load_nifti`` (``ndim`` enforced if given), labels by ``io.load_labels`` (integer check); T2w, labels
    and mask must share the T1w's grid. Intensities: ``io.normalize_intensity`` (robust 0.5/99.5 percentiles,
    clipped), ``normalise="always"`` or ``"outside_unit"`` (only an image with values outside [0, 1]);
    percentiles over the whole image (``percentiles="image"``) or inside the mask file (``"mask"``; the whole
    image when there is no mask file). Masks: the mask file (> 0) for both modalities, else
    ``io.foreground_mask`` of each normalised image (an empty one is an error naming the file).

    Returns a dict: ``t1``, ``t2`` float32, ``mask1``, ``mask2`` bool, ``labels`` int32 or None, ``affine`` (of
    the T1w file), ``ndim_file`` (dimensionality of the files). Callers crop/pad: :func:`load_images` (single
    images, MASR-Net) and ``pairs.load_split_arrays`` (registration pairs)."""
    if normalise not in ("always", "outside_unit"):
        raise ContraRegInputError(f"normalise must be 'always' or 'outside_unit', got {normalise!r}")
    if percentiles not in ("image", "mask"):
        raise ContraRegInputError(f"percentiles must be 'image' or 'mask', got {percentiles!r}")
    vols = {}
    for key in ("t1", "t2", "labels", "mask"):
        p = getattr(s, key)
        if p and (key != "labels" or with_labels):
            vols[key] = load_labels(p, ndim=ndim) if key == "labels" else load_nifti(p, ndim=ndim)
    for key in ("t2", "labels", "mask"):
        if key in vols:
            check_same_shape(vols["t1"], vols[key], ("t1", key))
    if "labels" in vols and not np.any(vols["labels"].data):
        raise ContraRegInputError(f"{vols['labels'].path}: subject {s.subject!r}: the label map has no structure "
                                  "(every voxel is 0): nothing to score Dice on")
    m = vols["mask"].data > 0 if "mask" in vols else None
    out = {"labels": vols["labels"].data if "labels" in vols else None, "affine": vols["t1"].affine,
           "ndim_file": vols["t1"].data.ndim}
    for key, mkey in (("t1", "mask1"), ("t2", "mask2")):
        x = vols[key].data
        if normalise == "always" or x.min() < 0 or x.max() > 1:
            x = normalize_intensity(x, mask=m if percentiles == "mask" else None)
        out[key] = np.asarray(x, np.float32)
        out[mkey] = m if m is not None else foreground_mask(x, require_nonempty=True, name=vols[key].path)
    return out


def load_images(desc: Description, split: str = "train", ndim: Optional[int] = None, multiple: int = 8):
    """Both the T1w and the T2w image of every subject of ``split`` (all subjects if the split is empty), each
    with its foreground mask, for single-image training (MASR-Net): :func:`load_subject` with images outside
    [0, 1] mapped by robust percentiles inside the mask file (if any); sizes not divisible by ``multiple``
    are zero-padded up. Returns (images, masks, info dict)."""
    subjects = desc.split(split) or desc.split("all")
    images, masks = [], []
    for s in subjects:
        sub = load_subject(s, ndim=ndim, with_labels=False, normalise="outside_unit", percentiles="mask")
        for key, mkey in (("t1", "mask1"), ("t2", "mask2")):
            x, mk = sub[key], sub[mkey]
            target = [-(-n // multiple) * multiple for n in x.shape]
            if list(x.shape) != target:
                x, _ = crop_or_pad(x, target)
                mk, _ = crop_or_pad(mk.astype(np.uint8), target)
            images.append(np.asarray(x, np.float32))
            masks.append(np.asarray(mk) > 0)
    if not images:
        raise ContraRegInputError(f"{desc.source}: no subjects to train on")
    info = dict(data=str(desc.source), split=split if desc.split(split) else "all", n_subjects=len(subjects),
                n_images=len(images), modalities=["t1", "t2"])
    return images, masks, info


def split_table(desc: Description) -> str:
    """The split of a data set as CSV text (``subject,split``, in the description's order)."""
    return "subject,split\n" + "".join(f"{s.subject},{s.split}\n" for s in desc.subjects)


def split_summary(desc: Description) -> str:
    """One line naming the split: counts and the subjects of the validation and test splits."""
    parts = [f"{len(desc.split(n))} {n}" for n in SPLITS]
    held = "; ".join(f"{n}: {', '.join(s.subject for s in desc.split(n)) or '-'}" for n in ("val", "test"))
    return f"{desc.source}: split {' / '.join(parts)} ({held})"
