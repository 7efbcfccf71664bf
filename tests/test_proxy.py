"""Built-in data, source ``mni2009a-synth`` (contrareg_tf.data.proxy): determinism, anatomy, contrast, warps,
2-D mode. The default source ``icbm2009c`` is tested in test_icbm.py."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import tree_hash
import scipy.ndimage as ndi

from contrareg_tf.data import proxy, proxy_stats
from contrareg_tf.errors import ContraRegInputError

SHAPE3, SP3, DISP3 = (32, 32, 32), 6.0, 2.0
SHAPE2, SP2, DISP2 = (48, 56), 4.0, 2.0
SRC = "mni2009a-synth"


def _dice(a, b, labels=(1, 2, 3)):
    """Independent Dice: mean over labels of 2|A∩B| / (|A| + |B|)."""
    return float(np.mean([2.0 * np.sum((a == j) & (b == j)) / (np.sum(a == j) + np.sum(b == j)) for j in labels]))


def _data(p):
    return np.asarray(nib.load(p).dataobj)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    kw = dict(n_subjects=3, shape=SHAPE3, spacing=SP3, max_disp=DISP3, ndim=3, source=SRC)
    return {
        "a": proxy.build_proxy(str(root / "a"), seed=0, **kw),
        "b": proxy.build_proxy(str(root / "b"), seed=0, **kw),
        "c": proxy.build_proxy(str(root / "c"), seed=1, **kw),
        "2d": proxy.build_proxy(str(root / "d2"), n_subjects=3, shape=SHAPE2, spacing=SP2, max_disp=DISP2,
                                ndim=2, seed=0, source=SRC),
        "root": root,
    }


def test_same_seed_identical_bytes_different_seed_differs(builds):
    ha, hb, hc = (tree_hash(builds[k].source and os.path.dirname(builds[k].source)) for k in "abc")
    assert ha == hb and len(ha) == 3 * 6 + 2  # 6 files per subject + dataset.csv + proxy.json
    diff = [k for k in ha if k.startswith("sub-") and ha[k] != hc.get(k)]
    assert len(diff) == 3 * 6  # every subject file depends on the seed


def test_files_layout_dtypes_and_ranges(builds):
    d = builds["a"]
    assert d.names == ["sub-000", "sub-001", "sub-002"]
    assert sorted(s.split for s in d.subjects) == ["test", "train", "val"]  # n=3: 1/1/1
    for s in d.subjects:
        for key in ("t1", "t2"):
            img = nib.load(s.files()[key])
            assert img.shape == SHAPE3 and img.get_data_dtype() == np.float32
            x = _data(s.files()[key])
            assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.99
            np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), [SP3] * 3)
        lab = _data(s.labels)
        assert set(np.unique(lab)) == {0, 1, 2, 3}
        np.testing.assert_array_equal(_data(s.mask) > 0, lab > 0)
    meta = json.load(open(os.path.join(os.path.dirname(d.source), "proxy.json")))
    assert meta["params"]["shape"] == list(SHAPE3) and meta["params"]["seed"] == 0


def test_grid_is_centred_on_the_mni_brain(builds):
    s = builds["a"].subjects[0]
    aff = nib.load(s.t1).affine
    centre_world = aff[:3, :3] @ ((np.array(SHAPE3) - 1) / 2) + aff[:3, 3]
    mni = nib.load(os.path.join(proxy.nilearn_data_dir(), proxy.MNI_FILES["t1"]))
    idx = np.nonzero(np.asarray(mni.dataobj) > 0)
    box_centre = np.array([(i.min() + i.max()) / 2 for i in idx])
    np.testing.assert_allclose(centre_world, mni.affine[:3, :3] @ box_centre + mni.affine[:3, 3], atol=1e-3)


def test_contrast_ordering(builds):
    for s in builds["a"].subjects + builds["2d"].subjects:
        lab = _data(s.labels)
        t1, t2 = _data(s.t1), _data(s.t2)
        m1 = [t1[lab == j].mean() for j in (1, 2, 3)]  # CSF, GM, WM
        m2 = [t2[lab == j].mean() for j in (1, 2, 3)]
        assert m2[0] > m2[1] > m2[2], f"T2w must be CSF > GM > WM, got {m2}"
        assert m1[2] > m1[1] > m1[0], f"T1w must be WM > GM > CSF, got {m1}"
    # describe_proxy agrees with the per-file computation
    st = proxy_stats.describe_proxy(builds["a"])
    assert st["n_subjects"] == 3
    cm = st["modalities"]["t2"]["class_mean"]
    assert cm["CSF"] > cm["GM"] > cm["WM"]
    np.testing.assert_allclose(sum(st["label_fractions"].values()), 1.0, atol=1e-9)
    s = builds["a"].subjects[0]
    t1, mask = _data(s.t1), _data(s.mask) > 0
    assert 0 < st["modalities"]["t1"]["mean"] < 1 and abs(st["modalities"]["t1"]["mean"] - t1[mask].mean()) < 0.1


def _jac_det(u):
    """det(I + ∇u) with np.gradient; u (*vol, ndim)."""
    nd = u.shape[-1]
    J = np.empty(u.shape[:-1] + (nd, nd))
    for i in range(nd):
        g = np.gradient(u[..., i])
        for j in range(nd):
            J[..., i, j] = g[j] + (i == j)
    return np.linalg.det(J)


@pytest.mark.parametrize("which,disp", [("a", DISP3), ("2d", DISP2)])
def test_warps_are_diffeomorphic_and_inverse(builds, which, disp):
    for s in builds[which].subjects:
        u = _data(s.extra["warp"]).astype(np.float64)
        ui = _data(s.extra["warp_inv"]).astype(np.float64)
        nd = u.shape[-1]
        assert u.shape == (SHAPE3 if which == "a" else SHAPE2) + (nd,)
        det = _jac_det(u)
        assert det.min() > 0, "folding in a proxy warp"
        norm = np.sqrt((u ** 2).sum(-1))
        assert 0.5 * disp < norm.max() < 2 * disp
        # φ⁻¹∘φ ≈ id: u(x) + u_inv(x + u(x)) ≈ 0 away from the border
        grid = np.indices(u.shape[:-1]).astype(np.float64)
        coords = grid + np.moveaxis(u, -1, 0)
        comp = np.moveaxis(u, -1, 0) + np.stack(
            [ndi.map_coordinates(ui[..., i], coords, order=1, mode="nearest") for i in range(nd)])
        inner = tuple(slice(4, -4) for _ in range(nd))
        assert np.abs(comp[(slice(None),) + inner]).max() < 0.25


def test_labels_follow_the_warp(builds):
    """Every subject's labels are the same template labels pulled back by its own warp, so mapping subject
    a onto subject b with the known warps agrees with b's labels far better than no registration."""
    d = builds["a"]
    a, b = d.subjects[0], d.subjects[1]
    la, lb = _data(a.labels), _data(b.labels)
    ub = _data(b.extra["warp"]).astype(np.float64)
    uia = _data(a.extra["warp_inv"]).astype(np.float64)
    grid = np.indices(SHAPE3).astype(np.float64)
    y = grid + np.moveaxis(ub, -1, 0)  # φ_b(y)
    phi = y + np.stack([ndi.map_coordinates(uia[..., i], y, order=1, mode="nearest") for i in range(3)])
    la_on_b = ndi.map_coordinates(la, phi, order=0, mode="constant")
    before, after = _dice(la, lb), _dice(la_on_b, lb)
    assert after > before + 0.05
    r = proxy_stats.dice_ceiling(d, pairs=[(0, 1)])
    np.testing.assert_allclose(r["mean"], after, atol=0.02)


def test_dice_before_registration(builds):
    d = builds["a"]
    labs = [_data(s.labels) for s in d.subjects]
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        dc = _dice(labs[i], labs[j])
        assert 0.2 < dc < 0.95, f"Dice before registration {dc}: subjects identical or unrelated"
    r = proxy_stats.dice_before(d, pairs=[(0, 1), (2, 0)])
    np.testing.assert_allclose(r["per_pair"], [_dice(labs[0], labs[1]), _dice(labs[2], labs[0])], atol=1e-12)
    np.testing.assert_allclose(r["mean"], np.mean(r["per_pair"]), atol=1e-12)
    assert set(r["per_label"]) == {"CSF", "GM", "WM"}


def test_2d_mode(builds):
    d = builds["2d"]
    labs = []
    for s in d.subjects:
        img = nib.load(s.t1)
        assert img.shape == SHAPE2 and len(img.shape) == 2
        np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), [SP2] * 3)
        assert _data(s.extra["warp"]).shape == SHAPE2 + (2,)
        labs.append(_data(s.labels))
        assert set(np.unique(labs[-1])) == {0, 1, 2, 3}
    # each subject is a slice from the axial band around MNI z = slice_z_mm
    zs = [nib.load(s.t1).affine[2, 3] for s in d.subjects]
    assert all(abs(z - 12.0) <= 4.0 for z in zs) and len(set(zs)) == 3
    dc = _dice(labs[0], labs[1])
    assert 0.2 < dc < 0.95


def test_reuse_and_cache_dir(builds, monkeypatch, tmp_path):
    d = builds["a"]
    root = os.path.dirname(d.source)
    t1 = d.subjects[0].t1
    mtime = os.path.getmtime(t1)
    again = proxy.build_proxy(root, n_subjects=3, shape=SHAPE3, spacing=SP3, max_disp=DISP3, seed=0, source=SRC)
    assert again.names == d.names and os.path.getmtime(t1) == mtime  # reused, not rewritten
    monkeypatch.setenv("CONTRAREG_CACHE", str(tmp_path / "cache"))
    assert proxy.default_cache_dir() == str(tmp_path / "cache")
    monkeypatch.delenv("CONTRAREG_CACHE")
    assert proxy.default_cache_dir() == os.path.expanduser("~/.cache/contrareg_tf")


def test_interrupted_build_is_redone(builds, monkeypatch, tmp_path):
    calls = {"n": 0}
    real_save = proxy.save_nifti

    def flaky_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_save(*a, **k)

    out = str(tmp_path / "p")
    kw = dict(n_subjects=3, shape=SHAPE3, spacing=SP3, max_disp=DISP3, seed=0, source=SRC)
    monkeypatch.setattr(proxy, "save_nifti", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        proxy.build_proxy(out, **kw)
    assert json.load(open(os.path.join(out, "proxy.json")))["complete"] is False
    monkeypatch.setattr(proxy, "save_nifti", real_save)
    proxy.build_proxy(out, **kw)
    assert tree_hash(out) == tree_hash(os.path.dirname(builds["a"].source))


def test_bad_parameters(tmp_path):
    with pytest.raises(ContraRegInputError, match="ndim"):
        proxy.build_proxy(str(tmp_path / "x"), n_subjects=2, shape=(32, 32), spacing=6.0, ndim=3)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ContraRegInputError, match="mine.*not empty"):
        proxy.build_proxy(str(tmp_path / "mine"), n_subjects=2, shape=(16, 16), spacing=8.0, ndim=2)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_data_build_tiny3d_summarises_all_pairs_and_refuses_before_writing(tmp_path, capsys):
    """tiny3d's 5 subjects hold 1 test subject: the build summarises all pairs instead of failing after
    writing; bad arguments are refused before the output folder exists."""
    from contrareg_tf.data.__main__ import main

    out = tmp_path / "t3"
    assert main(["build", "--preset", "tiny3d", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "all pairs (the test split has 1 subject)" in text and (out / "dataset.csv").is_file()
    for bad in (["--subjects", "1"], ["--montage", "0"], ["--data-source", "nope"]):
        with pytest.raises(ContraRegInputError):
            main(["build", "--preset", "tiny3d", "--out", str(tmp_path / "no"), *bad])
        assert not (tmp_path / "no").exists()


def test_misalignment_warning_quiet_on_built_pairs_loud_on_a_shift(builds, tmp_path):
    """Inter-subject pairs of the built data (2-D slices from different heights) are not flagged; the same
    fixed image against a copy shifted by 12 % of the brain's extent is."""
    import warnings

    from contrareg_tf.data import physical
    from contrareg_tf.errors import ContraRegWarning

    subs = builds["2d"].subjects
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContraRegWarning)
        for a in range(3):
            for b in range(3):
                if a != b:
                    physical.load_pair(subs[a].t1, subs[b].t2)
    img = nib.load(subs[1].t2)
    x = np.asarray(img.dataobj)
    ext = np.ptp(np.nonzero(x > 0.1 * x.max())[0]) + 1
    shifted = ndi.shift(x, (0.12 * ext, 0), order=1)
    p = str(tmp_path / "shifted.nii.gz")
    nib.save(nib.Nifti1Image(shifted.astype(np.float32), img.affine), p)
    with pytest.warns(ContraRegWarning, match="mis-aligned"):
        physical.load_pair(subs[0].t1, p)
