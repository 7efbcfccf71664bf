"""Statistics and figures about a built-in data set (``data/proxy.py`` builds it): what a registration starts
from and the best it can reach, and a montage to look at.

- :func:`dice_before`: Dice of inter-subject label pairs with the identity warp (the floor).
- :func:`dice_ceiling`: Dice after the ground-truth warp ``proxy.true_pair_warp`` (φ_a⁻¹ ∘ φ_b, nearest
  neighbour): the best a registration can reach on the built data; below 1 because the labels are resampled
  twice (template → subject a → subject b) and, in 2-D mode, subjects come from slightly different slices.
- Dice of a pair = mean over the pair's structures (labels present in both maps, ``metrics.pair_structures``),
  the same rule as the evaluation's.
- :func:`describe_proxy`: per-modality intensity statistics inside the brain and per label, label fractions.
- :func:`plot_montage`: T1w, T2w and labels of the first subjects (mid axial slice in 3-D).
"""
from typing import Optional

import numpy as np

from ..config import PROXY_STATS_PAIRS, MONTAGE_SUBJECTS
from ..errors import ContraRegInputError
from ..metrics import pair_structures, structure_dice
from .dataset import Description, load_subject
from .io import load_labels
from .pairs import make_pairs
from .proxy import LABEL_NAMES, pull_back, true_pair_warp, voxel_grid


def _read(s):
    """A built subject as stored: T1w, T2w (already in [0, 1], so left as they are), labels, brain mask."""
    sub = load_subject(s, normalise="outside_unit", percentiles="mask")
    return sub["t1"], sub["t2"], sub["labels"], sub["mask1"]


def describe_proxy(desc: Description, split: str = "all") -> dict:
    """Statistics over the subjects of ``split``: per modality mean/std inside the mask and mean per
    label (names from the build's ``proxy.json``; ``unlabelled`` = label 0 inside the mask, the cerebral white
    matter of CerebrA), label volume fractions (of the mask), all averaged over subjects."""
    subs = desc.split(split)
    if not subs:
        raise ContraRegInputError(f"describe_proxy: split {split!r} has no subjects")
    names = {int(k): v for k, v in (desc.meta.get("label_names") or LABEL_NAMES).items()}
    icbm = (desc.meta.get("params") or {}).get("source") == "icbm2009c"
    classes = {0: "unlabelled", **names} if icbm else names
    acc = {"t1": [], "t2": []}
    frac = []
    for s in subs:
        t1, t2, lab, mask = _read(s)
        sel = {j: (lab == j) & mask for j in classes}
        for key, img in (("t1", t1), ("t2", t2)):
            acc[key].append([img[mask].mean(), img[mask].std()] +
                            [img[m].mean() if m.any() else np.nan for m in sel.values()])
        frac.append([m.sum() / mask.sum() for m in sel.values()])
    out = {"n_subjects": len(subs), "shape": list(t1.shape), "modalities": {}}
    for key, rows in acc.items():
        m = np.nanmean(np.array(rows, float), 0)
        out["modalities"][key] = {"mean": float(m[0]), "std": float(m[1]),
                                  "class_mean": {classes[j]: float(m[2 + i]) for i, j in enumerate(classes)}}
    f = np.mean(np.array(frac, float), 0)
    out["label_fractions"] = {classes[j]: float(f[i]) for i, j in enumerate(classes)}
    return out


def _pairs_of(desc, pairs, n_pairs, seed, split):
    subs = desc.split(split)
    return subs, (make_pairs(subs, n_pairs, seed) if pairs is None else pairs)


def _label_loader(subs):
    cache = {}

    def lab(i):
        if i not in cache:
            cache[i] = load_labels(subs[i].labels).data
        return cache[i]
    return lab


def _dice_summary(desc, rows):
    """rows: [(fixed labels, moving labels before, moved labels)] -> mean / per-structure / per-pair Dice over
    each pair's structures (``metrics.pair_structures``)."""
    names = {int(k): v for k, v in (desc.meta.get("label_names") or {}).items()}
    ids = sorted(set().union(*[pair_structures(f, m) for f, m, _ in rows]))
    d = np.array([structure_dice(f, m, mv, ids) for f, m, mv in rows]).reshape(len(rows), len(ids))
    per_pair = [float(np.nanmean(r)) for r in d]
    return {"mean": float(np.mean(per_pair)),
            "per_label": {names.get(j, str(j)): float(np.nanmean(d[:, i])) for i, j in enumerate(ids)},
            "per_pair": per_pair}


def dice_before(desc: Description, pairs=None, n_pairs: Optional[int] = PROXY_STATS_PAIRS, seed: int = 0,
                split: str = "all") -> dict:
    """Dice of the label maps of inter-subject pairs before registration (identity warp), mean over each
    pair's structures (labels present in both maps).

    ``pairs``: list of (a, b) indices into ``desc.split(split)``; default ``make_pairs(.., n_pairs, seed)``.
    Returns ``{'mean': float, 'per_label': {name: mean}, 'per_pair': [mean over structures per pair]}``."""
    subs, pairs = _pairs_of(desc, pairs, n_pairs, seed, split)
    lab = _label_loader(subs)
    return _dice_summary(desc, [(lab(b), lab(a), lab(a)) for a, b in pairs])


def dice_ceiling(desc: Description, pairs=None, n_pairs: Optional[int] = PROXY_STATS_PAIRS, seed: int = 0,
                 split: str = "all") -> dict:
    """Dice after warping subject a's labels with the ground-truth ``proxy.true_pair_warp`` (nearest
    neighbour): the best a registration can do on the built-in data. Same output as :func:`dice_before`."""
    subs, pairs = _pairs_of(desc, pairs, n_pairs, seed, split)
    lab = _label_loader(subs)
    rows = []
    for a, b in pairs:
        phi = np.moveaxis(true_pair_warp(subs, a, b), -1, 0)
        la = lab(a)
        rows.append((lab(b), la, pull_back(la, phi, voxel_grid(la.shape), order=0)))
    return _dice_summary(desc, rows)


def plot_montage(desc: Description, path: str, n: int = MONTAGE_SUBJECTS) -> str:
    """PNG montage of the first ``n`` subjects: T1w, T2w and the label map over the T1w (mid axial slice in
    3-D), so that a user can look at the built-in data."""
    import matplotlib  # lazy: plotting only, and its backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    subs = desc.subjects[:max(1, int(n))]
    fig, axes = plt.subplots(len(subs), 3, figsize=(7.5, 2.6 * len(subs)), squeeze=False)
    for row, s in zip(axes, subs):
        t1, t2, lab, _ = _read(s)
        if t1.ndim == 3:
            z = t1.shape[2] // 2
            t1, t2, lab = t1[..., z], t2[..., z], lab[..., z]
        for ax, img, title in ((row[0], t1, "T1w"), (row[1], t2, "T2w"), (row[2], t1, "labels")):
            ax.imshow(np.rot90(img), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{s.subject} {title} ({s.split})" if title == "T1w" else title, fontsize=8)
            ax.axis("off")
        ml = np.ma.masked_equal(np.rot90(lab), 0)
        row[2].imshow(ml, cmap="tab20", interpolation="nearest", alpha=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
