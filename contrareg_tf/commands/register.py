"""Register a T1w/T2w NIfTI pair with a trained λ-conditioned model.

    python eval_scripts/register.py --model runs/mcr --fixed t1.nii.gz --moving t2.nii.gz --lambda 0.1 \
        --moved moved.nii.gz --warp warp.nii.gz
    # or pick, for this pair, the least-regularised λ whose warp keeps folds under a budget:
    python eval_scripts/register.py ... --max-folds 0.5

Physical space and any grid (contrareg_tf/inference.py, contrareg_tf/data/physical.py): the images may
differ in orientation, voxel size and field of view; the fixed image is reoriented to canonical RAS, the moving
image (and labels) resampled onto its world grid (after an ANTs MI affine with ``--affine ants``), and the
network runs at its training spacing (config.json ``spacing``, or ``--model-spacing``) on a window covering
both images' foreground, whose warp is mapped back onto the full fixed grid.

Outputs are on the fixed image's own grid with its affine/header: ``--moved`` is the moving image with its own
intensities (not the network's normalised input) resampled once through the full warp; ``--moved-labels`` keep
the label file's integer type; ``--warp`` / ``--inverse-warp`` are voxelmorph-convention displacements (voxel
units of the fixed grid, ij order, (*vol, ndim)) that include the affine: the moving point of fixed voxel x
is at world A_fixed·(x + u(x)); ``--itk-warp`` is the same warp as an ITK/ANTs displacement field (LPS mm).
Every input and output path is checked before anything is computed or written; an output may not name an
input or another output.
"""
import argparse

from contrareg_tf.cli import add_pair_outputs, console, percent, positive_float, unit_float
from contrareg_tf.inference import register_files



def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="train_hyper.py output folder (config.json + model.h5)")
    p.add_argument("--fixed", required=True)
    p.add_argument("--moving", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--lambda", dest="lam", type=unit_float, help="regularisation weight λ in [0, 1]")
    g.add_argument("--max-folds", type=percent, help="choose λ per pair: least regularised with folds ≤ PCT %%")
    p.add_argument("--moving-modality", default="t2", choices=("t1", "t2"),
                   help="modality of the moving image (models are trained T2w → T1w)")
    p.add_argument("--moved", required=True, help="output moved image (.nii.gz)")
    p.add_argument("--warp", help="output displacement field (.nii.gz)")
    p.add_argument("--inverse-warp", help="output inverse displacement field (.nii.gz)")
    add_pair_outputs(p)
    p.add_argument("--model-spacing", type=positive_float, help="voxel size (mm) the model was trained at (default: "
                   "config.json)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    res = register_files(a.model, a.fixed, a.moving, a.moved, lam=a.lam, max_folds=a.max_folds,
                         warp_out=a.warp, inverse_warp_out=a.inverse_warp, moving_labels=a.moving_labels,
                         moved_labels_out=a.moved_labels, moving_modality=a.moving_modality, affine=a.affine,
                         itk_warp_out=a.itk_warp, model_spacing=a.model_spacing)
    print(f"λ = {res.lam:.4g}   folds = {res.folds:.3f} %   model window {'x'.join(map(str, res.window.shape))}"
          f"   wrote {a.moved}")
    return 0


cli = console(main)


if __name__ == "__main__":
    cli()
