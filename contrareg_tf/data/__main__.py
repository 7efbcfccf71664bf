"""``python -m contrareg_tf.data build --preset NAME --out DIR``: write the built-in data set of a preset to a
folder — NIfTI files per subject (t1, t2, labels, mask, warp, warp_inv), ``DIR/dataset.csv`` in the data-set
description format (subject,t1,t2,labels,mask,split; usable as ``--data DIR/dataset.csv``), ``proxy.json``
(parameters, label names and groups) and ``montage.png`` (a few subjects) — and print Dice before
registration and the true-warp ceiling on the test pairs."""
import argparse
import dataclasses
import os
import sys


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m contrareg_tf.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the built-in data set of a preset to a folder")
    b.add_argument("--preset", default="cpu-demo")
    b.add_argument("--out", required=True, help="output folder (new, or an earlier build)")
    b.add_argument("--data-source", help="icbm2009c (default: real T1w/T2w + CerebrA) or mni2009a-synth")
    b.add_argument("--subjects", type=int, help="number of subjects (default: the preset's)")
    b.add_argument("--montage", type=int, default=4, help="subjects shown in montage.png")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    import warnings

    from ..config import get_preset
    from .dataset import resolve as resolve_data
    from . import proxy

    cfg = get_preset(a.preset)
    if a.data_source:
        cfg = dataclasses.replace(cfg, data_source=a.data_source)
    if a.subjects is not None:
        cfg = dataclasses.replace(cfg, proxy_subjects=a.subjects)
    desc = resolve_data(cfg, None, out_dir=a.out)
    png = proxy.plot_montage(desc, os.path.join(a.out, "montage.png"), n=a.montage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        before = proxy.dice_before(desc, split="test", n_pairs=None)["mean"]
        ceil = proxy.dice_ceiling(desc, split="test", n_pairs=None)["mean"]
    n = {s: len(desc.split(s)) for s in ("train", "val", "test")}
    print(f"{len(desc.subjects)} subjects ({n['train']}/{n['val']}/{n['test']} train/val/test), "
          f"{cfg.data_source}, {'x'.join(map(str, cfg.inshape))} @ {cfg.spacing:g} mm -> {desc.source}")
    print(f"test pairs: mean Dice over structures before registration {before:.3f}, "
          f"with the true inverse warp {ceil:.3f}; montage {png}")
    return 0


if __name__ == "__main__":
    from ..cli import run_cli

    run_cli(main, sys.argv[1:])
