#!/usr/bin/env python
"""Table 1 set A trained to a plateau, with training seeds and paired statistics (not in CI).

Each of mCR, CR, MI, local MI, MIND and NGF is trained on the preset's built-in data (fixed: the data's seed is
the preset's) for every training seed (network initialisation, pair order, λ draws, PatchNCE locations) until its
monitored Dice curve meets ``config.CONVERGE`` (``training/plateau.py``) or reaches the same step cap; then the
17-λ evaluation on the test pairs. Every finished (method, seed) writes its results at once to
``<results>/<method>_s<seed>/`` (17-λ rows, per-pair Dice / folds / std log|J| per λ, the monitor and validation
curves, the training card), so an interrupted study resumes where it stopped (``--resume`` also continues an
interrupted training from its checkpoint). The report — Table 1 over (test pair × seed), paired differences of
CR / mCR against each baseline at each method's selected λ and at matched smoothness, the curves — is rewritten
from whatever has finished:

    python bench/bench_converge.py                        # cpu-bench, seeds 0 1, 2 workers
    python bench/bench_converge.py --seeds 0 1 2 --resume # add a seed, continue interrupted runs
    python bench/bench_converge.py --report               # only rewrite the report from finished results
    python bench/bench_converge.py --resume --max-steps 20000   # a higher cap: runs stopped at the old cap go on
"""
import argparse
import concurrent.futures as cf
import csv
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from contrareg_tf import evaluation, experiment, stats  # noqa: E402
from contrareg_tf.atomic import write_json  # noqa: E402
from contrareg_tf.data import proxy_stats  # noqa: E402
from contrareg_tf.losses.similarity import is_contrastive  # noqa: E402
from contrareg_tf.metrics import dice30  # noqa: E402
from contrareg_tf.runs import load_trained  # noqa: E402
from contrareg_tf.training import train_hyper  # noqa: E402
from contrareg_tf.config import (CONVERGE, FOLD_BUDGET, HYP_ACTIVATIONS, LAMBDAS_17, TABLE1_A,  # noqa: E402
                                 VAL_CURVE_LAMBDA, get_preset)

BASELINES = ("mi", "lmi", "mind", "ngf")
LABELS = {"mcr": "mCR", "cr": "CR", "mi": "MI", "lmi": "local MI", "mind": "MIND", "ngf": "NGF"}


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------------
# one (method, seed): train to the plateau, evaluate 17 λ, write the results folder
# ------------------------------------------------------------------------------------------------------------
def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _rule_key(rule):
    """The parts of a stopping rule that decide where a run stops (the cap is compared separately)."""
    return {k: v for k, v in (rule or {}).items() if k != "max_steps"}


def finished(card, max_steps, rule=CONVERGE):
    """Whether a run's card says it needs no more training: stopped at its plateau under ``rule`` (a run stopped
    under another rule — or one the card does not record — goes on from its checkpoint), or at a cap ≥
    ``max_steps`` (a study resumed with a higher ``--max-steps`` continues the capped runs)."""
    stop = card.get("stopped") or {}
    if int(stop.get("step", 0)) >= max_steps:
        return True
    return stop.get("reason") == "plateau" and _rule_key(stop.get("rule")) == _rule_key(dataclasses.asdict(rule))


def _train_autoencoder(preset, modality, path, iters):
    cfg = get_preset(preset)
    experiment.pretrain_autoencoder(cfg, modality, path, iters=iters, progress=False)
    return path


def _monitor(cfg, desc, tag):
    """``fn(model) -> Dice`` at VAL_CURVE_LAMBDA on CONVERGE.monitor_pairs fixed pairs of training subjects."""
    arr = experiment.split_arrays(desc, "train", cfg)
    pairs = experiment.make_test_pairs(arr, CONVERGE.monitor_pairs, seed=cfg.seed)
    before = evaluation.pair_dice_before(pairs)

    def fn(model):
        d = evaluation.evaluate_lambdas(model, pairs, [VAL_CURVE_LAMBDA], progress=False, before=before)[0]["dice"]
        _log(f"{tag}: monitor Dice {d:.4f}")
        return d

    return fn


def run_job(preset, method, seed, run_dir, res_dir, ae_pair, resume, max_steps, overrides=None):
    """Train ``method`` with training seed ``seed`` into ``run_dir`` and write its results folder ``res_dir``."""
    cfg = get_preset(preset)                       # data and test pairs: the preset's seed
    run_cfg = dataclasses.replace(cfg, seed=seed, iters=max_steps, ckpt_every=CONVERGE.check_every, **(overrides or {}))
    desc = experiment.resolve_data(cfg)
    tag = f"{method} s{seed}"
    t0 = time.time()
    card_path = os.path.join(run_dir, "card.json")
    capped = os.path.isfile(card_path) and not finished(_read_json(card_path), max_steps)
    if capped or not os.path.isfile(card_path):   # not trained, or stopped at a lower cap / under another rule
        arr = experiment.split_arrays(desc, "train", cfg)
        kw = dict(ae1=ae_pair[0], ae2=ae_pair[1]) if is_contrastive(method) else {}
        train_hyper(run_cfg, method, run_dir,
                    {k: arr[k] for k in ("t1", "t2", "mask1", "mask2", "labels", "affines")},
                    resume=(resume or capped) and os.path.isdir(os.path.join(run_dir, "ckpt")), progress=False,
                    validate=experiment.validator(cfg, desc), monitor=(_monitor(cfg, desc, tag), CONVERGE),
                    command=f"bench_converge {preset} {method} seed {seed}", **kw)
    model, _ = load_trained(run_dir)
    test = experiment.make_test_pairs(experiment.split_arrays(desc, "test", cfg), None, seed=cfg.seed)
    names, groups = experiment.label_meta(desc)
    t1 = time.time()
    rows, per = evaluation.evaluate_lambdas(model, test, LAMBDAS_17, progress=False, per_pair=True,
                                            before=evaluation.pair_dice_before(test), label_names=names,
                                            label_groups=groups)
    tmp = res_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    evaluation.write_csv(rows, os.path.join(tmp, "lambdas.csv"))
    with open(os.path.join(tmp, "pairs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lambda", "pair", "a", "b", "dice", "folds", "sdlogj"])
        for i, lam in enumerate(LAMBDAS_17):
            for p, (a, b) in enumerate(test["ab"]):
                w.writerow([lam, p, a, b] + [f"{per[k][i, p]:.6g}" for k in ("dice", "folds", "sdlogj")])
    for name in ("val_curve.csv", "monitor_curve.csv"):
        if os.path.isfile(os.path.join(run_dir, name)):
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(tmp, name))
    card = _read_json(card_path)
    card["eval_seconds"] = round(time.time() - t1, 1)   # lambda_use: written by train_hyper
    write_json(os.path.join(tmp, "card.json"), card)
    shutil.rmtree(res_dir, ignore_errors=True)
    os.replace(tmp, res_dir)                         # the folder appears whole or not at all
    stop = card.get("stopped", {})
    _log(f"done {tag}: stopped at step {stop.get('step')} ({stop.get('reason')}), training {card['seconds']:.0f} s, "
         f"this call {time.time() - t0:.0f} s")
    return res_dir


# ------------------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------------------
def load_results(res_root, methods, seeds):
    """{method: {seed: {"rows", "dice" (λ, P), "folds", "sdlogj", "card", "val", "monitor"}}} of finished runs."""
    out = {}
    for m in methods:
        for s in seeds:
            d = os.path.join(res_root, f"{m}_s{s}")
            if not os.path.isfile(os.path.join(d, "card.json")):
                continue
            rows = evaluation.read_csv(os.path.join(d, "lambdas.csv"))
            with open(os.path.join(d, "pairs.csv"), newline="") as f:
                recs = list(csv.DictReader(f))
            npairs = 1 + max(int(r["pair"]) for r in recs)
            per = {k: np.full((len(LAMBDAS_17), npairs), np.nan) for k in ("dice", "folds", "sdlogj")}
            lam_index = {float(x): i for i, x in enumerate(LAMBDAS_17)}
            for r in recs:
                for k in per:
                    per[k][lam_index[float(r["lambda"])], int(r["pair"])] = float(r[k])
            card = _read_json(os.path.join(d, "card.json"))
            curves = {"val": evaluation.read_val_curve(d),
                      "monitor": evaluation.read_val_curve(d, "monitor_curve.csv")}
            out.setdefault(m, {})[s] = dict(rows=rows, card=card, **per, **curves)
    return out


def _stop_text(card):
    """"step (reason)", with † when the run stopped under another rule than ``CONVERGE`` (or one not recorded)."""
    stop = card.get("stopped") or {}
    other = _rule_key(stop.get("rule")) != _rule_key(dataclasses.asdict(CONVERGE))
    return f"{stop.get('step')} ({stop.get('reason', '?')}){' †' if other else ''}"


def _selected(runs, budget=FOLD_BUDGET):
    """Index of λ chosen on the seed-mean curve (best mean Dice with mean % folds < budget), or None."""
    dice = np.mean([r["dice"].mean(1) for r in runs.values()], 0)
    folds = np.mean([r["folds"].mean(1) for r in runs.values()], 0)
    ok = np.flatnonzero(folds < budget)
    return None if ok.size == 0 else int(ok[np.argmax(dice[ok])])


def _stack(runs, key, i, seeds):
    return np.concatenate([runs[s][key][i] for s in seeds])


def _fill_lambda_use(res_root, run_root, methods, seeds):
    """Add ``evaluation.lambda_use`` to results cards that lack them, from the trained run when it is still here."""
    for m in methods:
        for s in seeds:
            card_path = os.path.join(res_root, f"{m}_s{s}", "card.json")
            run = os.path.join(run_root, f"{m}_s{s}")
            if os.path.isfile(card_path) and os.path.isfile(os.path.join(run, "model.h5")):
                card = _read_json(card_path)
                if "lambda_use" not in card:
                    card["lambda_use"] = evaluation.lambda_use(load_trained(run)[0])
                    write_json(card_path, card)


def report(res_root, methods, seeds, preset, before, ceiling):
    """Markdown report text and the figures' paths (written beside the results folder)."""
    res = load_results(res_root, methods, seeds)
    common = [s for s in seeds if all(s in res.get(m, {}) for m in methods if m in res)]
    lines = [f"Seeds finished per method: " + ", ".join(f"{LABELS.get(m, m)} {sorted(res.get(m, {}))}"
                                                         for m in methods), ""]
    if not res:
        return "\n".join(lines + ["(no finished run yet)"]), []
    # Table 1
    lines += ["| Method | seeds | Opt. λ | Dice (↑) | Dice30 (↑) | % Folds (↓) | Sdlog\\|J\\| (↓) | ΔDice vs before | "
              "Dice per seed | stopped at step (reason) | training s per seed |", "|" + "---|" * 11]
    sel = {}
    for m in methods:
        runs = res.get(m)
        if not runs:
            continue
        ss = sorted(runs)
        i = _selected(runs)
        sel[m] = i
        stops = ", ".join(_stop_text(runs[s]["card"]) for s in ss)
        secs = ", ".join(f"{runs[s]['card']['seconds']:.0f}" for s in ss)
        if i is None:
            lines.append(f"| {LABELS.get(m, m)} | {len(ss)} | – | no λ with folds < {FOLD_BUDGET}% | | | | | | {stops} | {secs} |")
            continue
        d = _stack(runs, "dice", i, ss)
        per_seed = ", ".join(f"{runs[s]['dice'][i].mean():.3f}" for s in ss)
        lines.append(f"| {LABELS.get(m, m)} | {len(ss)} | {LAMBDAS_17[i]:g} | {d.mean():.3f} ± {d.std():.3f} | "
                     f"{dice30(d):.3f} | {_stack(runs, 'folds', i, ss).mean():.3f} | "
                     f"{_stack(runs, 'sdlogj', i, ss).mean():.3f} | {d.mean() - before:+.3f} | {per_seed} | {stops} | "
                     f"{secs} |")
    lines += [f"| (before registration) | | – | {before:.3f} | | | | | | | |",
              f"| (ground-truth warps) | | – | {ceiling:.3f} | | | | | | | |", ""]
    # paired statistics
    comps = [(x, y) for x in ("mcr", "cr") for y in BASELINES] + [("mcr", "cr")]
    comps = [(x, y) for x, y in comps if x in res and y in res and sel.get(x) is not None and sel.get(y) is not None]
    if comps:
        lines += [f"Paired differences over (test pair × seed) on the seeds both methods finished ({len(common)} seeds "
                  f"in common of {len(seeds)}); 95 % t-interval, paired t-test p, Wilcoxon signed-rank p. "
                  "Matched smoothness: the first method's Dice interpolated along its λ curve (per seed) to the second "
                  "method's mean std log|J| at its selected λ.", "",
                  "| comparison | n | at selected λ: ΔDice [95 % CI] | t p | Wilcoxon p | at matched std log\\|J\\|: "
                  "ΔDice [95 % CI] | t p | Wilcoxon p |", "|---|---|---|---|---|---|---|---|"]
        for x, y in comps:
            ss = sorted(set(res[x]) & set(res[y]))
            if not ss:
                continue
            a, b = _stack(res[x], "dice", sel[x], ss), _stack(res[y], "dice", sel[y], ss)
            at_sel = stats.paired_difference(a, b)
            target = _stack(res[y], "sdlogj", sel[y], ss).mean()
            matched, note = [], ""
            for s in ss:
                where = stats.crossing(LAMBDAS_17, res[x][s]["sdlogj"].mean(1), target)
                if where is None:
                    rng = res[x][s]["sdlogj"].mean(1)
                    note = f"out of range ({LABELS[x]} std log\\|J\\| {rng.min():.3f}–{rng.max():.3f}, target {target:.3f})"
                    break
                matched.append(stats.at_crossing(res[x][s]["dice"], where))
            cells = stats.paired_difference(np.concatenate(matched), b).cells() if not note else [note, "", ""]
            lines.append(f"| {LABELS[x]} − {LABELS[y]} | {a.size} | " + " | ".join(at_sel.cells() + cells) + " |")
        lines.append("")
    # the λ-conditioning at the end of training
    lines += ["The λ-conditioning at the end of training (`evaluation.lambda_use`): active units of the hypernetwork's "
              "first ReLU layer (of its width) at λ = 0 / 0.1 / 0.5 / 1, and the λ up to which the embedding — hence "
              "the registration — is the same as at λ = 0.", "",
              "| run | active units at λ = 0 / 0.1 / 0.5 / 1 | output constant for λ ≤ |", "|---|---|---|"]
    for m in methods:
        for s, r in sorted(res.get(m, {}).items()):
            c = r["card"].get("lambda_use")
            if c:
                act = " / ".join(str(c["active_first_layer"][k]) for k in ("0", "0.1", "0.5", "1"))
                lines.append(f"| {LABELS.get(m, m)} s{s} | {act} (of {c['units']}) | {c['flat_up_to']:g} |")
    lines.append("")
    # figures: curves (every seed) and Fig. 3 (seed means)
    figs = _figures(res, res_root, preset, before)
    return "\n".join(lines), figs


def _figures(res, res_root, preset, before):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (m, runs) in enumerate(res.items()):
        for s, r in sorted(runs.items()):
            for ax, key in zip(axes, ("monitor", "val")):
                if r[key]:
                    ax.plot(*r[key], color=colours[k % len(colours)], ls=("-", "--", ":")[s % 3], lw=1,
                            label=f"{LABELS.get(m, m)} s{s}")
    axes[0].set_title(f"monitor Dice (λ = {VAL_CURVE_LAMBDA:g}, {CONVERGE.monitor_pairs} training-subject pairs)",
                      fontsize=10)
    axes[1].set_title(f"validation Dice (λ = {VAL_CURVE_LAMBDA:g}, validation split) — Fig. 3 col. 4", fontsize=10)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    curves_png = os.path.join(os.path.dirname(res_root), f"converge_{preset}_curves.png")
    fig.savefig(curves_png, dpi=110)
    plt.close(fig)
    mean_rows = {}
    for m, runs in res.items():
        rows = []
        for i, lam in enumerate(LAMBDAS_17):
            rows.append({"lambda": lam, **{k: float(np.mean([r[k][i].mean() for r in runs.values()]))
                                           for k in ("dice", "folds", "sdlogj")}})
        mean_rows[LABELS.get(m, m)] = rows
    fig3_png = os.path.join(os.path.dirname(res_root), f"converge_{preset}_fig3.png")
    evaluation.plot_fig3(mean_rows, fig3_png, before=before)
    return [curves_png, fig3_png]


# ------------------------------------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-bench")
    p.add_argument("--methods", nargs="+", default=list(TABLE1_A))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ae-iters", type=int, default=15000, help="autoencoder iterations (as the shipped cpu-demo AEs)")
    p.add_argument("--max-steps", type=int, default=CONVERGE.max_steps,
                   help=f"step cap (default CONVERGE.max_steps = {CONVERGE.max_steps}; lower only for a quick check)")
    p.add_argument("--out", help="training run folders (default runs/converge_<preset>)")
    p.add_argument("--results", help="results folder (default bench/results/converge_<preset>)")
    p.add_argument("--resume", action="store_true", help="continue interrupted trainings from their checkpoints")
    p.add_argument("--report", action="store_true", help="only rewrite the report from finished results")
    p.add_argument("--hyp-activation", choices=HYP_ACTIVATIONS, help="ablation: the hypernetwork's activation "
                   "(runs, results and report get the suffix _hyp-<activation>)")
    a = p.parse_args()
    cfg = get_preset(a.preset)
    overrides = {"hyp_activation": a.hyp_activation} if a.hyp_activation else {}
    study = f"{a.preset}" + "".join(f"_hyp-{v}" for v in overrides.values())
    out = a.out or os.path.join(ROOT, "runs", f"converge_{study}")
    res_root = a.results or os.path.join(ROOT, "bench", "results", f"converge_{study}")
    os.makedirs(res_root, exist_ok=True)
    t0 = time.time()
    desc = experiment.resolve_data(cfg)
    # the autoencoders are the study's, shared by its ablations (each would otherwise train its own pair)
    ae_root = os.path.join(os.path.dirname(res_root), f"converge_{a.preset}")
    ae_pair = tuple(os.path.join(ae_root, f"ae_{m}.h5") for m in ("t1", "t2"))
    def done(m, s):
        card = os.path.join(res_root, f"{m}_s{s}", "card.json")
        return os.path.isfile(card) and finished(_read_json(card), a.max_steps)

    jobs = [(m, s) for s in a.seeds for m in sorted(a.methods, key=lambda m: not is_contrastive(m)) if not done(m, s)]
    if not a.report and jobs:
        ctx = mp.get_context("spawn")     # TF is not fork-safe
        with cf.ProcessPoolExecutor(max(1, a.workers), mp_context=ctx) as pool:
            need_ae = any(is_contrastive(m) for m, _ in jobs)
            todo = [(mod, path) for mod, path in zip(("t1", "t2"), ae_pair) if need_ae and not os.path.isfile(path)]
            for f in cf.as_completed([pool.submit(_train_autoencoder, a.preset, mod, path, a.ae_iters)
                                      for mod, path in todo]):
                _log(f"autoencoder written: {f.result()}")
            futures = {pool.submit(run_job, a.preset, m, s, os.path.join(out, f"{m}_s{s}"),
                                   os.path.join(res_root, f"{m}_s{s}"), ae_pair, a.resume, a.max_steps, overrides): (m, s)
                       for m, s in jobs}
            for f in cf.as_completed(futures):
                f.result()
    test = experiment.make_test_pairs(experiment.split_arrays(desc, "test", cfg), None, seed=cfg.seed)
    before = float(np.mean(evaluation.pair_dice_before(test)))
    ceiling = proxy_stats.dice_ceiling(desc, split="test", n_pairs=None)["mean"]
    _fill_lambda_use(res_root, out, a.methods, a.seeds)
    body, figs = report(res_root, a.methods, a.seeds, a.preset, before, ceiling)
    today = datetime.date.today().isoformat()
    r = CONVERGE
    head = [f"# Table 1 set A trained to a plateau — preset `{a.preset}` ({cfg.data_source}, "
            f"{len(desc.subjects)} subjects, {len(test['ab'])} test pairs), {today}, 2-core CPU", "",
            f"Command: `python bench/bench_converge.py {' '.join(sys.argv[1:])}`; this call {time.time() - t0:.0f} s.",
            "", f"Stopping rule (`config.CONVERGE`): every {r.check_every} steps from step {r.min_steps}, stop when the "
            f"mean monitor Dice over the last {r.window:.0%} of the steps exceeds that of the {r.window:.0%} before by "
            f"less than {r.min_gain}; cap {a.max_steps} steps. Monitor: Dice at λ = {VAL_CURVE_LAMBDA:g} on "
            f"{r.monitor_pairs} fixed pairs of training subjects; the plateau must hold at {r.patience} consecutive checks. "
            "† = stopped under an earlier rule (patience 1, cap 10000; its card records no rule). "
            "Learning rate, batch and network: the preset's" + ("" if not overrides else ", except "
            + ", ".join(f"{k} = {v}" for k, v in overrides.items()) + " (an ablation, not the paper)") + ". "
            f"Table 1: λ selected on the seed-mean curve (best Dice with mean % folds < {FOLD_BUDGET}); Dice ± std over "
            "(test pair × seed).", ""]
    text = "\n".join(head) + body + "\n\nFigures: " + ", ".join(f"`{os.path.basename(f)}`" for f in figs) + "\n"
    path = os.path.join(os.path.dirname(res_root), f"table1_converged_{study}.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
