"""``python -m contrareg_tf.data build --preset NAME --out DIR``: write the built-in data set of a preset to a
folder — NIfTI files per subject (t1, t2, labels, mask, warp, warp_inv), ``DIR/dataset.csv`` in the data-set
description format (subject,t1,t2,labels,mask,split; usable as ``--data DIR/dataset.csv``), ``proxy.json``
(parameters, label names and groups) and ``montage.png`` (a few subjects) — and print Dice before
registration and the true-warp ceiling on the test pairs (on all pairs when the test split has fewer than
two subjects). Every argument is checked before anything is written."""
import argparse
import dataclasses
import os
import sys
import warnings

from ..cli import run_cli
from ..config import MONTAGE_SUBJECTS, get_preset
from ..errors import ContraRegInputError
from .dataset import split_counts
from .proxy_stats import dice_before, dice_ceiling, plot_montage
from .sources import resolve


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m contrareg_tf.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the built-in data set of a preset to a folder")
    b.add_argument("--preset", default="cpu-demo")
    b.add_argument("--out", required=True, help="output folder (new, or an earlier build)")
    b.add_argument("--data-source", help="icbm2009c (default: real T1w/T2w + CerebrA) or mni2009a-synth")
    b.add_argument("--subjects", type=int, help="number of subjects (default: the preset's)")
    b.add_argument("--montage", type=int, default=MONTAGE_SUBJECTS, help="subjects shown in montage.png")
    return p.parse_args(argv)


def build_config(a):
    """The preset with ``--data-source`` / ``--subjects`` applied, refused before anything is written when
    the data set could not be built or summarised (fewer than 2 subjects: no inter-subject pair)."""
    cfg = get_preset(a.preset)
    if a.data_source:
        cfg = dataclasses.replace(cfg, data_source=a.data_source)
    if a.subjects is not None:
        cfg = dataclasses.replace(cfg, proxy_subjects=a.subjects)
    if cfg.proxy_subjects < 2:
        raise ContraRegInputError(f"--subjects {cfg.proxy_subjects}: need at least 2 subjects (inter-subject pairs)")
    if a.montage < 1:
        raise ContraRegInputError(f"--montage {a.montage}: must be >= 1")
    return cfg


def main(argv=None):
    a = parse(argv)
    cfg = build_config(a)
    n_test = split_counts(cfg.proxy_subjects)[2]
    split = "test" if n_test >= 2 else "all"
    desc = resolve(cfg, None, out_dir=a.out)
    png = plot_montage(desc, os.path.join(a.out, "montage.png"), n=a.montage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        before = dice_before(desc, split=split, n_pairs=None)["mean"]
        ceil = dice_ceiling(desc, split=split, n_pairs=None)["mean"]
    n = {s: len(desc.split(s)) for s in ("train", "val", "test")}
    print(f"{len(desc.subjects)} subjects ({n['train']}/{n['val']}/{n['test']} train/val/test), "
          f"{cfg.data_source}, {'x'.join(map(str, cfg.inshape))} @ {cfg.spacing:g} mm -> {desc.source}")
    where = "test pairs" if split == "test" else f"all pairs (the test split has {n['test']} subject)"
    print(f"{where}: mean Dice over structures before registration {before:.3f}, "
          f"with the true inverse warp {ceil:.3f}; montage {png}")
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
