"""A user's scans on the model grid (contrareg_tf.data.grid, experiment.report_data): crop/pad and physical-space
resampling checked against analytic spheres and independent numpy counts, the one line per data set and its
warning, the split written, the --inshape/--spacing checks, and an end-to-end tiny3d training + evaluation on a
32³ data set written with nibabel."""
import argparse
import csv
import dataclasses
import json
import os
import warnings

import nibabel as nib
import numpy as np
import pytest

from contrareg_tf import experiment
from contrareg_tf.cli import add_grid_options
from contrareg_tf.config import GRID_OUTSIDE_WARN, get_preset
from contrareg_tf.data import dataset, grid, pairs
from contrareg_tf.errors import ContraRegInputError, ContraRegWarning

N, SP = 32, 2.0                 # the user's scans: 32³ at 2 mm
CENTRE_VOX = (18.0, 14.0, 16.0)  # the brain sphere is off the image centre (15.5)
RADIUS_VOX = 9.0


def _sphere(shape, centre, radius):
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    return np.linalg.norm(g - np.asarray(centre), axis=-1) <= radius


def _affine(spacing=SP, flip=False):
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = (-40.0, -30.0, -20.0)
    if flip:        # LPS-stored copy of the same image: x and y axes reversed
        a[0, 0] = a[1, 1] = -spacing
        a[0, 3] = -40.0 + (N - 1) * spacing
        a[1, 3] = -30.0 + (N - 1) * spacing
    return a


def _subject_arrays(k, flip=False):
    rng = np.random.default_rng(k)
    brain = _sphere((N,) * 3, CENTRE_VOX, RADIUS_VOX)
    inner = _sphere((N,) * 3, CENTRE_VOX, RADIUS_VOX / 2)
    t1 = np.where(brain, 0.5 + 0.4 * inner, 0.0) + 0.01 * rng.random((N,) * 3) * brain
    t2 = np.where(brain, 0.9 - 0.5 * inner, 0.0)
    labels = brain.astype(np.int16) + inner.astype(np.int16)
    arrs = dict(t1=t1.astype(np.float32), t2=t2.astype(np.float32), labels=labels, mask=brain.astype(np.uint8))
    if flip:
        arrs = {k: v[::-1, ::-1].copy() for k, v in arrs.items()}
    return arrs


def _write_dataset(root, splits=("train",) * 3 + ("val",) * 2 + ("test",) * 2):
    rows = []
    for k, split in enumerate(splits):
        d = os.path.join(root, f"s{k}")
        os.makedirs(d)
        for key, arr in _subject_arrays(k).items():
            nib.save(nib.Nifti1Image(arr, _affine()), os.path.join(d, f"{key}.nii.gz"))
        rows.append([f"s{k}", f"s{k}/t1.nii.gz", f"s{k}/t2.nii.gz", f"s{k}/labels.nii.gz", f"s{k}/mask.nii.gz", split])
    path = os.path.join(root, "dataset.csv")
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["subject", "t1", "t2", "labels", "mask", "split"]] + rows)
    return path


def _loaded(k=0, flip=False):
    a = _subject_arrays(k, flip)
    return dict(t1=a["t1"], t2=a["t2"], mask1=a["mask"] > 0, mask2=a["mask"] > 0, labels=a["labels"].astype(np.int32),
                affine=_affine(flip=flip), ndim_file=3)


def test_crop_pad_counts_the_foreground_cut_away():
    sub = _loaded()
    out, info, aff = grid.fit_subject(sub, "s0", (16, 16, 16))
    brain = sub["mask1"]
    kept = brain[8:24, 8:24, 8:24].sum()                      # independent centred crop 32 -> 16: offset 8
    assert info.outside == pytest.approx(1 - kept / brain.sum())
    np.testing.assert_array_equal(out["mask1"], brain[8:24, 8:24, 8:24])
    np.testing.assert_allclose(aff[:3, 3], _affine()[:3, 3] + 8 * SP)   # the grid's own world position
    assert info.shape == (N,) * 3 and info.spacing == (SP,) * 3
    assert info.extent_mm == pytest.approx(((2 * RADIUS_VOX + 1) * SP,) * 3)


def _world_sphere_on(aff, shape):
    """The analytic brain sphere evaluated at the world positions of the grid's voxel centres."""
    centre_w = _affine()[:3, :3] @ np.asarray(CENTRE_VOX) + _affine()[:3, 3]
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    w = g @ aff[:3, :3].T + aff[:3, 3]
    return np.linalg.norm(w - centre_w, axis=-1) <= RADIUS_VOX * SP


@pytest.mark.parametrize("flip", [False, True])
def test_resample_centres_the_brain_and_keeps_it_whole(flip):
    out, info, aff = grid.fit_subject(_loaded(flip=flip), "s0", (16, 16, 16), spacing=4.0)
    assert info.outside == 0.0
    np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0), 4.0)
    assert np.all(np.diag(aff[:3, :3]) > 0)                 # closest RAS order, whatever the storage order
    truth = _world_sphere_on(aff, (16, 16, 16))
    m = out["mask1"]
    assert 2 * (m & truth).sum() / (m.sum() + truth.sum()) > 0.9
    com = np.array(np.nonzero(m)).mean(1)
    np.testing.assert_allclose(com, 7.5, atol=0.6)           # the brain's centre on the grid's centre
    assert set(np.unique(out["labels"])) <= {0, 1, 2} and 0.0 <= out["t1"].min() and out["t1"].max() <= 1.0


def test_resample_is_the_same_for_an_lps_stored_copy():
    a, _, aff_a = grid.fit_subject(_loaded(), "s0", (16, 16, 16), spacing=4.0)
    b, _, aff_b = grid.fit_subject(_loaded(flip=True), "s0", (16, 16, 16), spacing=4.0)
    np.testing.assert_allclose(aff_a, aff_b, atol=1e-9)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["t1"], b["t1"], atol=1e-5)


def test_resample_counts_the_foreground_outside():
    _, info, aff = grid.fit_subject(_loaded(), "s0", (8, 8, 8), spacing=4.0)   # 32 mm grid, 38 mm brain
    src = np.argwhere(_loaded()["mask1"]).astype(float)
    w = src @ _affine()[:3, :3].T + _affine()[:3, 3]
    v = (w - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    outside = 1 - np.all((v > -0.5) & (v < 7.5), axis=1).mean()
    assert info.outside == pytest.approx(outside) and 0.05 < outside < 0.6


def test_fit_line_and_warning():
    infos = [grid.FitInfo("a", (32, 32, 32), (2.0,) * 3, (38.0,) * 3, 0.0),
             grid.FitInfo("b", (32, 32, 30), (2.0, 2.0, 2.5), (38.0, 38.0, 50.0), 0.25)]
    line = grid.fit_line(infos, (16, 16, 16), None, "my.csv")
    assert "\n" not in line
    assert line.startswith("my.csv: 2 subjects 32x32x32, 32x32x30 @ 2x2x2, 2x2x2.5 mm -> grid 16x16x16")
    assert "centre crop/pad" in line and "mean 12.5 %, max 25.0 % (b)" in line
    msg = grid.fit_warning(infos, (16, 16, 16), None, "my.csv")
    assert "25.0 % of b's foreground" in msg and "--spacing 3.5" in msg     # 50 mm / 16 = 3.125 -> 3.5
    assert grid.fit_warning(infos[:1], (16, 16, 16), None, "my.csv") is None
    assert GRID_OUTSIDE_WARN < 0.25


def _args(**kw):
    return argparse.Namespace(**{"data": "d.csv", "inshape": None, "spacing": None, **kw})


def test_grid_arguments():
    p = argparse.ArgumentParser()
    add_grid_options(p)
    a = p.parse_args(["--inshape", "32", "32", "32", "--spacing", "2"])
    a.data = "d.csv"
    cfg, sp = grid.grid_config(get_preset("tiny3d"), a)
    assert cfg.inshape == (32, 32, 32) and sp == 2.0 and cfg.ae_crop == (16, 16, 16)
    assert grid.grid_config(get_preset("tiny3d"), _args()) == (get_preset("tiny3d"), None)
    for kw, msg in ((dict(inshape=[32, 32]), "3-D, give 3 sizes"), (dict(inshape=[32, 32, 30]), "multiple of 4"),
                    (dict(spacing=0.0), "must be > 0"), (dict(data=None, spacing=2.0), "apply to --data")):
        with pytest.raises(ContraRegInputError, match=msg):
            grid.grid_config(get_preset("tiny3d"), _args(**kw))


def test_split_arrays_resampled_and_2d_grid_refused(tmp_path):
    desc = dataset.load_description(_write_dataset(str(tmp_path)))
    arr = pairs.load_split_arrays(desc, "train", (16, 16, 16), ndim=3, spacing=4.0)
    assert arr.img1.shape == (3, 16, 16, 16) and [f.outside for f in arr.fits] == [0.0] * 3
    np.testing.assert_allclose([np.linalg.norm(a[:3, :3], axis=0) for a in arr.affines], 4.0)
    with pytest.raises(ContraRegInputError, match="2-D grid"):
        pairs.load_split_arrays(desc, "train", (16, 16), ndim=2, spacing=4.0)


def test_user_data_trained_and_evaluated_with_a_line_and_the_split(tmp_path, capsys):
    """tiny3d (16³) on 32³ scans: training and evaluation say what they did to the scans, warn that the grid
    cuts the brain, and write the split; the model is built on the 16³ grid."""
    data = _write_dataset(str(tmp_path / "data"))
    cfg = get_preset("tiny3d")
    run = str(tmp_path / "run")
    with pytest.warns(ContraRegWarning, match="falls outside the 16x16x16 grid"):
        experiment.train_method(cfg, "mi", run, data=data, iters=2, progress=False)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "-> grid" in ln]
    assert len(lines) == 1 and "5 subjects 32x32x32 @ 2x2x2 mm -> grid 16x16x16 (centre crop/pad" in lines[0]
    assert "split 3 train / 2 val / 2 test" in out
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["config"]["inshape"] == [16, 16, 16]
    with open(os.path.join(run, experiment.SPLITS_CSV)) as f:
        got = {r["subject"]: r["split"] for r in csv.DictReader(f)}
    assert got == {f"s{k}": s for k, s in enumerate(["train"] * 3 + ["val"] * 2 + ["test"] * 2)}
    ev = str(tmp_path / "eval")
    with pytest.warns(ContraRegWarning, match="falls outside"):
        experiment.evaluate_runs([run], ev, data=data, progress=False, lambdas=[0.0, 0.5])
    out = capsys.readouterr().out
    assert sum("-> grid 16x16x16" in ln for ln in out.splitlines()) == 1 and "2 subjects" in out
    assert os.path.isfile(os.path.join(ev, "table1.csv")) and os.path.isfile(os.path.join(ev, experiment.SPLITS_CSV))
    # resampled to 4 mm the brain fits: the line says so and nothing warns; the run's voxel size differs -> warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        experiment.evaluate_runs([run], str(tmp_path / "eval4"), data=data, progress=False, lambdas=[0.0],
                                 spacing=4.0)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ContraRegWarning)]
    assert not any("falls outside" in m for m in msgs) and any("trained on 2 mm" in m for m in msgs)
    assert "resampled to 4 mm" in capsys.readouterr().out


def test_spacing_needs_user_data():
    with pytest.raises(ContraRegInputError, match="--spacing"):
        experiment.open_data(dataclasses.replace(get_preset("tiny3d")), None, spacing=4.0)
