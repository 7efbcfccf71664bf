#!/usr/bin/env python
"""The longer CPU run of Table 1 (not in CI): the main job at a benchmark preset, written up as a results file
with the command, the proxy's Dice floor (before registration) and ceiling (ground-truth warps), seconds of
training per method and the paper's ordering checks.

    python bench/bench_table1.py                                   # preset cpu-bench, ~35 min on 2 cores
    python bench/bench_table1.py --preset cpu-demo --iters 300     # quicker
    python bench/bench_table1.py --preset cpu-demo --rows A,B,C,D,extra   # every row, the paper's values beside

Per run: training seconds, s/step and the training process's peak resident memory (``card.json``).
"""
import argparse
import datetime
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from contrareg_tf import evaluation, experiment  # noqa: E402
from contrareg_tf.config import FOLD_BUDGET, get_preset  # noqa: E402
from contrareg_tf.data import proxy_stats  # noqa: E402


def _ordering(rows):
    """The paper's qualitative claims (Table 1 / Fig. 3) checked on this run's Table 1 rows; a claim whose rows
    were not run is left out, and a method without an admissible λ has NaN entries (every comparison False).
    Rows are named as ``reproduce_table1`` names them: "A mCR" with ``--rows``, "mcr" with ``--methods``."""
    d = {r["method"]: r for r in rows}
    plain = {"A mCR": "mcr", "A CR": "cr", "A MI": "mi", "A LocalMI": "lmi", "A MIND": "mind", "A NGF": "ngf"}

    def get(name, key="dice"):
        r = d.get(name) or d.get(plain.get(name, ""))
        return None if r is None else r[key]

    claims = [("mCR ≥ CR", ("A mCR", "A CR"), lambda a, b: a >= b),
              ("CR > MI", ("A CR", "A MI"), lambda a, b: a > b),
              ("mCR > MI", ("A mCR", "A MI"), lambda a, b: a > b),
              ("local MI > MIND", ("A LocalMI", "A MIND"), lambda a, b: a > b),
              ("B: CR > SM-brains (Dice)", ("B CR", "B SM-brains"), lambda a, b: a > b),
              ("B: mCR > SM-brains (Dice)", ("B mCR", "B SM-brains"), lambda a, b: a > b),
              ("B: CR > MI at width ×4", ("B CR", "B MI"), lambda a, b: a > b),
              ("C: CR+MI < CR", ("C CR+MI", "A CR"), lambda a, b: a < b),
              ("C: CR+ExtNegs < CR", ("C CR+ExtNegs", "A CR"), lambda a, b: a < b),
              ("C: CR+MI+ExtNegs < CR", ("C CR+MI+ExtNegs", "A CR"), lambda a, b: a < b),
              ("C: CR+SupPretrain ≈ CR (|Δ| < 0.01)", ("C CR+SupPretrain", "A CR"), lambda a, b: abs(a - b) < 0.01),
              ("C: mCR+SupPretrain ≈ mCR (|Δ| < 0.01)", ("C mCR+SupPretrain", "A mCR"),
               lambda a, b: abs(a - b) < 0.01),
              ("C: mCR+RandAE slightly below mCR (0 < Δ < 0.02)", ("A mCR", "C mCR+RandAE"),
               lambda a, b: 0 < a - b < 0.02),
              ("D: integration steps marginal (Dice range < 0.01)",
               ("D CR (10 int. steps)", "D CR (16 int. steps)", "D CR (32 int. steps)"),
               lambda *x: max(x) - min(x) < 0.01)]
    out = []
    for text, names, test in claims:
        vals = [get(n) for n in names]
        if all(v is not None for v in vals):
            out.append((text, bool(test(*vals))))
    sdlog = [get(n, "sdlogj") for n in ("B SM-brains", "B CR", "B mCR")]
    if all(v is not None for v in sdlog):
        out.append(("B: SM-brains smoother than CR and mCR (Sdlog|J|)", sdlog[0] < min(sdlog[1:])))
    folds = get("A NGF", "folds")
    if folds is not None:
        out.append((f"NGF folds < {FOLD_BUDGET} %", folds < FOLD_BUDGET))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-bench")
    p.add_argument("--iters", type=int, help="registration iterations per method (default: the preset's)")
    p.add_argument("--ae-iters", type=int, default=15000, help="autoencoder iterations (as the shipped cpu-demo AEs)")
    p.add_argument("--out", default=None, help="run folder (default runs/bench_<preset>)")
    p.add_argument("--rows", help="Table-1 sets/rows (reproduce_table1.py --rows); default: set A as --methods")
    p.add_argument("--workers", type=int, help="methods trained at once (default: reproduce_table1's)")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    a = p.parse_args()
    cfg = get_preset(a.preset)
    out = a.out or os.path.join("runs", f"bench_{a.preset}")
    t0 = time.time()
    rows_arg = a.rows.split(",") if a.rows else None
    md = experiment.reproduce_table1(cfg, out, iters=a.iters, ae_iters=a.ae_iters, progress=False, rows=rows_arg,
                                     workers=a.workers)
    total = time.time() - t0
    rows = evaluation.read_csv(os.path.join(out, "table1.csv"))
    desc = experiment.resolve_data(cfg)
    ceiling = proxy_stats.dice_ceiling(desc, split="test", n_pairs=None)["mean"]
    secs = {}
    table_rows, _ = experiment.select_rows(rows_arg)
    for r in table_rows:
        name = experiment.row_run_name(cfg, r)
        card = os.path.join(out, name, "card.json")
        if os.path.isfile(card) and name not in secs:
            with open(card) as f:
                c = json.load(f)
            secs[name] = (c["seconds"], c["sec_per_step"], c["steps_run"], c.get("peak_rss_mb", float("nan")))
    today = datetime.date.today().isoformat()
    cmd = "python bench/bench_table1.py " + " ".join(sys.argv[1:])
    lines = [f"# Table 1 on the built-in data ({cfg.data_source}), preset `{a.preset}` ({today}, 2-core CPU)", "",
             f"Command: `{cmd.strip()}` — {total:.0f} s in all.", "", md.strip(), "",
             f"Dice ceiling (ground-truth warps, same test pairs, nearest neighbour): {ceiling:.3f}", "",
             "| run | training s | s/step | steps | peak RSS of its process (MB) |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {s:.0f} | {sp:.3f} | {n} | {mb:.0f} |" for m, (s, sp, n, mb) in secs.items()]
    lines += ["", f"Methods trained {experiment.default_workers(len(secs))} at a time (contrastive ones first): "
              "training s and s/step are wall times while sharing the cores with the other worker."]
    lines += ["", "The paper's ordering on this run:", ""]
    lines += [f"- {name}: {'holds' if ok else 'does not hold'}" for name, ok in _ordering(rows)]
    lines += ["", f"Per-λ curves: `{a.preset}_fig3.png` (and per structure group `{a.preset}_fig3_groups.png`) "
              f"beside this file; per-method 17-λ CSVs (with per-structure Dice) in `{out}/`.", ""]
    os.makedirs(a.results, exist_ok=True)
    path = os.path.join(a.results, f"table1_{a.preset}_{today}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    for fig in ("fig3", "fig3_groups"):
        if os.path.isfile(os.path.join(out, f"{fig}.png")):
            shutil.copyfile(os.path.join(out, f"{fig}.png"), os.path.join(a.results, f"{a.preset}_{fig}.png"))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
