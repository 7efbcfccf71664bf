"""PatchNCE (CR / mCR / ExtNegs / RandAE) against numpy transcriptions of the paper's equation."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import voxelmorph as vxm

from contrareg_tf.config import PAPER
from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.losses.patchnce import PatchNCE, attach_heads, patchnce, score_jobs
from contrareg_tf.losses.sampling import resize_mask, sample_locations
from contrareg_tf.losses.similarity import build_similarity
from contrareg_tf.networks.autoencoder import build_autoencoder, feature_channels
from contrareg_tf.networks.heads import build_heads
from contrareg_tf.networks.layers import NearestUpsample
from contrareg_tf.networks.point_features import point_split

KL = tf.keras.layers


# ------------------------------------------------------------------------------------------- helpers
def np_patchnce(q, k, valid, tau, ext=None, valid_ext=None):
    """The paper's equation, literally: loops over queries i and negatives j != i (float64)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    out = np.zeros(q.shape[0])
    for b in range(q.shape[0]):
        losses = []
        for i in range(q.shape[1]):
            if not valid[b, i]:
                continue
            pos = np.exp(q[b, i] @ k[b, i] / tau)
            neg = sum(np.exp(q[b, i] @ k[b, j] / tau) for j in range(q.shape[1]) if j != i and valid[b, j])
            if ext is not None:
                neg += sum(np.exp(q[b, i] @ ext[b, j] / tau) for j in range(ext.shape[1])
                           if valid_ext is None or valid_ext[b, j])
            losses.append(-np.log(pos / (pos + neg)))
        out[b] = np.mean(losses) if losses else 0.0
    return out


def unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_maxpool_mask(m, shape):
    """Block-'any' downsampling of a binary (B, *vol) mask to (B, *shape) (integer factors)."""
    b, vol = m.shape[0], m.shape[1:]
    f = [v // s for v, s in zip(vol, shape)]
    r = m.reshape(b, *[x for s, ff in zip(shape, f) for x in (s, ff)])
    return r.any(axis=tuple(range(2, 2 * len(shape) + 1, 2)))


def tiny_ae(ndim, size, seed=0):
    """Stand-in autoencoder: [recon, f1 (stride 1), f2 (stride 2), f3 (stride 4)]."""
    tf.keras.utils.set_random_seed(seed)
    Conv = getattr(KL, f"Conv{ndim}D")
    x = KL.Input((*[size] * ndim, 1))
    f1 = Conv(4, 3, padding="same", activation="relu")(x)
    f2 = Conv(6, 3, strides=2, padding="same", activation="relu")(f1)
    f3 = Conv(8, 3, strides=2, padding="same")(f2)
    return tf.keras.Model(x, [Conv(1, 1)(f1), f1, f2, f3])


def linear_heads(channels, dim=8, seed=0):
    """Stand-in heads: one Dense each (L2-normalised by PatchNCE) — transcribable in numpy."""
    tf.keras.utils.set_random_seed(seed)
    return [tf.keras.Sequential([KL.Input((c,)), KL.Dense(dim)]) for c in channels]


def mlp_heads(channels, dim=16, seed=0):
    tf.keras.utils.set_random_seed(seed)
    return [tf.keras.Sequential([KL.Input((c,)), KL.Dense(dim, activation="relu"), KL.Dense(dim),
                                 KL.UnitNormalization()]) for c in channels]


def smooth_image(ndim, size, b=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((b, *[size] * ndim))
    for ax in range(1, ndim + 1):  # cheap separable blur
        x = (np.roll(x, 1, ax) + 2 * x + np.roll(x, -1, ax)) / 4
        x = (np.roll(x, 1, ax) + 2 * x + np.roll(x, -1, ax)) / 4
    x = (x - x.min()) / (x.max() - x.min())
    return x[..., None].astype(np.float32)


SIZES = {2: 32, 3: 16}


# ---------------------------------------------------------------------------------------- core loss
@pytest.mark.parametrize("dtype,tau,tol", [(np.float64, PAPER.nce_tau, 1e-9), (np.float32, 0.07, 1e-5)])
def test_core_matches_numpy_equation(dtype, tau, tol):
    rng = np.random.default_rng(1)
    q, k = unit(rng, 3, 12, 8), unit(rng, 3, 12, 8)
    valid = rng.random((3, 12)) > 0.3
    valid[2] = False                       # a sample without valid queries contributes 0
    got = patchnce(tf.constant(q, dtype), tf.constant(k, dtype), tf.constant(valid), tau).numpy()
    want = np_patchnce(q.astype(dtype), k.astype(dtype), valid, tau)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert got[2] == 0.0
    # all-valid default
    np.testing.assert_allclose(patchnce(tf.constant(q, dtype), tf.constant(k, dtype), None, tau).numpy(),
                               np_patchnce(q, k, np.ones((3, 12), bool), tau), rtol=tol, atol=tol)


def test_core_extnegs_matches_numpy_and_adds_negatives():
    rng = np.random.default_rng(2)
    q, k, e = unit(rng, 2, 10, 6), unit(rng, 2, 10, 6), unit(rng, 2, 7, 6)
    valid = np.ones((2, 10), bool)
    valid_e = rng.random((2, 7)) > 0.4
    tau = PAPER.nce_tau
    with_ext = patchnce(tf.constant(q), tf.constant(k), tf.constant(valid), tau, tf.constant(e),
                        tf.constant(valid_e)).numpy()
    without = patchnce(tf.constant(q), tf.constant(k), tf.constant(valid), tau).numpy()
    np.testing.assert_allclose(with_ext, np_patchnce(q, k, valid, tau, e, valid_e), rtol=1e-9)
    np.testing.assert_allclose(without, np_patchnce(q, k, valid, tau), rtol=1e-9)
    assert np.all(with_ext >= without) and np.any(with_ext > without + 1e-6)


def test_core_single_valid_location_gives_zero_and_finite_grads():
    rng = np.random.default_rng(3)
    q = tf.Variable(unit(rng, 1, 5, 4).astype(np.float32))
    k = tf.constant(unit(rng, 1, 5, 4).astype(np.float32))
    valid = tf.constant([[False, True, False, False, False]])
    with tf.GradientTape() as tape:
        loss = patchnce(q, k, valid, PAPER.nce_tau)
    g = tape.gradient(loss, q).numpy()
    assert loss.numpy()[0] == pytest.approx(0.0, abs=1e-6)   # only the positive in the denominator
    assert np.all(np.isfinite(g))


# ------------------------------------------------------------------------------------------ sampling
def test_sample_locations_distinct_seeded_and_foreground_first():
    rng = np.random.default_rng(4)
    mask = rng.random((3, 200)) > 0.7
    mask[2] = False
    mask[2, [5, 17, 99]] = True              # 3 foreground locations < ns
    idx, valid = sample_locations(tf.constant(mask), 32, seed=7)
    idx, valid = idx.numpy(), valid.numpy()
    idx2, _ = sample_locations(tf.constant(mask), 32, seed=7)
    np.testing.assert_array_equal(idx, idx2.numpy())
    assert idx.shape == (3, 32)
    for b in range(3):
        assert len(set(idx[b])) == 32 and idx[b].min() >= 0 and idx[b].max() < 200
        np.testing.assert_array_equal(valid[b], mask[b, idx[b]])
        assert valid[b].sum() == min(32, mask[b].sum())   # every foreground location first
    assert set(idx[2, valid[2]]) == {5, 17, 99}
    # fewer locations than ns: all of them
    idx, valid = sample_locations(tf.ones((2, 20), tf.bool), 64, seed=1)
    assert idx.shape == (2, 20)
    np.testing.assert_array_equal(np.sort(idx.numpy(), -1), np.tile(np.arange(20), (2, 1)))


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_mask_is_block_any(ndim):
    rng = np.random.default_rng(5)
    m = rng.random((2, *[16] * ndim)) > 0.93
    for s in (16, 8, 4):
        got = resize_mask(tf.constant(m[..., None]), [s] * ndim).numpy()
        np.testing.assert_array_equal(got, np_maxpool_mask(m, [s] * ndim))
    # non-integer factor: nearest neighbour
    got = resize_mask(tf.constant(m), [6] * ndim).numpy()
    src = np.floor((np.arange(6) + 0.5) * 16 / 6).astype(int)
    want = m[np.ix_(range(2), *[src] * ndim)]
    np.testing.assert_array_equal(got, want)


# -------------------------------------------------------------------------------- PatchNCE end-to-end
@pytest.mark.parametrize("ndim", [2, 3])
def test_patchnce_class_matches_numpy_pipeline(ndim):
    """Full path: AE features → gather sampled indices → Dense head → L2-norm → equation, summed over
    layers; everything after the AE transcribed in numpy."""
    size = SIZES[ndim]
    a1, a2 = tiny_ae(ndim, size, 0), tiny_ae(ndim, size, 1)
    f1, f2 = linear_heads([4, 6, 8], seed=2), linear_heads([4, 6, 8], seed=3)
    x1, x2 = smooth_image(ndim, size, seed=0), smooth_image(ndim, size, seed=1)
    tau = 0.07
    nce = PatchNCE(a1, f1, a2, f2, num_patches=24, tau=tau, seed=3)
    loss, samples = nce.compute(x1, x2, return_samples=True)
    feats1 = [f.numpy() for f in a1(x1)[1:]]
    feats2 = [f.numpy() for f in a2(x2)[1:]]

    def proj(head, feat, idx):
        w, b = (v.numpy() for v in head.layers[0].weights)
        flat = feat.reshape(feat.shape[0], -1, feat.shape[-1])
        g = np.stack([flat[i, idx[i]] for i in range(len(idx))]) @ w + b
        return g / (np.linalg.norm(g, axis=-1, keepdims=True) + 1e-7)

    want = np.zeros(2)
    for k in range(3):
        idx = samples[k]["idx"].numpy()
        assert samples[k]["valid"].numpy().all()
        want += np_patchnce(proj(f1[k], feats1[k], idx), proj(f2[k], feats2[k], idx),
                            np.ones(idx.shape, bool), tau)
    assert loss.shape == (2,)
    np.testing.assert_allclose(loss.numpy(), want, rtol=2e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_aligned_lower_than_shifted(ndim):
    size = SIZES[ndim]
    ae = tiny_ae(ndim, size, 4)           # RandAE: randomly initialised and frozen, same on both sides
    heads = mlp_heads([4, 6, 8], seed=5)
    x = smooth_image(ndim, size, seed=2)
    shifted = np.roll(x, 3, axis=1)
    aligned = PatchNCE(ae, heads, ae, heads, num_patches=32, seed=0)(x, x).numpy()
    moved = PatchNCE(ae, heads, ae, heads, num_patches=32, seed=0)(x, shifted).numpy()
    assert np.all(np.isfinite(aligned)) and np.all(aligned < moved)


@pytest.mark.parametrize("ndim", [2, 3])
def test_mcr_samples_only_foreground(ndim):
    size = SIZES[ndim]
    a1, a2 = tiny_ae(ndim, size, 0), tiny_ae(ndim, size, 1)
    f1, f2 = mlp_heads([4, 6, 8], seed=1), mlp_heads([4, 6, 8], seed=2)
    rng = np.random.default_rng(6)
    x1, x2 = smooth_image(ndim, size, seed=3), smooth_image(ndim, size, seed=4)
    m1 = np.zeros((2, *[size] * ndim), bool)
    m2 = np.zeros_like(m1)
    m1[(slice(None),) + (slice(2, 9),) * ndim] = True    # two offset boxes; union = foreground
    m2[(slice(None),) + (slice(6, 12),) * ndim] = True
    m2[1] |= rng.random(m2.shape[1:]) > 0.97
    nce = PatchNCE(a1, f1, a2, f2, num_patches=40, masked=True, seed=1)
    loss, samples = nce.compute(x1, x2, masks=(m1, m2), return_samples=True)
    assert np.all(np.isfinite(loss.numpy()))
    union = m1 | m2
    for k, s in enumerate([size, size // 2, size // 4]):
        fg = np_maxpool_mask(union, [s] * ndim).reshape(2, -1)
        idx, valid = samples[k]["idx"].numpy(), samples[k]["valid"].numpy()
        np.testing.assert_array_equal(samples[k]["mask"].numpy(), fg)
        for b in range(2):
            assert fg[b, idx[b, valid[b]]].all()                     # never a background query/negative
            assert not fg[b, idx[b, ~valid[b]]].any()
            assert valid[b].sum() == min(idx.shape[1], fg[b].sum())


def test_mcr_keras_form_derives_masks_by_threshold():
    a1, a2 = tiny_ae(2, 32, 0), tiny_ae(2, 32, 1)
    f1, f2 = mlp_heads([4, 6, 8], seed=1), mlp_heads([4, 6, 8], seed=2)
    x1, x2 = smooth_image(2, 32, seed=3), smooth_image(2, 32, seed=4)
    x1[:, :, 16:] = 0
    x2[:, :, 20:] = 0
    nce = PatchNCE(a1, f1, a2, f2, num_patches=2000, masked=True, mask_threshold=0.05, seed=1)
    _, samples = nce.compute(x1, x2, return_samples=True)
    fg = ((x1[..., 0] > 0.05) | (x2[..., 0] > 0.05)).reshape(2, -1)
    idx, valid = samples[0]["idx"].numpy(), samples[0]["valid"].numpy()
    assert idx.shape == (2, 32 * 32) and valid.sum(-1).tolist() == fg.sum(-1).tolist()
    assert all(fg[b, idx[b, valid[b]]].all() for b in range(2))
    assert nce.loss(x1, x2).shape == (2,)


@pytest.mark.parametrize("nb_fg", [0, 3])
def test_mcr_empty_or_tiny_mask_is_finite(nb_fg):
    a1, a2 = tiny_ae(3, 16, 0), tiny_ae(3, 16, 1)
    f1, f2 = mlp_heads([4, 6, 8], seed=1), mlp_heads([4, 6, 8], seed=2)
    x1, x2 = smooth_image(3, 16, seed=3), smooth_image(3, 16, seed=4)
    m = np.zeros((2, 16, 16, 16, 1), np.float32)
    m.reshape(2, -1)[:, [100, 2000, 4000][:nb_fg]] = 1
    a = tf.Variable(x2)
    nce = PatchNCE(a1, f1, a2, f2, num_patches=32, masked=True, seed=0)
    with tf.GradientTape() as tape:
        loss = nce(x1, a, masks=(m, m))
    g = tape.gradient(loss, a)
    assert np.all(np.isfinite(loss.numpy())) and np.all(np.isfinite(g.numpy()))
    if nb_fg == 0:
        np.testing.assert_array_equal(loss.numpy(), 0.0)
    else:
        assert np.all(loss.numpy() > 0)


def test_extnegs_class_adds_negatives():
    """ExtNegs through the class: same seed → same query/key indices; the extra negatives only add
    terms to every denominator, so the loss cannot decrease. Also the Keras form's 2nd channel."""
    a1, a2 = tiny_ae(2, 32, 0), tiny_ae(2, 32, 1)
    f1, f2 = mlp_heads([4, 6, 8], seed=1), mlp_heads([4, 6, 8], seed=2)
    x1, x2, ext = (smooth_image(2, 32, seed=s) for s in (5, 6, 7))
    kw = dict(num_patches=16, tau=0.07)
    base, s0 = PatchNCE(a1, f1, a2, f2, seed=3, **kw).compute(x1, x2, return_samples=True)
    with_ext, s1 = PatchNCE(a1, f1, a2, f2, seed=3, **kw).compute(x1, x2, ext=ext, return_samples=True)
    np.testing.assert_array_equal(s0[0]["idx"].numpy(), s1[0]["idx"].numpy())
    assert np.all(with_ext.numpy() > base.numpy())
    keras_form = PatchNCE(a1, f1, a2, f2, seed=3, **kw).loss(np.concatenate([x1, ext], -1), x2)
    np.testing.assert_allclose(keras_form.numpy(), with_ext.numpy(), rtol=1e-6)


def test_gradients_reach_registration_net_and_heads_not_autoencoders():
    tf.keras.utils.set_random_seed(0)
    a1, a2 = tiny_ae(2, 32, 0), tiny_ae(2, 32, 1)    # RandAE (random init, frozen by PatchNCE)
    f1, f2 = mlp_heads([4, 6, 8], seed=1), mlp_heads([4, 6, 8], seed=2)
    reg = vxm.networks.VxmDense((32, 32), nb_unet_features=[[8, 8], [8, 8, 8]], int_steps=3, bidir=True)
    lsim = build_similarity("cr", dataclasses.replace(PAPER, num_patches=32), a1, a2, f1, f2, seed=0)
    assert a1.trainable_variables == [] and a2.trainable_variables == []
    fixed, moving = smooth_image(2, 32, seed=1), smooth_image(2, 32, seed=2)
    head_vars = lsim.trainable_variables
    assert len(head_vars) == sum(len(h.trainable_variables) for h in f1 + f2)
    with tf.GradientTape() as tape:
        y_src, y_trg, _ = reg([moving, fixed])
        loss = tf.reduce_mean(lsim(fixed, moving, y_src, y_trg)["sim"])
    grads = tape.gradient(loss, reg.trainable_variables + head_vars)
    n_reg = len(reg.trainable_variables)
    g_reg, g_head = grads[:n_reg], grads[n_reg:]
    # the AEs are never updated: no AE variable is in anything a Keras optimizer / fit would train
    ae_refs = {v.ref() for v in a1.weights + a2.weights}
    trainer = attach_heads(reg, lsim)
    trainer([moving, fixed])
    assert not ae_refs & {v.ref() for v in head_vars + trainer.trainable_variables}
    assert {v.ref() for v in trainer.trainable_variables} == {v.ref() for v in reg.trainable_variables + head_vars}
    assert all(g is not None for g in g_head) and all(np.any(g.numpy() != 0) for g in g_head)
    assert sum(g is not None and np.any(g.numpy() != 0) for g in g_reg) == n_reg
    flow = [g for g, v in zip(g_reg, reg.trainable_variables) if "flow" in v.name and "kernel" in v.name]
    assert flow and np.abs(flow[0].numpy()).max() > 0


def test_seed_modes_global_rng_and_shared_generator():
    a1 = tiny_ae(2, 32, 0)
    f1 = mlp_heads([4, 6, 8], seed=1)
    x = smooth_image(2, 32)

    def idx(nce):
        return [s["idx"].numpy() for s in nce.compute(x, x, return_samples=True)[1]]

    nce = PatchNCE(a1, f1, a1, f1, num_patches=8)           # seed=None: TF's global RNG
    tf.random.set_seed(11)
    first = idx(nce)
    tf.random.set_seed(11)
    assert all(np.array_equal(u, v) for u, v in zip(first, idx(nce)))
    assert not all(np.array_equal(u, v) for u, v in zip(first, idx(nce)))   # advances between calls
    gen = tf.random.Generator.from_seed(3)                 # shared generator: state is resumable
    state = gen.state.numpy()
    first = idx(PatchNCE(a1, f1, a1, f1, num_patches=8, seed=gen))
    gen.reset_from_seed(3)
    assert np.array_equal(gen.state.numpy(), state)
    assert all(np.array_equal(u, v) for u, v in zip(first, idx(PatchNCE(a1, f1, a1, f1, num_patches=8, seed=gen))))
    with pytest.raises(ContraRegInputError, match="seed"):
        PatchNCE(a1, f1, a1, f1, seed="x")


def test_bidirectional_is_mean_of_directions():
    """BidirSimilarity scores both directions in one batched pass: ½(d12 + d21) of separate PatchNCE calls with the
    same seeds."""
    a1, a2 = tiny_ae(2, 32, 0), tiny_ae(2, 32, 1)
    f1, f2 = mlp_heads([4, 6, 8], seed=1), mlp_heads([4, 6, 8], seed=2)
    x1, x2, y1, y2 = (smooth_image(2, 32, seed=s) for s in range(4))
    cfg = dataclasses.replace(PAPER, num_patches=16)
    both = build_similarity("cr", cfg, a1, a2, f1, f2, seed=5)(x1, x2, y2, y1)
    d12 = PatchNCE(a1, f1, a2, f2, num_patches=16, seed=5)(x1, y2).numpy()
    d21 = PatchNCE(a2, f2, a1, f1, num_patches=16, seed=5)(x2, y1).numpy()
    np.testing.assert_allclose(both["d12"].numpy(), d12, rtol=1e-6)
    np.testing.assert_allclose(both["d21"].numpy(), d21, rtol=1e-6)
    np.testing.assert_allclose(both["sim"].numpy(), 0.5 * (d12 + d21), rtol=1e-6)


def test_bad_inputs_raise_contrareg_error():
    a1 = tiny_ae(2, 32, 0)
    f1 = mlp_heads([4, 6, 8], seed=1)
    x = smooth_image(2, 32)
    with pytest.raises(ContraRegInputError, match="heads"):
        PatchNCE(a1, f1, a1, f1[:2])
    with pytest.raises(ContraRegInputError, match="nb_layers"):
        PatchNCE(a1, f1, a1, f1, nb_layers=4)
    nce = PatchNCE(a1, f1, a1, f1, num_patches=8)
    with pytest.raises(ContraRegInputError, match="y_pred"):
        nce(x, x[:, :16])
    with pytest.raises(ContraRegInputError, match="y_true"):
        nce(x[..., 0], x)
    with pytest.raises(ContraRegInputError, match="masks"):
        PatchNCE(a1, f1, a1, f1, masked=True)(x, x, masks=(x[:, :8], x[:, :8]))


def test_real_autoencoder_and_heads():
    a1 = build_autoencoder(2, name="ae_t1")
    a2 = build_autoencoder(2, name="ae_t2")
    chans = [int(f.shape[-1]) for f in a1.outputs[1:7]]
    f1 = build_heads(chans, units=32, name="heads_t1")
    f2 = build_heads(chans, units=32, name="heads_t2")
    x1, x2 = smooth_image(2, 32, seed=1), smooth_image(2, 32, seed=2)
    nce = PatchNCE(a1, f1, a2, f2, num_patches=32, masked=True, seed=0)
    var = tf.Variable(x2)
    with tf.GradientTape() as tape:
        loss = nce(x1, var)
    assert loss.shape == (2,) and np.all(np.isfinite(loss.numpy()))
    assert np.any(tape.gradient(loss, var).numpy() != 0)
    assert a1.trainable_variables == [] and len(nce.trainable_variables) > 0


# --------------------------------------------------------------- optimised path vs straightforward references
def paper_style_parts(ndim, size=16, seed=0):
    """build_autoencoder (conv → norm → act blocks, nearest up-sampling) and ProjectionHead MLPs, small."""
    filters = (4, 6, 8, 6, 4, 4, 4, 1)
    a1, a2 = (build_autoencoder(ndim, filters, seed=seed + s, name=f"ae{s}") for s in (1, 2))
    chans = feature_channels(filters, 6)
    tf.keras.utils.set_random_seed(seed)
    h1, h2 = (build_heads(chans, units=16, name=n) for n in ("f1", "f2"))
    rng = np.random.default_rng(seed)
    for h in h1 + h2:        # CUT's gain-0.02 init makes every projection ~equal; spread them
        h.set_weights([w * 30 + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in h.get_weights()])
    return a1, a2, h1, h2


def reference_d(ae_f, heads_f, ae_m, heads_m, fixed, moved, samples, tau):
    """The previous, straightforward implementation for given sampled indices: full autoencoder maps, gather,
    one head call per side and layer (heads normalise), the equation per layer with tf ops."""
    fq, fk = ae_f(fixed)[1:], ae_m(moved)[1:]
    total = 0.0
    for k, s in enumerate(samples):
        def proj(head, f):
            g = tf.gather(tf.reshape(f, [f.shape[0], -1, f.shape[-1]]), s["idx"], batch_dims=1)
            return tf.reshape(head(tf.reshape(g, [-1, f.shape[-1]])), [f.shape[0], g.shape[1], -1])
        q, kp = proj(heads_f[k], fq[k]), proj(heads_m[k], fk[k])
        logits = tf.einsum("bid,bjd->bij", q, kp) / tau
        n = logits.shape[1]
        valid = tf.cast(s["valid"], tf.bool)
        keep = tf.logical_or(tf.eye(n, dtype=tf.bool)[None], valid[:, None, :])
        lse = tf.reduce_logsumexp(tf.where(keep, logits, -1e9), -1)
        per = (lse - tf.linalg.diag_part(logits)) * tf.cast(valid, tf.float32)
        total += tf.reduce_sum(per, -1) / tf.maximum(tf.reduce_sum(tf.cast(valid, tf.float32), -1), 1.0)
    return total, (fq, fk)


@pytest.mark.parametrize("ndim,masked", [(2, False), (3, True)])
def test_optimised_bidirectional_loss_and_gradient_match_references(ndim, masked):
    """Both directions through BidirSimilarity's path (last feature layer at the sampled points only, heads and
    PatchNCE terms of both directions batched) equal (rtol 1e-5) a straightforward TF reference and a numpy
    transcription of the equation for the same sampled indices; the gradients w.r.t. both registration
    outputs (moved images) match the reference's."""
    size, tau = (32 if ndim == 2 else 16), 0.07
    a1, a2, h1, h2 = paper_style_parts(ndim, size)
    assert point_split(a1, 6) is not None                       # the point path is the one under test
    x1, x2 = smooth_image(ndim, size, seed=1), smooth_image(ndim, size, seed=2)
    m2 = tf.Variable(smooth_image(ndim, size, seed=3))           # "I2∘φ" and "I1∘φ⁻¹": what the network outputs
    m1 = tf.Variable(smooth_image(ndim, size, seed=4))
    masks = None
    if masked:
        box = np.zeros((2, *[size] * ndim, 1), np.float32)
        box[(slice(None),) + (slice(3, 7),) * ndim] = 1
        masks = (box, box)
    d12 = PatchNCE(a1, h1, a2, h2, num_patches=24, tau=tau, masked=masked, seed=5, name="d12")
    d21 = PatchNCE(a2, h2, a1, h1, num_patches=24, tau=tau, masked=masked, seed=6, name="d21")
    with tf.GradientTape(persistent=True) as tape:
        t12, t21 = score_jobs([d12.sampled_features(x1, m2, masks), d21.sampled_features(x2, m1, masks)])
        new = tf.reduce_sum(t12 + t21)
    # the same draws: fresh generators with the same seeds, sampled by the single-direction calls
    s12 = PatchNCE(a1, h1, a2, h2, num_patches=24, tau=tau, masked=masked, seed=5).compute(
        x1, m2, masks=masks, return_samples=True)[1]
    s21 = PatchNCE(a2, h2, a1, h1, num_patches=24, tau=tau, masked=masked, seed=6).compute(
        x2, m1, masks=masks, return_samples=True)[1]
    with tf.GradientTape(persistent=True) as rtape:
        r12, (fq12, fk12) = reference_d(a1, h1, a2, h2, x1, m2, s12, tau)
        r21, _ = reference_d(a2, h2, a1, h1, x2, m1, s21, tau)
        ref = tf.reduce_sum(r12 + r21)
    np.testing.assert_allclose(t12.numpy(), r12.numpy(), rtol=1e-5)
    np.testing.assert_allclose(t21.numpy(), r21.numpy(), rtol=1e-5)
    for v in (m1, m2):
        g, gr = tape.gradient(new, v).numpy(), rtape.gradient(ref, v).numpy()
        assert np.abs(gr).max() > 0
        np.testing.assert_allclose(g, gr, rtol=1e-4, atol=1e-5 * np.abs(gr).max())
    for w, wr in zip(tape.gradient(new, h1[5].trainable_variables), rtape.gradient(ref, h1[5].trainable_variables)):
        np.testing.assert_allclose(w.numpy(), wr.numpy(), rtol=1e-4, atol=1e-5 * np.abs(wr.numpy()).max())

    def np_proj(head, feat, idx):           # numpy: gather, MLP, x / (‖x‖ + 1e-7)
        flat = feat.numpy().reshape(feat.shape[0], -1, feat.shape[-1]).astype(np.float64)
        h = np.stack([flat[b, idx[b]] for b in range(len(idx))])
        for i, layer in enumerate(head.dense_layers):
            kern, bias = layer.get_weights()
            h = h @ kern + bias
            h = np.maximum(h, 0) if i < len(head.dense_layers) - 1 else h
        return h / (np.linalg.norm(h, axis=-1, keepdims=True) + 1e-7)

    want = sum(np_patchnce(np_proj(h1[k], fq12[k], s["idx"].numpy()), np_proj(h2[k], fk12[k], s["idx"].numpy()),
                           s["valid"].numpy(), tau) for k, s in enumerate(s12))
    np.testing.assert_allclose(t12.numpy(), want, rtol=1e-5)
    if masked:
        assert not all(s["valid"].numpy().all() for s in s12)    # some picks fell outside the box


@pytest.mark.parametrize("ndim,size,up,stride", [(2, 15, 1, 2), (3, 8, 2, 1), (2, 9, 2, 1), (3, 7, 1, 1)])
def test_point_conv_equals_the_conv_at_the_points(ndim, size, up, stride):
    """PointConv (the last feature layer at sampled locations) = the Keras conv's full output gathered there,
    for 'same' padding with odd sizes (TF pads ⌊total/2⌋ before), stride 2 and ×2 nearest up-sampling."""
    tf.keras.utils.set_random_seed(0)
    Conv = getattr(KL, f"Conv{ndim}D")
    x = KL.Input((*[size] * ndim, 1))
    f1 = Conv(3, 3, padding="same", activation="relu")(x)
    a = NearestUpsample(up)(f1) if up > 1 else f1
    f2 = Conv(5, 3, strides=stride, padding="same", activation="tanh")(a)
    ae = tf.keras.Model(x, [x, f1, f2])
    trunk, point = point_split(ae, 2)
    img = np.random.default_rng(1).random((2, *[size] * ndim, 1)).astype(np.float32)
    full = ae(img)[2].numpy().reshape(2, -1, 5)
    src = trunk(img)
    src = src[-1] if isinstance(src, (list, tuple)) else src
    n = full.shape[1]
    assert point.out_shape(src.shape[1:-1].as_list()) == list(ae(img)[2].shape[1:-1])
    idx = np.stack([np.arange(n), np.arange(n)[::-1]]).astype(np.int32)
    got = point(src, tf.constant(idx)).numpy()
    want = np.stack([full[b, idx[b]] for b in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
