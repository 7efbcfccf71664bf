#!/usr/bin/env python
"""Register a T1w/T2w NIfTI pair with a trained λ-conditioned model.

    python eval_scripts/register.py --model runs/mcr --fixed t1.nii.gz --moving t2.nii.gz --lambda 0.1 \
        --moved moved.nii.gz --warp warp.nii.gz
    # or pick, for this pair, the least-regularised λ whose warp keeps folds under a budget:
    python eval_scripts/register.py ... --max-folds 0.5

Outputs keep the fixed image's affine/header; warps are voxel-unit, ij-order displacements (voxelmorph).
All inputs are checked before anything is written.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="train_hyper.py output folder (config.json + model.h5)")
    p.add_argument("--fixed", required=True)
    p.add_argument("--moving", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--lambda", dest="lam", type=float, help="regularisation weight λ in [0, 1]")
    g.add_argument("--max-folds", type=float, help="choose λ per pair: least regularised with folds ≤ PCT %%")
    p.add_argument("--moving-modality", default="t2", choices=("t1", "t2"),
                   help="modality of the moving image (models are trained T2w → T1w)")
    p.add_argument("--moved", required=True, help="output moved image (.nii.gz)")
    p.add_argument("--warp", help="output displacement field (.nii.gz)")
    p.add_argument("--inverse-warp", help="output inverse displacement field (.nii.gz)")
    p.add_argument("--moving-labels", help="label map of the moving image")
    p.add_argument("--moved-labels", help="output: moving labels warped (nearest neighbour)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    from contrareg_tf.inference import register_files

    res = register_files(a.model, a.fixed, a.moving, a.moved, lam=a.lam, max_folds=a.max_folds,
                         warp_out=a.warp, inverse_warp_out=a.inverse_warp, moving_labels=a.moving_labels,
                         moved_labels_out=a.moved_labels, moving_modality=a.moving_modality)
    print(f"λ = {res.lam:.4g}   folds = {res.folds:.3f} %   wrote {a.moved}")
    return 0


if __name__ == "__main__":
    from contrareg_tf.cli import run_cli

    run_cli(main)
