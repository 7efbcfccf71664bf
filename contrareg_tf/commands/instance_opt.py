"""Instance-optimisation registration of one NIfTI pair with MIND-SSC / MIND / DNS / autoencoder features
(DNS paper Table 4 pyramid: 3 levels, Adam lr 1e-2/5e-3/3e-3, 100/80/50 iterations, ‖∇u‖² weights
0.6/0.5/0.4; see contrareg_tf/instance_opt.py).

    python eval_scripts/instance_opt.py --fixed t2.nii.gz --moving t1.nii.gz --features mindssc \\
        --moved moved.nii.gz --warp warp.nii.gz --moving-labels t1_labels.nii.gz \\
        --moved-labels moved_labels.nii.gz --fixed-labels t2_labels.nii.gz

Physical space (contrareg_tf/data/physical.py): the fixed image is reoriented to canonical RAS order, the
moving image and labels are resampled onto its world grid (any orientation, voxel size or field of view), after
an ANTs affine with ``--affine ants``; the optimisation runs there. Outputs are on the fixed image's own grid,
with its affine/header: ``--moved`` = the moving image (its own intensities) resampled once through the full
warp; ``--moved-labels`` in the label file's integer type; ``--warp`` = voxelmorph's convention, displacement in
voxel units of the fixed grid, ij order, shape (*vol, ndim), affine included (the moving point of fixed voxel x
is at world A_fixed·(x + u(x))); ``--itk-warp`` = the same as an ITK/ANTs displacement field (LPS mm).
Images are percentile-normalised to [0, 1] (``--no-normalize`` to skip). Every input and output path is
checked before anything is computed or written (an output may not name an input or another output); a warp
folding > 20 % of the voxels is written with a ``warning:`` naming the likely cause.
"""
import argparse
import os

from contrareg_tf.cli import add_pair_outputs, console
from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.instance_opt import (IO_ITERS, IO_LEVELS, IO_LRS, IO_REG_WEIGHTS,
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
    add_pair_outputs(p)
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


def _check_file(path, arg):
    if path is None or not os.path.isfile(path):
        raise ContraRegInputError(f"{arg} {path}: file not found")


def main(argv=None):
    a = parse(argv)
    import numpy as np

    from contrareg_tf import metrics
    from contrareg_tf.data.io import check_output_paths, label_dtype, normalize_intensity, save_nifti
    from contrareg_tf.data.itk import save_itk_displacement
    from contrareg_tf.data.physical import load_pair
    from contrareg_tf.inference import warn_if_folding
    from contrareg_tf.instance_opt import check_schedule, instance_optimise

    # ---- validate everything before anything is computed or written
    if a.moved_labels and not a.moving_labels:
        raise ContraRegInputError("--moved-labels needs --moving-labels")
    if a.fixed_labels and not a.moving_labels:
        raise ContraRegInputError("--fixed-labels (Dice) needs --moving-labels")
    if a.inverse_warp and not a.diffeomorphic:
        raise ContraRegInputError("--inverse-warp needs --diffeomorphic")
    inputs = {"--fixed": a.fixed, "--moving": a.moving, "--moving-labels": a.moving_labels,
              "--fixed-labels": a.fixed_labels, "--dns-model": a.dns_model, "--ae1": a.ae1, "--ae2": a.ae2}
    check_output_paths({"--moved": a.moved, "--warp": a.warp, "--inverse-warp": a.inverse_warp,
                        "--moved-labels": a.moved_labels, "--itk-warp": a.itk_warp}, inputs)
    check_schedule(a.levels, a.lrs, a.iters, a.reg_weights, a.smooth_sigma, a.int_steps)
    if a.features == "dns" and a.dns_model is not None:
        _check_file(a.dns_model, "--dns-model")
    if a.features == "ae":
        _check_file(a.ae1, "--ae1")
        _check_file(a.ae2, "--ae2")
    pair = load_pair(a.fixed, a.moving, moving_labels=a.moving_labels, fixed_labels=a.fixed_labels,
                     affine=a.affine)
    if a.itk_warp and pair.ndim != 3:
        raise ContraRegInputError("--itk-warp: the ITK displacement export is 3-D only")
    fx, mv = pair.fixed_c, pair.moving_c
    if not a.no_normalize:
        fx, mv = normalize_intensity(fx), normalize_intensity(mv)
    kw = {}
    if a.features == "dns" and a.dns_model is not None:
        kw["dns_model"] = a.dns_model
    if a.features == "ae":
        kw.update(ae_models=(a.ae1, a.ae2), moving_modality=a.moving_modality)

    # ---- register (on the canonical fixed grid)
    res = instance_optimise(fx[None, ..., None], mv[None, ..., None], features=a.features, levels=a.levels,
                            lrs=a.lrs, iters=a.iters, reg_weights=a.reg_weights, smooth_sigma=a.smooth_sigma,
                            diffeomorphic=a.diffeomorphic, int_steps=a.int_steps, progress=not a.quiet, **kw)
    u = pair.total_warp(res.disp[0])
    jac = metrics.jacobian_determinant(u)
    folds = metrics.folding_fraction(jac)
    print(f"features {a.features}: {res.seconds:.1f} s, similarity {float(res.final_similarity[0]):.4f}, "
          f"folds {folds:.3f} %, std log|J| {metrics.std_log_jacobian(jac):.3f}")
    moved_lab = pair.moved_labels(u) if pair.moving_labels is not None else None

    # ---- write outputs (fixed grid, affine and header)
    if a.moved:
        save_nifti(a.moved, pair.moved(u), like=pair.fixed)
    if a.warp:
        save_nifti(a.warp, u, like=pair.fixed)
    if a.inverse_warp:
        save_nifti(a.inverse_warp, pair.total_inverse_warp(res.inverse[0]), like=pair.fixed)
    if a.moved_labels:
        save_nifti(a.moved_labels, moved_lab, like=pair.fixed, dtype=label_dtype(pair.moving_labels))
    if a.itk_warp:
        save_itk_displacement(a.itk_warp, u, pair.fixed)
    if pair.fixed_labels is not None:
        flab = pair.fixed_labels.data
        no_warp = np.zeros(pair.fixed.shape + (pair.ndim,), np.float32)  # world-space identity
        before = metrics.mean_dice(flab, pair.moved_labels(no_warp))
        aligned = f"  after affine {metrics.mean_dice(flab, pair.moved_labels(pair.total_warp(None))):.4f}" \
            if a.affine == "ants" else ""
        print(f"Dice before {before:.4f}{aligned}  after {metrics.mean_dice(flab, moved_lab):.4f}")
    warn_if_folding(folds, f"too high a learning rate (--lrs {','.join(f'{v:g}' for v in a.lrs)}) or too low a "
                           f"regularisation weight (--reg-weights {','.join(f'{v:g}' for v in a.reg_weights)})")
    return 0


cli = console(main)


if __name__ == "__main__":
    cli()
