#!/usr/bin/env python
"""Benchmark: instance optimisation (IO, DNS paper Table 4) with MIND-SSC (and DNS / autoencoder features
when weights are given) against ANTs SyNOnly (Mattes MI) and elastix B-spline (MI) on the built-in data
(default source icbm2009c: moving = real ICBM 2009c T1w of subject a, fixed = real T2w of subject b, each with
its own random diffeomorphism and intensity augmentation; CerebrA labels).

    python bench/bench_io.py                                   # 96³ @ 2 mm and 128³ @ 1.5 mm, 3 pairs each
    python bench/bench_io.py --sizes 96:2 --pairs 2 --methods io-mindssc,ants,elastix
    python bench/bench_io.py --sizes 96:2 --dns-model models/dns_proxy3d.h5 --ae1 A1.h5 --ae2 A2.h5

Every method runs in its own worker process (peak RSS is per method); the table gives Dice (mean over
the pair's structures — labels in both input maps —, then over pairs; and per coarse group of structures), % folding voxels (det J ≤ 0), std log|J| (det clipped at 1e-9),
seconds per pair (IO: features + optimisation, first pair includes tf.function tracing) and the worker's
peak RSS. ANTs / elastix displacement fields are physical (ITK) mm: the images are handed over with
identity direction and isotropic spacing, so voxel displacement = field / spacing along each numpy axis
(ITK's x = numpy axis 0 for ANTs' from_numpy, = the last numpy axis for itk.GetImageFromArray); the
conversion is checked by re-warping the labels with the converted field against each tool's own
nearest-neighbour resampling ("agree" column, fraction of equal voxels).
Needs the ``bench`` extra for the peers: ``pip install antspyx itk-elastix``.
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_pair(desc, a, b):
    from contrareg_tf.data.io import load_nifti

    sa, sb = desc.subjects[a], desc.subjects[b]
    mov = load_nifti(sa.t1).data
    fix = load_nifti(sb.t2).data
    mlab = load_nifti(sa.labels).data.astype("int32")
    flab = load_nifti(sb.labels).data.astype("int32")
    return fix, mov, flab, mlab


def score(flab, mlab, moved, groups):
    """Dice over the pair's structures (``metrics.pair_structures``): mean, and mean per coarse group."""
    import numpy as np

    from contrareg_tf import metrics

    ids = np.asarray(metrics.pair_structures(flab, mlab))
    d = metrics.dice_per_label(flab, moved, ids)
    per = {g: float(np.mean(d[[groups.get(int(k)) == g for k in ids]])) for g in GROUPS
           if any(groups.get(int(k)) == g for k in ids)}
    return {"dice_mean": float(np.mean(d)), "dice": per}


def _warp_labels_np(lab, u):
    import numpy as np
    from scipy import ndimage

    grid = np.stack(np.meshgrid(*[np.arange(n) for n in lab.shape], indexing="ij"), 0).astype(np.float64)
    return ndimage.map_coordinates(lab, grid + np.moveaxis(u, -1, 0), order=0, mode="nearest")


def _run_io(fix, mov, spacing, opts, features):
    from contrareg_tf.config import IO_PRESETS
    from contrareg_tf.instance_opt import instance_optimise
    from contrareg_tf.ops import warp_array as warp

    features, _, preset = features.partition("-")        # io-<features>[-<preset>], e.g. io-mindssc-fast
    kw = IO_PRESETS[preset or opts.get("io_preset") or "paper"].schedule()
    if features == "dns":
        kw["dns_model"] = opts["dns_model"]
    if features == "ae":
        kw.update(ae_models=(opts["ae1"], opts["ae2"]), moving_modality="t1")
    if opts.get("iters"):
        kw["iters"] = opts["iters"]
    t = time.perf_counter()
    res = instance_optimise(fix[None, ..., None], mov[None, ..., None], features=features, progress=False, **kw)
    sec = time.perf_counter() - t
    return res.disp[0], sec, None, lambda lab: warp(lab[None, ..., None], res.disp, "nearest")[0, ..., 0]


def _run_ants(fix, mov, spacing, opts, mlab):
    import ants
    import numpy as np

    sp = (float(spacing),) * fix.ndim
    f = ants.from_numpy(fix.astype("float32"), spacing=sp)
    m = ants.from_numpy(mov.astype("float32"), spacing=sp)
    t = time.perf_counter()
    reg = ants.registration(f, m, type_of_transform="SyNOnly", syn_metric="mattes")
    sec = time.perf_counter() - t
    field = ants.image_read(reg["fwdtransforms"][0]).numpy()          # (*vol, ndim) physical mm, ITK x = axis 0
    u = field / np.asarray(sp)
    own = ants.apply_transforms(f, ants.from_numpy(mlab.astype("float32"), spacing=sp), reg["fwdtransforms"],
                                interpolator="nearestNeighbor").numpy()
    return u, sec, np.rint(own).astype("int32"), None


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
    t = time.perf_counter()
    _, params = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False)
    sec = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as scratch:  # transformix writes deformationField.nii there (default: cwd)
        field = itk.GetArrayFromImage(itk.transformix_deformation_field(m, params, output_directory=scratch))
    # numpy axes reversed
    u = field[..., ::-1] / float(spacing)  # component k of ITK = numpy axis (ndim-1-k)
    params.SetParameter(0, "FinalBSplineInterpolationOrder", "0")
    own = itk.GetArrayFromImage(itk.transformix_filter(img(mlab), params))
    return u, sec, np.rint(own).astype("int32"), None


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
    for a, b in spec["pairs"]:
        fix, mov, flab, mlab = _load_pair(desc, a, b)
        method = spec["method"]
        if method.startswith("io-"):
            u, sec, own, warp_fn = _run_io(fix, mov, spec["spacing"], spec, method[3:])
            moved = warp_fn(mlab)
            agree = float(np.mean(moved == _warp_labels_np(mlab, u)))
        else:
            run = _run_ants if method == "ants" else _run_elastix
            u, sec, own, _ = run(fix, mov, spec["spacing"], spec, mlab)
            moved = _warp_labels_np(mlab, u)
            agree = float(np.mean(moved == own))
        jac = metrics.jacobian_determinant(u)
        rows.append({"pair": [a, b], **score(flab, mlab, moved, groups), "folds_pct": metrics.folding_fraction(jac),
                     "std_log_jac": metrics.std_log_jacobian(jac), "seconds": sec, "agree": agree})
    print("RESULT " + json.dumps({"rows": rows, "peak_rss_mb": _rss_mb(), "base_rss_mb": base}), flush=True)


# ---------------------------------------------------------------------------------------------- driver
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="96:2,128:1.5", help="comma list of SIZE:SPACING_MM (cubic volumes)")
    p.add_argument("--pairs", type=int, default=3, help="pairs per size (disjoint subjects 2i -> 2i+1)")
    p.add_argument("--max-disp-mm", type=float, default=12.0,
                   help="proxy SVF amplitude in mm (8 voxels at 1.5 mm, as in issue 13's measurements)")
    p.add_argument("--methods", default=None,
                   help="comma list from io-mindssc, io-mind, io-dns, io-ae (each optionally -<preset>, e.g. "
                        "io-mindssc-fast), ants, elastix, greedy, niftyreg, convexadam (peers not installed are "
                        "skipped with a note) (default: io-mindssc [+io-dns, io-ae when weights are given], ants, "
                        "elastix)")
    p.add_argument("--dns-model", help="MASR-Net weights (3-D .h5) for io-dns")
    p.add_argument("--ae1", help="T1w autoencoder weights for io-ae")
    p.add_argument("--ae2", help="T2w autoencoder weights for io-ae")
    p.add_argument("--iters", help="IO iterations per level, e.g. 100,80,50 (default: the preset's)")
    p.add_argument("--io-preset", default="paper",
                   help="IO schedule (config.IO_PRESETS) of io-<features> methods without a -<preset> suffix")
    p.add_argument("--threads", type=int, default=2, help="threads for ANTs / elastix (TF uses all cores)")
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


def _dice30(rows):
    """Mean Dice of the lowest 30 % of pairs (at least one pair; Learn2Reg's DSC30); '' for one pair."""
    import numpy as np

    if len(rows) < 2:
        return ""
    d = np.sort([r["dice_mean"] for r in rows])
    return f"{d[:max(1, int(round(0.3 * len(d))))].mean():.3f}"


def _fmt_rows(size, spacing, method, res, ants_sec=None):
    import numpy as np

    rows = res["rows"]
    sec = float(np.mean([r["seconds"] for r in rows]))
    ratio = f"{sec / ants_sec:.2f}" if ants_sec else ""
    return (f"| {size}³ @ {spacing:g} mm | {method} | {_dice_cells(rows)} | {_dice30(rows)}"
            + f" | {np.mean([r['folds_pct'] for r in rows]):.3f} | {np.mean([r['std_log_jac'] for r in rows]):.3f}"
            f" | {sec:.1f} | {ratio} | {res['peak_rss_mb'] / 1024:.2f}"
            f" | {min(r['agree'] for r in rows):.4f} |")


PEERS_MISSING = {"greedy": "picsl-greedy (pip install picsl-greedy) is not wired into this benchmark yet",
                 "niftyreg": "NiftyReg (reg_f3d) has no pip package here",
                 "convexadam": "convexAdam needs PyTorch, not in this environment"}
IO_FEATURES = ("mindssc", "mind", "dns", "ae")


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
    if a.io_preset not in IO_PRESETS:
        raise ContraRegInputError(f"--io-preset: unknown preset {a.io_preset!r}; choose one of {sorted(IO_PRESETS)}")
    for m in list(methods):
        feat, _, preset = m[3:].partition("-") if m.startswith("io-") else ("", "", "")
        if m.startswith("io-") and (feat not in IO_FEATURES or (preset and preset not in IO_PRESETS)):
            raise ContraRegInputError(f"--methods: unknown method {m!r} (io-<{'|'.join(IO_FEATURES)}>"
                                      f"[-<{'|'.join(IO_PRESETS)}>])")
        if not m.startswith("io-") and m not in ("ants", "elastix") and m not in PEERS_MISSING:
            raise ContraRegInputError(f"--methods: unknown method {m!r}")
        if m in PEERS_MISSING:
            print(f"# skipped {m}: {PEERS_MISSING[m]}", flush=True)
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
            + ["Dice30", "% folds", "std log\\|J\\|", "s / pair", "time / ANTs", "peak RSS GB", "agree"])
    header = "| " + " | ".join(cols) + " |"
    lines = [header, "|" + "---|" * len(cols)]
    print(header, flush=True)
    raw = {}
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
            before.append(score(flab, mlab, mlab, groups))
            ceil.append(score(flab, mlab, _warp_labels_np(mlab, proxy.true_pair_warp(desc, i, j)), groups))
        for name, rows in (("before registration", before), ("true warp (ceiling)", ceil)):
            line = f"| {size}³ @ {spacing:g} mm | {name} | {_dice_cells(rows)} | {_dice30(rows)} | | | | | | |"
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
                f"python {platform.python_version()}.  \n"
                f"Built-in data ({a.data_source}): moving = T1w of subject 2i, fixed = T2w of subject 2i+1; Dice "
                "over each pair's labels (structures in both maps), per coarse group in the columns; "
                f"SVF max {a.max_disp_mm:g} mm per subject.  \n"
                "IO schedules (contrareg_tf.config.IO_PRESETS; io-<features> = --io-preset, io-<features>-<preset> "
                f"= that preset): {'; '.join(f'{k}: {v.schedule()}' for k, v in IO_PRESETS.items())}"
                f"{'; iters overridden: ' + a.iters if a.iters else ''}.  \n"
                "time / ANTs = s / pair over ANTs SyNOnly's s / pair measured in the same run (each method in its "
                "own worker process, one after the other on the same machine); Dice30 = mean of the lowest 30 % "
                "of pairs (empty for one pair).  \n"
                "agree = fraction of voxels where labels warped with our converted displacement equal the tool's "
                "own nearest-neighbour resampling (IO: vs scipy map_coordinates).\n\n")
        f.write("\n".join(lines) + "\n\n<details><summary>raw per-pair results</summary>\n\n```json\n"
                + json.dumps(raw, indent=1) + "\n```\n</details>\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from contrareg_tf.cli import run_cli

    run_cli(main)
