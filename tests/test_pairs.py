"""Inter-subject pairs (contrareg_tf.data.pairs): make_pairs, load_split_arrays, PairSampler, pair_dataset."""
import numpy as np
import pytest

from contrareg_tf.data import dataset as ds
from contrareg_tf.data import io, pairs, proxy
from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.rng import step_rng

VOL = (10, 12, 9)   # on-disk grid of the synthetic subjects
SHAPE = (8, 14, 9)  # crop x, pad y, keep z


def _norm(x):
    """Independent transcription of the robust [0, 1] normalisation (0.5 / 99.5 percentiles)."""
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.clip((x - lo) / (hi - lo), 0, 1)


def _cp(x, shape):
    """Independent centred crop/pad of the leading axes."""
    out = np.zeros(tuple(shape) + x.shape[len(shape):], x.dtype)
    src, dst = [], []
    for o, t in zip(x.shape, shape):
        k = min(o, t)
        src.append(slice((o - k) // 2, (o - k) // 2 + k))
        dst.append(slice((t - k) // 2, (t - k) // 2 + k))
    out[tuple(dst)] = x[tuple(src)]
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """5 subjects (4 train, 1 test) with distinct random images, a blob mask (subject 3 has no mask
    file), labels = subject-specific pattern."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    g = np.indices(VOL) - (np.array(VOL)[:, None, None, None] - 1) / 2
    blob = (g ** 2).sum(0) < 16
    subs, raw = [], []
    for i in range(5):
        d = root / f"s{i}"
        d.mkdir()
        t1 = (rng.random(VOL) * blob + 0.01 * rng.random(VOL)).astype(np.float32) * (i + 1) * 10
        t2 = (rng.random(VOL) * blob).astype(np.float32) * 3 + 1
        lab = (blob * (1 + (np.arange(np.prod(VOL)).reshape(VOL) + i) % 3)).astype(np.int16)
        for k, a in (("t1", t1), ("t2", t2), ("labels", lab)):
            io.save_nifti(d / f"{k}.nii.gz", a)
        mask = None
        if i != 3:
            io.save_nifti(d / "mask.nii.gz", blob.astype(np.uint8))
            mask = str(d / "mask.nii.gz")
        subs.append(ds.Subject(f"s{i}", str(d / "t1.nii.gz"), str(d / "t2.nii.gz"), str(d / "labels.nii.gz"),
                               mask, "test" if i == 4 else "train"))
        raw.append({"t1": t1, "t2": t2, "labels": lab, "mask": blob})
    ds.write_description(root / "dataset.csv", subs)
    pairs.clear_cache()
    return ds.load_description(root), raw


def test_make_pairs():
    allp = pairs.make_pairs(4)
    assert len(allp) == 12 and len(set(allp)) == 12 and all(a != b for a, b in allp)
    p = pairs.make_pairs(5, n_pairs=15, seed=3)
    assert p == pairs.make_pairs(5, n_pairs=15, seed=3)  # deterministic
    assert p != pairs.make_pairs(5, n_pairs=15, seed=4)
    assert len(set(p)) == 15 and all(a != b and 0 <= a < 5 and 0 <= b < 5 for a, b in p)
    many = pairs.make_pairs(3, n_pairs=14, seed=0)  # more than the 6 that exist: cycles
    assert len(many) == 14 and set(many) == set(pairs.make_pairs(3)) and all(a != b for a, b in many)
    with pytest.raises(ContraRegInputError, match="at least 2"):
        pairs.make_pairs(1)


def test_load_split_arrays_matches_files(synth):
    desc, raw = synth
    arr = pairs.load_split_arrays(desc, "train", SHAPE, ndim=3)
    assert len(arr) == 4 and arr.names == ["s0", "s1", "s2", "s3"]
    assert arr.img1.shape == (4,) + SHAPE and arr.img1.dtype == np.float32
    assert arr["t1"] is arr.img1 and arr["t2"] is arr.img2  # dict-style aliases
    assert arr.get("mask1") is arr.mask1 and arr.get("ext1") is None and arr.get("ext1", 0) == 0
    for i in range(4):
        np.testing.assert_allclose(arr.img1[i], _cp(_norm(raw[i]["t1"]), SHAPE), atol=1e-5)
        np.testing.assert_allclose(arr.img2[i], _cp(_norm(raw[i]["t2"]), SHAPE), atol=1e-5)
        np.testing.assert_array_equal(arr.labels[i], _cp(raw[i]["labels"], SHAPE))
        if i != 3:  # mask file: used for both modalities
            np.testing.assert_array_equal(arr.mask1[i], _cp(raw[i]["mask"], SHAPE))
            np.testing.assert_array_equal(arr.mask2[i], arr.mask1[i])
    # subject 3 has no mask file: foreground of each image (the blob, up to thresholding)
    overlap = (arr.mask1[3] & _cp(raw[3]["mask"], SHAPE)).sum() / _cp(raw[3]["mask"], SHAPE).sum()
    assert overlap > 0.8
    assert pairs.load_split_arrays(desc, "train", SHAPE, ndim=3) is arr  # cached


def _take(ds_, n):
    return [{k: v.numpy() for k, v in b.items()} for b in ds_.take(n)]


def _old_training_rule(seed, step, n, B, ext):
    """Independent transcription of the training sampler's draw rule as it stood before the two samplers were
    merged (the README main-job numbers depend on it): a, b != a, λ, then c != a, b by +1 bumps."""
    rng = step_rng(seed, step, 0)
    a = rng.integers(0, n, B)
    b = (a + rng.integers(1, n, B)) % n
    lam = rng.uniform(0, 1, (B, 1)).astype(np.float32)
    c = None
    if ext:
        c = rng.integers(0, n, B)
        for i in range(B):
            while c[i] in (a[i], b[i]):
                c[i] = (c[i] + 1) % n
    return a, b, lam, c


@pytest.mark.parametrize("n", [2, 3, 5, 9])
@pytest.mark.parametrize("B", [1, 4])
def test_sampler_training_draws_bit_identical_to_old_rule(n, B):
    rng = np.random.default_rng(n * 10 + B)
    t1, t2 = rng.random((n, 4, 3)).astype(np.float32), rng.random((n, 4, 3)).astype(np.float32)
    m1 = rng.random((n, 4, 3)) > 0.3
    for ext in ([False, True] if n >= 3 else [False]):
        for seed in (0, 7, 12345):
            s = pairs.PairSampler(t1, t2, m1, None, batch_size=B, seed=seed, ext=ext)
            for step in (0, 1, 2, 17, 999, 10 ** 6):
                a, b, lam, c = _old_training_rule(seed, step, n, B, ext)
                got = s.batch(step)
                assert set(got) == {"img1", "img2", "mask1", "mask2", "lam"} | ({"ext1", "ext2"} if ext else set())
                np.testing.assert_array_equal(got["img1"][..., 0], t1[a])
                np.testing.assert_array_equal(got["img2"][..., 0], t2[b])
                np.testing.assert_array_equal(got["mask1"][..., 0], m1[a].astype(np.float32))
                np.testing.assert_array_equal(got["mask2"][..., 0], (t2[b] > 0).astype(np.float32))
                assert got["lam"].dtype == np.float32 and np.array_equal(got["lam"], lam)
                if ext:
                    np.testing.assert_array_equal(got["ext1"][..., 0], t1[c])
                    np.testing.assert_array_equal(got["ext2"][..., 0], t2[c])
                    assert np.all((c != a) & (c != b))
                assert np.all(a != b)
    # the training package re-exports the same class
    from contrareg_tf import training
    assert training.PairSampler is pairs.PairSampler


def test_pair_dataset_shapes_dtypes_and_content(synth):
    desc, raw = synth
    B = 3
    d = pairs.pair_dataset(desc, "train", SHAPE, B, seed=5, with_labels=True, ext_negative=True,
                           with_indices=True)
    batches = _take(d, 4)
    for step, b in enumerate(batches):
        for k in ("img1", "img2", "mask1", "mask2", "ext1", "ext2"):
            assert b[k].shape == (B,) + SHAPE + (1,) and b[k].dtype == np.float32, k
        for k in ("labels1", "labels2"):
            assert b[k].shape == (B,) + SHAPE + (1,) and b[k].dtype == np.int32
        i1, i2, ie = b["index1"], b["index2"], b["index_ext"]
        # batch k of the data set is the step-keyed draw of step k
        a, c2, lam, c = _old_training_rule(5, step, 4, B, True)
        assert np.array_equal(i1, a) and np.array_equal(i2, c2) and np.array_equal(ie, c)
        assert np.array_equal(b["lam"], lam)
        for s in range(B):
            np.testing.assert_allclose(b["img1"][s, ..., 0], _cp(_norm(raw[i1[s]]["t1"]), SHAPE), atol=1e-5)
            np.testing.assert_allclose(b["img2"][s, ..., 0], _cp(_norm(raw[i2[s]]["t2"]), SHAPE), atol=1e-5)
            np.testing.assert_allclose(b["ext1"][s, ..., 0], _cp(_norm(raw[ie[s]]["t1"]), SHAPE), atol=1e-5)
            np.testing.assert_allclose(b["ext2"][s, ..., 0], _cp(_norm(raw[ie[s]]["t2"]), SHAPE), atol=1e-5)
            np.testing.assert_array_equal(b["labels2"][s, ..., 0], _cp(raw[i2[s]]["labels"], SHAPE))
    # every index stays inside the train split (the test subject s4 never appears)
    assert max(int(b["index1"].max()) for b in batches) < 4
    # seeded: the same sequence each time it is iterated, another seed gives another one
    again = _take(d, 4)
    assert all(np.array_equal(x["index1"], y["index1"]) and np.array_equal(x["img2"], y["img2"])
               for x, y in zip(batches, again))
    other = _take(pairs.pair_dataset(desc, "train", SHAPE, B, seed=6, with_indices=True), 4)
    assert any(not np.array_equal(x["index1"], y["index1"]) for x, y in zip(batches, other))
    # the default keys only
    plain = next(iter(pairs.pair_dataset(desc, "train", SHAPE, 2, seed=0)))
    assert set(plain) == {"img1", "img2", "mask1", "mask2", "lam"}


def test_2d_mode_slices_3d_volumes(synth):
    desc, raw = synth
    shape2 = SHAPE[:2]
    arr = pairs.load_split_arrays(desc, "train", shape2, ndim=2)
    assert arr.img1.shape == (4,) + shape2 + (VOL[2],)
    zlo, zhi = pairs.axial_band(np.concatenate([arr.mask1, arr.mask2]))
    d = pairs.pair_dataset(desc, "train", shape2, 4, seed=1, ndim=2, with_indices=True, ext_negative=True)
    for b in _take(d, 3):
        assert b["img1"].shape == (4,) + shape2 + (1,)
        for s in range(4):
            a, c, e = b["index1"][s], b["index2"][s], b["index_ext"][s]
            vol1 = _cp(_norm(raw[a]["t1"]), shape2)
            vol2 = _cp(_norm(raw[c]["t2"]), shape2)
            vole = _cp(_norm(raw[e]["t2"]), shape2)
            z1 = [z for z in range(VOL[2]) if np.allclose(vol1[..., z], b["img1"][s, ..., 0], atol=1e-5)]
            z2 = [z for z in range(VOL[2]) if np.allclose(vol2[..., z], b["img2"][s, ..., 0], atol=1e-5)]
            ze = [z for z in range(VOL[2]) if np.allclose(vole[..., z], b["ext2"][s, ..., 0], atol=1e-5)]
            # the same axial slice for all three images, inside the band
            assert len(z1) == 1 and z1 == z2 == ze and zlo <= z1[0] <= zhi
    # slicing draws a, b, λ, c exactly as the 3-D (training) case does, then z
    s3 = pairs.PairSampler(arr.img1, arr.img2, arr.mask1, arr.mask2, batch_size=4, seed=1, ext=True)
    s2 = pairs.PairSampler.from_split(arr, 2, batch_size=4, seed=1, ext=True, with_indices=True)
    a, b, c, lam, z = s2.draw(3)
    a3, b3, c3, lam3, z3 = s3.draw(3)
    assert np.array_equal(a, a3) and np.array_equal(b, b3) and np.array_equal(c, c3) and np.array_equal(lam, lam3)
    assert z3 is None and np.all((z >= zlo) & (z <= zhi))
    got = s2.batch(3)
    for k in range(4):
        np.testing.assert_array_equal(got["mask2"][k, ..., 0], arr.mask2[b[k], ..., z[k]].astype(np.float32))


def test_errors(synth, tmp_path):
    desc, raw = synth
    with pytest.raises(ContraRegInputError, match="at least 2 subjects.*got 1"):
        pairs.pair_dataset(desc, "test", SHAPE, 1)
    two = ds.Description(desc.subjects[:2], source="two")
    with pytest.raises(ContraRegInputError, match="at least 3 subjects.*ExtNegs.*got 2"):
        pairs.pair_dataset(two, "train", SHAPE, 1, ext_negative=True)
    with pytest.raises(ContraRegInputError, match="batch_size"):
        pairs.pair_dataset(desc, "train", SHAPE, 0)
    with pytest.raises(ContraRegInputError, match="shape"):
        pairs.load_split_arrays(desc, "train", (8, 8), ndim=3)
    # a subject whose T2w has another shape than its T1w
    d = tmp_path / "bad"
    d.mkdir()
    io.save_nifti(d / "t1.nii.gz", raw[0]["t1"])
    io.save_nifti(d / "t2.nii.gz", raw[0]["t2"][:, :, :-1])
    io.save_nifti(d / "labels.nii.gz", raw[0]["labels"])
    bad = ds.Subject("bad", str(d / "t1.nii.gz"), str(d / "t2.nii.gz"), str(d / "labels.nii.gz"), split="train")
    with pytest.raises(ContraRegInputError, match=r"shape mismatch.*bad/t1.nii.gz.*bad/t2.nii.gz"):
        pairs.load_split_arrays([bad, desc.subjects[0]], None, SHAPE)


def test_pair_dataset_on_2d_proxy(tmp_path):
    desc = proxy.build_proxy(str(tmp_path / "p"), n_subjects=3, shape=(32, 40), spacing=6.0, max_disp=1.5,
                             ndim=2, seed=2)
    d = pairs.pair_dataset(desc, "all", (32, 40), 2, seed=0, ndim=2, with_labels=True, with_indices=True)
    b = next(iter(d))
    assert b["img1"].shape == (2, 32, 40, 1) and b["labels1"].dtype.name == "int32"
    assert np.all(b["index1"].numpy() != b["index2"].numpy())
    assert set(np.unique(b["labels1"].numpy())) <= set(range(103))   # CerebrA labels
    assert float(b["img1"].numpy().max()) <= 1.0 and float(b["img2"].numpy().min()) >= 0.0


def test_loader_keeps_large_labels_and_rejects_non_integer_ones(tmp_path):
    """Real label maps go through io.load_labels: 40000 stays 40000 (an int16 cast made it -25536);
    a label map with a non-integer value is an error naming the file."""
    rng = np.random.default_rng(1)
    g = np.indices(VOL) - (np.array(VOL)[:, None, None, None] - 1) / 2
    blob = (g ** 2).sum(0) < 16
    subs = []
    for i, lab in enumerate([np.where(blob, 40000, 0), np.where(blob, 2.5, 0.0)]):
        d = tmp_path / f"s{i}"
        d.mkdir()
        io.save_nifti(d / "t1.nii.gz", (rng.random(VOL) * blob).astype(np.float32))
        io.save_nifti(d / "t2.nii.gz", (rng.random(VOL) * blob).astype(np.float32))
        io.save_nifti(d / "labels.nii.gz", lab.astype(np.int32 if i == 0 else np.float32))
        subs.append(ds.Subject(f"s{i}", str(d / "t1.nii.gz"), str(d / "t2.nii.gz"), str(d / "labels.nii.gz"),
                               None, "train" if i == 0 else "test"))
    ds.write_description(tmp_path / "dataset.csv", subs)
    desc = ds.load_description(tmp_path)
    pairs.clear_cache()
    arr = pairs.load_split_arrays(desc, "train", VOL, ndim=3)
    assert set(np.unique(arr.labels).tolist()) == {0, 40000}
    np.testing.assert_array_equal(arr.labels[0] == 40000, blob)
    with pytest.raises(ContraRegInputError, match=r"s1/labels\.nii\.gz.*integer"):
        pairs.load_split_arrays(desc, "test", VOL, ndim=3)


def _fg(x):
    """Independent transcription of the foreground rule (scipy.ndimage as the peer): x > 10 % of the 99.5th
    percentile, largest connected component, holes filled."""
    import scipy.ndimage as ndi
    m = x > 0.1 * np.percentile(x, 99.5)
    lab, n = ndi.label(m)
    if n > 1:
        m = lab == 1 + np.argmax(np.bincount(lab.ravel())[1:])
    return ndi.binary_fill_holes(m)


def _norm_in(x, m):
    lo, hi = np.percentile(x[m], [0.5, 99.5])
    return np.clip((x - lo) / (hi - lo), 0, 1)


def test_one_subject_loader_behind_both_paths(synth, tmp_path):
    """dataset.load_images (single images, MASR-Net) and pairs.load_split_arrays (pairs) both load through
    dataset.load_subject: the same image and mask where their rules coincide (no mask file, values outside
    [0, 1]), and each its own documented rule elsewhere."""
    desc, raw = synth
    grid = (16, 16, 16)                          # load_images pads (10, 12, 9) up to multiples of 8
    images, masks, info = ds.load_images(desc, "train")
    arr = pairs.load_split_arrays(desc, "train", grid, ndim=3)
    assert info["n_images"] == 8 and all(x.shape == grid for x in images)
    for i in range(4):
        for j, (key, akey, mkey) in enumerate((("t1", "img1", "mask1"), ("t2", "img2", "mask2"))):
            x, mk = images[2 * i + j], masks[2 * i + j]
            whole = _cp(_norm(raw[i][key]), grid)
            np.testing.assert_allclose(arr[akey][i], whole, atol=1e-5)
            if i == 3:                             # no mask file: the two paths agree
                np.testing.assert_array_equal(x, arr[akey][i])
                np.testing.assert_array_equal(mk, arr[mkey][i])
                np.testing.assert_array_equal(mk, _cp(_fg(_norm(raw[i][key])), grid))
            else:                                  # mask file: load_images takes percentiles inside it
                np.testing.assert_allclose(x, _cp(_norm_in(raw[i][key], raw[i]["mask"]), grid), atol=1e-5)
                np.testing.assert_array_equal(mk, _cp(raw[i]["mask"], grid))
                np.testing.assert_array_equal(arr[mkey][i], mk)
    # an image already in [0, 1] is kept as it is by load_images, normalised by load_split_arrays
    d = tmp_path / "u"
    d.mkdir()
    x01 = (0.8 * raw[3]["t1"] / raw[3]["t1"].max()).astype(np.float32)
    for k in ("t1", "t2"):
        io.save_nifti(d / f"{k}.nii.gz", x01)
    io.save_nifti(d / "labels.nii.gz", raw[3]["labels"])
    sub = ds.Subject("u", str(d / "t1.nii.gz"), str(d / "t2.nii.gz"), str(d / "labels.nii.gz"), None, "train")
    one = ds.Description([sub, desc.subjects[0]], source="u")
    images, masks, _ = ds.load_images(one, "train")
    np.testing.assert_array_equal(images[0], _cp(x01, grid))
    np.testing.assert_array_equal(masks[0], _cp(_fg(x01), grid))
    np.testing.assert_allclose(pairs.load_split_arrays([sub], None, grid).img1[0], _cp(_norm(x01), grid), atol=1e-5)
