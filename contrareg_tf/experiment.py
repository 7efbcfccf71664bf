"""The paper's workflow glued end to end: data (built-in proxy or a real description) → autoencoders →
λ-conditioned training per method → 17-λ evaluation → Table 1 / Fig. 3 / Fig. 2. The scripts in
``train_scripts/`` and ``eval_scripts/`` are argument parsers over these functions.

A job's data set is resolved once (:func:`open_data` → :class:`DataSet`) and handed down. A user's data
(``data`` = CSV / folder) is brought onto the config's grid by crop/pad or, with ``spacing``, by resampling
(``data/grid.py``), and every job says so in one line (:func:`report_data`: shapes and voxel sizes → grid,
foreground outside it, a ``ContraRegWarning`` above ``config.GRID_OUTSIDE_WARN``), prints the split once
and writes it (``splits.csv`` in the run / table folder, ``splits`` in an autoencoder's card).
"""
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import tensorflow as tf

from . import evaluation
from .assets import shipped
from .atomic import atomic_path, write_json
from .config import (FOLD_BUDGET, LAMBDAS_17, SPACING_MISMATCH_WARN, SYNTHMORPH_METHODS, TABLE1_A, TABLE1_ROWS,
                     TABLE1_SETS, VAL_CURVE_LAMBDA, VAL_CURVE_PAIRS, Config, Table1Row, wide_preset)
from .data.dataset import Description, split_summary, split_table
from .data.grid import fit_line, fit_warning
from .data.icbm import GROUPS
from .data.pairs import load_split_arrays, make_pairs
from .data.sources import resolve as resolve_data
from .errors import ContraRegInputError, ContraRegWarning
from .losses.similarity import LossSpec, is_contrastive
from .networks.hyper import register
from .runs import config_from_meta, data_spacing, load_trained
from .training import train_autoencoder, train_hyper, train_sup_pretrain
from .training.synthmorph import train_synthmorph

SPLITS_CSV = "splits.csv"


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------
@dataclass
class DataSet:
    """A job's data set, resolved once: its ``desc``, the user's ``path`` (None: the built-in data), the voxel
    size ``spacing`` (mm) its scans are resampled to (None: centre crop/pad to the grid), and whether its one
    line has been printed (``reported``: a job that reported it hands it on, to workers too)."""
    desc: Description
    path: Optional[str] = None
    spacing: Optional[float] = None
    reported: bool = False


def open_data(cfg, data=None, spacing=None) -> DataSet:
    """``data`` as a :class:`DataSet`: one already opened is returned as it is; else ``data`` (CSV / folder,
    None = the config's built-in data) is resolved. ``spacing`` applies to a user's data only."""
    if isinstance(data, DataSet):
        return data
    if spacing is not None and data is None:
        raise ContraRegInputError("--spacing resamples a user's --data; the built-in data is built on the "
                                  "preset's grid")
    return DataSet(resolve_data(cfg, data), None if data is None else os.fspath(data), spacing)


def label_meta(desc):
    """``({label: name}, {label: group})`` of a data set: from the built-in data's ``proxy.json``, else
    ``(None, None)`` (labels are then named by their values and not grouped)."""
    names = desc.meta.get("label_names") if desc.meta else None
    groups = desc.meta.get("label_groups") if desc.meta else None
    return ({int(k): v for k, v in names.items()} if names else None,
            {int(k): v for k, v in groups.items()} if groups else None)


def data_label(cfg, ds: DataSet):
    """How a model card names its data: the user's description path, or the proxy's parameters."""
    if ds.path is not None:
        return os.path.abspath(ds.desc.source or ds.path)
    return (f"built-in data {cfg.data_source}: {cfg.proxy_subjects} subjects, {'x'.join(map(str, cfg.inshape))} @ {cfg.spacing:g} mm, "
            f"max_disp {cfg.proxy_max_disp:g} vox, seed {cfg.seed}")


def split_arrays(desc, split, cfg: Config, spacing: Optional[float] = None):
    """Stacks ``t1, t2, mask1, mask2, labels`` (N, *inshape) of one split, normalised to [0, 1] and brought
    onto the config's grid (crop/pad, or resampled to ``spacing`` mm: ``data/grid.py``)."""
    arr = load_split_arrays(desc, split, tuple(cfg.inshape), ndim=len(cfg.inshape), spacing=spacing)
    if arr["t1"].shape[0] == 0:
        raise ContraRegInputError(f"split {split!r} of {desc.source} has no subjects")
    return arr


def report_data(cfg, ds: DataSet, arrays, out_dir=None):
    """A user's data set: ONE line saying how the subjects of ``arrays`` (SplitArrays of the splits a job
    loaded) came onto the grid, a ``ContraRegWarning`` when a subject loses more than
    ``config.GRID_OUTSIDE_WARN`` of its foreground, and the split (printed once, written to ``out_dir/splits.csv``
    when given). The built-in data is built on the grid: nothing to say. Returns the line (None if none)."""
    if ds.path is None:
        return None
    if ds.reported:
        write_splits(ds, out_dir)
        return None
    infos = list({i.subject: i for a in arrays for i in a.fits}.values())
    line = fit_line(infos, cfg.inshape, ds.spacing, ds.desc.source or ds.path)
    print(line, flush=True)
    warn = fit_warning(infos, cfg.inshape, ds.spacing, ds.desc.source or ds.path)
    if warn:
        warnings.warn(warn, ContraRegWarning, stacklevel=2)
    print(split_summary(ds.desc), flush=True)
    write_splits(ds, out_dir)
    ds.reported = True
    return line


def write_splits(ds: DataSet, out_dir):
    """``out_dir/splits.csv``: the subject → split table of a user's data set (nothing for built-in data)."""
    if ds.path is None or out_dir is None:
        return None
    path = os.path.join(out_dir, SPLITS_CSV)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(split_table(ds.desc))
    return path


def make_test_pairs(arrays, n_pairs=None, seed=0):
    """Inter-subject test pairs: I1 = T1w of a, I2 = T2w of b ≠ a (all ordered pairs, or ``n_pairs`` of them
    drawn deterministically)."""
    n = arrays["t1"].shape[0]
    if n < 2:
        raise ContraRegInputError(f"need at least 2 test subjects for inter-subject pairs, got {n}")
    # the pairs of data.pairs.make_pairs, in lexicographic order (all of them when n_pairs covers them)
    full = n_pairs is None or n_pairs >= n * (n - 1)
    idx = make_pairs(n) if full else sorted(make_pairs(n, n_pairs, seed))
    a, b = np.array([i for i, _ in idx]), np.array([j for _, j in idx])
    return {"img1": arrays["t1"][a], "img2": arrays["t2"][b], "labels1": arrays["labels"][a],
            "labels2": arrays["labels"][b], "target_t2": arrays["t2"][a], "ab": idx}


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------
def _train_split(cfg, ds: DataSet):
    return split_arrays(ds.desc, "train", cfg, ds.spacing)


def pretrain_autoencoder(cfg, modality, out, data=None, iters=None, lr=None, batch_size=None, resume=False,
                         progress=True, command=None, spacing=None):
    """Train A1 (``t1``) or A2 (``t2``) on the training split; writes ``out`` (.h5) and its model card (with
    the grid line and the split for a user's data)."""
    ds = open_data(cfg, data, spacing)
    arr = _train_split(cfg, ds)
    line = report_data(cfg, ds, [arr])
    ae, hist = train_autoencoder(cfg, arr[modality], out, modality=modality, iters=iters, lr=lr,
                                 batch_size=batch_size, resume=resume, progress=progress, command=command)
    extra = {"data_source": cfg.data_source} if ds.path is None else {
        "grid": line or fit_line(arr.fits, cfg.inshape, ds.spacing, ds.desc.source),
        "splits": {n: [s.subject for s in ds.desc.split(n)] for n in ("train", "val", "test")}}
    _annotate_card(out, data=data_label(cfg, ds), **extra)
    return ae, hist


def _annotate_card(h5_path, **extra):
    p = os.path.splitext(h5_path)[0] + ".json"
    with open(p) as f:
        card = json.load(f)
    card.update(extra)
    write_json(p, card)


def sup_pretrain(cfg, out_dir, data=None, iters=None, lr=None, batch_size=None, resume=False, progress=True,
                 command=None, spacing=None):
    """SupPretrain (paper §3): A1, A2, F1, F2 on aligned same-subject pairs with λsp·d12 + Σ(L1 + NCC)."""
    ds = open_data(cfg, data, spacing)
    arr = _train_split(cfg, ds)
    report_data(cfg, ds, [arr])
    out = train_sup_pretrain(cfg, arr, out_dir, iters=iters, lr=lr, batch_size=batch_size, resume=resume,
                             progress=progress, command=command)
    write_splits(ds, out_dir)
    return out


def _is_synthmorph(name):
    return str(name).strip().lower() in SYNTHMORPH_METHODS


def _is_contrastive(name):
    """CR / mCR and variants (need autoencoders); False for the SynthMorph baselines."""
    return not _is_synthmorph(name) and is_contrastive(name)


def _train_synthmorph(cfg, method, out, arr, **kw):
    """SM-brains / SM-shapes (``training.synthmorph``) on the training arrays ``arr`` (sm-brains: its label
    maps; both: the voxel size of the data): options of the λ-conditioned trainer that do not apply are refused
    when set, ignored at their defaults."""
    bad = [k for k in ("ae1", "ae2", "rand_ae", "heads", "dns_model", "reg_penalty", "mixed_precision", "xla")
           if kw.pop(k, None)]
    if kw.pop("conditioning", "film") != "film":
        bad.append("conditioning")
    if bad:
        raise ContraRegInputError(f"{method}: {', '.join(bad)} do(es) not apply to a SynthMorph model")
    return train_synthmorph(cfg, method, out, {k: arr[k] for k in ("labels", "affines")}, **kw)


def _validation_arrays(cfg, ds: DataSet):
    """The split of the validation curve: val, or test when val has fewer than 2 subjects (the built-in
    cpu-demo data)."""
    split = "val" if len(ds.desc.split("val")) >= 2 else "test"
    return split_arrays(ds.desc, split, cfg, ds.spacing)


def validator(cfg, desc, arr=None):
    """Fig. 3 col. 4: ``validate(model) -> Dice`` at ``VAL_CURVE_LAMBDA`` on ``VAL_CURVE_PAIRS`` fixed pairs of the
    validation split (the test split when the validation split has fewer than 2 subjects, as the built-in
    cpu-demo data; the curve is only drawn, nothing is selected by it), or None without label maps. ``desc``:
    a Description or a :class:`DataSet`; ``arr``: that split's arrays, when already loaded."""
    if arr is None:
        ds = desc if isinstance(desc, DataSet) else DataSet(desc)
        arr = _validation_arrays(cfg, ds)
    if arr.get("labels") is None or arr["t1"].shape[0] < 2:
        return None
    pairs = make_test_pairs(arr, VAL_CURVE_PAIRS, seed=cfg.seed)
    before = evaluation.pair_dice_before(pairs)

    def validate(model):
        rows = evaluation.evaluate_lambdas(model, pairs, [VAL_CURVE_LAMBDA], progress=False, before=before)
        return rows[0]["dice"]

    return validate


def train_method(cfg, loss, out, data=None, spacing=None, **kw):
    """Train one λ-conditioned model (``train_hyper.py``), or a SynthMorph baseline (``sm-brains``,
    ``sm-shapes``: ``training.synthmorph``). The data set is resolved once (``data``: CSV / folder, None = the
    built-in data, or a :class:`DataSet`). A contrastive loss without ``ae1``/``ae2`` (and not RandAE) uses the
    autoencoders shipped in ``models/`` for the preset, when there are any."""
    ds = open_data(cfg, data, spacing)
    arr = _train_split(cfg, ds)
    loaded = [arr]
    if kw.pop("val_curve", True) and "validate" not in kw:
        val = _validation_arrays(cfg, ds)
        loaded.append(val)
        kw["validate"] = validator(cfg, ds, val)
    report_data(cfg, ds, loaded)
    if _is_synthmorph(loss):
        out_hist = _train_synthmorph(cfg, loss, out, arr, **kw)
    else:
        if is_contrastive(loss) and not kw.get("rand_ae") and kw.get("ae1") is None and kw.get("ae2") is None:
            shipped_aes = shipped_autoencoders(cfg)
            if shipped_aes:
                kw["ae1"], kw["ae2"] = shipped_aes
        out_hist = train_hyper(cfg, loss, out, {k: arr[k] for k in ("t1", "t2", "mask1", "mask2", "labels",
                                                                    "affines")}, **kw)
    write_splits(ds, out)
    return out_hist


def shipped_autoencoders(cfg):
    """Paths of the autoencoders shipped in ``models/`` for this preset and its built-in data source (the
    ``data_source`` of their JSON cards), or None."""
    paths = tuple(shipped(f"ae_{m}_{cfg.name}.h5") for m in ("t1", "t2"))
    for p in paths:
        try:
            with open(os.path.splitext(p)[0] + ".json") as f:
                card = json.load(f)
        except (OSError, ValueError):
            return None
        if not os.path.isfile(p) or card.get("data_source", "mni2009a-synth") != cfg.data_source:
            return None
    return paths


# ------------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------------
def check_spacing(meta, arr, run):
    """Warn when the evaluation data's voxel size differs from the run's training voxel size by more than
    ``config.SPACING_MISMATCH_WARN`` (the network's receptive field is in voxels)."""
    trained, now = meta.get("data_spacing"), data_spacing(arr, arr["t1"].ndim - 1)
    if trained and now and max(trained / now, now / trained) > SPACING_MISMATCH_WARN:
        warnings.warn(f"{run}: trained on {trained:g} mm voxels, evaluated on {now:g} mm voxels; give --spacing "
                      f"{trained:g} to resample the data as in training", ContraRegWarning, stacklevel=2)
        return True
    return False


def evaluate_runs(run_dirs, out_dir, data=None, split="test", n_pairs=None, budget=FOLD_BUDGET, progress=True,
                  lambdas=LAMBDAS_17, names=None, paper=None, sets=None, groups=None, spacing=None):
    """Evaluate each run over the 17 λ; write ``<method>.csv``, ``table1.md/csv``, ``fig3.png`` (with the
    validation curves as col. 4 when the runs logged them), ``fig2.png``; returns Table 1 as Markdown.
    ``names``: the row label of each run (default its loss); a run folder listed twice is evaluated once.
    ``paper`` / ``sets`` / ``groups``: see ``evaluation.table1`` and ``evaluation.plot_fig3``. ``data`` /
    ``spacing``: as :func:`open_data`; the runs' grid (``inshape``) is used; a user's data set gets its one line
    and ``out_dir/splits.csv``. ``out_dir`` is created once the first run and the data have loaded."""
    results, examples, pairs, before_pairs, cfg0, label_names, label_groups = {}, {}, None, None, None, None, None
    done, curves = {}, {}
    for k, run in enumerate(run_dirs):
        key = os.path.abspath(run)
        if names is not None and key in done:        # the same run under a second row label (Table 1 D3 = B4)
            results[names[k]], curves[names[k]] = results[done[key]], curves.get(done[key])
            continue
        model, meta = load_trained(run)
        cfg = config_from_meta(meta)
        if cfg0 is None:
            cfg0 = cfg
            ds = open_data(cfg, data, spacing)
            arr = split_arrays(ds.desc, split, cfg, ds.spacing)
            pairs = make_test_pairs(arr, n_pairs, seed=cfg.seed)
            before_pairs = evaluation.pair_dice_before(pairs)   # once: the same pairs for every method
            label_names, label_groups = label_meta(ds.desc)
            os.makedirs(out_dir, exist_ok=True)
            report_data(cfg, ds, [arr], out_dir)
        elif tuple(cfg.inshape) != tuple(cfg0.inshape):
            raise ContraRegInputError(f"{run}: grid {cfg.inshape} differs from {cfg0.inshape} of the first run")
        check_spacing(meta, arr, run)
        method = meta["loss"] if names is None else names[k]
        name = method if method not in results else f"{method} ({os.path.basename(os.path.normpath(run))})"
        done[key] = name
        rows = evaluation.evaluate_lambdas(model, pairs, lambdas=lambdas, progress=progress, desc=f"eval {name}",
                                           before=before_pairs, label_names=label_names, label_groups=label_groups)
        evaluation.write_csv(rows, os.path.join(out_dir, f"{_file_name(name)}.csv"))
        results[name] = rows
        curves[name] = evaluation.read_val_curve(run)
        best = evaluation.select_lambda(rows, budget) or rows[0]
        moved, _, _ = register(model, pairs["img2"][0], pairs["img1"][0], best["lambda"])
        examples[f"{name} λ={best['lambda']:.3g}"] = dict(fixed=pairs["img1"][0], moving=pairs["img2"][0],
                                                          moved=moved[0, ..., 0], target_t2=pairs["target_t2"][0])
    before = float(np.mean(before_pairs))   # the "before registration" row / line
    rows, md = evaluation.table1(results, budget, before=before, paper=paper, sets=sets)
    with atomic_path(os.path.join(out_dir, "table1.md")) as tmp, open(tmp, "w") as f:
        f.write(md)
    evaluation.write_csv(rows, os.path.join(out_dir, "table1.csv"),
                         fields=("method",) + evaluation.TABLE1_FIELDS)
    unique = {n: results[n] for n in done.values()}
    if groups is not None:
        groups = {t: [n for n in ms if n in unique] for t, ms in groups.items()}
        groups = {t: ms for t, ms in groups.items() if ms}
    evaluation.plot_fig3(unique, os.path.join(out_dir, "fig3.png"), before=before, budget=budget,
                         curves={n: curves.get(n) for n in unique}, groups=groups)
    if label_groups:
        evaluation.plot_groups(unique, os.path.join(out_dir, "fig3_groups.png"),
                               before_groups=evaluation.group_dice_before(pairs, label_groups),
                               groups=group_order(label_groups))
    evaluation.plot_examples(examples, os.path.join(out_dir, "fig2.png"))
    return md


def group_order(label_groups):
    """Every coarse group of a data set's labels (all panels of ``fig3_groups.png``, also those without a
    structure in the test images): CerebrA's in ``icbm.GROUPS`` order, then any other in label order."""
    present = list(dict.fromkeys(label_groups.values()))
    return [g for g in GROUPS if g in present] + [g for g in present if g not in GROUPS]


def _file_name(name):
    return "".join(c if c.isalnum() or c in "+-._" else "_" for c in name).strip("_")


def default_workers(n_runs):
    """How many methods ``reproduce_table1`` trains at once: 1 with a GPU (two TF processes would compete
    for its memory), else up to 2 on a CPU with >= 2 cores — one training step keeps ~1.4 of 2 cores busy
    and graph tracing only one, so two processes finish the six demo methods ~1.3× sooner."""
    if tf.config.list_physical_devices("GPU"):
        return 1
    return max(1, min(2, os.cpu_count() or 1, int(n_runs)))


def _worker_init(counter, lock):
    """Spawned training worker: its own tqdm line (TQDM_POSITION, read by tqdm's env defaults) and lock."""
    from tqdm.auto import tqdm  # lazy: progress bars only

    with counter.get_lock():
        os.environ["TQDM_POSITION"] = str(counter.value)
        counter.value += 1
    tqdm.set_lock(lock)


@dataclass
class Table1Job:
    """One training of the Table-1 runner: the row's ``cfg``, its ``method`` (a ``--loss`` name or a SynthMorph
    baseline), its ``run_dir`` and the further :func:`train_method` options ``kwargs``."""
    cfg: Config
    method: str
    run_dir: str
    kwargs: dict = field(default_factory=dict)


def _train_runs(jobs, data, progress, workers):
    """Train ``jobs`` (:class:`Table1Job`) on ``data`` (as :func:`train_method` takes it) — in this process if
    ``workers`` == 1, else in that many spawned processes (slowest methods first). The first failure cancels
    the rest and is re-raised."""
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            train_method(j.cfg, j.method, j.run_dir, data=data, progress=progress, **j.kwargs)
        return
    ctx = mp.get_context("spawn")   # TF is not fork-safe
    jobs = sorted(jobs, key=lambda j: (-j.cfg.ch, not _is_contrastive(j.method)))
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                initargs=(ctx.Value("i", 0), ctx.RLock())) as pool:
        futures = [pool.submit(train_method, j.cfg, j.method, j.run_dir, data=data, progress=progress, **j.kwargs)
                   for j in jobs]
        try:
            for f in cf.as_completed(futures):
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def row_config(cfg, row):
    """The ``Config`` of a Table-1 row: the preset, its wide companion for sets B/D, set D's integration steps."""
    rc = wide_preset(cfg) if row.wide else cfg
    return dataclasses.replace(rc, int_steps=row.int_steps) if row.int_steps else rc


def row_run_name(cfg, row):
    """Run folder of a Table-1 row: the method (as ``--methods`` names it), plus what differs from the preset
    (``_ch<width>``, ``_ts<steps>``, ``_suppretrain``, ``_randae``); rows with the same setting share a run."""
    rc = row_config(cfg, row)
    parts = [row.method.replace("+", "_")]
    if rc.ch != cfg.ch:
        parts.append(f"ch{rc.ch}")
    if rc.int_steps != cfg.int_steps and not _is_synthmorph(row.method):
        parts.append(f"ts{rc.int_steps}")
    parts += [t for t, on in (("suppretrain", row.sup_pretrain), ("randae", row.rand_ae)) if on]
    return "_".join(parts)


def select_rows(rows=None, methods=TABLE1_A):
    """Table-1 rows to run: ``rows`` = set letters (A, B, C, D, extra: every row of the set) or single rows
    named as the paper does (A5 = set A's fifth row, CR; extra2 = ACCR) from ``config.TABLE1_ROWS``, in the
    table's order; or, with ``rows`` None, one plain row per ``--methods`` name (no paper columns)."""
    if rows is None:
        return [Table1Row("", m, m) for m in methods], False
    ids = {}
    for r in TABLE1_ROWS:
        ids.setdefault(r.set, []).append(r)
    chosen = set()
    for item in (str(x).strip() for x in rows):
        m = re.fullmatch(r"(A|B|C|D|extra)(\d*)", item)
        k = int(m.group(2)) if m and m.group(2) else None
        if m is None or (k is not None and not 1 <= k <= len(ids[m.group(1)])):
            raise ContraRegInputError(f"unknown Table-1 row {item!r}; give a set ({', '.join(TABLE1_SETS)}) or "
                                      "a row of one (A1-A6, B1-B5, C1-C6, D1-D3, extra1-extra3)")
        chosen.update(ids[m.group(1)] if k is None else [ids[m.group(1)][k - 1]])
    if not chosen:
        raise ContraRegInputError("--rows: no Table-1 rows given")
    return [r for r in TABLE1_ROWS if r in chosen], True


def reproduce_table1(cfg, out_dir, methods=TABLE1_A, data=None, iters=None, ae_iters=None, ae1=None, ae2=None,
                     n_pairs=None, resume=False, progress=True, workers=None, rows=None, spacing=None):
    """The main job: proxy data → autoencoders (shipped, given, or trained) → one run per method → Table 1.
    ``rows``: Table-1 sets (A, B, C, D, extra) instead of ``methods``: every row of those sets, labelled as
    in the paper, with the paper's values beside it (sets B/D at the preset's wide companion; SupPretrain
    rows start from one SupPretrain run, ``out_dir/suppretrain``). ``workers``: methods trained at once
    (default ``default_workers``). The data set is resolved once, reported once (a user's: ``data`` /
    ``spacing`` as :func:`open_data`) and handed to every step."""
    table_rows, with_paper = select_rows(rows, methods)
    for r in table_rows:
        if not _is_synthmorph(r.method):
            try:
                LossSpec.parse(r.method)    # one error line for an unknown method
            except ContraRegInputError as e:
                raise ContraRegInputError(f"{e}; or a SynthMorph baseline: {', '.join(SYNTHMORPH_METHODS)}") \
                    from None
    if workers is not None and int(workers) < 1:
        raise ContraRegInputError(f"workers must be >= 1, got {workers}")
    t0 = time.time()
    ds = open_data(cfg, data, spacing)
    if ds.path is not None:
        report_data(cfg, ds, [split_arrays(ds.desc, n, cfg, ds.spacing) for n in ("train", "val", "test")
                              if ds.desc.split(n)])
    os.makedirs(out_dir, exist_ok=True)
    write_splits(ds, out_dir)
    if any(_is_contrastive(r.method) and not (r.rand_ae or r.sup_pretrain) for r in table_rows) and \
            (ae1 is None or ae2 is None):
        shipped = None if ds.path is not None else shipped_autoencoders(cfg)
        if shipped:
            ae1, ae2 = shipped
        else:
            ae1, ae2 = (os.path.join(out_dir, f"ae_{m}.h5") for m in ("t1", "t2"))
            for mod, path in (("t1", ae1), ("t2", ae2)):
                if not os.path.isfile(path):
                    pretrain_autoencoder(cfg, mod, path, data=ds, iters=ae_iters, progress=progress)
    sp_dir = os.path.join(out_dir, "suppretrain")
    if any(r.sup_pretrain for r in table_rows) and not os.path.isfile(os.path.join(sp_dir, "heads2.h5")):
        sup_pretrain(cfg, sp_dir, data=ds, iters=ae_iters, progress=progress)
    runs, jobs, seen = [], [], set()
    for r in table_rows:
        run = os.path.join(out_dir, row_run_name(cfg, r))
        runs.append(run)
        if run in seen or (os.path.isfile(os.path.join(run, "model.h5")) and not resume):
            continue  # already trained (or another row's run)
        seen.add(run)
        kw = dict(iters=iters, resume=resume and os.path.isdir(os.path.join(run, "ckpt")))
        if r.sup_pretrain:
            kw.update(ae1=os.path.join(sp_dir, "ae_t1.h5"), ae2=os.path.join(sp_dir, "ae_t2.h5"), heads=sp_dir)
        elif r.rand_ae:
            kw.update(rand_ae=True)
        elif _is_contrastive(r.method):
            kw.update(ae1=ae1, ae2=ae2)
        jobs.append(Table1Job(row_config(cfg, r), r.method, run, kw))
    _train_runs(jobs, ds, progress, default_workers(len(jobs)) if workers is None else int(workers))
    names = [f"{r.set} {r.label}".strip() for r in table_rows]
    extra = {}
    if with_paper:
        extra = dict(names=names, paper={n: r.paper for n, r in zip(names, table_rows)},
                     sets={n: r.set for n, r in zip(names, table_rows)}, groups=_fig3_groups(table_rows, names))
    md = evaluate_runs(runs, out_dir, data=ds, n_pairs=n_pairs, progress=progress, **extra)
    md += f"\n({len(ds.desc.subjects)} subjects, preset {cfg.name}, total {time.time() - t0:.0f} s)\n"
    return md


def _fig3_groups(table_rows, names):
    """Fig. 3's rows: similarity losses (set A), extensions (set C), larger models and baselines (sets B, D),
    other methods (extra)."""
    titles = {"A": "losses (A)", "C": "extensions (C)", "B": "wide / SynthMorph (B, D)",
              "D": "wide / SynthMorph (B, D)", "extra": "CoRe / ACCR"}
    groups = {}
    for r, n in zip(table_rows, names):
        groups.setdefault(titles[r.set], []).append(n)
    return groups
