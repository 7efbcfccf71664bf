"""Train MASR-Net (the DNS descriptor network, DNS paper §3.3) by anatomy-aware contrastive learning on
single images (T1w and T2w alike): Bézier intensity augmentation + inversion, InfoNCE between the
descriptors of an image and its augmented copy at N sampled foreground locations.

Writes ``--out`` (.h5 weights with the build config inside) and a JSON model card next to it
(``<out>.json``: data, preset, iterations, losses, time, command).

The shipped weights (models/DNS_MODEL_CARD.md) were made with
    python train_scripts/train_dns.py --preset cpu-demo --iters 5000 --max-minutes 8 --no-progress \
        --out models/dns_proxy2d.h5
    python train_scripts/train_dns.py --preset small3d --crop 32 32 32 --iters 5000 --max-minutes 10 \
        --no-progress --out models/dns_proxy3d.h5
"""
import argparse
import shlex
import sys

from contrareg_tf.cli import console, nonnegative_int, positive_float, positive_int
from contrareg_tf.compat import deterministic_ops
from contrareg_tf.config import PRESETS, get_preset
from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.data import dataset
from contrareg_tf.data.io import load_nifti
from contrareg_tf.data.sources import resolve
from contrareg_tf.networks import masr
from contrareg_tf.training import train_masr


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's example commands as written, and each option's default."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("--data", default=None,
                   help="data-set CSV or folder (subject/{t1,t2,labels[,mask]}.nii.gz); default: built-in proxy "
                        "of the preset")
    p.add_argument("--preset", default="small3d", choices=sorted(PRESETS),
                   help="proxy shape/spacing/subjects (and default --iters)")
    p.add_argument("--iters", type=positive_int, default=None, help="training steps (default: the preset's iters)")
    p.add_argument("--lr", type=positive_float, default=masr.DNS_LR, help="Adam learning rate")
    p.add_argument("--num-samples", type=positive_int, default=masr.DNS_NUM_SAMPLES,
                   help="sampled foreground locations per step (N^k)")
    p.add_argument("--tau", type=positive_float, default=masr.DNS_TAU, help="InfoNCE temperature")
    p.add_argument("--crop", type=positive_int, nargs="+", default=None,
                   help="train on random crops of this size (multiples of 8); default: whole images")
    p.add_argument("--widths", type=positive_int, nargs=4, default=list(masr.DNS_WIDTHS), help="encoder widths")
    p.add_argument("--feat-channels", type=positive_int, default=masr.DNS_FEAT_CHANNELS, help="C_h")
    p.add_argument("--dilation", type=positive_int, default=masr.DNS_DILATION, help="radius of the dilated layout")
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop early after this much training time (the card records the steps done)")
    p.add_argument("--split", default="train", choices=("train", "val", "test", "all"), help="subjects to train on (train/val/test/all)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--out", required=True, help="output weights (.h5); the card goes to <out>.json")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in <out>_work/ (written every 100 steps)")
    return p.parse_args(argv)


def training_spacing_mm(cfg, desc, data):
    """Voxel size (mm per axis) of the training images: the preset's for the built-in data, else the first
    subject's T1w header."""
    if data is None:
        return [float(cfg.spacing)] * len(cfg.inshape)
    return [float(v) for v in load_nifti(desc.subjects[0].t1).spacing]


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = get_preset(args.preset)
    except ValueError as e:
        raise ContraRegInputError(f"--preset: {e}") from None
    if not args.out.endswith(".h5"):
        raise ContraRegInputError(f"--out {args.out}: must end in .h5")
    checks = (("--iters", args.iters, args.iters is None or args.iters >= 1),
              ("--lr", args.lr, args.lr > 0),
              ("--num-samples", args.num_samples, args.num_samples >= 2),
              ("--tau", args.tau, args.tau > 0),
              ("--max-minutes", args.max_minutes, args.max_minutes is None or args.max_minutes > 0))
    for flag, v, ok in checks:
        if not ok:
            raise ContraRegInputError(f"{flag}: invalid value {v}")
    deterministic_ops(args.seed)  # GPU: identical re-runs (CPU kernels already are; compat.py)
    iters = args.iters if args.iters is not None else cfg.iters
    desc = resolve(cfg, args.data)
    images, masks, info = dataset.load_images(desc, split=args.split,
                                              ndim=len(cfg.inshape) if args.data is None else None)
    if args.data is None:
        info["data"] = (f"built-in data {cfg.data_source} ({len(cfg.inshape)}-D {'x'.join(map(str, cfg.inshape))} "
                        f"@ {cfg.spacing:g} mm, {cfg.proxy_subjects} subjects, seed {cfg.seed}) at {desc.source}")
    # the resolution the weights apply at: instance optimisation warns more than DNSConfig.spacing_factor away
    info["spacing_mm"] = training_spacing_mm(cfg, desc, args.data)
    cmd = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + list(sys.argv[1:] if argv is None
                                                                             else argv)))
    card = dict(info, preset=cfg.name, command=cmd,
                augmentation=f"Bezier intensity curve ({masr.DNS_BEZIER_POINTS} random monotone control "
                             f"points), inversion p={masr.DNS_INVERT_PROB}")
    build = dict(widths=args.widths, feat_channels=args.feat_channels, dilation=args.dilation)
    _, hist = train_masr(images, masks, iters=iters, lr=args.lr, num_samples=args.num_samples,
                              tau=args.tau, seed=args.seed, crop=args.crop, build_kwargs=build,
                              progress=not args.no_progress, out=args.out, card=card,
                              max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                              resume=args.resume)
    print(f"wrote {args.out} and {args.out[:-3]}.json: {len(hist)} iterations, loss {hist[0]:.4f} -> {hist[-1]:.4f}")
    return 0


cli = console(main)


if __name__ == "__main__":
    cli()
