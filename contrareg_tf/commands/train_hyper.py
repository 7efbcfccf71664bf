"""Train the λ-conditioned registration network (ContraReg paper §2–3).

    python train_scripts/train_hyper.py --loss mcr --ae1 models/ae_t1_cpu-demo.h5 --ae2 models/ae_t2_cpu-demo.h5 \
        --preset cpu-demo --out runs/mcr

``--loss sm-brains`` / ``sm-shapes`` train the SynthMorph baselines of Table 1 instead (Hoffmann et al., TMI
2022; voxelmorph 0.2's recipe: images synthesized from label maps, Dice of the warped maps + Grad('l2')); the run
folder loads like the others (λ is ignored).

Defaults are the paper's (``--preset paper``: 3-D 160×192×160, ch=64, ts=5, lr 5e-5, 1e5 iterations); data
default to the built-in data (real ICBM 2009c contrasts, ``contrareg_tf.data.proxy``) at the preset's grid.
Without ``--ae1/--ae2`` a contrastive loss uses the autoencoders shipped for the preset
(``models/ae_{t1,t2}_<preset>.h5``). ``--resume`` continues exactly from the last checkpoint.
``--out`` is locked while the run lasts (``OUT/train.lock``: holder's PID and host); a second run into the
same folder exits 2 naming the holder, and a stale lock (dead PID on this host) is taken over with a warning.

``--strategy multiworker``: ``tf.distribute.MultiWorkerMirroredStrategy``, cluster and task from ``TF_CONFIG``;
start the same command once per task (same ``--out``, a folder every worker can read). ``--batch-size`` is the
global batch, split over the workers; the chief (task ``chief``, or ``worker`` 0) alone writes ``--out``, and
``--resume`` restarts every worker from the chief's checkpoint. Two workers on one machine:

    TF_CONFIG='{"cluster":{"worker":["127.0.0.1:12345","127.0.0.1:12346"]},"task":{"type":"worker","index":0}}' \
        python train_scripts/train_hyper.py --loss mi --preset tiny2d --strategy multiworker --out runs/mw &
    TF_CONFIG='{"cluster":{"worker":["127.0.0.1:12345","127.0.0.1:12346"]},"task":{"type":"worker","index":1}}' \
        python train_scripts/train_hyper.py --loss mi --preset tiny2d --strategy multiworker --out runs/mw
"""
import argparse
import dataclasses
import sys

from contrareg_tf import experiment
from contrareg_tf.cli import add_grid_options, console, int_steps, nonnegative_int, positive_float, positive_int
from contrareg_tf.compat import deterministic_ops
from contrareg_tf.config import HYP_ACTIVATIONS, SYNTHMORPH_METHODS, get_preset
from contrareg_tf.data.grid import grid_config
from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.lock import out_dir_lock
from contrareg_tf.losses.similarity import LOSS_NAMES
from contrareg_tf.training.loop import get_strategy



def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", required=True, choices=LOSS_NAMES + SYNTHMORPH_METHODS, metavar="LOSS",
                   help=f"similarity of the λ-conditioned network ({', '.join(LOSS_NAMES)}), or a SynthMorph "
                   "baseline (one network, no λ; Dice on synthetic images): sm-brains (images synthesized from "
                   "the training subjects' label maps), sm-shapes (from random Perlin-noise shapes)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, TensorBoard, model.h5, card.json)")
    p.add_argument("--preset", default="paper", help="named configuration (contrareg_tf.config.PRESETS)")
    p.add_argument("--data", default=None, help="data-set description (CSV or folder); default: built-in proxy")
    add_grid_options(p)
    p.add_argument("--ae1", help="T1w autoencoder .h5 (contrastive losses)")
    p.add_argument("--ae2", help="T2w autoencoder .h5 (contrastive losses)")
    p.add_argument("--rand-ae", action="store_true", help="random frozen autoencoders (RandAE)")
    p.add_argument("--heads", help="folder with pretrained heads1.h5/heads2.h5 to start from (SupPretrain: "
                   "train_autoencoder.py --sup-pretrain's output, with its ae_t1.h5/ae_t2.h5 as --ae1/--ae2)")
    p.add_argument("--dns-model", help="MASR-Net .h5 for --loss dns")
    p.add_argument("--ch", type=positive_int, help="U-Net width (paper: 64; 256 for the large runs)")
    p.add_argument("--int-steps", type=int_steps, help="scaling-and-squaring steps ts (paper: 5)")
    p.add_argument("--iters", type=positive_int, help="iterations (paper: 1e5)")
    p.add_argument("--lr", type=positive_float, help="Adam learning rate (paper: 5e-5)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--num-patches", type=positive_int, help="PatchNCE ns (paper: 1024)")
    p.add_argument("--ckpt-every", type=positive_int)
    p.add_argument("--seed", type=nonnegative_int)
    p.add_argument("--conditioning", default="film", choices=("film", "hyperconv"))
    p.add_argument("--hyp-activation", choices=HYP_ACTIVATIONS, help="hypernetwork activation (paper: relu; "
                   "leaky_relu keeps units alive at small λ, an ablation)")
    p.add_argument("--reg-penalty", choices=("l2", "norm"), help="L_reg on v: 'l2' = Grad('l2') (default), "
                   "'norm' = mean v²")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(refused when a setting other than --iters / --ckpt-every differs from the run's)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (without it, a "
                   "folder holding a run is refused)")
    p.add_argument("--strategy", default="default", choices=("default", "mirrored", "multiworker"))
    p.add_argument("--mixed-precision", action="store_true", help="memory switch: the U-Net in float16 "
                   "(integration, warps, autoencoders, heads and losses float32; dynamic loss scaling; GPU)")
    p.add_argument("--xla", action="store_true", help="XLA-compile the training step (GPU)")
    p.add_argument("--remat", action="store_true", help="memory switch: recompute the full-resolution U-Net "
                   "blocks in the backward pass (same gradients, less memory, slower; README's memory table)")
    p.add_argument("--no-val-curve", action="store_true", help="skip the validation Dice logged at every "
                   "checkpoint (val_curve.csv, Fig. 3 col. 4)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.resume and args.overwrite:
        raise ContraRegInputError("--resume and --overwrite exclude each other")
    cfg = get_preset(args.preset)
    over = {k: v for k, v in dict(ch=args.ch, int_steps=args.int_steps, num_patches=args.num_patches,
                                  ckpt_every=args.ckpt_every, seed=args.seed,
                                  hyp_activation=args.hyp_activation).items() if v is not None}
    cfg, spacing = grid_config(dataclasses.replace(cfg, **over), args)
    command = " ".join(sys.argv)
    if args.strategy == "multiworker":
        # TF configures the collectives at program start-up, and the task names this worker's lock
        get_strategy("multiworker")
    deterministic_ops(cfg.seed)  # GPU: identical re-runs (CPU kernels already are; compat.py)
    with out_dir_lock(args.out, command):  # before the data are built: a second run stops at once
        _train(args, cfg, spacing, command)
    print(f"done: {args.out}")
    return 0


def _train(args, cfg, spacing, command):
    if args.remat and args.loss in SYNTHMORPH_METHODS:
        raise ContraRegInputError(f"{args.loss}: --remat applies to the λ-conditioned network only")
    extra = {"remat": True} if args.remat else {}   # only when set: the SynthMorph trainer has no such option

    experiment.train_method(cfg, args.loss, args.out, data=args.data, spacing=spacing, ae1=args.ae1, ae2=args.ae2,
                            rand_ae=args.rand_ae, heads=args.heads, val_curve=not args.no_val_curve,
                            dns_model=args.dns_model, iters=args.iters, lr=args.lr,
                            batch_size=args.batch_size, resume=args.resume, strategy=args.strategy,
                            conditioning=args.conditioning, mixed_precision=args.mixed_precision, xla=args.xla,
                            reg_penalty=args.reg_penalty, progress=not args.no_progress,
                            command=command, overwrite=args.overwrite, **extra)


cli = console(main)


if __name__ == "__main__":
    cli()
