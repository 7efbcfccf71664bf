#!/usr/bin/env python
"""Benchmark: instance optimisation (IO, DNS paper Table 4) with MIND-SSC (and DNS / autoencoder features
when weights are given) against peer registration tools, each run as a user would run it, on the built-in data
(default source icbm2009c: moving = real ICBM 2009c T1w of subject a, fixed = real T2w of subject b, each with
its own random diffeomorphism and intensity augmentation; CerebrA labels).

    python bench/bench_io.py                                   # 96³ @ 2 mm and 128³ @ 1.5 mm, 3 pairs each
    python bench/bench_io.py --sizes 96:2 --pairs 1 \
        --methods ants,ants-syn,elastix,greedy,niftyreg,convexadam,io-mindssc --io-preset fast
    python bench/bench_io.py --sizes 96:2 --dns-model models/dns_proxy3d.h5 --ae1 A1.h5 --ae2 A2.h5

Peers (the exact call of each is recorded in the results file):
  ants        antspyx ``registration(type_of_transform="SyNOnly", syn_metric="mattes")``: deformable SyN only
  ants-syn    antspyx ``registration(type_of_transform="SyN", syn_metric="mattes")``: an affine stage (Mattes
              MI) THEN SyN; the scored displacement is the composition of both (``apply_transforms(compose=)``)
  elastix     itk-elastix, elastix's default "bspline" parameter map (AdvancedMattesMutualInformation)
  greedy      picsl-greedy (Greedy3D API = the greedy command line), ``-m NMI -n 100x50x10`` (greedy's
              documented deformable schedule), default smoothing
  niftyreg    NiftyReg ``reg_f3d --nmi`` (defaults otherwise), ``reg_transform -disp`` for the field
  convexadam  convexAdam ``convex_adam_pt`` (MIND-SSC, coupled convex + Adam) with its default
              hyperparameters, on the CPU
A peer whose package is missing is skipped with one line "skipped <method>: <package> not installed".

Every method runs in its own worker process (peak RSS is per method, including any child process); the table
gives Dice (mean over the pair's structures — labels in both input maps —, then over pairs; and per coarse
group of structures), Dice30 (``metrics.dice30`` of the per-pair mean Dice: with one pair, that pair's Dice),
HD95 (``metrics.hd95`` in mm, nan-mean over the pair's structures, each structure computed on a crop around
both its masks — exact, see ``hd95_mean``), % folding voxels (det J ≤ 0), std log|J| (det clipped at 1e-9),
seconds per pair (the registration call only; IO: features + optimisation, first pair includes tf.function
tracing) and the worker's peak RSS.

Conversions to this project's displacement (φ(x) = x + u(x), voxel units, ij / numpy axes): the images are
handed over with identity direction, origin 0 and isotropic spacing, so voxel displacement = physical field /
spacing along each numpy axis. ITK's x is numpy axis 0 for ANTs' ``from_numpy`` and the last numpy axis for
``itk.GetImageFromArray`` / ``SimpleITK.GetImageFromArray`` (elastix, greedy: components reversed); greedy's
warp is ITK (LPS) physical, no sign flip; NiftyReg's displacement is NIfTI real-world along the array axes of
an image saved with affine diag(spacing); convexAdam returns voxel displacements along the numpy axes
already. Each conversion is checked ("agree" column): the fraction of voxels where labels warped with the
converted field (scipy nearest neighbour) equal the tool's own nearest-neighbour resampling of the labels.
convexAdam has no label resampler (its ``apply_convex`` is linear): its agree (marked "img") is the fraction
of voxels where ``apply_convex`` of the moving image equals the project's ``ops.warp_array`` linear warp with
the converted field within 1e-3.
Needs the ``bench`` extra for the peers (``pip install -e .[bench]``; see setup.py for what installs cleanly).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GROUPS = ("cortex", "subcortical", "ventricles", "cerebellum_brainstem")   # contrareg_tf.data.icbm.GROUPS


# ------------------------------------------------------------------------------------------- workers
def _rss_mb():
    """Peak RSS (MB) of this worker or of any child process it waited for (NiftyReg's binaries)."""
    return max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024.0


def _load_pair(desc, a, b):
    from contrareg_tf.data.io import load_nifti

    sa, sb = desc.subjects[a], desc.subjects[b]
    mov = load_nifti(sa.t1).data
    fix = load_nifti(sb.t2).data
    mlab = load_nifti(sa.labels).data.astype("int32")
    flab = load_nifti(sb.labels).data.astype("int32")
    return fix, mov, flab, mlab


def hd95_mean(flab, moved, ids, spacing, margin=2):
    """Nan-mean over ``ids`` of ``metrics.hd95`` (mm), each structure on the crop of both label maps to the
    bounding box of (fixed ∪ moved) mask plus ``margin`` voxels. Exact: both surfaces lie inside the crop and
    the margin keeps the erosion that finds them unchanged (a crop edge that is an image edge stays one), so
    every nearest-surface distance is the full-volume one; a 128³ pair's 100 structures take seconds instead
    of minutes. A structure the warp lost scores nan (left out of the mean), as in ``metrics.hd95``."""
    import numpy as np

    from contrareg_tf import metrics

    vals = []
    for k in ids:
        both = (flab == k) | (moved == k)
        if not both.any():
            continue
        box = tuple(slice(max(0, int(ax.min()) - margin), int(ax.max()) + margin + 1) for ax in np.nonzero(both))
        vals.append(metrics.hd95(flab[box], moved[box], spacing, labels=[int(k)]).get(int(k), np.nan))
    vals = np.asarray(vals, dtype=np.float64)
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")


def score(flab, mlab, moved, groups, spacing=None):
    """Dice over the pair's structures (``metrics.pair_structures``): mean, and mean per coarse group; HD95
    (mm, ``hd95_mean``) when ``spacing`` is given."""
    import numpy as np

    from contrareg_tf import metrics

    ids = np.asarray(metrics.pair_structures(flab, mlab))
    d = metrics.dice_per_label(flab, moved, ids)
    per = {g: float(np.mean(d[[groups.get(int(k)) == g for k in ids]])) for g in GROUPS
           if any(groups.get(int(k)) == g for k in ids)}
    out = {"dice_mean": float(np.mean(d)), "dice": per}
    if spacing is not None:
        out["hd95_mean"] = hd95_mean(flab, moved, ids, spacing)
    return out


def _warp_labels_np(lab, u):
    import numpy as np
    from scipy import ndimage

    grid = np.stack(np.meshgrid(*[np.arange(n) for n in lab.shape], indexing="ij"), 0).astype(np.float64)
    return ndimage.map_coordinates(lab, grid + np.moveaxis(u, -1, 0), order=0, mode="nearest")


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# Each runner returns dict(u=voxel displacement (*vol, 3), sec=registration seconds, call=the exact call as a
# string, and either own=the tool's own nearest-neighbour resampling of the moving labels or agree=a
# precomputed conversion check with agree_on=what it compares).
def _run_io(fix, mov, spacing, opts, mlab, features):
    import dataclasses

    from contrareg_tf.config import IO_PRESETS
    from contrareg_tf.instance_opt import FeatureSpec, instance_optimise
    from contrareg_tf.ops import warp_array as warp

    features, _, preset = features.partition("-")        # io-<features>[-<preset>], e.g. io-mindssc-fast
    schedule = IO_PRESETS[preset or opts.get("io_preset") or "paper"]
    # the deformable stage always kept: this bench measures the optimiser on warped pairs
    schedule = dataclasses.replace(schedule, deformable="on", **({"iters": tuple(opts["iters"])} if opts.get("iters")
                                                                  else {}))
    spec = FeatureSpec(features, dns_model=opts["dns_model"] if features == "dns" else None,
                       ae_models=(opts["ae1"], opts["ae2"]) if features == "ae" else None, moving_modality="t1")
    res, sec = _timed(lambda: instance_optimise(fix[None, ..., None], mov[None, ..., None], spec, schedule,
                                                progress=False))
    moved_io = warp(mlab[None, ..., None], res.disp, "nearest")[0, ..., 0]
    # IO's own (TF) nearest-neighbour warp vs the scipy warp used for scoring
    return dict(u=res.disp[0], sec=sec, own=moved_io,
                call=f"instance_optimise(fixed, moving, {spec!r}, {schedule!r}, progress=False)")


def _run_ants(fix, mov, spacing, opts, mlab, transform="SyNOnly"):
    import ants
    import numpy as np

    sp = (float(spacing),) * fix.ndim
    f = ants.from_numpy(fix.astype("float32"), spacing=sp)
    m = ants.from_numpy(mov.astype("float32"), spacing=sp)
    kw = dict(type_of_transform=transform, syn_metric="mattes")
    reg, sec = _timed(lambda: ants.registration(f, m, **kw))
    with tempfile.TemporaryDirectory() as scratch:
        # SyN: [warp, affine.mat] -> one displacement field (physical mm, ITK x = numpy axis 0)
        comp = ants.apply_transforms(f, m, reg["fwdtransforms"], compose=os.path.join(scratch, "c"))
        field = ants.image_read(comp).numpy()
    u = field / np.asarray(sp)
    own = ants.apply_transforms(f, ants.from_numpy(mlab.astype("float32"), spacing=sp), reg["fwdtransforms"],
                                interpolator="nearestNeighbor").numpy()
    call = (f"ants.registration(fixed, moving, {', '.join(f'{k}={v!r}' for k, v in kw.items())}); "
            "ants.apply_transforms(fixed, moving, reg['fwdtransforms'], compose=prefix)")
    return dict(u=u, sec=sec, own=np.rint(own).astype("int32"), call=call)


def _run_ants_syn(fix, mov, spacing, opts, mlab):
    return _run_ants(fix, mov, spacing, opts, mlab, transform="SyN")


def _run_elastix(fix, mov, spacing, opts, mlab):
    import itk
    import numpy as np

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(opts["threads"])

    def img(a):
        im = itk.GetImageFromArray(np.ascontiguousarray(a.astype("float32")))
        im.SetSpacing([float(spacing)] * a.ndim)
        return im

    f, m = img(fix), img(mov)
    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("bspline"))
    (_, params), sec = _timed(lambda: itk.elastix_registration_method(f, m, parameter_object=po,
                                                                      log_to_console=False))
    with tempfile.TemporaryDirectory() as scratch:  # transformix writes deformationField.nii there (default: cwd)
        field = itk.GetArrayFromImage(itk.transformix_deformation_field(m, params, output_directory=scratch))
    u = field[..., ::-1] / float(spacing)  # component k of ITK = numpy axis (ndim-1-k)
    params.SetParameter(0, "FinalBSplineInterpolationOrder", "0")
    own = itk.GetArrayFromImage(itk.transformix_filter(img(mlab), params))
    pm = po.GetParameterMap(0)
    call = ("po = itk.ParameterObject.New(); po.AddParameterMap(po.GetDefaultParameterMap('bspline')); "
            "itk.elastix_registration_method(fixed, moving, parameter_object=po, log_to_console=False)  # "
            + ", ".join(f"{k}={' '.join(pm[k])}" for k in ("Metric", "Transform", "FinalGridSpacingInPhysicalUnits",
                                                         "NumberOfResolutions", "MaximumNumberOfIterations")
                        if k in pm))
    return dict(u=u, sec=sec, own=np.rint(own).astype("int32"), call=call)


GREEDY_CMD = "-d 3 -threads {threads} -m NMI -i fixed moving -n 100x50x10 -o warp"


def _run_greedy(fix, mov, spacing, opts, mlab):
    import io

    import numpy as np
    import SimpleITK as sitk
    from picsl_greedy import Greedy3D

    def img(a):
        im = sitk.GetImageFromArray(np.ascontiguousarray(a.astype("float32")))
        im.SetSpacing([float(spacing)] * a.ndim)
        return im

    g = Greedy3D()
    cmd = GREEDY_CMD.format(threads=opts["threads"])
    log = io.StringIO()
    _, sec = _timed(lambda: g.execute(cmd, fixed=img(fix), moving=img(mov), warp=None, out=log, err=log))
    field = sitk.GetArrayFromImage(g["warp"])                # (*numpy vol, 3): ITK (x, y, z) physical mm
    u = field[..., ::-1] / float(spacing)
    res_cmd = "-d 3 -rf fixed -ri NN -rm labels moved -r warp"
    g.execute(res_cmd, labels=img(mlab), moved=None, out=log, err=log)
    own = np.rint(sitk.GetArrayFromImage(g["moved"])).astype("int32")
    return dict(u=u, sec=sec, own=own, call=f"Greedy3D().execute({cmd!r}, fixed=<sitk T2w>, moving=<sitk T1w>, "
                                         f"warp=None); warp = g['warp']")


def _niftyreg_bin(name):
    """Path of a NiftyReg executable: the ``niftyreg`` package's bin folder, else PATH."""
    import glob
    import shutil

    import niftyreg

    here = os.path.dirname(os.path.abspath(niftyreg.__file__))
    for cand in glob.glob(os.path.join(here, "**", name), recursive=True):
        if os.access(cand, os.X_OK) and os.path.isfile(cand):
            return cand
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found in the niftyreg package ({here}) nor on PATH")
    return found


NIFTYREG_F3D = "reg_f3d -ref fixed.nii -flo moving.nii -cpp cpp.nii -res res.nii --nmi -omp {threads}"


def _run_niftyreg(fix, mov, spacing, opts, mlab):
    import nibabel as nib
    import numpy as np

    aff = np.diag([float(spacing)] * 3 + [1.0])
    with tempfile.TemporaryDirectory() as d:
        for name, a in (("fixed", fix), ("moving", mov), ("labels", mlab)):
            nib.save(nib.Nifti1Image(np.asarray(a, np.float32), aff), os.path.join(d, name + ".nii"))
        cmd = NIFTYREG_F3D.format(threads=opts["threads"])
        argv = [_niftyreg_bin("reg_f3d")] + cmd.split()[1:]

        def run(args):
            r = subprocess.run(args, cwd=d, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{os.path.basename(args[0])} failed: {(r.stderr or r.stdout).strip()[-300:]}")

        _, sec = _timed(lambda: run(argv))
        run([_niftyreg_bin("reg_transform"), "-ref", "fixed.nii", "-disp", "cpp.nii", "disp.nii"])
        run([_niftyreg_bin("reg_resample"), "-ref", "fixed.nii", "-flo", "labels.nii", "-trans", "cpp.nii",
             "-res", "moved.nii", "-inter", "0"])
        field = np.asarray(nib.load(os.path.join(d, "disp.nii")).dataobj, np.float64)   # (*vol, 1, 3) mm
        own = np.rint(np.asarray(nib.load(os.path.join(d, "moved.nii")).dataobj)).astype("int32")
    u = field.reshape(fix.shape + (3,)) / float(spacing)
    return dict(u=u, sec=sec, own=own, call=cmd + "; reg_transform -ref fixed.nii -disp cpp.nii disp.nii")


CONVEXADAM_KW = {}   # convex_adam_pt's own defaults (mind_r=1, mind_d=2, lambda_weight=1.25, grid_sp=6, disp_hw=4,
#                      selected_niter=80, selected_smooth=0, grid_sp_adam=2, ic=True)


def _run_convexadam(fix, mov, spacing, opts, mlab):
    import inspect

    import numpy as np
    import torch
    from convexAdam.apply_convex import apply_convex
    from convexAdam.convex_adam_MIND import convex_adam_pt

    from contrareg_tf.ops import warp_array

    torch.set_num_threads(opts["threads"])
    disp, sec = _timed(lambda: convex_adam_pt(img_fixed=fix, img_moving=mov, device=torch.device("cpu"),
                                              **CONVEXADAM_KW))
    u = np.asarray(disp, np.float64)                 # voxels, numpy axes already (apply_convex: map_coordinates)
    theirs = apply_convex(disp=disp, moving=mov)
    ours = warp_array(mov, u.astype(np.float32), "linear")
    defaults = {k: v.default for k, v in inspect.signature(convex_adam_pt).parameters.items()
                if k in ("mind_r", "mind_d", "lambda_weight", "grid_sp", "disp_hw", "selected_niter",
                         "selected_smooth", "grid_sp_adam", "ic")}
    return dict(u=u, sec=sec, agree=float(np.mean(np.abs(theirs - ours) <= 1e-3)), agree_on="img",
                call=f"convexAdam.convex_adam_MIND.convex_adam_pt(img_fixed=fixed, img_moving=moving, "
                     f"device=torch.device('cpu'))  # defaults {defaults}; torch.set_num_threads({opts['threads']})")


# what the recorded call alone does not say
NOTES = {"ants": "deformable only (no affine stage)",
         "ants-syn": "an affine stage (Mattes MI) then SyN: scored on the composition of both",
         "elastix": "elastix's default B-spline map: no affine stage, bending-energy penalty included",
         "greedy": "no affine stage; greedy's default smoothing (-s 1.732vox 0.7071vox)",
         "niftyreg": "no affine stage; reg_f3d defaults otherwise",
         "convexadam": "no affine stage; agree checked on the image (the package resamples linearly only)"}

# method -> (runner, pip package, import name)
PEERS = {"ants": (_run_ants, "antspyx", "ants"),
         "ants-syn": (_run_ants_syn, "antspyx", "ants"),
         "elastix": (_run_elastix, "itk-elastix", "itk"),
         "greedy": (_run_greedy, "picsl-greedy", "picsl_greedy"),
         "niftyreg": (_run_niftyreg, "niftyreg", "niftyreg"),
         "convexadam": (_run_convexadam, "convexadam", "convexAdam")}


def worker(spec):
    """One method on all pairs of one size; prints a JSON line."""
    import numpy as np

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(spec["threads"]))
    import contrareg_tf  # noqa: F401
    from contrareg_tf import metrics
    from contrareg_tf.data.dataset import load_description

    desc = load_description(spec["desc"])
    groups = {int(k): v for k, v in spec["groups"].items()}
    base = _rss_mb()
    rows = []
    call = None
    for a, b in spec["pairs"]:
        fix, mov, flab, mlab = _load_pair(desc, a, b)
        method = spec["method"]
        if method.startswith("io-"):
            r = _run_io(fix, mov, spec["spacing"], spec, mlab, method[3:])
        else:
            r = PEERS[method][0](fix, mov, spec["spacing"], spec, mlab)
        moved = _warp_labels_np(mlab, r["u"])
        agree = float(np.mean(moved == r["own"])) if "own" in r else r["agree"]
        jac = metrics.jacobian_determinant(r["u"])
        call = r["call"]
        rows.append({"pair": [a, b], **score(flab, mlab, moved, groups, spec["spacing"]),
                     "folds_pct": metrics.folding_fraction(jac), "std_log_jac": metrics.std_log_jacobian(jac),
                     "seconds": r["sec"], "agree": agree, "agree_on": r.get("agree_on", "labels")})
    print("RESULT " + json.dumps({"rows": rows, "peak_rss_mb": _rss_mb(), "base_rss_mb": base, "call": call}),
          flush=True)


# ---------------------------------------------------------------------------------------------- driver
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="96:2,128:1.5", help="comma list of SIZE:SPACING_MM (cubic volumes)")
    p.add_argument("--pairs", type=int, default=3, help="pairs per size (disjoint subjects 2i -> 2i+1)")
    p.add_argument("--max-disp-mm", type=float, default=12.0,
                   help="proxy SVF amplitude in mm (8 voxels at 1.5 mm, as in issue 13's measurements)")
    p.add_argument("--methods", default=None,
                   help="comma list from io-mindssc, io-mind, io-dns, io-ae (each optionally -<preset>, e.g. "
                        "io-mindssc-fast), ants, ants-syn, elastix, greedy, niftyreg, convexadam (peers not "
                        "installed are skipped with a note) (default: io-mindssc [+io-dns, io-ae when weights are "
                        "given], ants, elastix)")
    p.add_argument("--dns-model", help="MASR-Net weights (3-D .h5) for io-dns")
    p.add_argument("--ae1", help="T1w autoencoder weights for io-ae")
    p.add_argument("--ae2", help="T2w autoencoder weights for io-ae")
    p.add_argument("--iters", help="IO iterations per level, e.g. 100,80,50 (default: the preset's)")
    p.add_argument("--io-preset", default="paper",
                   help="IO schedule (config.IO_PRESETS) of io-<features> methods without a -<preset> suffix")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for the peers (ITK / OpenMP / torch; TF uses all cores)")
    p.add_argument("--data-source", default="icbm2009c", help="built-in data: icbm2009c or mni2009a-synth")
    p.add_argument("--cache", default=None, help="proxy cache folder (default: contrareg_tf cache)")
    p.add_argument("--out", default=None, help="markdown table (default bench/results/io_<date>.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _methods(a):
    if a.methods:
        return [m.strip() for m in a.methods.split(",") if m.strip()]
    out = ["io-mindssc"]
    if a.dns_model:
        out.append("io-dns")
    if a.ae1 and a.ae2:
        out.append("io-ae")
    return out + ["ants", "elastix"]


def _dice_cells(rows):
    import numpy as np

    dm = np.array([r["dice_mean"] for r in rows])
    per = [np.mean([r["dice"][g] for r in rows if g in r["dice"]] or [np.nan]) for g in GROUPS]
    return f"{dm.mean():.3f} ± {dm.std():.3f} | " + " | ".join(f"{v:.3f}" for v in per)


def _dice30_hd95(rows):
    """Dice30 (``metrics.dice30`` of the per-pair mean Dice; one pair -> its Dice) | mean HD95 over pairs."""
    import numpy as np

    from contrareg_tf import metrics

    hd = [r["hd95_mean"] for r in rows if "hd95_mean" in r]
    return (f"{metrics.dice30([r['dice_mean'] for r in rows]):.3f} | "
            + (f"{np.nanmean(hd):.2f}" if hd and np.isfinite(hd).any() else ""))


def _fmt_rows(size, spacing, method, res, ants_sec=None):
    import numpy as np

    rows = res["rows"]
    sec = float(np.mean([r["seconds"] for r in rows]))
    ratio = f"{sec / ants_sec:.2f}" if ants_sec else ""
    on = " (img)" if any(r.get("agree_on") == "img" for r in rows) else ""
    return (f"| {size}³ @ {spacing:g} mm | {method} | {_dice_cells(rows)} | {_dice30_hd95(rows)}"
            + f" | {np.mean([r['folds_pct'] for r in rows]):.3f} | {np.mean([r['std_log_jac'] for r in rows]):.3f}"
            f" | {sec:.1f} | {ratio} | {res['peak_rss_mb'] / 1024:.2f}"
            f" | {min(r['agree'] for r in rows):.4f}{on} |")


def _missing(method):
    """The pip package a peer method needs when it is not importable here, else None."""
    import importlib.util

    _, package, module = PEERS[method]
    return None if importlib.util.find_spec(module) is not None else package


IO_FEATURES = ("mindssc", "mind", "dns", "ae")


def _versions(methods):
    """'package version' of the peers and the deep-learning frameworks used in this run."""
    from importlib import metadata

    pk = {PEERS[m][1] for m in methods if m in PEERS} | ({"torch"} if "convexadam" in methods else set())
    pk |= {"tensorflow"} if any(m.startswith("io-") for m in methods) else set()
    out = []
    for p in sorted(pk):
        try:
            out.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            out.append(f"{p} ?")
    return "Versions: " + ", ".join(out) + "."


def main(argv=None):
    a = parse(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return 0
    import numpy as np

    import contrareg_tf  # noqa: F401
    from contrareg_tf.data import proxy
    from contrareg_tf.errors import ContraRegInputError

    from contrareg_tf.config import IO_PRESETS

    methods = _methods(a)
    skipped = []
    if a.io_preset not in IO_PRESETS:
        raise ContraRegInputError(f"--io-preset: unknown preset {a.io_preset!r}; choose one of {sorted(IO_PRESETS)}")
    for m in list(methods):
        feat, _, preset = m[3:].partition("-") if m.startswith("io-") else ("", "", "")
        if m.startswith("io-") and (feat not in IO_FEATURES or (preset and preset not in IO_PRESETS)):
            raise ContraRegInputError(f"--methods: unknown method {m!r} (io-<{'|'.join(IO_FEATURES)}>"
                                      f"[-<{'|'.join(IO_PRESETS)}>])")
        if not m.startswith("io-") and m not in PEERS:
            raise ContraRegInputError(f"--methods: unknown method {m!r} (peers: {', '.join(PEERS)})")
        if m in PEERS and _missing(m):
            skipped.append(f"skipped {m}: {_missing(m)} not installed")
            print(skipped[-1], flush=True)
            methods.remove(m)
        if feat == "dns" and not a.dns_model:
            raise ContraRegInputError(f"--methods {m} needs --dns-model")
        if feat == "ae" and not (a.ae1 and a.ae2):
            raise ContraRegInputError(f"--methods {m} needs --ae1 and --ae2")
    methods.sort(key=lambda m: m != "ants")        # ANTs first: the time ratio column is relative to it
    sizes = []
    for tok in a.sizes.split(","):
        s, sp = tok.split(":")
        sizes.append((int(s), float(sp)))
    iters = [int(t) for t in a.iters.split(",")] if a.iters else None

    cols = (["volume", "method", "Dice mean ± sd"] + list(GROUPS)
            + ["Dice30", "HD95 mm", "% folds", "std log\\|J\\|", "s / pair", "time / ANTs", "peak RSS GB", "agree"])
    header = "| " + " | ".join(cols) + " |"
    lines = [header, "|" + "---|" * len(cols)]
    print(header, flush=True)
    raw, calls = {}, {}
    load = os.getloadavg()
    for size, spacing in sizes:
        t0 = time.time()
        desc = proxy.build_proxy(None if a.cache is None else os.path.join(a.cache, f"io_{size}_{spacing:g}"),
                                 n_subjects=max(2 * a.pairs, 2), shape=(size,) * 3, spacing=spacing,
                                 max_disp=a.max_disp_mm / spacing, seed=0, source=a.data_source)
        pairs = [(2 * i, 2 * i + 1) for i in range(a.pairs)]
        print(f"# proxy {size}³ @ {spacing:g} mm ready in {time.time() - t0:.0f} s: {desc.source}", flush=True)
        groups = {int(k): v for k, v in (desc.meta.get("label_groups") or {}).items()}
        before, ceil = [], []
        for i, j in pairs:
            _, _, flab, mlab = _load_pair(desc, i, j)
            before.append(score(flab, mlab, mlab, groups, spacing))
            ceil.append(score(flab, mlab, _warp_labels_np(mlab, proxy.true_pair_warp(desc, i, j)), groups, spacing))
        for name, rows in (("before registration", before), ("true warp (ceiling)", ceil)):
            line = f"| {size}³ @ {spacing:g} mm | {name} | {_dice_cells(rows)} | {_dice30_hd95(rows)} | | | | | | |"
            lines.append(line)
            print(line, flush=True)
        ants_sec = None
        for m in methods:
            spec = dict(method=m, desc=desc.source, pairs=pairs, spacing=spacing, threads=a.threads,
                        dns_model=a.dns_model, ae1=a.ae1, ae2=a.ae2, iters=iters, io_preset=a.io_preset,
                        groups={str(k): v for k, v in groups.items()})
            env = dict(os.environ, PYTHONPATH=ROOT, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(a.threads),
                       OMP_NUM_THREADS=str(a.threads))
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                               capture_output=True, text=True, env=env)
            res = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
            if r.returncode != 0 or not res:
                line = f"| {size}³ @ {spacing:g} mm | {m} | failed: {r.stderr.strip().splitlines()[-1:]} |"
            else:
                out = json.loads(res[0][7:])
                raw[f"{size}:{m}"] = out
                calls[m] = out.get("call")
                if m == "ants":
                    ants_sec = float(np.mean([r["seconds"] for r in out["rows"]]))
                line = _fmt_rows(size, spacing, m, out, ants_sec)
            lines.append(line)
            print(line, flush=True)

    out = a.out or os.path.join(ROOT, "bench", "results", f"io_{time.strftime('%Y-%m-%d')}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(f"# IO benchmark ({time.strftime('%Y-%m-%d %H:%M')})\n\n")
        f.write(f"Command: `python bench/bench_io.py {' '.join(argv if argv is not None else sys.argv[1:])}`  \n")
        f.write(f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; "
                f"python {platform.python_version()}; load average (1, 5, 15 min) at start "
                f"{', '.join(f'{v:.2f}' for v in load)}, at end {', '.join(f'{v:.2f}' for v in os.getloadavg())}."
                f"  \n{_versions(methods)}  \n"
                f"Built-in data ({a.data_source}): moving = T1w of subject 2i, fixed = T2w of subject 2i+1; Dice "
                "over each pair's labels (structures in both maps), per coarse group in the columns; "
                f"SVF max {a.max_disp_mm:g} mm per subject.  \n"
                "IO schedules (contrareg_tf.config.IO_PRESETS; io-<features> = --io-preset, io-<features>-<preset> "
                f"= that preset): {'; '.join(f'{k}: {v!r}' for k, v in IO_PRESETS.items())}"
                f"{'; iters overridden: ' + a.iters if a.iters else ''}.  \n"
                "time / ANTs = s / pair over ANTs SyNOnly's s / pair measured in the same run (each method in its "
                "own worker process, one after the other on the same machine); Dice30 = metrics.dice30 of the "
                "per-pair mean Dice (mean of the lowest ceil(30 %) of pairs; one pair -> that pair's Dice); HD95 = "
                "metrics.hd95 (mm), mean over the pair's structures, then over pairs.  \n"
                "agree = fraction of voxels where labels warped with our converted displacement equal the tool's "
                "own nearest-neighbour resampling (IO: its TF nearest warp vs scipy map_coordinates; (img): "
                "convexAdam's apply_convex of the moving image vs ops.warp_array with the converted field, "
                "|diff| <= 1e-3).\n\n"
                + "".join(f"{l}  \n" for l in skipped)
                + ("\nExact calls (fixed = T2w of subject 2i+1, moving = T1w of subject 2i, identity direction, "
                   "origin 0, the size's spacing):\n\n"
                   + "".join(f"- `{m}`: `{c}`" + (f" ({NOTES[m]})" if m in NOTES else "") + "\n"
                             for m, c in calls.items())
                   + "\n" if calls else ""))
        f.write("\n".join(lines) + "\n\n<details><summary>raw per-pair results</summary>\n\n```json\n"
                + json.dumps(raw, indent=1) + "\n```\n</details>\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from contrareg_tf.cli import run_cli

    run_cli(main)
