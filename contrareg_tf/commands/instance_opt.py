"""Instance-optimisation registration of one NIfTI pair with MIND-SSC / MIND / DNS / autoencoder features
(default ``--io-preset paper``: the DNS paper's Table 4 pyramid, 3 levels, Adam lr 1e-2/5e-3/3e-3, 100/80/50
iterations, ‖∇u‖² weights 0.6/0.5/0.4; ``--io-preset fast``: the faster schedule of config.IO_PRESETS;
``--io-preset convex``: a coupled-convex start + 40 half-resolution Adam steps; explicit
--levels/--iters/--lrs/--reg-weights/--smooth-sigma override the preset's values; see contrareg_tf/instance_opt/).

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

The deformable stage (``--deformable``): 'auto' (default) keeps it only when it lowers its own data term (1 −
mean cosine of the descriptors, every voxel of the finest level) by more than the fraction
``IOConfig.deformable_min_gain`` of its value after the pre-alignment — otherwise the affine (``--affine ants``)
or world-space result is written, as for an already aligned pair of one subject's two contrasts; 'on' always
keeps it (the DNS paper's behaviour), 'off' skips it. One line per phase (loading, descriptors, convex start,
optimisation, decision, writing) with its time; the DNS weights file used is named, with a ``warning:`` when the
images are more than 1.5x finer or coarser than the weights' training resolution. A job whose estimated memory
exceeds what is available is refused before anything is loaded.
"""
import argparse

from contrareg_tf.cli import add_pair_outputs, console, int_steps
from contrareg_tf.config import IO_PRESETS
from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.instance_opt import DEFORMABLE_MODES
from contrareg_tf.instance_opt.files import instance_opt_files, with_overrides
from contrareg_tf.progress import set_quiet


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
    p.add_argument("--int-steps", type=int_steps, help="scaling-and-squaring steps (default: the preset's)")
    p.add_argument("--io-preset", default="paper",
                   help=f"optimisation schedule, one of {', '.join(IO_PRESETS)} (config.IO_PRESETS): paper = DNS "
                   "Table 4 (default), fast = 2 levels, control grid, strided sampling, convex = coupled-convex "
                   "discrete start + 40 half-resolution Adam steps")
    p.add_argument("--levels", type=int, help="pyramid levels (default: the preset's)")
    p.add_argument("--iters", type=_ints, help="per level, comma-separated (default: the preset's)")
    p.add_argument("--lrs", type=_floats, help="Adam lr per level, comma-separated (default: the preset's)")
    p.add_argument("--reg-weights", type=_floats, help="‖∇u‖² weight per level (default: the preset's)")
    p.add_argument("--smooth-sigma", type=float, help="descriptor Gaussian σ in voxels (default: the preset's)")
    p.add_argument("--deformable", choices=DEFORMABLE_MODES,
                   help="keep the deformable stage: auto = only when it lowers its data term beyond noise (else the "
                   "affine / pre-aligned result), on = always (the paper), off = never (default: the preset's, auto)")
    p.add_argument("--no-normalize", action="store_true", help="do not percentile-normalise the images")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no phase lines")
    return p.parse_args(argv)


def schedule_of(a):
    """The ``IOConfig`` the flags ask for: the preset with every explicit flag applied."""
    if a.io_preset not in IO_PRESETS:
        raise ContraRegInputError(f"--io-preset: unknown preset {a.io_preset!r}; choose one of {sorted(IO_PRESETS)}")
    return with_overrides(IO_PRESETS[a.io_preset], levels=a.levels, lrs=a.lrs, iters=a.iters,
                          reg_weights=a.reg_weights, smooth_sigma=a.smooth_sigma, int_steps=a.int_steps,
                          diffeomorphic=a.diffeomorphic or None, deformable=a.deformable)


def main(argv=None):
    a = parse(argv)
    set_quiet(a.quiet)
    res = instance_opt_files(
        a.fixed, a.moving, features=a.features, moved_out=a.moved, warp_out=a.warp,
        inverse_warp_out=a.inverse_warp, moving_labels=a.moving_labels, moved_labels_out=a.moved_labels,
        fixed_labels=a.fixed_labels, itk_warp_out=a.itk_warp, affine=a.affine, normalize=not a.no_normalize,
        dns_model=a.dns_model, ae1=a.ae1, ae2=a.ae2, moving_modality=a.moving_modality, schedule=schedule_of(a),
        progress=not a.quiet)
    sim = res.io.final_similarity
    kept = "deformable kept" if bool(res.io.deformable_kept[0]) else "deformable dropped"
    print(f"features {a.features}: {res.io.seconds:.1f} s, {kept}, similarity "
          f"{'n/a' if sim is None or sim[0] != sim[0] else f'{float(sim[0]):.4f}'}, folds {res.folds:.3f} %, "
          f"std log|J| {res.sdlogj:.3f}")
    if res.dice_after is not None:
        aligned = "" if res.dice_affine is None else f"  after affine {res.dice_affine:.4f}"
        print(f"Dice before {res.dice_before:.4f}{aligned}  after {res.dice_after:.4f}")
    return 0


cli = console(main)


if __name__ == "__main__":
    cli()
