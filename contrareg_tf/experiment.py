"""The paper's workflow glued end to end: data (built-in proxy or a real description) → autoencoders →
λ-conditioned training per method → 17-λ evaluation → Table 1 / Fig. 3 / Fig. 2. The scripts in
``train_scripts/`` and ``eval_scripts/`` are argument parsers over these functions.
"""
import dataclasses
import json
import os
import time

import numpy as np

from .atomic import atomic_path, write_json
from .config import FOLD_BUDGET, LAMBDAS_17, SYNTHMORPH_METHODS, TABLE1_A, Config
from .data.dataset import resolve as resolve_data  # noqa: F401  (data set of a config)
from .errors import ContraRegInputError


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------
def label_meta(desc):
    """``({label: name}, {label: group})`` of a data set: from the built-in data's ``proxy.json``, else
    ``(None, None)`` (labels are then named by their values and not grouped)."""
    names = desc.meta.get("label_names") if desc.meta else None
    groups = desc.meta.get("label_groups") if desc.meta else None
    return ({int(k): v for k, v in names.items()} if names else None,
            {int(k): v for k, v in groups.items()} if groups else None)


def data_label(cfg, data, desc):
    """How a model card names its data: the user's description path, or the proxy's parameters."""
    if data is not None:
        return os.path.abspath(desc.source or str(data))
    return (f"built-in data {cfg.data_source}: {cfg.proxy_subjects} subjects, {'x'.join(map(str, cfg.inshape))} @ {cfg.spacing:g} mm, "
            f"max_disp {cfg.proxy_max_disp:g} vox, seed {cfg.seed}")


def split_arrays(desc, split, cfg: Config):
    """Stacks ``t1, t2, mask1, mask2, labels`` (N, *inshape) of one split, normalised to [0, 1] and
    crop/padded to the config's grid."""
    from .data.pairs import load_split_arrays

    arr = load_split_arrays(desc, split, tuple(cfg.inshape), ndim=len(cfg.inshape))
    if arr["t1"].shape[0] == 0:
        raise ContraRegInputError(f"split {split!r} of {desc.source} has no subjects")
    return arr


def make_test_pairs(arrays, n_pairs=None, seed=0):
    """Inter-subject test pairs: I1 = T1w of a, I2 = T2w of b ≠ a (all ordered pairs, or ``n_pairs`` of them
    drawn deterministically)."""
    from .data.pairs import make_pairs

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
def pretrain_autoencoder(cfg, modality, out, data=None, iters=None, lr=None, batch_size=None, resume=False,
                         progress=True, command=None):
    """Train A1 (``t1``) or A2 (``t2``) on the training split; writes ``out`` (.h5) and its model card."""
    from .training import train_autoencoder

    desc = resolve_data(cfg, data)
    arr = split_arrays(desc, "train", cfg)
    ae, hist = train_autoencoder(cfg, arr[modality], out, modality=modality, iters=iters, lr=lr,
                                 batch_size=batch_size, resume=resume, progress=progress, command=command)
    _annotate_card(out, data=data_label(cfg, data, desc), **({} if data is not None else
                                                             {"data_source": cfg.data_source}))
    return ae, hist


def _annotate_card(h5_path, **extra):
    p = os.path.splitext(h5_path)[0] + ".json"
    with open(p) as f:
        card = json.load(f)
    card.update(extra)
    write_json(p, card)


def sup_pretrain(cfg, out_dir, data=None, iters=None, lr=None, batch_size=None, resume=False, progress=True,
                 command=None):
    """SupPretrain (paper §3): A1, A2, F1, F2 on aligned same-subject pairs with λsp·d12 + Σ(L1 + NCC)."""
    from .training import train_sup_pretrain

    desc = resolve_data(cfg, data)
    arr = split_arrays(desc, "train", cfg)
    return train_sup_pretrain(cfg, arr, out_dir, iters=iters, lr=lr, batch_size=batch_size, resume=resume,
                              progress=progress, command=command)


def _is_synthmorph(name):
    return str(name).strip().lower() in SYNTHMORPH_METHODS


def _is_contrastive(name):
    """CR / mCR and variants (need autoencoders); False for the SynthMorph baselines."""
    from .losses.similarity import is_contrastive

    return not _is_synthmorph(name) and is_contrastive(name)


def _train_synthmorph(cfg, method, out, data=None, **kw):
    """SM-brains / SM-shapes (``training.synthmorph``): options of the λ-conditioned trainer that do not apply
    are refused when set, ignored at their defaults."""
    from .training.synthmorph import train_synthmorph

    bad = [k for k in ("ae1", "ae2", "rand_ae", "heads", "dns_model", "reg_penalty", "mixed_precision", "xla")
           if kw.pop(k, None)]
    if kw.pop("conditioning", "film") != "film":
        bad.append("conditioning")
    if bad:
        raise ContraRegInputError(f"{method}: {', '.join(bad)} do(es) not apply to a SynthMorph model")
    desc = resolve_data(cfg, data)
    arr = split_arrays(desc, "train", cfg)   # sm-brains: its label maps; both: the voxel size of the data
    return train_synthmorph(cfg, method, out, {k: arr[k] for k in ("labels", "affines")}, **kw)


def validator(cfg, desc):
    """Fig. 3 col. 4: ``validate(model) -> Dice`` at ``VAL_CURVE_LAMBDA`` on ``VAL_CURVE_PAIRS`` fixed pairs of the
    validation split (the test split when the validation split has fewer than 2 subjects, as the built-in
    cpu-demo data; the curve is only drawn, nothing is selected by it), or None without label maps."""
    from . import evaluation
    from .config import VAL_CURVE_LAMBDA, VAL_CURVE_PAIRS

    split = "val" if len(desc.split("val")) >= 2 else "test"
    arr = split_arrays(desc, split, cfg)
    if arr.get("labels") is None or arr["t1"].shape[0] < 2:
        return None
    pairs = make_test_pairs(arr, VAL_CURVE_PAIRS, seed=cfg.seed)
    before = evaluation.pair_dice_before(pairs)

    def validate(model):
        rows = evaluation.evaluate_lambdas(model, pairs, [VAL_CURVE_LAMBDA], progress=False, before=before)
        return rows[0]["dice"]

    return validate


def train_method(cfg, loss, out, data=None, **kw):
    """Train one λ-conditioned model (``train_hyper.py``), or a SynthMorph baseline (``sm-brains``,
    ``sm-shapes``: ``training.synthmorph``). A contrastive loss without ``ae1``/``ae2`` (and not RandAE) uses the
    autoencoders shipped in ``models/`` for the preset, when there are any."""
    from .losses.similarity import is_contrastive
    from .training import train_hyper

    if kw.pop("val_curve", True) and "validate" not in kw:
        kw["validate"] = validator(cfg, resolve_data(cfg, data))
    if _is_synthmorph(loss):
        return _train_synthmorph(cfg, loss, out, data=data, **kw)
    if is_contrastive(loss) and not kw.get("rand_ae") and kw.get("ae1") is None and kw.get("ae2") is None:
        shipped = shipped_autoencoders(cfg)
        if shipped:
            kw["ae1"], kw["ae2"] = shipped
    desc = resolve_data(cfg, data)
    arr = split_arrays(desc, "train", cfg)
    return train_hyper(cfg, loss, out, {k: arr[k] for k in ("t1", "t2", "mask1", "mask2", "labels", "affines")},
                       **kw)


def shipped_autoencoders(cfg):
    """Paths of the autoencoders shipped in ``models/`` for this preset and its built-in data source (the
    ``data_source`` of their JSON cards), or None."""
    from .assets import shipped
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
def evaluate_runs(run_dirs, out_dir, data=None, split="test", n_pairs=None, budget=FOLD_BUDGET, progress=True,
                  lambdas=LAMBDAS_17, names=None, paper=None, sets=None, groups=None):
    """Evaluate each run over the 17 λ; write ``<method>.csv``, ``table1.md/csv``, ``fig3.png`` (with the
    validation curves as col. 4 when the runs logged them), ``fig2.png``; returns Table 1 as Markdown.
    ``names``: the row label of each run (default its loss); a run folder listed twice is evaluated once.
    ``paper`` / ``sets`` / ``groups``: see ``evaluation.table1`` and ``evaluation.plot_fig3``."""
    from . import evaluation
    from .networks.hyper import register
    from .runs import config_from_meta, load_trained

    os.makedirs(out_dir, exist_ok=True)
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
            desc = resolve_data(cfg, data)
            pairs = make_test_pairs(split_arrays(desc, split, cfg), n_pairs, seed=cfg.seed)
            before_pairs = evaluation.pair_dice_before(pairs)   # once: the same pairs for every method
            label_names, label_groups = label_meta(desc)
        elif tuple(cfg.inshape) != tuple(cfg0.inshape):
            raise ContraRegInputError(f"{run}: grid {cfg.inshape} differs from {cfg0.inshape} of the first run")
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
                               before_groups=evaluation.group_dice_before(pairs, label_groups))
    evaluation.plot_examples(examples, os.path.join(out_dir, "fig2.png"))
    return md


def _file_name(name):
    return "".join(c if c.isalnum() or c in "+-._" else "_" for c in name).strip("_")


def default_workers(n_runs):
    """How many methods ``reproduce_table1`` trains at once: 1 with a GPU (two TF processes would compete
    for its memory), else up to 2 on a CPU with >= 2 cores — one training step keeps ~1.4 of 2 cores busy
    and graph tracing only one, so two processes finish the six demo methods ~1.3× sooner."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return 1
    return max(1, min(2, os.cpu_count() or 1, int(n_runs)))


def _worker_init(counter, lock):
    """Spawned training worker: its own tqdm line (TQDM_POSITION, read by tqdm's env defaults) and lock."""
    from tqdm.auto import tqdm

    with counter.get_lock():
        os.environ["TQDM_POSITION"] = str(counter.value)
        counter.value += 1
    tqdm.set_lock(lock)


def _train_runs(jobs, data, progress, workers):
    """Train ``jobs`` = [(cfg, method, run_dir, kwargs)] — in this process if ``workers`` == 1, else in that many
    spawned processes (slowest methods first). The first failure cancels the rest and is re-raised."""
    if workers <= 1 or len(jobs) <= 1:
        for cfg, m, run, kw in jobs:
            train_method(cfg, m, run, data=data, progress=progress, **kw)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")   # TF is not fork-safe
    jobs = sorted(jobs, key=lambda j: (-j[0].ch, not _is_contrastive(j[1])))
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                initargs=(ctx.Value("i", 0), ctx.RLock())) as pool:
        futures = [pool.submit(train_method, cfg, m, run, data=data, progress=progress, **kw)
                   for cfg, m, run, kw in jobs]
        try:
            for f in cf.as_completed(futures):
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def row_config(cfg, row):
    """The ``Config`` of a Table-1 row: the preset, its wide companion for sets B/D, set D's integration steps."""
    from .config import wide_preset

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
    import re

    from .config import TABLE1_ROWS, TABLE1_SETS, Table1Row

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
                     n_pairs=None, resume=False, progress=True, workers=None, rows=None):
    """The main job: proxy data → autoencoders (shipped, given, or trained) → one run per method → Table 1.
    ``rows``: Table-1 sets (A, B, C, D, extra) instead of ``methods``: every row of those sets, labelled as
    in the paper, with the paper's values beside it (sets B/D at the preset's wide companion; SupPretrain
    rows start from one SupPretrain run, ``out_dir/suppretrain``). ``workers``: methods trained at once
    (default ``default_workers``)."""
    from .losses.similarity import LossSpec

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
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    desc = resolve_data(cfg, data)
    if any(_is_contrastive(r.method) and not (r.rand_ae or r.sup_pretrain) for r in table_rows) and \
            (ae1 is None or ae2 is None):
        shipped = None if data is not None else shipped_autoencoders(cfg)
        if shipped:
            ae1, ae2 = shipped
        else:
            ae1, ae2 = (os.path.join(out_dir, f"ae_{m}.h5") for m in ("t1", "t2"))
            for mod, path in (("t1", ae1), ("t2", ae2)):
                if not os.path.isfile(path):
                    pretrain_autoencoder(cfg, mod, path, data=data, iters=ae_iters, progress=progress)
    sp_dir = os.path.join(out_dir, "suppretrain")
    if any(r.sup_pretrain for r in table_rows) and not os.path.isfile(os.path.join(sp_dir, "heads2.h5")):
        sup_pretrain(cfg, sp_dir, data=data, iters=ae_iters, progress=progress)
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
        jobs.append((row_config(cfg, r), r.method, run, kw))
    _train_runs(jobs, data, progress, default_workers(len(jobs)) if workers is None else int(workers))
    names = [f"{r.set} {r.label}".strip() for r in table_rows]
    extra = {}
    if with_paper:
        extra = dict(names=names, paper={n: r.paper for n, r in zip(names, table_rows)},
                     sets={n: r.set for n, r in zip(names, table_rows)}, groups=_fig3_groups(table_rows, names))
    md = evaluate_runs(runs, out_dir, data=data, n_pairs=n_pairs, progress=progress, **extra)
    md += f"\n({len(desc.subjects)} subjects, preset {cfg.name}, total {time.time() - t0:.0f} s)\n"
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
