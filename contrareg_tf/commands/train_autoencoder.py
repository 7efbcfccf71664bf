"""Pretrain one modality's autoencoder (ContraReg paper §3): L1 + local NCC (window 7), random crops,
flips and brightness/contrast/saturation jitter, Adam. Writes ``--out`` (.h5) and a JSON model card beside it.

    python train_scripts/train_autoencoder.py --modality t1 --preset cpu-demo --out models/ae_t1.h5
    python train_scripts/train_autoencoder.py --sup-pretrain --preset cpu-demo --out models/sup   # A1,A2,F1,F2
    # paper topology on the built-in 3-D data at 2 mm (the shipped models/ae_t1_paper.h5 was made so):
    python train_scripts/train_autoencoder.py --modality t1 --preset paper --grid 96,112,96 --spacing 2 \
        --crop 64,64,64 --out models/ae_t1_paper.h5
"""
import argparse
import dataclasses
import sys

from contrareg_tf import experiment
from contrareg_tf.cli import console, nonnegative_int, positive_float, positive_int, positive_ints
from contrareg_tf.compat import deterministic_ops
from contrareg_tf.config import get_preset
from contrareg_tf.data.grid import grid_config
from contrareg_tf.errors import ContraRegInputError



def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", choices=("t1", "t2"), help="which autoencoder (A1 = t1, A2 = t2)")
    p.add_argument("--sup-pretrain", action="store_true",
                   help="SupPretrain: A1, A2, F1, F2 on aligned same-subject pairs, λsp·d12 + reconstruction")
    p.add_argument("--out", required=True, help=".h5 path (or a folder with --sup-pretrain)")
    p.add_argument("--preset", default="paper")
    p.add_argument("--data", default=None, help="data-set description (CSV or folder); default: built-in proxy")
    p.add_argument("--data-source", help="built-in data: icbm2009c (default) or mni2009a-synth")
    p.add_argument("--grid", type=positive_ints, help="grid, e.g. 96,112,96 (default: the preset's): of the built-in data, or with --data the "
                   "model grid its scans are centre-cropped / padded (or with --spacing resampled) to")
    p.add_argument("--spacing", type=positive_float, help="voxel size in mm: of the built-in data (default: the preset's), or with --data the "
                   "physical-space resampling of its scans, centred on each brain (default: keep the files' voxels)")
    p.add_argument("--crop", type=positive_ints, help="training crop, e.g. 64,64,64 (default: the preset's ae_crop)")
    p.add_argument("--subjects", type=positive_int, help="built-in data subjects (default: the preset's)")
    p.add_argument("--iters", type=positive_int)
    p.add_argument("--lr", type=positive_float, default=None,
                   help="Adam learning rate (default: the preset's ae_lr, 1e-4; not in the paper)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--seed", type=nonnegative_int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if not a.sup_pretrain and not a.modality:
        p.error("--modality is required unless --sup-pretrain")
    return a


def main(argv=None):
    args = parse(argv)
    cfg = get_preset(args.preset)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    spacing = None
    if args.data is not None:       # a user's scans: the grid and voxel size they are brought to (data/grid.py)
        if args.subjects is not None or args.data_source is not None:
            raise ContraRegInputError("--subjects / --data-source describe the built-in data, not --data")
        cfg, spacing = grid_config(cfg, argparse.Namespace(data=args.data, inshape=args.grid, spacing=args.spacing))
        over = dict(ae_crop=args.crop)
    else:
        over = dict(data_source=args.data_source, inshape=args.grid, spacing=args.spacing, ae_crop=args.crop,
                    proxy_subjects=args.subjects)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    deterministic_ops(cfg.seed)  # GPU: identical re-runs (CPU kernels already are; compat.py)
    kw = dict(data=args.data, iters=args.iters, lr=args.lr, batch_size=args.batch_size, resume=args.resume,
              progress=not args.no_progress, command=" ".join(sys.argv), spacing=spacing)
    if args.sup_pretrain:
        experiment.sup_pretrain(cfg, args.out, **kw)
    else:
        experiment.pretrain_autoencoder(cfg, args.modality, args.out, **kw)
    print(f"done: {args.out}")
    return 0


cli = console(main)


if __name__ == "__main__":
    cli()
