"""The main job: reproduce Table 1 / Fig. 3 end to end on the built-in proxy data (or a real data set).

    python eval_scripts/reproduce_table1.py --preset cpu-demo      # ~12 min on 2 idle CPU cores
    python eval_scripts/reproduce_table1.py --preset paper --data dhcp.csv   # the paper's setting (GPU)
    python eval_scripts/reproduce_table1.py --preset cpu-demo --rows A,B,C,D,extra   # every row of Table 1

``--rows`` runs the paper's Table 1 by set (A, B, C, D; ``extra`` = CoRe, ACCR, ACCR without attention) or by
row (A5 = CR, B1 = SM-brains, ...), labelled as in the paper with the paper's own Opt. λ / Dice / Dice30 /
% folds / Sdlog|J| beside each row (Dey et al., MICCAI 2022, Table 1). Sets B and D run at the preset's wide
companion (``config.wide_preset``: paper-ch256 for the paper; U-Net × WIDE_FACTOR (2) and 32 integration steps
on the CPU presets); the SupPretrain rows start from one SupPretrain run (autoencoders and heads,
``<out>/suppretrain``).

Builds the proxy data, pretrains (or loads) the two autoencoders, trains the λ-conditioned network for each
method, evaluates the 17 λ values, prints Table 1 and writes table1.md/csv, fig3.png and fig2.png.
"""
import argparse
import dataclasses

from contrareg_tf import experiment
from contrareg_tf.cli import add_grid_options, console, positive_int
from contrareg_tf.compat import deterministic_ops
from contrareg_tf.config import TABLE1_A, get_preset
from contrareg_tf.data.grid import grid_config
from contrareg_tf.errors import ContraRegInputError




def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-demo")
    p.add_argument("--out", default="runs/table1")
    p.add_argument("--data", default=None, help="data-set description; default: built-in data")
    add_grid_options(p)
    p.add_argument("--data-source", help="built-in data: icbm2009c (default; real T1w/T2w + CerebrA) or "
                   "mni2009a-synth (T2w rendered from tissue maps)")
    p.add_argument("--methods", nargs="+", default=None, help=f"losses, one plain row each (default: "
                   f"{' '.join(TABLE1_A)})")
    p.add_argument("--rows", help="Table-1 sets or rows, comma-separated: A,B,C,D,extra or e.g. A5,B1 "
                   "(paper labels and the paper's values beside each row)")
    p.add_argument("--iters", type=positive_int, help="registration iterations per method (default: the preset's)")
    p.add_argument("--ae-iters", type=positive_int, help="autoencoder iterations if they must be trained")
    p.add_argument("--ae1", help="T1w autoencoder .h5 (default: shipped models/ for the preset, else trained)")
    p.add_argument("--ae2", help="T2w autoencoder .h5")
    p.add_argument("--pairs", type=positive_int, default=None, help="number of test pairs")
    p.add_argument("--resume", action="store_true", help="continue runs that have checkpoints")
    p.add_argument("--workers", type=positive_int, help="methods trained at once in separate processes (default: 2 on a "
                   "multi-core CPU, 1 with a GPU)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    if a.rows is not None and a.methods is not None:
        raise ContraRegInputError("give --rows or --methods, not both")
    rows = None if a.rows is None else [r for r in a.rows.replace(" ", ",").split(",") if r]
    cfg = get_preset(a.preset)
    if a.data_source:
        cfg = dataclasses.replace(cfg, data_source=a.data_source)
    cfg, spacing = grid_config(cfg, a)
    deterministic_ops(cfg.seed)  # GPU: identical re-runs (CPU kernels already are; compat.py)
    table_md = experiment.reproduce_table1(cfg, a.out, methods=a.methods or list(TABLE1_A), rows=rows, data=a.data,
                                           iters=a.iters, ae_iters=a.ae_iters, ae1=a.ae1, ae2=a.ae2,
                                           n_pairs=a.pairs, resume=a.resume, progress=not a.no_progress,
                                           workers=a.workers, spacing=spacing)
    print(table_md)
    return 0


cli = console(main)


if __name__ == "__main__":
    cli()
