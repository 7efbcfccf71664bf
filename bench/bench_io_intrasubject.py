#!/usr/bin/env python
"""Benchmark: instance optimisation (IO) on pairs that need no deformation, beside pairs that do — does the
deformable stage leave one subject's two contrasts alone, and what does ``--deformable auto`` decide?

Built-in data (``data/proxy.py``, source icbm2009c: the real ICBM 2009c T1w / T2w with CerebrA labels), 64³ @ 3 mm
by default (the 1 mm pair is too heavy for a shared 2-core machine; ``--size`` / ``--spacing`` change it). Each
subject is the template pulled back through its own random diffeomorphism, and its T1w and T2w each get their own
intensity augmentation (gamma, blur, smooth multiplicative bias field, Rician noise):

  (a) aligned   moving = subject i's T1w, fixed = subject i's T2w: the same anatomy, the identity is the answer
  (b) offset    the same pair, the moving T1w's NIfTI affine changed by a rigid transform (``--rotation`` degrees
                about the z axis through the grid centre, then ``--shift`` mm along x): run with ``--affine ants``
  (c) warped    moving = subject a's T1w, fixed = subject b's T2w (as ``bench_io.py``): a real deformation

Every pair goes through ``instance_opt.files.instance_opt_files`` (the command's code path: physical space, the
ANTs affine, the optimisation) with ``deformable='on'``; the columns are CerebrA Dice (mean over the structures of
both maps, then over pairs) of the identity (world space), the affine alone (ANTs; for (a) and (c) a separate
``--affine ants --deformable off`` run), IO with the deformable stage always kept ('on'), and IO with
``--deformable auto`` — which returns the 'on' result when the decision keeps the stage and the pre-aligned result
(world space, or the affine for (b)) otherwise, so it is read off the same run; "kept" counts the pairs whose
deformable stage 'auto' kept and "gain" gives the relative decrease of the data term (S₀ − S_φ) / S₀ per pair
(``instance_opt/decision.py``).

    python bench/bench_io_intrasubject.py                       # 3 pairs per case, every preset, MIND-SSC
    python bench/bench_io_intrasubject.py --presets fast --pairs 1
"""
import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import contrareg_tf  # noqa: E402,F401
from contrareg_tf.config import IO_PRESETS  # noqa: E402
from contrareg_tf.data import proxy  # noqa: E402
from contrareg_tf.data.io import load_nifti, save_nifti  # noqa: E402
from contrareg_tf.instance_opt import keep_deformable  # noqa: E402
from contrareg_tf.instance_opt.files import instance_opt_files  # noqa: E402

CASES = ("aligned", "offset", "warped")


def rigid_offset(affine, rotation_deg, shift_mm, shape):
    """``affine`` composed with a world-space rigid transform: a rotation of ``rotation_deg`` about the z axis
    through the grid's centre, then ``shift_mm`` along x."""
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    a = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    world = np.eye(4)
    world[:3, :3] = rot
    world[:3, 3] = centre - rot @ centre + np.array([shift_mm, 0.0, 0.0])
    return world @ affine


def pair_files(desc, case, a, b, scratch, rotation, shift):
    """(fixed, moving, fixed_labels, moving_labels) paths of one pair of ``case``."""
    sa, sb = desc.subjects[a], desc.subjects[b]
    if case != "offset":
        return sb.t2, sa.t1, sb.labels, sa.labels
    img, lab = load_nifti(sa.t1), load_nifti(sa.labels)
    aff = rigid_offset(img.affine, rotation, shift, img.shape)
    mi, ml = os.path.join(scratch, f"t1_{a}.nii.gz"), os.path.join(scratch, f"labels_{a}.nii.gz")
    save_nifti(mi, img.data, affine=aff)
    save_nifti(ml, lab.data.astype(np.int16), affine=aff)
    return sb.t2, mi, sb.labels, ml


def run_pair(files, schedule, features, affine):
    fixed, moving, flab, mlab = files
    res = instance_opt_files(fixed, moving, features=features, moving_labels=mlab, fixed_labels=flab,
                             affine=affine, schedule=schedule, progress=False)
    return res


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="cubic grid of the built-in data")
    p.add_argument("--spacing", type=float, default=3.0, help="its voxel size in mm")
    p.add_argument("--pairs", type=int, default=3, help="pairs per case (subjects 2i, 2i+1)")
    p.add_argument("--presets", default=",".join(IO_PRESETS), help="comma list of config.IO_PRESETS")
    p.add_argument("--features", default="mindssc", choices=("mindssc", "mind", "dns"))
    p.add_argument("--rotation", type=float, default=10.0, help="(b): degrees about z")
    p.add_argument("--shift", type=float, default=5.0, help="(b): mm along x")
    p.add_argument("--max-disp-mm", type=float, default=12.0, help="the built-in data's SVF amplitude (bench_io's)")
    p.add_argument("--cache", default=None, help="built-in data folder (default: contrareg_tf's cache)")
    p.add_argument("--out", default=None, help="markdown table (default bench/results/io_intrasubject_<date>.md)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    t0 = time.time()
    desc = proxy.build_proxy(a.cache, n_subjects=max(2 * a.pairs, 2), shape=(a.size,) * 3, spacing=a.spacing,
                             max_disp=a.max_disp_mm / a.spacing, seed=0)
    print(f"# built-in data {a.size}³ @ {a.spacing:g} mm ready in {time.time() - t0:.0f} s: {desc.source}", flush=True)
    pairs = {"aligned": [(2 * i, 2 * i) for i in range(a.pairs)], "offset": [(2 * i, 2 * i) for i in range(a.pairs)],
             "warped": [(2 * i, 2 * i + 1) for i in range(a.pairs)]}
    header = ("| case | preset | identity | affine (ANTs) | IO 'on' | IO 'auto' | auto − pre-aligned | kept | "
              "gain (S₀ − S_φ) / S₀ per pair |")
    lines = [header, "|" + "---|" * 9]
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for case in CASES:
            files = [pair_files(desc, case, i, j, scratch, a.rotation, a.shift) for i, j in pairs[case]]
            aff_only = None
            if case != "offset":       # the affine alone: a separate run with the deformable stage off
                off = dataclasses.replace(IO_PRESETS["paper"], deformable="off")
                aff_only = [run_pair(f, off, a.features, "ants").dice_affine for f in files]
            for name in presets:
                sched = dataclasses.replace(IO_PRESETS[name], deformable="on")
                rows = [run_pair(f, sched, a.features, "ants" if case == "offset" else "none") for f in files]
                ident = [r.dice_before for r in rows]
                affd = [r.dice_affine for r in rows] if case == "offset" else aff_only
                pre = affd if case == "offset" else ident
                on = [r.dice_after for r in rows]
                io = [r.io for r in rows]
                kept = [bool(keep_deformable(x.similarity_identity, x.similarity_deformable, "auto",
                                             IO_PRESETS[name].deformable_min_gain)[0]) for x in io]
                auto = [d if k else p for d, k, p in zip(on, kept, pre)]
                gains = [float((x.similarity_identity[0] - x.similarity_deformable[0]) / x.similarity_identity[0])
                         for x in io]
                line = (f"| {case} | {name} | {np.mean(ident):.4f} | {np.mean(affd):.4f} | {np.mean(on):.4f} | "
                        f"{np.mean(auto):.4f} | {np.mean(auto) - np.mean(pre):+.4f} | {sum(kept)}/{len(kept)} | "
                        f"{', '.join(f'{g:.2f}' for g in gains)} |")
                lines.append(line)
                print(line, flush=True)
    note = (f"Built-in data {a.size}³ @ {a.spacing:g} mm (icbm2009c, seed 0, SVF amplitude {a.max_disp_mm:g} mm), "
            f"features {a.features}, {a.pairs} pair(s) per case; (b) rotation {a.rotation:g}° about z + {a.shift:g} mm "
            f"along x in the moving affine. Command: python bench/bench_io_intrasubject.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    out = a.out or os.path.join(ROOT, "bench", "results", f"io_intrasubject_{time.strftime('%Y-%m-%d')}.md")
    with open(out, "w") as f:
        f.write("# IO on intra-subject pairs\n\n" + note + "\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
