"""Issue 12: real scans in, correct results out — physical space, any grid, affine pre-alignment, ITK export,
outputs that never destroy inputs, one ``error:`` line per failure, the training lock, BOM-tolerant CSVs.

Phantoms are analytic objects defined in world millimetres (an asymmetric ellipsoid with an inner core and an
off-centre ball, smooth texture) rasterised on each grid, so the same physical object can be stored in any
orientation / voxel size / field of view with a known answer. Dice is computed here in numpy; antspyx is the
peer for the affine and the ITK field. Models are tiny3d networks built here (untrained: their warps are
≈ 0, ~1e-4 voxels), so a correct result is the identity *in world space* — which voxel-space handling misses.
"""
import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from contrareg_tf.data import physical as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


# ------------------------------------------------------------------------------------------- phantoms
def world_phantom(shape, affine, centre=(2.0, -3.0, 1.0)):
    """(labels int32, image float32) of the world-space object on the grid ``shape``/``affine`` (4×4)."""
    w = P.apply_affine(np.asarray(affine, float), P.identity_grid(shape))
    c = np.asarray(centre)
    r = np.linalg.norm((w - c) / np.array([24.0, 18.0, 15.0]), axis=-1)
    lab = np.zeros(shape, np.int32)
    lab[r < 1] = 1
    lab[r < 0.6] = 2
    lab[np.linalg.norm(w - c - np.array([11.0, 5.0, 4.0]), axis=-1) < 6] = 3
    tex = 1 + 0.25 * np.sin(w[..., 0] / 4.0) * np.cos(w[..., 1] / 3.0) + 0.2 * np.sin(w[..., 2] / 3.5 + w[..., 0] / 6)
    img = np.array([0.0, 0.6, 1.0, 0.3], np.float32)[lab] * tex
    return lab, ndi.gaussian_filter(img, 0.7).astype(np.float32)


def centred_affine(shape, spacing):
    a = np.diag(list(np.broadcast_to(spacing, 3).astype(float)) + [1.0])
    a[:3, 3] = -(np.array(shape) - 1) * np.diag(a)[:3] / 2
    return a


def reoriented(data, affine, ornt_codes):
    """The same physical image stored in another voxel order (nibabel orientation tools)."""
    import nibabel.orientations as no

    img = nib.Nifti1Image(data, affine)
    tr = no.ornt_transform(no.io_orientation(affine), no.axcodes2ornt(ornt_codes))
    out = img.as_reoriented(tr)
    return np.asarray(out.dataobj), out.affine


def save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def mdice(a, b, labels=(1, 2, 3)):
    return float(np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in labels]))


def fg_dice(a, b):
    return float(2 * np.sum((a > 0) & (b > 0)) / (np.sum(a > 0) + np.sum(b > 0)))


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "eval_scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_main(name, argv, capsys):
    """Run an eval script's ``main`` through ``run_cli``: (exit code, stderr lines, stdout)."""
    from contrareg_tf.cli import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(load_script(name).main, argv)
    cap = capsys.readouterr()
    return e.value.code, [ln for ln in cap.err.strip().splitlines() if ln], cap.out


SHAPE, SPACING = (32, 36, 28), 2.0
IO_FAST = ["--iters", "4,3,2", "--quiet"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The RAS reference: image + labels at 2 mm."""
    d = tmp_path_factory.mktemp("ref")
    aff = centred_affine(SHAPE, SPACING)
    lab, img = world_phantom(SHAPE, aff)
    return {"dir": d, "aff": aff, "lab": lab, "img": img, "img_path": save(d / "img.nii.gz", img, aff),
            "lab_path": save(d / "lab.nii.gz", lab.astype(np.int16), aff)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny3d model folder (config.json + model.h5) trained at 2 mm, weights untouched (warp ≈ 0)."""
    from contrareg_tf.atomic import write_json
    from contrareg_tf.config import get_preset
    from contrareg_tf.networks.hyper import build_hyper_vxm
    from contrareg_tf.runs import save_trained

    d = str(tmp_path_factory.mktemp("run"))
    cfg = dataclasses.replace(get_preset("tiny3d"), spacing=2.0)
    save_trained(d, build_hyper_vxm(cfg))
    write_json(os.path.join(d, "config.json"), {"config": dataclasses.asdict(cfg), "conditioning": "film"})
    return d


# ------------------------------------------------------------------------------------ orientation tools
def test_canonical_round_trip_and_vector_components_agree_in_world_space():
    rng = np.random.default_rng(0)
    x = rng.random((5, 6, 7))
    a = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -3], [0, -1.0, 0, 4], [0, 0, 0, 1]])
    ornt = P.canonical_orientation(a, 3)
    xc, ac = P.to_canonical(x, ornt), P.canonical_affine(a, x.shape, ornt)
    assert np.all(np.diag(ac)[:3] > 0) and np.count_nonzero(ac[:3, :3]) == 3   # RAS, axis-aligned
    w = P.apply_affine(a, P.identity_grid(x.shape))            # each stored voxel's world position
    ic = np.rint(P.apply_affine(np.linalg.inv(ac), w)).astype(int)
    np.testing.assert_array_equal(xc[ic[..., 0], ic[..., 1], ic[..., 2]], x)
    np.testing.assert_array_equal(P.from_canonical(xc, ornt), x)
    u_c = rng.random(xc.shape + (3,))
    u_o = P.from_canonical(u_c, ornt, vector=True)               # same physical displacement in mm:
    np.testing.assert_allclose(u_o @ a[:3, :3].T, u_c[ic[..., 0], ic[..., 1], ic[..., 2]] @ ac[:3, :3].T,
                               atol=1e-12)


def test_window_warp_maps_back_scaled_and_extended():
    """A window displacement at 2× the fixed spacing: values × 2 in fixed voxels; constant outside."""
    from contrareg_tf.inference import Window, warp_from_window

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [4.0, 2.0, 0.0]                                 # window voxel w ↔ fixed voxel 2w + shift
    win = Window(shape=(8, 8, 8), affine=aff, scale=(2.0, 2.0, 2.0))
    g = P.identity_grid(win.shape)
    u_w = np.stack([0.1 * g[..., 0], np.full(win.shape, -0.5), np.zeros(win.shape)], -1).astype(np.float32)
    u = warp_from_window(u_w, win, (30, 24, 20))
    c = P.identity_grid((30, 24, 20))
    w0 = np.clip((c[..., 0] - 4.0) / 2.0, 0, 7)                  # window coordinate, clamped outside
    np.testing.assert_allclose(u[..., 0], 2 * 0.1 * w0, atol=1e-5)
    np.testing.assert_allclose(u[..., 1], -1.0, atol=1e-6)


# ------------------------------------------------------------------- the same image, any orientation
ORIENTS = [("RAS", "LAS"), ("RAS", "LPI"), ("RAS", "SRA"), ("LPI", "RAS"), ("ASL", "LAS")]


def _stored(ref, codes, d, stem):
    img, aff = reoriented(ref["img"], ref["aff"], codes)
    lab, _ = reoriented(ref["lab"].astype(np.int16), ref["aff"], codes)
    return save(d / f"{stem}_img.nii.gz", img, aff), save(d / f"{stem}_lab.nii.gz", lab, aff), lab, aff


@pytest.mark.parametrize("fixed_codes,moving_codes", ORIENTS)
def test_same_physical_image_any_orientation_io_and_model(ref, run_dir, tmp_path, capsys, fixed_codes,
                                                          moving_codes):
    from contrareg_tf.inference import register_files

    f_img, f_lab, f_lab_arr, f_aff = _stored(ref, fixed_codes, tmp_path, "f")
    m_img, m_lab, m_lab_arr, _ = _stored(ref, moving_codes, tmp_path, "m")
    if f_lab_arr.shape == m_lab_arr.shape:
        assert mdice(f_lab_arr, m_lab_arr) < 0.9                    # in voxel space they differ
    out = tmp_path / "io_lab.nii.gz"
    code, err, _ = run_main("instance_opt", ["--fixed", f_img, "--moving", m_img, "--moving-labels", m_lab,
                                             "--moved-labels", str(out), "--moved", str(tmp_path / "io.nii.gz"),
                                             *IO_FAST], capsys)
    assert code == 0, err
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, f_aff)
    assert img.header.get_data_shape() == f_lab_arr.shape
    assert mdice(np.asarray(img.dataobj), f_lab_arr) >= 0.99
    res = register_files(run_dir, f_img, m_img, str(tmp_path / "net.nii.gz"), lam=0.5, moving_labels=m_lab,
                         moved_labels_out=str(tmp_path / "net_lab.nii.gz"))
    net = nib.load(str(tmp_path / "net_lab.nii.gz"))
    np.testing.assert_allclose(net.affine, f_aff)
    assert mdice(np.asarray(net.dataobj), f_lab_arr) >= 0.99
    moved = nib.load(str(tmp_path / "net.nii.gz")).get_fdata()  # the moving intensities, not normalised ones
    f_data = nib.load(f_img).get_fdata()
    assert np.abs(moved - f_data).max() < 0.01 * f_data.max()
    assert res.folds == 0.0


# ------------------------------------------------------------------------------ voxel size and grid
def np_nearest_on_fixed(m_lab, m_aff, f_shape, f_aff):
    """Independent numpy answer: the moving label at each fixed voxel centre's world position (rounded)."""
    idx = np.rint(P.apply_affine(np.linalg.inv(m_aff) @ f_aff, P.identity_grid(f_shape))).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(m_lab.shape)), axis=-1)
    out = np.zeros(f_shape, m_lab.dtype)
    i = idx[inside]
    out[inside] = m_lab[i[:, 0], i[:, 1], i[:, 2]]
    return out


@pytest.mark.parametrize("moving_spacing", [1.0, (1.0, 2.0, 4.0)])
def test_moving_at_other_voxel_size_lands_on_fixed_grid(ref, run_dir, tmp_path, capsys, moving_spacing):
    """Same object, moving at 1 mm (or 1×2×4 mm) vs the 2 mm fixed; grids share voxel 0's centre, so at
    1 mm every fixed voxel centre is a moving voxel centre and nearest neighbour is exact; at 1×2×4 mm the
    answer is the independent numpy nearest-neighbour resampling (and a lower Dice: 4 mm slices)."""
    from contrareg_tf.inference import register_files

    fov = np.array(SHAPE) * SPACING
    m_shape = tuple(int(v) for v in fov / np.broadcast_to(moving_spacing, 3))
    m_aff = centred_affine(m_shape, moving_spacing)
    m_aff[:3, 3] = ref["aff"][:3, 3]
    if moving_spacing != 1.0:
        m_aff[:3, 3] += [0.0, 0.3, 0.7]     # no fixed voxel centre half-way between two moving ones (ties)
    m_lab, m_img = world_phantom(m_shape, m_aff)
    mi, ml = save(tmp_path / "m.nii.gz", m_img, m_aff), save(tmp_path / "ml.nii.gz", m_lab, m_aff)
    expect = np_nearest_on_fixed(m_lab, m_aff, SHAPE, ref["aff"])
    if moving_spacing == 1.0:
        assert fg_dice(expect, ref["lab"]) == 1.0
    out = tmp_path / "io_lab.nii.gz"
    code, err, _ = run_main("instance_opt", ["--fixed", ref["img_path"], "--moving", mi, "--moving-labels", ml,
                                             "--moved-labels", str(out), *IO_FAST], capsys)
    assert code == 0, err
    io_lab = np.asarray(nib.load(str(out)).dataobj)
    register_files(run_dir, ref["img_path"], mi, str(tmp_path / "n.nii.gz"), lam=0.5, moving_labels=ml,
                   moved_labels_out=str(tmp_path / "nl.nii.gz"))
    net_lab = np.asarray(nib.load(str(tmp_path / "nl.nii.gz")).dataobj)
    assert np.mean(net_lab == expect) >= 0.995                      # warp ≈ 0: the world-space answer
    for lab in (io_lab, net_lab):
        assert fg_dice(lab, ref["lab"]) >= (0.95 if moving_spacing == 1.0 else 0.9)
        assert mdice(lab, ref["lab"]) >= (0.95 if moving_spacing == 1.0 else 0.8)


@pytest.mark.parametrize("image_spacing", [2.0, 1.0])
def test_register_any_grid_keeps_every_moving_foreground_voxel(run_dir, tmp_path, image_spacing):
    """37×41×29 through a model trained at 16³ (and, at 1 mm, at twice the images' voxel size)."""
    from contrareg_tf.inference import register_files

    shape = (37, 41, 29)
    aff = centred_affine(shape, image_spacing)
    g = P.identity_grid(shape)
    r = np.linalg.norm((g - (np.array(shape) - 1) / 2) / (np.array(shape) / 2.05), axis=-1)
    lab = ((r < 1).astype(np.int32) + (r < 0.5)).astype(np.int16)   # reaches every face of the grid
    img = np.array([0.0, 0.5, 1.0], np.float32)[lab]
    fi, ml = save(tmp_path / "f.nii.gz", img, aff), save(tmp_path / "l.nii.gz", lab, aff)
    res = register_files(run_dir, fi, fi, str(tmp_path / "m.nii.gz"), lam=0.5, moving_labels=ml,
                         moved_labels_out=str(tmp_path / "ml.nii.gz"), warp_out=str(tmp_path / "w.nii.gz"))
    fg = lab > 0
    moved = nib.load(str(tmp_path / "m.nii.gz")).get_fdata()
    moved_lab = np.asarray(nib.load(str(tmp_path / "ml.nii.gz")).dataobj)
    assert np.all(moved[fg] > 0.4)                                   # nothing outside a central block is lost
    assert np.mean(moved_lab[fg] == lab[fg]) >= 0.999
    assert nib.load(str(tmp_path / "w.nii.gz")).shape == shape + (3,)
    assert all(s % 4 == 0 for s in res.window.shape) and res.window.shape != (16, 16, 16)


# ------------------------------------------------------------------------------------ affine (ANTs)
def _affine_pair(tmp_path):
    shape, sp = (48, 48, 48), 1.3
    aff = centred_affine(shape, sp)
    th = np.deg2rad(10)
    t = np.eye(4)
    t[:3, :3] = 1.1 * np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    t[:3, 3] = [5.0, 0.0, 0.0]                                       # fixed world p ↔ moving world T·p
    flab, fimg = world_phantom(shape, aff)
    mlab, mimg = world_phantom(shape, np.linalg.inv(t) @ aff)
    return {"t": t, "aff": aff, "flab": flab, "mlab": mlab,
            "f": save(tmp_path / "af.nii.gz", fimg, aff), "m": save(tmp_path / "am.nii.gz", mimg, aff),
            "fl": save(tmp_path / "afl.nii.gz", flab.astype(np.int16), aff),
            "ml": save(tmp_path / "aml.nii.gz", mlab.astype(np.int16), aff)}


def test_ants_affine_recovers_known_rotation_scale_shift(tmp_path):
    p = _affine_pair(tmp_path)
    assert fg_dice(p["mlab"], p["flab"]) < 0.85
    pair = P.load_pair(p["f"], p["m"], moving_labels=p["ml"], affine="ants")
    lin = pair.world[:3, :3]
    u, _, vt = np.linalg.svd(lin)                                     # polar decomposition: rotation u·vt
    rot = u @ vt
    assert np.cbrt(np.linalg.det(lin)) == pytest.approx(1.1, abs=0.03)                 # scale 1.1
    # 10° about z; antspyx's default 'Affine' schedule (10 full-resolution iterations) lands at 4–9° on this
    # phantom (measured, 11 runs) — the overlap, not the angle, is the criterion of the issue
    assert 3.0 < np.degrees(np.arctan2(rot[1, 0], rot[0, 0])) < 15.0
    assert np.linalg.norm(pair.world[:3, 3] - p["t"][:3, 3]) < 1.5     # 5 mm shift, within 1.5 mm
    moved = pair.moved_labels(pair.total_warp(None))
    assert fg_dice(moved, p["flab"]) >= 0.95


def test_affine_none_warns_on_misaligned_pair(tmp_path):
    from contrareg_tf.errors import ContraRegWarning

    p = _affine_pair(tmp_path)
    with pytest.warns(ContraRegWarning, match="--affine ants"):
        P.load_pair(p["f"], p["m"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ContraRegWarning)
        P.load_pair(p["f"], p["f"])                                   # aligned: silent


def test_itk_export_applied_by_antspyx_matches_project_labels(tmp_path, capsys):
    """--affine ants + deformable IO + a moving image in another orientation: ants.apply_transforms with the
    exported field reproduces the project's moved labels."""
    import ants

    p = _affine_pair(tmp_path)
    m_img, m_aff = reoriented(np.asarray(nib.load(p["m"]).dataobj), p["aff"], "LPI")
    m_lab, _ = reoriented(p["mlab"].astype(np.int16), p["aff"], "LPI")
    mi, ml = save(tmp_path / "m_lpi.nii.gz", m_img, m_aff), save(tmp_path / "ml_lpi.nii.gz", m_lab, m_aff)
    outs = {k: str(tmp_path / f"{k}.nii.gz") for k in ("lab", "itk", "warp")}
    code, err, out = run_main("instance_opt", ["--fixed", p["f"], "--moving", mi, "--moving-labels", ml,
                                               "--fixed-labels", p["fl"], "--moved-labels", outs["lab"],
                                               "--itk-warp", outs["itk"], "--warp", outs["warp"],
                                               "--affine", "ants", *IO_FAST], capsys)
    assert code == 0, err
    ours = np.asarray(nib.load(outs["lab"]).dataobj)
    assert fg_dice(ours, p["flab"]) >= 0.95
    theirs = ants.apply_transforms(fixed=ants.image_read(p["f"]), moving=ants.image_read(ml),
                                   transformlist=[outs["itk"]], interpolator="nearestNeighbor").numpy()
    assert mdice(np.rint(theirs).astype(int), ours) >= 0.99
    assert np.abs(nib.load(outs["warp"]).get_fdata()).max() > 3     # the affine is inside the written warp


# ------------------------------------------------------------------------------------------ labels
def test_large_label_values_survive_and_non_integer_labels_are_rejected(ref, run_dir, tmp_path, capsys):
    lab = ref["lab"].astype(np.int32) * 20000                          # 40000, 60000: beyond int16
    ml = save(tmp_path / "big.nii.gz", lab, ref["aff"])
    out = tmp_path / "out.nii.gz"
    code, err, _ = run_main("register", ["--model", run_dir, "--fixed", ref["img_path"], "--moving",
                                         ref["img_path"], "--lambda", "0.5", "--moved", str(tmp_path / "m.nii.gz"),
                                         "--moving-labels", ml, "--moved-labels", str(out)], capsys)
    assert code == 0, err
    got = np.asarray(nib.load(str(out)).dataobj)
    assert got.dtype == np.int32 and set(np.unique(got)) == {0, 20000, 40000, 60000}
    assert np.mean(got == lab) > 0.999
    frac = save(tmp_path / "frac.nii.gz", ref["lab"].astype(np.float32) + 0.3, ref["aff"])
    code, err, _ = run_main("instance_opt", ["--fixed", ref["img_path"], "--moving", ref["img_path"],
                                             "--moving-labels", frac, "--moved-labels", str(tmp_path / "x.nii.gz"),
                                             *IO_FAST], capsys)
    assert code == 2 and len(err) == 1 and "frac.nii.gz" in err[0] and "integer" in err[0]


# ------------------------------------------------------------------------------- failures: one line
def _bad_register_case(case, ref, run_dir, d):
    """(argv, inputs to keep byte-identical, outputs that must not appear) for register.py."""
    model = d / "model"
    model.mkdir()
    for f in ("config.json", "model.h5"):
        with open(os.path.join(run_dir, f), "rb") as src, open(model / f, "wb") as dst:
            dst.write(src.read())
    if case == "truncated_h5":
        data = (model / "model.h5").read_bytes()
        (model / "model.h5").write_bytes(data[: len(data) // 3])
    elif case == "truncated_json":
        data = (model / "config.json").read_bytes()
        (model / "config.json").write_bytes(data[: len(data) // 2])
    elif case == "keyless_json":
        (model / "config.json").write_text(json.dumps({"loss": "mi"}))
    fixed, moving = ref["img_path"], save(d / "mov.nii.gz", ref["img"], ref["aff"])
    moved, warp = str(d / "moved.nii.gz"), str(d / "warp.nii.gz")
    if case == "all_zero":
        moving = save(d / "zero.nii.gz", np.zeros(SHAPE, np.float32), ref["aff"])
    elif case == "moved_is_moving":
        moved = moving
    elif case == "moved_is_warp":
        warp = moved
    argv = ["--model", str(model), "--fixed", fixed, "--moving", moving, "--lambda", "0.5", "--moved", moved,
            "--warp", warp]
    return argv, [fixed, moving, str(model / "config.json"), str(model / "model.h5")]


@pytest.mark.parametrize("case", ["truncated_h5", "truncated_json", "keyless_json", "all_zero",
                                  "moved_is_moving", "moved_is_warp"])
def test_register_failures_are_one_error_line_exit_2_inputs_untouched(case, ref, run_dir, tmp_path, capsys):
    argv, inputs = _bad_register_case(case, ref, run_dir, tmp_path)
    before = {p: md5(p) for p in inputs}
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    code, err, _ = run_main("register", argv, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert {p: md5(p) for p in inputs} == before
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing       # no output, no temporary file


@pytest.mark.parametrize("case", ["lrs_nan", "reg_nan", "sigma_nan", "levels_0", "all_zero", "moved_is_moving",
                                  "labels_is_output", "diverged"])
def test_instance_opt_failures_are_one_error_line_exit_2_inputs_untouched(case, ref, tmp_path, capsys,
                                                                          monkeypatch):
    moving = save(tmp_path / "mov.nii.gz", ref["img"], ref["aff"])
    labels = save(tmp_path / "lab.nii.gz", ref["lab"].astype(np.int16), ref["aff"])
    moved = str(tmp_path / "moved.nii.gz")
    extra = []
    if case == "lrs_nan":
        extra = ["--lrs", "nan,5e-3,3e-3"]
    elif case == "reg_nan":
        extra = ["--reg-weights", "0.6,nan,0.4"]
    elif case == "sigma_nan":
        extra = ["--smooth-sigma", "nan"]
    elif case == "levels_0":
        extra = ["--levels", "0"]
    elif case == "all_zero":
        moving = save(tmp_path / "zero.nii.gz", np.zeros(SHAPE, np.float32), ref["aff"])
    elif case == "moved_is_moving":
        moved = moving
    elif case == "labels_is_output":
        extra = ["--moving-labels", labels, "--moved-labels", labels]
    elif case == "diverged":   # the optimiser's own NaN check, reached through the real code path
        from contrareg_tf import instance_opt as IO

        real = IO._LevelSolver._step
        monkeypatch.setattr(IO._LevelSolver, "_step",
                            lambda self: (self.var.assign(self.var * np.float32("nan")), real(self))[1])
        IO._SOLVERS.clear()
    inputs = [ref["img_path"], moving, labels]
    before = {p: md5(p) for p in inputs}
    listing = sorted(os.listdir(tmp_path))
    code, err, _ = run_main("instance_opt", ["--fixed", ref["img_path"], "--moving", moving, "--moved", moved,
                                             "--iters", "2,2,2", "--quiet", *extra], capsys)
    if case == "diverged":
        from contrareg_tf import instance_opt as IO

        IO._SOLVERS.clear()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:"), err
    if case == "diverged":
        assert "learning rate" in err[0]
    if case == "levels_0":
        assert "levels" in err[0] and "lrs" not in err[0]
    assert {p: md5(p) for p in inputs} == before
    assert sorted(os.listdir(tmp_path)) == listing


def test_too_high_learning_rate_finishes_with_a_warning(ref, tmp_path, capsys):
    lab = tmp_path / "l.nii.gz"
    code, err, _ = run_main("instance_opt", ["--fixed", ref["img_path"], "--moving", ref["img_path"],
                                             "--warp", str(lab), "--lrs", "1e6,1e6,1e6", "--iters", "5,5,5",
                                             "--deformable", "on", "--quiet"], capsys)
    from contrareg_tf import metrics

    folds = metrics.folding_fraction(metrics.jacobian_determinant(nib.load(str(lab)).get_fdata()))
    assert code == 0 and folds > 20
    warn = [ln for ln in err if ln.startswith("warning:")]
    assert len(warn) == 1 and "learning rate" in warn[0] and not any(ln.startswith("error:") for ln in err)


# -------------------------------------------------------------------------------------- DNS padding
def test_dns_features_pad_to_multiple_of_8_and_crop_back():
    import tensorflow as tf

    from contrareg_tf.instance_opt import _pad8

    def needs8(y):
        assert all(s % 8 == 0 for s in y.shape[1:-1])
        return tf.concat([2 * y, y * y], axis=-1)                       # pointwise: known answer on the grid

    x = np.random.default_rng(0).random((1, 13, 20, 9, 1)).astype(np.float32)
    out = _pad8(needs8, x).numpy()
    np.testing.assert_allclose(out, np.concatenate([2 * x, x * x], -1), rtol=1e-6)


# ---------------------------------------------------------------------------------------- the lock
def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_train_hyper_into_one_out_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from contrareg_tf.lock import acquire; "
                               "acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train_scripts", "train_hyper.py"), "--loss", "mi",
                            "--preset", "tiny3d", "--out", str(out), "--no-progress"], capture_output=True,
                           text=True, env=ENV, timeout=300)
        assert r.returncode == 2
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and f"PID {holder.pid}" in err[0]
        assert sorted(os.listdir(out)) == ["train.lock"]                 # nothing else written
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    import socket

    from contrareg_tf import lock

    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    (out / lock.LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    with lock.out_dir_lock(str(out)) as path:
        assert json.load(open(path))["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "stale" in err and str(dead) in err
    assert not os.path.exists(out / lock.LOCK_NAME)                     # released


# ------------------------------------------------------------------------------------------- CSV BOM
def test_description_csv_with_utf8_bom(tmp_path):
    from contrareg_tf.data.dataset import load_description

    for k in ("t1", "t2", "labels"):
        (tmp_path / f"{k}.nii.gz").write_bytes(b"")
    (tmp_path / "d.csv").write_bytes("\ufeffsubject,t1,t2,labels\ns1,t1.nii.gz,t2.nii.gz,labels.nii.gz\n"
                                     .encode("utf-8"))
    desc = load_description(tmp_path / "d.csv")
    assert desc.names == ["s1"] and desc[0].t1 == str(tmp_path / "t1.nii.gz")
