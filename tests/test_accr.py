"""ACCR (the review's §4 proposal, losses/accr.py) against independent numpy transcriptions: the cross-modal
attention block, the anatomy-aware negatives and the masked InfoNCE, the structural self-similarity term; the
JointSimilarity protocol in 2-D / 3-D and three training steps of the registration network."""
import dataclasses
import warnings

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from contrareg_tf import config
from contrareg_tf.config import get_preset
from contrareg_tf.losses import accr as A
from contrareg_tf.losses.joint import JointSimilarity
from contrareg_tf.losses.similarity import build_similarity
from contrareg_tf.networks.accr import CrossModalAttention
from contrareg_tf.training.registration import setup_registration

SMALL = dataclasses.replace(config.ACCR, widths=(4, 6), feat_channels=5, attn_channels=3, num_patches=24)


# ----------------------------------------------------------------------------- numpy references
def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_cross_attention(x, y, wq, wk, wv, wo):
    q, k, v = x @ wq, y @ wk, y @ wv
    a = np_softmax(np.einsum("bnd,bmd->bnm", q, k) / np.sqrt(wq.shape[1]))
    return x + np.einsum("bnm,bmd->bnd", a, v) @ wo


def np_masked_nce(q, k, allowed, tau):
    """−log exp(s_ii/τ) / (exp(s_ii/τ) + Σ_{allowed j} exp(s_ij/τ)), mean over i, float64 loops."""
    B, n, _ = q.shape
    out = np.zeros(B)
    for b in range(B):
        for i in range(n):
            s = q[b, i] @ k[b].T / tau
            terms = [s[i]] + [s[j] for j in range(n) if allowed[b, i, j]]
            m = max(terms)
            out[b] += -(s[i] - m - np.log(np.sum(np.exp(np.array(terms) - m)))) / n
    return out


def np_shift(x, off):
    p = max(abs(o) for o in off)
    xp = np.pad(x, [(p, p)] * len(off) + [(0, 0)], mode="edge")
    return xp[tuple(slice(p + o, p + o + n) for o, n in zip(off, x.shape[:-1]))]


def np_self_similarity(f, d, p):
    """(*vol, C) → (*vol, 2·ndim): D_k = box_p[mean_c (f − f(· + r_k))²], exp(−(D − min D)/V)."""
    offs = [list(s * d * e) for e in np.eye(f.ndim - 1, dtype=int) for s in (1, -1)]
    D = np.stack([ndimage.uniform_filter(((f - np_shift(f, o)) ** 2).mean(-1), size=p, mode="nearest")
                  for o in offs], -1)
    V = D.mean(-1)
    m = V.mean()
    V = np.clip(V, max(1e-3 * m, 1e-12), max(1e3 * m, 1e-12))
    return np.exp(-(D - D.min(-1, keepdims=True)) / V[..., None])


def quadrant_labels(shape):
    """A label map of four regions (quadrants of the first two axes): 0, 3, 5, 7."""
    lab = np.zeros(shape, np.int32)
    h, w = shape[0] // 2, shape[1] // 2
    lab[:h, w:], lab[h:, :w], lab[h:, w:] = 3, 5, 7
    return lab


# ----------------------------------------------------------------------------- attention block
def test_cross_modal_attention_matches_numpy():
    tf.keras.utils.set_random_seed(3)
    blk = CrossModalAttention(4, 3, name="attn_t")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 5, 4)).astype(np.float32), rng.normal(size=(2, 7, 4)).astype(np.float32)
    o1, o2 = blk(tf.constant(x), tf.constant(y))
    w = lambda att: [d.kernel.numpy().astype(np.float64) for d in (att.wq, att.wk, att.wv, att.wo)]  # noqa: E731
    np.testing.assert_allclose(o1.numpy(), np_cross_attention(x.astype(np.float64), y, *w(blk.to1)), atol=1e-5)
    np.testing.assert_allclose(o2.numpy(), np_cross_attention(y.astype(np.float64), x, *w(blk.to2)), atol=1e-5)
    assert len(blk.trainable_variables) == 8          # built at construction: 2 directions × q, k, v, o


# ----------------------------------------------------------------------------- anatomy-aware negatives
def _batch(shape, B=2, seed=0):
    rng = np.random.default_rng(seed)
    img = lambda: tf.constant(rng.random((B, *shape, 1), np.float32))  # noqa: E731
    lab = np.stack([quadrant_labels(shape)] * B)[..., None]
    lab2 = np.stack([np.rot90(quadrant_labels(shape))] * B)[..., None].copy()   # subject b: other layout
    return dict(img1=img(), img2=img(), labels1=tf.constant(lab), labels2=tf.constant(lab2)), img(), img()


def test_negatives_never_from_the_query_region_fixed_labels():
    """Without flows: a key j is a negative of query i iff j ≠ i and L_fixed(x_j) ≠ L_fixed(x_i) (checked on
    the sampled indices); the NCE part equals the numpy masked InfoNCE of the encoder features."""
    shape = (8, 8)
    batch, m2, m1 = _batch(shape)
    acc = A.ACCRSimilarity(2, attention=False, params=SMALL, rng=tf.random.Generator.from_seed(5))
    d12, d21, det = acc.terms(batch, m2, m1)
    lab1 = batch["labels1"].numpy().reshape(2, -1)
    idx = det["idx"][0].numpy()
    allowed = det["allowed"][0].numpy()
    n = idx.shape[1]
    assert n == SMALL.num_patches and all(len(set(r)) == n for r in idx)      # distinct locations
    for b in range(2):
        reg = lab1[b, idx[b]]
        assert len(set(reg)) == 4                                              # several regions sampled
        want = (reg[:, None] != reg[None, :]) & ~np.eye(n, dtype=bool)
        np.testing.assert_array_equal(allowed[b], want)
        assert not np.any(allowed[b] & (reg[:, None] == reg[None, :]))
    # the NCE term: numpy on the gathered, normalised encoder features
    f1 = acc.enc1(batch["img1"]).numpy().reshape(2, -1, SMALL.feat_channels).astype(np.float64)
    f2 = acc.enc2(m2).numpy().reshape(2, -1, SMALL.feat_channels).astype(np.float64)
    q = np.stack([f1[b, idx[b]] for b in range(2)])
    k = np.stack([f2[b, idx[b]] for b in range(2)])
    q, k = q / np.linalg.norm(q, axis=-1, keepdims=True), k / np.linalg.norm(k, axis=-1, keepdims=True)
    reg = np.stack([lab1[b, idx[b]] for b in range(2)])
    want_nce = np_masked_nce(q, k, (reg[:, :, None] != reg[:, None, :]) & ~np.eye(n, dtype=bool), SMALL.tau)
    np.testing.assert_allclose(det["nce"][0].numpy(), want_nce, rtol=2e-4, atol=2e-4)


def test_negatives_read_through_the_flow():
    """With flows: the negative's region is the moving label map at x_j + u(x_j) (nearest, clamped)."""
    shape = (8, 8)
    batch, m2, m1 = _batch(shape, seed=1)
    u = np.zeros((2, *shape, 2), np.float32)
    u[..., 0], u[..., 1] = 1.2, -2.4                                           # rounds to (+1, −2)
    acc = A.ACCRSimilarity(2, attention=True, params=SMALL, rng=tf.random.Generator.from_seed(6))
    _, _, det = acc.terms(batch, m2, m1, tf.constant(u), tf.constant(-u))
    lab1, lab2 = batch["labels1"].numpy()[..., 0], batch["labels2"].numpy()[..., 0]
    for direction, (fixed, moving, shift) in enumerate(((lab1, lab2, (1, -2)), (lab2, lab1, (-1, 2)))):
        idx, allowed = det["idx"][direction].numpy(), det["allowed"][direction].numpy()
        n = idx.shape[1]
        for b in range(2):
            i0, i1 = np.unravel_index(idx[b], shape)
            rq = fixed[b][i0, i1]
            rk = moving[b][np.clip(i0 + shift[0], 0, 7), np.clip(i1 + shift[1], 0, 7)]
            want = (rq[:, None] != rk[None, :]) & ~np.eye(n, dtype=bool)
            np.testing.assert_array_equal(allowed[b], want)
            assert want.sum() > 0 and (~want).sum() > n                        # some excluded, some kept


def test_masked_nce_matches_numpy():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(2, 9, 4))
    k = rng.normal(size=(2, 9, 4))
    q, k = q / np.linalg.norm(q, axis=-1, keepdims=True), k / np.linalg.norm(k, axis=-1, keepdims=True)
    reg = rng.integers(0, 3, size=(2, 9))
    allowed = A.allowed_negatives(tf.constant(reg), tf.constant(reg)).numpy()
    np.testing.assert_array_equal(allowed, (reg[:, :, None] != reg[:, None, :]) & ~np.eye(9, dtype=bool))
    got = A.masked_nce(tf.constant(q, tf.float32), tf.constant(k, tf.float32), tf.constant(allowed), 0.5)
    np.testing.assert_allclose(got.numpy(), np_masked_nce(q, k, allowed, 0.5), rtol=1e-5)
    # one region only: no negatives, ℓ = 0
    none = A.allowed_negatives(tf.zeros((1, 9), tf.int32), tf.zeros((1, 9), tf.int32))
    assert A.masked_nce(tf.constant(q[:1], tf.float32), tf.constant(k[:1], tf.float32), none, 0.5).numpy()[0] == 0.0


def test_without_labels_plain_negatives_and_a_warning():
    batch, m2, m1 = _batch((8, 8))
    batch = {k: v for k, v in batch.items() if not k.startswith("labels")}
    acc = A.ACCRSimilarity(2, attention=False, params=SMALL, rng=1)
    with pytest.warns(UserWarning, match="no label maps"):
        _, _, det = acc.terms(batch, m2, m1)
    n = SMALL.num_patches
    np.testing.assert_array_equal(det["allowed"][0].numpy(), np.broadcast_to(~np.eye(n, dtype=bool), (2, n, n)))


# ----------------------------------------------------------------------------- structural self-similarity
@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 6)])
def test_self_similarity_matches_numpy(shape):
    rng = np.random.default_rng(4)
    f = rng.normal(size=(2, *shape, 3)).astype(np.float32)
    g = rng.normal(size=(2, *shape, 3)).astype(np.float32)
    got = A.self_similarity(tf.constant(f), 1, 3).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], np_self_similarity(f[b].astype(np.float64), 1, 3), rtol=1e-4, atol=1e-5)
    sss = A.structural_self_similarity(tf.constant(f), tf.constant(g), 1, 3).numpy()
    want = [np.abs(np_self_similarity(f[b].astype(np.float64), 1, 3)
                   - np_self_similarity(g[b].astype(np.float64), 1, 3)).mean() for b in range(2)]
    np.testing.assert_allclose(sss, want, rtol=1e-4)
    assert np.all(sss > 0)
    np.testing.assert_array_equal(A.structural_self_similarity(tf.constant(f), tf.constant(f)).numpy(), 0.0)


# ----------------------------------------------------------------------------- protocol, gradients
@pytest.mark.parametrize("preset", ["tiny2d", "tiny3d"])
@pytest.mark.parametrize("name", ["accr", "accr-noattn"])
def test_protocol_terms_and_gradients(preset, name):
    cfg = get_preset(preset)
    sim = build_similarity(name, cfg, seed=tf.random.Generator.from_seed(0))
    # satisfies the protocol by structure, without inheriting from it
    assert isinstance(sim.d12, JointSimilarity) and JointSimilarity not in type(sim.d12).__mro__
    batch, m2, m1 = _batch(cfg.inshape, seed=3)
    flow = tf.constant(np.random.default_rng(1).normal(size=(2, *cfg.inshape, len(cfg.inshape))), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([m2, m1])
        out = sim.training_terms(batch, m2, m1, flow, -flow)
        total = tf.reduce_sum(out["sim"])
    for key in ("d12", "d21", "sim"):
        assert out[key].shape == (2,) and np.all(np.isfinite(out[key].numpy()))
    variables = sim.trainable_variables
    grads = tape.gradient(total, variables + [m2, m1])
    items = sim.checkpoint_items()
    assert ("accr_attn" in items) == (name == "accr")
    for mod in items.values():        # every encoder and the attention block receive gradients
        ids = {v.ref() for v in mod.trainable_variables}
        gs = [g for v, g in zip(variables, grads) if v.ref() in ids]
        assert gs and all(g is not None for g in gs) and sum(float(tf.reduce_sum(tf.abs(g))) for g in gs) > 0
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads[-2:])       # and the moved images


@pytest.mark.slow
def test_three_training_steps_tiny2d():
    rng = np.random.default_rng(0)
    N, shape = 4, (32, 32)
    t1 = rng.random((N, *shape), np.float32)
    arrays = dict(t1=t1, t2=(1 - t1) * rng.uniform(0.8, 1.0, (N, *shape)).astype(np.float32),
                  mask1=t1 > 0.1, mask2=t1 > 0.1, labels=np.stack([quadrant_labels(shape)] * N))
    s = setup_registration(get_preset("tiny2d"), "accr", arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)          # labels present: no fallback warning
        losses = [float(s.step(s.sampler.batch(k))["loss"]) for k in range(3)]
    assert np.all(np.isfinite(losses))
