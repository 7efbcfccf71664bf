"""NIfTI io, preprocessing helpers and data-set descriptions (contrareg_tf.data.io / .dataset)."""
import os

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from contrareg_tf.data import dataset as ds
from contrareg_tf.data import io
from contrareg_tf.errors import ContraRegInputError


def _affine(spacing=(1.5, 2.0, 2.5)):
    a = np.diag(list(spacing) + [1.0])
    a[:3, 3] = [-10.0, 20.5, -3.25]
    a[0, 1] = 0.1  # a non-diagonal term, to see it survive
    return a


# ----------------------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------------------
def test_round_trip_keeps_data_affine_and_header(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((7, 6, 5)).astype(np.float32)
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"contrareg test"
    hdr["intent_name"] = b"mytest"
    p = tmp_path / "img.nii.gz"
    io.save_nifti(p, x, affine=_affine(), header=hdr)
    v = io.load_nifti(p, ndim=3)
    assert v.data.dtype == np.float32 and v.path == str(p)
    np.testing.assert_array_equal(v.data, x)
    np.testing.assert_allclose(v.affine, _affine(), atol=1e-6)
    assert v.header.get_xyzt_units() == ("mm", "sec")
    assert v.header["descrip"].item().startswith(b"contrareg test")
    assert v.header["intent_name"].item() == b"mytest"
    np.testing.assert_allclose(v.header.get_zooms(), np.linalg.norm(_affine()[:3, :3], axis=0), rtol=1e-6)
    assert nib.load(str(p)).get_data_dtype() == np.float32
    # saving "like" a volume keeps its affine and header
    p2 = tmp_path / "img2.nii"
    io.save_nifti(p2, x * 2, like=v)
    v2 = io.load_nifti(p2)
    np.testing.assert_allclose(v2.affine, v.affine, atol=1e-6)
    assert v2.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(v2.data, x * 2, rtol=1e-7)


def test_labels_saved_as_int16_and_bool_as_uint8(tmp_path):
    lab = np.arange(60).reshape(3, 4, 5) % 4
    io.save_nifti(tmp_path / "lab.nii.gz", lab, affine=np.eye(4))
    assert nib.load(str(tmp_path / "lab.nii.gz")).get_data_dtype() == np.int16
    np.testing.assert_array_equal(io.load_nifti(tmp_path / "lab.nii.gz").data, lab)
    io.save_nifti(tmp_path / "m.nii.gz", lab > 1)
    assert nib.load(str(tmp_path / "m.nii.gz")).get_data_dtype() == np.uint8


def test_2d_round_trip_and_spacing(tmp_path):
    x = np.linspace(0, 1, 12 * 9, dtype=np.float32).reshape(12, 9)
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    io.save_nifti(tmp_path / "a.nii.gz", x, affine=aff)
    v = io.load_nifti(tmp_path / "a.nii.gz", ndim=2)
    assert v.shape == (12, 9) and v.spacing == (4.0, 4.0)
    np.testing.assert_array_equal(v.data, x)


def test_vector_field_round_trip(tmp_path):
    u = np.random.default_rng(1).normal(size=(6, 5, 4, 3)).astype(np.float32)
    io.save_nifti(tmp_path / "w.nii", u)
    v = io.load_nifti(tmp_path / "w.nii", vector=True)
    np.testing.assert_array_equal(v.data, u)
    with pytest.raises(ContraRegInputError, match="w.nii"):
        io.load_nifti(tmp_path / "w.nii")  # 4-D with 3 components is not an image


def test_trailing_singleton_4th_dim_is_squeezed(tmp_path):
    x = np.ones((5, 4, 3, 1), np.float32)
    nib.save(nib.Nifti1Image(x, np.eye(4)), str(tmp_path / "s.nii.gz"))
    assert io.load_nifti(tmp_path / "s.nii.gz").shape == (5, 4, 3)
    nib.save(nib.Nifti1Image(np.ones((5, 4, 1), np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    assert io.load_nifti(tmp_path / "t.nii.gz", ndim=2).shape == (5, 4)


def test_save_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "keep.nii.gz"
    io.save_nifti(p, np.zeros((4, 4, 4), np.float32))
    before = p.read_bytes()

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_nifti(p, np.ones((4, 4, 4), np.float32))
    assert p.read_bytes() == before  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["keep.nii.gz"]  # no temp file left behind
    with pytest.raises(OSError):
        io.save_nifti(tmp_path / "new.nii.gz", np.ones((4, 4, 4), np.float32))
    assert not (tmp_path / "new.nii.gz").exists()


# ----------------------------------------------------------------------------------------------------------
# bad input: one error type, naming the file
# ----------------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    p = tmp_path / "nope.nii.gz"
    with pytest.raises(ContraRegInputError, match="nope.nii.gz.*not found"):
        io.load_nifti(p)


def test_text_file_renamed_nifti(tmp_path):
    p = tmp_path / "fake.nii.gz"
    p.write_text("subject,t1\nthis is not an image\n")
    with pytest.raises(ContraRegInputError, match="fake.nii.gz.*not a readable NIfTI"):
        io.load_nifti(p)
    p2 = tmp_path / "fake.nii"
    p2.write_text("hello")
    with pytest.raises(ContraRegInputError, match="fake.nii"):
        io.load_nifti(p2)


def test_png_is_rejected(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p = tmp_path / "picture.png"
    plt.imsave(str(p), np.random.default_rng(0).random((8, 8)))
    with pytest.raises(ContraRegInputError, match="picture.png"):
        io.load_nifti(p)


def test_4d_image_rejected(tmp_path):
    p = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(p))
    with pytest.raises(ContraRegInputError, match="fmri.nii.gz.*4-D"):
        io.load_nifti(p)


def test_wrong_dimensionality(tmp_path):
    p = tmp_path / "vol.nii.gz"
    io.save_nifti(p, np.zeros((4, 5, 6), np.float32))
    with pytest.raises(ContraRegInputError, match="vol.nii.gz.*2-D"):
        io.load_nifti(p, ndim=2)
    p2 = tmp_path / "slice.nii.gz"
    io.save_nifti(p2, np.zeros((4, 5), np.float32))
    with pytest.raises(ContraRegInputError, match="slice.nii.gz.*3-D"):
        io.load_nifti(p2, ndim=3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_rejected(tmp_path, bad):
    x = np.zeros((4, 4, 4), np.float32)
    x[1, 2, 3] = bad
    p = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(x, np.eye(4)), str(p))
    with pytest.raises(ContraRegInputError, match="bad.nii.gz.*NaN/Inf"):
        io.load_nifti(p)
    with pytest.raises(ContraRegInputError, match="out.nii.gz"):
        io.save_nifti(tmp_path / "out.nii.gz", x)


def test_mismatched_shapes(tmp_path):
    io.save_nifti(tmp_path / "t1.nii.gz", np.zeros((4, 5, 6), np.float32))
    io.save_nifti(tmp_path / "t2.nii.gz", np.zeros((4, 5, 7), np.float32))
    a, b = io.load_nifti(tmp_path / "t1.nii.gz"), io.load_nifti(tmp_path / "t2.nii.gz")
    with pytest.raises(ContraRegInputError, match="t1.nii.gz.*t2.nii.gz"):
        io.check_same_shape(a, b)
    with pytest.raises(ContraRegInputError, match="fixed.*moving"):
        io.check_same_shape(np.zeros((3, 3)), np.zeros((3, 4)), names=("fixed", "moving"))
    io.check_same_shape(a, a)  # no error


def test_empty_mask_rejected():
    with pytest.raises(ContraRegInputError, match="sub-07/t1.nii.gz.*empty"):
        io.foreground_mask(np.zeros((6, 6, 6)), threshold=0.5, require_nonempty=True, name="sub-07/t1.nii.gz")
    with pytest.raises(ContraRegInputError, match="mymask.*empty"):
        io.check_nonempty_mask(np.zeros((3, 3)), name="mymask")
    assert not io.foreground_mask(np.zeros((6, 6, 6)), threshold=0.5).any()  # allowed when not required


# ----------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(orig=st.lists(st.integers(1, 9), min_size=2, max_size=3),
       target=st.lists(st.integers(1, 9), min_size=3, max_size=3), chan=st.booleans())
def test_crop_or_pad_and_uncrop(orig, target, chan):
    target = tuple(target[: len(orig)])
    x = np.arange(1, np.prod(orig) * (2 if chan else 1) + 1, dtype=np.float32).reshape(
        tuple(orig) + ((2,) if chan else ()))
    y, info = io.crop_or_pad(x, target)
    assert y.shape[: len(target)] == target and y.shape[len(target):] == x.shape[len(orig):]
    # independent transcription: centred window, extra voxel at the end
    expect_y = np.zeros_like(y)
    expect_back = np.full_like(x, -1)
    src, dst = [], []
    for o, t in zip(orig, target):
        k = min(o, t)
        c = (o - k) // 2
        p = (t - k) // 2
        src.append(slice(c, c + k))
        dst.append(slice(p, p + k))
    expect_y[tuple(dst)] = x[tuple(src)]
    expect_back[tuple(src)] = x[tuple(src)]
    np.testing.assert_array_equal(y, expect_y)
    back = io.uncrop(y, info, fill=-1)
    np.testing.assert_array_equal(back, expect_back)
    if all(t >= o for o, t in zip(orig, target)):
        np.testing.assert_array_equal(back, x)  # pure padding is exactly invertible


def test_uncrop_shape_mismatch():
    _, info = io.crop_or_pad(np.zeros((5, 5)), (3, 7))
    with pytest.raises(ContraRegInputError, match="cropped shape"):
        io.uncrop(np.zeros((4, 7)), info)


def test_normalize_intensity():
    rng = np.random.default_rng(3)
    x = rng.normal(100, 30, size=(20, 20, 20)).astype(np.float32)
    y = io.normalize_intensity(x)
    assert y.dtype == np.float32 and y.min() == 0.0 and y.max() == 1.0
    lo, hi = np.percentile(x, [0.5, 99.5])
    expect = np.clip((x - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(y, expect, atol=1e-5)
    # percentiles taken inside the mask only
    mask = np.zeros_like(x, bool)
    mask[5:15, 5:15, 5:15] = True
    ym = io.normalize_intensity(x, mask=mask, lo=2, hi=98)
    lo, hi = np.percentile(x[mask], [2, 98])
    np.testing.assert_allclose(ym, np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert not io.normalize_intensity(np.full((4, 4), 7.0)).any()  # constant image -> zeros


def test_foreground_mask_fills_holes_and_keeps_largest_component():
    g = np.indices((24, 24, 24)) - 11.5
    r = np.sqrt((g ** 2).sum(0))
    ball = r < 8
    img = np.where(ball & (r > 3), 1.0, 0.0)  # shell with a hole inside
    img[0:2, 0:2, 0:2] = 1.0  # a small separate blob
    m = io.foreground_mask(img, threshold=0.5)
    np.testing.assert_array_equal(m, ball)
    m2 = io.foreground_mask(img, threshold=0.5, fill_holes=False, largest_component=False)
    np.testing.assert_array_equal(m2, img > 0.5)


# ----------------------------------------------------------------------------------------------------------
# data-set descriptions
# ----------------------------------------------------------------------------------------------------------
def _make_subjects(root, n, with_mask=True):
    subs = []
    for i in range(n):
        d = root / f"s{i:02d}"
        d.mkdir(parents=True)
        for k in ("t1", "t2", "labels") + (("mask",) if with_mask else ()):
            io.save_nifti(d / f"{k}.nii.gz", np.full((3, 3, 3), i, np.int16 if k in ("labels", "mask") else np.float32))
        subs.append(ds.Subject(subject=f"s{i:02d}", t1=str(d / "t1.nii.gz"), t2=str(d / "t2.nii.gz"),
                               labels=str(d / "labels.nii.gz"), mask=str(d / "mask.nii.gz") if with_mask else None))
    return subs


def test_description_csv_round_trip_relative_paths(tmp_path):
    subs = _make_subjects(tmp_path / "data", 5)
    for s, sp in zip(subs, ["train", "train", "train", "val", "test"]):
        s.split = sp
    subs[0].extra = {"age": "40.5"}
    csv_path = ds.write_description(tmp_path / "data" / "list.csv", subs)
    text = open(csv_path).read()
    assert text.splitlines()[0].startswith("subject,t1,t2,labels,mask,split")
    assert str(tmp_path) not in text  # relative paths
    d = ds.load_description(csv_path)
    assert d.names == [s.subject for s in subs] and len(d) == 5
    for a, b in zip(d.subjects, subs):
        assert (a.t1, a.t2, a.labels, a.mask, a.split) == (b.t1, b.t2, b.labels, b.mask, b.split)
    assert d.subjects[0].extra["age"] == "40.5"
    assert [s.subject for s in d.split("val")] == ["s03"] and [s.subject for s in d.split("test")] == ["s04"]
    # a folder holding dataset.csv loads that CSV
    ds.write_description(tmp_path / "data" / "dataset.csv", subs)
    assert ds.load_description(tmp_path / "data").names == d.names


def test_folder_layout_and_seeded_split(tmp_path):
    _make_subjects(tmp_path, 10, with_mask=False)
    d = ds.load_description(tmp_path, seed=0)
    assert d.names == [f"s{i:02d}" for i in range(10)]
    assert all(s.mask is None for s in d.subjects)
    sizes = [len(d.split(k)) for k in ("train", "val", "test")]
    assert sizes == [8, 1, 1]  # 10*23/492 -> 1 (at least 1), 10*64/492 = 1.3 -> 1
    again = ds.load_description(tmp_path, seed=0)
    assert [s.split for s in again.subjects] == [s.split for s in d.subjects]
    splits_by_seed = {tuple(s.split for s in ds.load_description(tmp_path, seed=k).subjects) for k in range(6)}
    assert len(splits_by_seed) > 1  # the seed matters
    with pytest.raises(ContraRegInputError, match="unknown split"):
        d.split("training")


@pytest.mark.parametrize("n,expect", [(492, (405, 23, 64)), (3, (1, 1, 1)), (2, (2, 0, 0)), (100, (82, 5, 13))])
def test_split_counts_follow_paper_ratios(n, expect):
    assert ds.split_counts(n) == expect
    labels = ds.assign_splits([f"x{i}" for i in range(n)], seed=1)
    assert tuple(labels.count(k) for k in ("train", "val", "test")) == expect


def test_description_errors(tmp_path):
    subs = _make_subjects(tmp_path / "d", 2)
    bad = tmp_path / "bad.csv"
    bad.write_text("subject,t1,labels\na,x.nii.gz,y.nii.gz\n")
    with pytest.raises(ContraRegInputError, match=r"bad.csv.*missing column.*'t2'"):
        ds.load_description(bad)
    ds.write_description(tmp_path / "ok.csv", subs)
    os.remove(subs[1].t2)
    with pytest.raises(ContraRegInputError, match=r"s01.*t2 file not found.*s01/t2.nii.gz"):
        ds.load_description(tmp_path / "ok.csv")
    with pytest.raises(ContraRegInputError, match="not found"):
        ds.load_description(tmp_path / "missing.csv")
    wrong = tmp_path / "split.csv"
    wrong.write_text(f"subject,t1,t2,labels,split\na,{subs[0].t1},{subs[0].t1},{subs[0].t1},holdout\n")
    with pytest.raises(ContraRegInputError, match="split.csv.*invalid split 'holdout'"):
        ds.load_description(wrong)
    (tmp_path / "layout" / "s1").mkdir(parents=True)
    io.save_nifti(tmp_path / "layout" / "s1" / "t1.nii.gz", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ContraRegInputError, match="s1.*missing t2"):
        ds.load_description(tmp_path / "layout")


def test_a_nifti_without_orientation_or_with_a_broken_affine_is_refused(tmp_path):   # N9
    load_nifti = io.load_nifti
    data = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "nocodes.nii.gz")
    with pytest.raises(ContraRegInputError, match=r"nocodes.nii.gz: no orientation in the header"):
        load_nifti(tmp_path / "nocodes.nii.gz")
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "sform_only.nii.gz")
    np.testing.assert_allclose(load_nifti(tmp_path / "sform_only.nii.gz").affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    bad = np.diag([2.0, 2.0, 2.0, 1.0])
    bad[2, 2] = 0.0                                   # zero voxel size along k (the sform wins over the qform)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_sform(bad, code=1)
    nib.save(img, tmp_path / "degenerate.nii.gz")
    with pytest.raises(ContraRegInputError, match=r"degenerate.nii.gz: the header's affine is degenerate"):
        load_nifti(tmp_path / "degenerate.nii.gz")
    bad[2, 2], bad[0, 3] = 2.0, np.nan
    img.set_sform(bad, code=1)
    nib.save(img, tmp_path / "nan.nii.gz")
    with pytest.raises(ContraRegInputError, match=r"nan.nii.gz: the header's affine is not finite"):
        load_nifti(tmp_path / "nan.nii.gz")
