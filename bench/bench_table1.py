#!/usr/bin/env python
"""The longer CPU run of Table 1 (not in CI): the main job at a benchmark preset, written up as a results file
with the command, the proxy's Dice floor (before registration) and ceiling (ground-truth warps), seconds of
training per method and the paper's ordering checks.

    python bench/bench_table1.py                                   # preset cpu-bench, ~35 min on 2 cores
    python bench/bench_table1.py --preset cpu-demo --iters 300     # quicker
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


def _ordering(rows):
    """The paper's qualitative claims (Table 1 A / Fig. 3) checked on this run's Table 1 rows (a method
    without an admissible λ has NaN entries, so every comparison with it is False)."""
    from contrareg_tf.config import FOLD_BUDGET

    d = {r["method"]: r for r in rows}
    nan = {"dice": float("nan"), "folds": float("nan")}
    dice = {m: d.get(m, nan)["dice"] for m in ("mcr", "cr", "mi", "lmi", "mind")}
    return [("mCR ≥ CR", dice["mcr"] >= dice["cr"]), ("CR > MI", dice["cr"] > dice["mi"]),
            ("mCR > MI", dice["mcr"] > dice["mi"]),
            ("local MI > MIND", dice["lmi"] > dice["mind"]), (f"NGF folds < {FOLD_BUDGET} %", d.get("ngf", nan)["folds"] < FOLD_BUDGET)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-bench")
    p.add_argument("--iters", type=int, help="registration iterations per method (default: the preset's)")
    p.add_argument("--ae-iters", type=int, default=15000, help="autoencoder iterations (as the shipped cpu-demo AEs)")
    p.add_argument("--out", default=None, help="run folder (default runs/bench_<preset>)")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    a = p.parse_args()

    from contrareg_tf import evaluation, experiment
    from contrareg_tf.config import TABLE1_A, get_preset
    from contrareg_tf.data import proxy

    cfg = get_preset(a.preset)
    out = a.out or os.path.join("runs", f"bench_{a.preset}")
    t0 = time.time()
    md = experiment.reproduce_table1(cfg, out, iters=a.iters, ae_iters=a.ae_iters, progress=False)
    total = time.time() - t0
    rows = evaluation.read_csv(os.path.join(out, "table1.csv"))
    desc = experiment.resolve_data(cfg)
    ceiling = proxy.dice_ceiling(desc, split="test", n_pairs=None)["mean"]
    secs = {}
    for m in TABLE1_A:
        card = os.path.join(out, m, "card.json")
        if os.path.isfile(card):
            with open(card) as f:
                c = json.load(f)
            secs[m] = (c["seconds"], c["sec_per_step"], c["steps_run"])
    today = datetime.date.today().isoformat()
    cmd = "python bench/bench_table1.py " + " ".join(sys.argv[1:])
    lines = [f"# Table 1 on the built-in data ({cfg.data_source}), preset `{a.preset}` ({today}, 2-core CPU)", "",
             f"Command: `{cmd.strip()}` — {total:.0f} s in all.", "", md.strip(), "",
             f"Dice ceiling (ground-truth warps, same test pairs, nearest neighbour): {ceiling:.3f}", "",
             "| method | training s | s/step | steps |", "|---|---|---|---|"]
    lines += [f"| {m} | {s:.0f} | {sp:.3f} | {n} |" for m, (s, sp, n) in secs.items()]
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
