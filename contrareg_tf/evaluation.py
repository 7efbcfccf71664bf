"""Evaluation as a function of λ (paper §3, Fig. 3, Table 1).

For each of the 17 test λ values (``config.LAMBDAS_17``) every test pair (I1 = T1w of subject a, I2 = T2w of
subject b) is registered by the hypernetwork; the moved label map (labels of b warped by φ, nearest neighbour)
is compared with a's labels: Dice (mean over the pair's structures — the labels present in both label maps —
per pair, then over pairs; per structure and per coarse group in the CSV), Dice30 (mean of the lowest 30%
of per-pair Dice), % folding voxels of φ (of all voxels) and std log|J_φ| — for the forward warp and for the
inverse warp φ⁻¹ (a's labels onto b). Table 1 reports each method at the λ of best Dice among those whose mean
% folds stays below 0.5% of all voxels, plus the paired gain over no registration: ΔDice = mean over pairs of
(Dice after − Dice before) and the fraction of pairs whose Dice rose.
"""
import csv
import math
import os

import numpy as np

from . import metrics
from .atomic import atomic_path
from .config import FOLD_BUDGET, LAMBDAS_17, VAL_CURVE_LAMBDA  # FOLD_BUDGET: % of all voxels, paper Table 1
from .errors import ContraRegInputError
from .networks.hyper import register
from .ops import warp_array


CSV_FIELDS = ("lambda", "dice", "dice_std", "dice30", "folds", "folds_std", "sdlogj", "dice_inv", "dice30_inv",
              "folds_inv", "sdlogj_inv", "gain", "gain_std", "improved", "n_pairs")
TABLE1_FIELDS = ("lambda", "dice", "dice_std", "dice30", "folds", "sdlogj", "gain", "gain_std", "improved")


def _batch_metrics(fixed_labs, moving_labs, flows, label_ids):
    """Per-sample Dice of every label of ``label_ids`` (nan where the label is not one of the pair's
    structures, ``metrics.pair_structures``), % folds and std log|J| for stacks of label maps (B, *vol) and
    displacements (B, *vol, ndim): one batched nearest-neighbour warp, then numpy metrics.
    Returns (dice (B, L), other (B, 2))."""
    moved = np.asarray(warp_array(np.asarray(moving_labs, np.int32)[..., None], flows, interp="nearest"))[..., 0]
    ids = np.asarray(label_ids, np.int64)
    dice, other = np.full((len(flows), len(ids)), np.nan), np.zeros((len(flows), 2))
    for i, (fixed, mov, mv, flow) in enumerate(zip(fixed_labs, moving_labs, moved, flows)):
        dice[i] = metrics.structure_dice(fixed, mov, mv, ids)
        jac = metrics.jacobian_determinant(flow)
        other[i] = metrics.folding_fraction(jac), metrics.std_log_jacobian(jac)
    return dice, other


def _chunk_size(inshape, batch_size, voxels=2 ** 19):
    """How many (λ, pair) registrations to evaluate per call: about ``voxels`` voxels of images (at least
    ``batch_size``), so 2-D test sets go in a few calls and paper-size volumes one batch at a time."""
    return max(int(batch_size), int(voxels // int(np.prod(inshape))))


def _nanmean(x, axis):
    """nan-mean that returns nan (no warning) where every value is nan."""
    n = np.sum(~np.isnan(x), axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(x, axis) / np.maximum(n, 1), np.nan)


def structure_columns(dice, label_ids, label_names=None, label_groups=None):
    """Per-λ summary of per-label Dice ``dice`` (λ, P, L): ``{column: values (λ,)}`` with one ``dice:<name>``
    column per structure (mean over the pairs that have it) and, when ``label_groups`` ({label: group}) is
    given, one ``dice_<group>`` column per coarse group (per pair the mean over the group's structures, then
    the mean over pairs)."""
    names = label_names or {}
    cols = {}
    if label_groups:
        for g in dict.fromkeys(label_groups[k] for k in label_ids if k in label_groups):
            sel = [j for j, k in enumerate(label_ids) if label_groups.get(k) == g]
            cols[f"dice_{g}"] = _nanmean(_nanmean(dice[..., sel], 2), 1)
    per = _nanmean(dice, 1)
    for j, k in enumerate(label_ids):
        cols[f"dice:{names.get(k, str(k))}"] = per[:, j]
    return cols


def evaluate_lambdas(model, pairs, lambdas=LAMBDAS_17, batch_size=4, progress=True, desc="eval", before=None,
                     label_names=None, label_groups=None, per_pair=False):
    """``pairs``: dict of stacks ``img1, img2`` (P, *vol) and ``labels1, labels2``. Returns one row per λ
    (dict with the ``CSV_FIELDS``, then the ``structure_columns``). Dice of a pair = mean over its structures
    (labels present in both label maps, ``metrics.pair_structures``). Registrations of all (λ, pair)
    combinations run in chunks of several λ values × pairs per network call. ``before``: the pairs'
    ``pair_dice_before`` (computed if None; pass it when evaluating several models on the same pairs).
    ``label_names`` / ``label_groups``: {label: name} / {label: coarse group} for the per-structure columns.
    ``per_pair``: also return ``{"dice", "folds", "sdlogj"}`` arrays (λ, P) of every pair (paired statistics)."""
    from tqdm.auto import tqdm  # lazy: progress bars only

    for k in ("img1", "img2", "labels1", "labels2"):
        if k not in pairs:
            raise ContraRegInputError(f"evaluation pairs lack {k!r}")
    p = pairs["img1"].shape[0]
    label_ids = sorted(int(v) for v in np.union1d(np.unique(pairs["labels1"]), np.unique(pairs["labels2"])) if v)
    jobs = [(li, i) for li in range(len(lambdas)) for i in range(p)]
    chunk = _chunk_size(pairs["img1"].shape[1:], batch_size)
    nl = len(label_ids)
    fd, bd = np.full((len(lambdas), p, nl), np.nan), np.full((len(lambdas), p, nl), np.nan)  # per-label Dice
    fo, bo = np.zeros((len(lambdas), p, 2)), np.zeros((len(lambdas), p, 2))  # (% folds, sdlogJ)
    before = np.asarray(pair_dice_before(pairs) if before is None else before, np.float64)
    with tqdm(total=len(lambdas), desc=desc, disable=not progress, unit="λ") as bar:
        for s in range(0, len(jobs), chunk):
            li, pi = np.array(jobs[s:s + chunk]).T
            lam = np.asarray(lambdas, np.float32)[li][:, None]
            # source = I2 (T2w of b), target = I1 (T1w of a)
            _, pos, neg = register(model, pairs["img2"][pi][..., None], pairs["img1"][pi][..., None], lam,
                                   batch_size=batch_size)
            l1, l2 = pairs["labels1"][pi], pairs["labels2"][pi]
            fd[li, pi], fo[li, pi] = _batch_metrics(l1, l2, pos, label_ids)
            bd[li, pi], bo[li, pi] = _batch_metrics(l2, l1, neg, label_ids)
            bar.update(int(np.sum(pi == p - 1)))   # λ values whose last pair is done
    fw, bw = _nanmean(fd, 2), _nanmean(bd, 2)    # (λ, P): Dice over each pair's structures
    extra = structure_columns(fd, label_ids, label_names, label_groups)
    rows = []
    for i, lam in enumerate(lambdas):
        f, b = fw[i], bw[i]
        rows.append({"lambda": float(lam), "dice": f.mean(), "dice_std": f.std(), "dice30": metrics.dice30(f),
                     "folds": fo[i, :, 0].mean(), "folds_std": fo[i, :, 0].std(), "sdlogj": fo[i, :, 1].mean(),
                     "dice_inv": b.mean(), "dice30_inv": metrics.dice30(b), "folds_inv": bo[i, :, 0].mean(),
                     "sdlogj_inv": bo[i, :, 1].mean(), "gain": (f - before).mean(),
                     "gain_std": (f - before).std(), "improved": float(np.mean(f > before)), "n_pairs": p,
                     **{k: float(v[i]) for k, v in extra.items()}})
    if per_pair:
        return rows, {"dice": fw, "folds": fo[..., 0], "sdlogj": fo[..., 1]}
    return rows


def lambda_use(model, step=0.005):
    """How alive the λ-conditioning is: active (> 0) units of the hypernetwork's first ReLU layer at λ = 0, 0.1,
    0.5 and 1, and the largest λ of a ``step`` grid up to which the embedding equals its value at λ = 0 (a
    λ range the network cannot tell apart; 0 = every λ is distinguished; 1 = the λ-conditioning has collapsed:
    one registration for every λ). A FiLM network whose hypernetwork's ReLU units are dead at small λ shows it."""
    hyp = model.references.hyp_model
    lam = np.round(np.arange(0.0, 1.0 + step / 2, step), 6)[:, None].astype(np.float32)
    first = hyp.layers[1](lam).numpy()
    emb = hyp(lam).numpy()
    same = np.all(np.abs(emb - emb[:1]) <= 1e-6 * (1 + np.abs(emb[:1])), axis=1)
    flat = float(lam[np.argmin(same), 0] - step) if not same.all() else 1.0
    pick = {f"{v:g}": int((first[int(round(v / step))] > 0).sum()) for v in (0.0, 0.1, 0.5, 1.0)}
    return {"units": int(first.shape[1]), "active_first_layer": pick, "flat_up_to": round(max(flat, 0.0), 6)}


def pair_dice_before(pairs):
    """Per-pair Dice (mean over the pair's structures, ``metrics.pair_structures``) of the unregistered
    label maps."""
    return [metrics.mean_dice(a, b, metrics.pair_structures(a, b)) for a, b in zip(pairs["labels1"],
                                                                                    pairs["labels2"])]


def group_dice_before(pairs, label_groups):
    """{group: Dice before registration}: per pair the mean over the group's structures, then over pairs."""
    ids = sorted(label_groups)
    d = np.full((len(pairs["labels1"]), len(ids)), np.nan)
    for i, (a, b) in enumerate(zip(pairs["labels1"], pairs["labels2"])):
        d[i] = metrics.structure_dice(a, b, b, ids)
    cols = structure_columns(d[None], ids, None, label_groups)
    return {k[5:]: float(v[0]) for k, v in cols.items() if k.startswith("dice_")}


# ------------------------------------------------------------------------------------------------------------
# CSV / Table 1
# ------------------------------------------------------------------------------------------------------------
def write_csv(rows, path, fields=None):
    """Rows to CSV: ``fields`` (default ``CSV_FIELDS`` followed by any further keys of the first row, e.g. the
    per-structure columns)."""
    if fields is None:
        fields = CSV_FIELDS + tuple(k for k in (rows[0] if rows else {}) if k not in CSV_FIELDS)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in fields if k in r})


def read_csv(path):
    with open(path, newline="") as f:
        return [{k: (float(v) if k != "method" else v) for k, v in r.items()} for r in csv.DictReader(f)]


def select_lambda(rows, budget=FOLD_BUDGET):
    """The row with the best Dice among those with mean % folds < ``budget`` (None if none qualifies)."""
    ok = [r for r in rows if r["folds"] < budget]
    return max(ok, key=lambda r: r["dice"]) if ok else None


def _fmt(v, spec=".3f"):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table1(results, budget=FOLD_BUDGET, before=None, paper=None, sets=None):
    """``results``: {method: rows}. Returns (list of Table-1 rows, Markdown text). ``paper``: {method: (opt. λ,
    Dice, Dice30, % folds, Sdlog|J|) of the paper's Table 1, or None} adds those five columns beside each row;
    ``sets``: {method: set letter} adds a Set column (``reproduce_table1.py --rows``)."""
    out = []
    for method, rows in results.items():
        r = select_lambda(rows, budget)
        if r is None:
            out.append({"method": method, **{k: math.nan for k in TABLE1_FIELDS}})
        else:
            out.append({"method": method, **{k: r.get(k, math.nan) for k in TABLE1_FIELDS}})
    head = ["Method", "Opt. λ", "Dice (↑)", "Dice30 (↑)", "% Folds (↓)", "Sdlog\\|J\\| (↓)", "ΔDice vs before",
            "pairs improved"]
    if sets is not None:
        head = ["Set"] + head
    if paper is not None:
        head += ["paper λ", "paper Dice", "paper Dice30", "paper % Folds", "paper Sdlog\\|J\\|"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in out:
        if math.isnan(r["dice"]):
            cells = [r["method"], "–", f"no λ with folds < {budget}%", "", "", "", "", ""]
        else:
            gain = "" if math.isnan(r["gain"]) else f"{r['gain']:+.3f} ± {r['gain_std']:.3f}"
            imp = "" if math.isnan(r["improved"]) else f"{100 * r['improved']:.0f}%"
            cells = [r["method"], f"{r['lambda']:.3g}", f"{r['dice']:.3f} ± {r['dice_std']:.3f}", f"{r['dice30']:.3f}",
                     f"{r['folds']:.3f}", f"{r['sdlogj']:.3f}", gain, imp]
        if sets is not None:       # "B MI" is shown as "B | MI"
            st = sets.get(r["method"], "")
            if st and cells[0].startswith(st + " "):
                cells[0] = cells[0][len(st) + 1:]
            cells = [st] + cells
        if paper is not None:
            pv = paper.get(r["method"]) or (None,) * 5
            cells += [_fmt(pv[0], ".3g"), *(_fmt(v) for v in pv[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    if before is not None:
        cells = ["(before registration)", "–", f"{before:.3f}"] + [""] * (len(head) - 3 - (sets is not None))
        lines.append("| " + " | ".join(([""] if sets is not None else []) + cells) + " |")
    return out, "\n".join(lines) + "\n"


def read_val_curve(run_dir, name="val_curve.csv"):
    """(steps, Dice) of a run's ``val_curve.csv`` (Fig. 3 col. 4; ``name="monitor_curve.csv"``: the plateau
    rule's monitor), or None when the run has none."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return None
    rows = read_csv(path)
    return [int(r["step"]) for r in rows], [r["dice"] for r in rows]


# ------------------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib  # lazy: plotting only, and its backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above
    return plt


def line_colours(n):
    """``n`` distinct colours: tab10 up to 10 lines, tab20 up to 20, then tab20 + tab20b (40)."""
    plt = _pyplot()
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    pool = [plt.get_cmap("tab20")(i) for i in range(20)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    return [pool[i % len(pool)] for i in range(n)]


def plot_fig3(results, path, before=None, budget=FOLD_BUDGET, curves=None, groups=None):
    """Fig. 3: Dice, % folds and std log|J| against λ (cols. 1–3), one line per method, and validation Dice
    against training step (col. 4, from ``curves`` = {method: (steps, Dice)}; drawn when any is given).
    ``groups``: {row title: [methods]}, one figure row each (the paper's rows: losses, extensions, baselines)."""
    plt = _pyplot()
    curves = {k: v for k, v in (curves or {}).items() if v}
    groups = groups or {"": list(results)}
    ncol = 4 if curves else 3
    fig, axes = plt.subplots(len(groups), ncol, figsize=(4.6 * ncol, 4 * len(groups)), squeeze=False)
    for row, (title, methods) in zip(axes, groups.items()):
        for method in methods:
            rows = results[method]
            lam = [r["lambda"] for r in rows]
            for ax, key in zip(row, ("dice", "folds", "sdlogj")):
                ax.plot(lam, [r[key] for r in rows], marker="o", ms=3, label=method)
            if method in curves:
                row[3].plot(*curves[method], marker=".", ms=3, label=method)
        if before is not None:
            row[0].axhline(before, color="gray", ls=":", label="before")
            if ncol == 4:
                row[3].axhline(before, color="gray", ls=":")
        row[1].axhline(budget, color="red", ls="--", lw=0.8, label=f"{budget}% budget")
        names = ("Dice", "% folding voxels", "std log|J|", f"validation Dice (λ = {VAL_CURVE_LAMBDA:g})")
        for k, (ax, t) in enumerate(zip(row, names)):
            ax.set_xlabel("training step" if k == 3 else "λ")
            ax.set_title(f"{title}: {t}" if title else t, fontsize=10)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_groups(results, path, before_groups=None, groups=None):
    """Dice of each coarse structure group (``dice_<group>`` columns) against λ: one panel per group in a
    2-column grid, one line per method in its own colour (:func:`line_colours`), one legend beside the panels;
    ``before_groups``: {group: Dice before registration} drawn as a dotted line. ``groups``: the panels in
    order (default: the groups with a column); a group without a column (no structure of it in the test
    images, e.g. 2-D slices above the cerebellum) gets a panel saying so."""
    plt = _pyplot()
    first = next(iter(results.values()))
    have = [k[5:] for k in first[0] if k.startswith("dice_") and k[5:] not in ("std", "inv")]
    groups = list(groups) if groups else have
    if not groups:
        return None
    ncol = min(2, len(groups))
    nrow = -(-len(groups) // ncol)
    colours = line_colours(len(results))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol + 2.8, 3.6 * nrow), squeeze=False)
    for ax, g in zip(axes.ravel(), groups):
        ax.set_title(f"Dice: {g.replace('_', ' + ')}", fontsize=10)
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
        if g not in have:
            ax.text(0.5, 0.5, "no structure of this group\nin the test images", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="gray")
            continue
        for c, (method, rows) in zip(colours, results.items()):
            ax.plot([r["lambda"] for r in rows], [r[f"dice_{g}"] for r in rows], marker="o", ms=3, color=c,
                    label=method)
        if before_groups and g in before_groups:
            ax.axhline(before_groups[g], color="gray", ls=":", label="before")
    for ax in axes.ravel()[len(groups):]:
        ax.axis("off")
    handles = {}
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_figwidth(), 1))
    fig.legend(list(handles.values()), list(handles), loc="center left", fontsize=7, frameon=False,
               bbox_to_anchor=(1 - 2.6 / fig.get_figwidth(), 0.5))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mid_slice(x):
    return x if x.ndim == 2 else x[:, :, x.shape[2] // 2]


def plot_examples(examples, path):
    """Fig. 2-style panel: for each method, the fixed T1w (subject a), the moving T2w (subject b), the moved
    image and |moved − subject a's T2w| (the fixed subject's own T2w: what a perfect registration would give),
    with a colour bar. ``examples``: {method: dict(fixed, moving, moved, target_t2)} (2-D or 3-D arrays)."""
    plt = _pyplot()
    n = len(examples)
    fig, axes = plt.subplots(n, 4, figsize=(11, 2.6 * n), squeeze=False)
    for i, (method, ex) in enumerate(examples.items()):
        panels = [("fixed: T1w of subject a", ex["fixed"]), ("moving: T2w of subject b", ex["moving"]),
                  ("moved (b's T2w on a)", ex["moved"])]
        if ex.get("target_t2") is not None:
            panels.append(("|moved − T2w of subject a|", np.abs(ex["moved"] - ex["target_t2"])))
        for j, (title, img) in enumerate(panels):
            im = axes[i, j].imshow(np.rot90(_mid_slice(img)), cmap="gray" if j < 3 else "magma",
                                   vmin=0, vmax=1 if j < 3 else None)
            axes[i, j].set_title(f"{method}\n{title}" if j == 0 else title, fontsize=8)
            if j == 3:
                fig.colorbar(im, ax=axes[i, j], fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
