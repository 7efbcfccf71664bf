"""Evaluate trained λ-conditioned models over the paper's 17 λ values; write one CSV per method, Table 1
(Markdown + CSV), Fig. 3-style curves and Fig. 2-style example slices.

    python eval_scripts/eval_hyper.py --runs runs/mcr runs/cr runs/mi --out results/
"""
import argparse

from contrareg_tf import experiment
from contrareg_tf.cli import add_grid_options, console, percent, positive_int
from contrareg_tf.compat import deterministic_ops
from contrareg_tf.config import FOLD_BUDGET
from contrareg_tf.data.grid import check_needs_data



def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="train_hyper.py output folders (one per method)")
    p.add_argument("--out", required=True, help="folder for CSVs, table1.md/csv, fig3.png, fig2.png")
    p.add_argument("--data", default=None, help="data-set description; default: the built-in proxy of the runs")
    add_grid_options(p, inshape=False)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--pairs", type=positive_int, default=None, help="number of test pairs (default: all ordered pairs)")
    p.add_argument("--max-folds", type=percent, default=FOLD_BUDGET, help="Table 1 folding budget, %% of voxels")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    check_needs_data(a)            # the grid is each run's; --spacing resamples --data
    deterministic_ops(0)  # GPU: identical re-runs (CPU kernels already are; compat.py)
    table_md = experiment.evaluate_runs(a.runs, a.out, data=a.data, split=a.split, n_pairs=a.pairs,
                                        budget=a.max_folds, progress=not a.no_progress,
                                        spacing=a.spacing)
    print(table_md)
    return 0


cli = console(main)


if __name__ == "__main__":
    cli()
