#!/usr/bin/env python
"""Instance-optimisation registration of one NIfTI pair with MIND-SSC / MIND / DNS / autoencoder features
(DNS paper Table 4 pyramid: 3 levels, Adam lr 1e-2/5e-3/3e-3, 100/80/50 iterations, ‖∇u‖² weights
0.6/0.5/0.4; see contrareg_tf/instance_opt.py).

    python eval_scripts/instance_opt.py --fixed t2.nii.gz --moving t1.nii.gz --features mindssc \\
        --moved moved.nii.gz --warp warp.nii.gz --moving-labels t1_labels.nii.gz \\
        --moved-labels moved_labels.nii.gz --fixed-labels t2_labels.nii.gz

Images are percentile-normalised to [0, 1] (``--no-normalize`` to skip). Outputs keep the fixed image's
affine/header; the warp is voxelmorph's convention: displacement in voxel units, ij order, shape
(*vol, ndim). Every input is checked before anything is written.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# TF's C++ start-up noise (CUDA plugin registration 'E' lines) would precede the one-line error message;
# export TF_CPP_MIN_LOG_LEVEL=0..2 to see TF's own logging again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contrareg_tf  # noqa: E402,F401  (compat shim first)
from contrareg_tf.errors import ContraRegInputError  # noqa: E402
from contrareg_tf.instance_opt import (IO_ITERS, IO_LEVELS, IO_LRS, IO_REG_WEIGHTS,  # noqa: E402
                                       IO_SMOOTH_SIGMA)


def _floats(s):
    return [float(t) for t in s.split(",") if t.strip()]


def _ints(s):
    return [int(t) for t in s.split(",") if t.strip()]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixed", required=True, help="fixed image (.nii / .nii.gz)")
    p.add_argument("--moving", required=True, help="moving image (.nii / .nii.gz)")
    p.add_argument("--features", default="mindssc", choices=("mindssc", "mind", "dns", "ae"))
    p.add_argument("--dns-model", help="MASR-Net weights (.h5, train_scripts/train_dns.py) for --features dns "
                   "(default: the shipped models/dns_proxy{2,3}d.h5)")
    p.add_argument("--ae1", help="T1w autoencoder A1 weights (.h5) for --features ae")
    p.add_argument("--ae2", help="T2w autoencoder A2 weights (.h5) for --features ae")
    p.add_argument("--moving-modality", default="t1", choices=("t1", "t2"),
                   help="modality of the moving image (picks A1/A2 for --features ae); default t1")
    p.add_argument("--moved", help="output: moved image")
    p.add_argument("--warp", help="output: displacement field (voxel units, ij, (*vol, ndim))")
    p.add_argument("--inverse-warp", help="output: inverse displacement (needs --diffeomorphic)")
    p.add_argument("--moving-labels", help="label map of the moving image")
    p.add_argument("--moved-labels", help="output: moving labels warped (nearest neighbour)")
    p.add_argument("--fixed-labels", help="label map of the fixed image: prints Dice before / after")
    p.add_argument("--diffeomorphic", action="store_true", help="optimise an SVF (scaling and squaring)")
    p.add_argument("--int-steps", type=int, default=7)
    p.add_argument("--levels", type=int, default=IO_LEVELS, help="pyramid levels, half to full size")
    p.add_argument("--iters", type=_ints, default=list(IO_ITERS), help="per level, comma-separated")
    p.add_argument("--lrs", type=_floats, default=list(IO_LRS), help="Adam lr per level, comma-separated")
    p.add_argument("--reg-weights", type=_floats, default=list(IO_REG_WEIGHTS), help="‖∇u‖² weight per level")
    p.add_argument("--smooth-sigma", type=float, default=IO_SMOOTH_SIGMA, help="descriptor Gaussian σ (voxels)")
    p.add_argument("--no-normalize", action="store_true", help="do not percentile-normalise the images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _check_out(path, arg):
    from contrareg_tf.data.io import NIFTI_EXTS

    if path is None:
        return
    if not path.endswith(NIFTI_EXTS):
        raise ContraRegInputError(f"{arg} {path}: output file name must end with .nii or .nii.gz")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ContraRegInputError(f"{arg} {path}: output folder {folder} does not exist")


def _check_file(path, arg):
    if path is None or not os.path.isfile(path):
        raise ContraRegInputError(f"{arg} {path}: file not found")


def _labels(vol, arg):
    import numpy as np

    lab = np.rint(vol.data)
    if not np.allclose(lab, vol.data, atol=1e-3):
        raise ContraRegInputError(f"{arg} {vol.path}: label map must hold integer labels")
    return lab.astype(np.int32)


def main(argv=None):
    a = parse(argv)
    import numpy as np

    from contrareg_tf import metrics
    from contrareg_tf.data.io import check_same_shape, load_nifti, normalize_intensity, save_nifti
    from contrareg_tf.instance_opt import instance_optimise, warp

    # ---- validate everything before any output is written
    if a.moved_labels and not a.moving_labels:
        raise ContraRegInputError("--moved-labels needs --moving-labels")
    if a.fixed_labels and not a.moving_labels:
        raise ContraRegInputError("--fixed-labels (Dice) needs --moving-labels")
    if a.inverse_warp and not a.diffeomorphic:
        raise ContraRegInputError("--inverse-warp needs --diffeomorphic")
    outs = {"--moved": a.moved, "--warp": a.warp, "--inverse-warp": a.inverse_warp,
            "--moved-labels": a.moved_labels}
    for arg, path in outs.items():
        _check_out(path, arg)
    given = [p for p in outs.values() if p]
    if len(set(map(os.path.abspath, given))) != len(given):
        raise ContraRegInputError("two outputs name the same file")
    if a.features == "dns" and a.dns_model is not None:
        _check_file(a.dns_model, "--dns-model")
    if a.features == "ae":
        _check_file(a.ae1, "--ae1")
        _check_file(a.ae2, "--ae2")
    fixed = load_nifti(a.fixed)
    moving = load_nifti(a.moving, ndim=fixed.ndim)
    check_same_shape(fixed, moving, ("--fixed", "--moving"))
    mlab = flab = None
    if a.moving_labels:
        mvol = load_nifti(a.moving_labels, ndim=fixed.ndim)
        check_same_shape(fixed, mvol, ("--fixed", "--moving-labels"))
        mlab = _labels(mvol, "--moving-labels")
    if a.fixed_labels:
        fvol = load_nifti(a.fixed_labels, ndim=fixed.ndim)
        check_same_shape(fixed, fvol, ("--fixed", "--fixed-labels"))
        flab = _labels(fvol, "--fixed-labels")
    fx, mv = fixed.data, moving.data
    if not a.no_normalize:
        fx, mv = normalize_intensity(fx), normalize_intensity(mv)
    kw = {}
    if a.features == "dns" and a.dns_model is not None:
        kw["dns_model"] = a.dns_model
    if a.features == "ae":
        kw.update(ae_models=(a.ae1, a.ae2), moving_modality=a.moving_modality)

    # ---- register
    res = instance_optimise(fx[None, ..., None], mv[None, ..., None], features=a.features, levels=a.levels,
                            lrs=a.lrs, iters=a.iters, reg_weights=a.reg_weights, smooth_sigma=a.smooth_sigma,
                            diffeomorphic=a.diffeomorphic, int_steps=a.int_steps, progress=not a.quiet, **kw)
    u = res.disp[0]
    jac = metrics.jacobian_determinant(u)
    print(f"features {a.features}: {res.seconds:.1f} s, similarity {float(res.final_similarity[0]):.4f}, "
          f"folds {metrics.folding_fraction(jac):.3f} %, std log|J| {metrics.std_log_jacobian(jac):.3f}")

    # ---- write outputs (fixed affine/header)
    if a.moved:
        save_nifti(a.moved, warp(moving.data[None, ..., None], res.disp)[0, ..., 0], like=fixed)
    if a.warp:
        save_nifti(a.warp, u, like=fixed)
    if a.inverse_warp:
        save_nifti(a.inverse_warp, res.inverse[0], like=fixed)
    moved_lab = None
    if mlab is not None:
        moved_lab = warp(mlab[None, ..., None], res.disp, interp="nearest")[0, ..., 0]
        if a.moved_labels:
            save_nifti(a.moved_labels, moved_lab, like=fixed)
    if flab is not None and mlab is not None:
        before, after = metrics.mean_dice(flab, mlab), metrics.mean_dice(flab, moved_lab)
        print(f"Dice before {before:.4f}  after {after:.4f}")
    return 0


if __name__ == "__main__":
    from contrareg_tf.cli import run_cli

    run_cli(main)
