"""SynthMorph baselines (SM-brains / SM-shapes, training/synthmorph.py): the synthesizer's labels are the warped
input map and its image is a function of them, the Dice term is a soft Dice, a few steps lower the loss, and a
run folder registers through the λ interface with the same warp at every λ."""
import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndi

from contrareg_tf.config import SM_PAPER, get_preset

# calm synthesis: no blur / bias / gamma, zero intensity spread: the image is one value per (warped) label
CALM = dataclasses.replace(SM_PAPER, blur_std=0.0, bias_std=0.0, gamma_std=0.0, zero_background=0.0)


def _blob_map(shape):
    """Labels {0, 3, 7}: two boxes inside a background border of 25 % of each axis."""
    lab = np.zeros(shape, np.int32)
    q = [s // 4 for s in shape]
    lab[tuple(slice(a, s - a) for a, s in zip(q, shape))] = 3
    lab[tuple(slice(a, s // 2) for a, s in zip(q, shape))] = 7
    return lab


@pytest.mark.parametrize("preset", ["tiny2d", "tiny3d"])
def test_synthesizer_labels_are_the_warped_map_and_the_image_follows_them(preset):
    import tensorflow as tf

    from contrareg_tf.training.synthmorph import synthesizer

    cfg = get_preset(preset)
    tf.keras.utils.set_random_seed(3)
    lab = _blob_map(cfg.inshape)
    ids = [0, 3, 7]
    gen = synthesizer(cfg, CALM, ids, id=0, return_def=True, std_min=[0.0] * 3, std_max=[0.0] * 3)
    image, onehot, disp = (np.asarray(o)[0] for o in gen(lab[None, ..., None].astype(np.float32)))
    assert onehot.shape == tuple(cfg.inshape) + (3,)
    assert np.abs(disp).max() > 0.05                     # a real deformation was drawn
    # independent nearest-neighbour warp of the map by the returned displacement (voxel units, ij)
    grid = np.meshgrid(*[np.arange(s) for s in cfg.inshape], indexing="ij")
    coords = [g + disp[..., d] for d, g in enumerate(grid)]
    ref = ndi.map_coordinates(lab, coords, order=0, mode="nearest")
    got = np.asarray(ids)[np.argmax(onehot, -1)]
    assert np.allclose(onehot.sum(-1), 1.0)
    assert np.mean(got != ref) < 0.005                  # rounding ties only
    # zero spread, no blur / bias / gamma: one intensity per label, a different one for each label
    values = []
    for k in ids:
        v = image[..., 0][got == k]
        assert v.size and np.ptp(v) < 1e-5
        values.append(float(v[0]))
    assert min(np.diff(sorted(values))) > 1e-3


def test_dice_loss_equals_numpy_soft_dice():
    from contrareg_tf.training.synthmorph import dice_loss

    rng = np.random.default_rng(0)
    true = np.eye(4, dtype=np.float32)[rng.integers(0, 3, (2, 6, 5))]      # channel 3 absent in truth
    pred = rng.random((2, 6, 5, 4)).astype(np.float32)
    pred[1, ..., 3] = 0.0                                                   # and in one prediction: 0/0
    pred /= pred.sum(-1, keepdims=True) + 1e-9
    d = []
    for t, p in zip(true, pred):
        for c in range(4):
            den = t[..., c].sum() + p[..., c].sum()
            d.append(0.0 if den == 0 else 2 * (t[..., c] * p[..., c]).sum() / den)
    want = 1.0 - np.mean(d)
    assert float(dice_loss(true, pred)) == pytest.approx(want, abs=1e-6)


def test_label_map_sampler_is_step_keyed_and_flips_both_maps():
    from contrareg_tf.training.synthmorph import LabelMapSampler

    maps = np.arange(4 * 8 * 6).reshape(4, 8, 6) % 5
    s = LabelMapSampler(maps, batch_size=2, seed=1)
    a, b = s.batch(7), s.batch(7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["labels1"].shape == a["labels2"].shape == (2, 8, 6, 1)
    # every drawn map is a pool map under one common flip
    for step in range(20):
        x = s.batch(step)
        both = np.concatenate([x["labels1"], x["labels2"]])[..., 0]
        flips = [f for f in ([], [0], [1], [0, 1])
                 if all(any(np.array_equal(np.flip(m, f) if f else m, p) for p in maps) for m in both)]
        assert flips


def test_training_lowers_the_dice_loss():
    """tiny2d, 8 random-shape maps of 4 labels; every target map is its source shifted by 3 voxels, and both go
    through the full synthesizers (random deformation and contrast). 40 seeded steps on the shared loop: the
    mean Dice loss of the last 10 steps is below that of the first 10 by a margin."""
    import tensorflow as tf

    from contrareg_tf.training.loop import run_loop, step_rng
    from contrareg_tf.training.synthmorph import build_training_model, make_train_step, shape_label_maps

    cfg = get_preset("tiny2d")
    sm = dataclasses.replace(SM_PAPER, shape_maps=8, shape_labels=4)
    maps = shape_label_maps(cfg, sm)
    tf.keras.utils.set_random_seed(0)
    core, train_model = build_training_model(cfg, sm, list(range(4)))
    opt = tf.keras.optimizers.Adam(3e-3)
    opt.build(core.trainable_variables)
    step = make_train_step(train_model, core.trainable_variables, opt, sm.reg_weight, tf.distribute.get_strategy(), 4)

    def batch(i):
        x = maps[step_rng(0, i, 0).integers(len(maps), size=4)][..., None].astype(np.float32)
        return {"labels1": x, "labels2": np.roll(x, 3, axis=1)}

    hist = run_loop(step, batch, tf.train.Checkpoint(step=tf.Variable(0, dtype=tf.int64)), None, 40, 40,
                    progress=False)
    dice = np.array([h["dice"] for h in hist])
    first, last = dice[:10].mean(), dice[-10:].mean()
    print(f"Dice loss: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last < first - 0.03, (first, last)


@pytest.mark.slow
def test_run_registers_through_the_lambda_interface_with_one_warp(tmp_path):
    """A run folder (tiny2d, 2 steps) loads with runs.load_trained, and evaluation / inference give the same
    metrics and warps at two λ values (one Table-1 row, a flat Fig. 3 line; batched evaluation may differ in
    the last float bits)."""
    from contrareg_tf import evaluation
    from contrareg_tf.inference import register_arrays
    from contrareg_tf.runs import load_trained
    from contrareg_tf.training.synthmorph import train_synthmorph

    cfg = get_preset("tiny2d")
    maps = np.stack([_blob_map(cfg.inshape), np.roll(_blob_map(cfg.inshape), 2, 0)])
    out = str(tmp_path / "sm")
    train_synthmorph(cfg, "sm-brains", out, {"labels": maps}, iters=2, progress=False)
    model, meta = load_trained(out)
    assert meta["loss"] == "sm-brains" and meta["method"] == "synthmorph"
    rng = np.random.default_rng(0)
    imgs = ndi.gaussian_filter(rng.random((2,) + tuple(cfg.inshape)), 1.5).astype(np.float32)
    pairs = {"img1": imgs[:1], "img2": imgs[1:], "labels1": maps[:1], "labels2": maps[1:]}
    rows = evaluation.evaluate_lambdas(model, pairs, lambdas=(0.0, 0.7), progress=False)
    for k in ("dice", "folds", "sdlogj", "dice_inv", "folds_inv", "sdlogj_inv"):
        assert rows[0][k] == pytest.approx(rows[1][k], rel=1e-6, abs=1e-9), k
    fwd0, inv0, _ = register_arrays(model, imgs[0], imgs[1], lam=0.0)
    fwd1, inv1, _ = register_arrays(model, imgs[0], imgs[1], lam=0.7)
    assert np.array_equal(fwd0, fwd1) and np.array_equal(inv0, inv1)
    assert np.abs(fwd0).max() > 0                          # a trained network, not an all-zero warp
