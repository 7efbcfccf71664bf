"""Memory model and memory switches (issue 25): bench_memory's fit and peak reader, rematerialisation (same
gradients as the plain step) and mixed precision (float16 U-Net, float32 integration / warps / losses) against
the float32 network on the tiny 3-D preset."""
import dataclasses
import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf

from contrareg_tf import training
from contrareg_tf.config import get_preset
from contrareg_tf.networks.hyper import FiLMVxmDense
from contrareg_tf.networks.memory import remat_call, uses_mixed_precision

_SPEC = importlib.util.spec_from_file_location(
    "bench_memory", os.path.join(os.path.dirname(__file__), os.pardir, "bench", "bench_memory.py"))
bench_memory = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_memory)

TINY = get_preset("tiny3d")


def test_fit_recovers_known_line():
    vox = np.array([32 ** 3, 48 ** 3, 32 * 48 * 32, 64 ** 3], float)
    a, b = 2.5e7, 6123.0
    noise = np.array([1e5, -2e5, 1e5, 0.0])   # zero-mean, orthogonal enough not to move the fit much
    fa, fb, res = bench_memory.fit_line(vox, a + b * vox)
    assert fa == pytest.approx(a, rel=1e-9) and fb == pytest.approx(b, rel=1e-12)
    assert np.abs(res).max() < 1e-3
    fa, fb, res = bench_memory.fit_line(vox, a + b * vox + noise)
    # the least-squares line of the noisy points, solved independently through the normal equations
    A = np.stack([np.ones(4), vox], 1)
    ref = np.linalg.solve(A.T @ A, A.T @ (a + b * vox + noise))
    assert (fa, fb) == pytest.approx(tuple(ref), rel=1e-6)
    np.testing.assert_allclose(res, a + b * vox + noise - A @ ref, atol=1e-2)


def test_measure_peak_sees_a_known_tensor():
    n = 4 * 1024 * 1024                       # 16 MiB of float32

    def make():
        x = tf.random.uniform([n])
        return float(tf.reduce_sum(x * 2.0))

    _, peak, before = bench_memory.measure_peak(make, "CPU:0")
    assert peak - before >= 4 * n


def _tiny_model(**kw):
    tf.keras.utils.set_random_seed(0)
    return FiLMVxmDense(TINY.inshape, ch=TINY.ch, nb_levels=TINY.nb_levels, int_steps=TINY.int_steps,
                        hyp_units=TINY.hyp_units, **kw)


def _batch():
    rng = np.random.default_rng(1)
    src = rng.random((1, *TINY.inshape, 1)).astype(np.float32)
    trg = rng.random((1, *TINY.inshape, 1)).astype(np.float32)
    return [tf.constant(src), tf.constant(trg), tf.constant([[0.3]], tf.float32)]


def _loss_and_grads(model, forward, batch):
    with tf.GradientTape() as tape:
        ys, yt, v, pos, neg = forward(batch)
        loss = (tf.reduce_mean((ys - batch[1]) ** 2) + tf.reduce_mean((yt - batch[0]) ** 2)
                + 1e-2 * tf.reduce_mean(tf.cast(v, tf.float32) ** 2) + 1e-3 * tf.reduce_mean(pos ** 2))
    return loss, tape.gradient(loss, model.trainable_variables)


def _outputs(model):
    r = model.references
    return [r.y_source, r.y_target, r.preint_flow, r.pos_flow, r.neg_flow]


def test_remat_gradients_equal_plain():
    model = _tiny_model()
    batch = _batch()
    plain = tf.keras.Model(model.inputs, _outputs(model))
    remat = remat_call(model, _outputs(model))
    # full-resolution FiLM blocks of vxm 0.2's U-Net: the encoder's first conv and the 3 final convs (the last
    # decoder level works at half resolution; its up-sampled output is concatenated with the skip)
    full = [b for b in model.references.film_blocks if tuple(b["conv"].output.shape[1:-1]) == TINY.inshape]
    assert remat.layers_rematerialised == len(full) == 4
    l0, g0 = _loss_and_grads(model, lambda b: plain(b), batch)
    l1, g1 = _loss_and_grads(model, lambda b: remat(b), batch)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for v, a, b in zip(model.trainable_variables, g0, g1):
        assert (a is None) == (b is None), v.name
        if a is not None:   # recomputation repeats the same float32 ops: equal to rounding
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6 * float(tf.reduce_max(tf.abs(a))),
                                       err_msg=v.name)


def test_mixed_precision_network_close_to_float32():
    ref = _tiny_model()
    mp = _tiny_model(mixed_precision=True)
    assert tf.keras.mixed_precision.global_policy().name == "float32"    # restored after the build
    assert uses_mixed_precision(mp) and not uses_mixed_precision(ref)
    mp.set_weights(ref.get_weights())
    # float32 islands: integration, rescaling, negation and both warps
    for l in mp.layers:
        if any(k in l.name for k in ("flow_int", "transformer", "diffflow", "flow_resize", "neg_flow")):
            assert l.compute_dtype == "float32", l.name
    assert any(l.compute_dtype == "float16" for l in mp.layers if isinstance(l, tf.keras.layers.Conv3D))
    batch = _batch()
    outs_ref = tf.keras.Model(ref.inputs, _outputs(ref))(batch)
    outs_mp = tf.keras.Model(mp.inputs, _outputs(mp))(batch)
    for a, b in zip(outs_ref, outs_mp):
        assert b.dtype == tf.float32
    # float16 has an 11-bit significand (rel. 4.9e-4 per rounding): the velocity through 3 FiLM levels of convs
    # differs by ~1e-3 of its range; the warped images by far less (the velocities are ~1e-4 voxels at init)
    v_ref, v_mp = outs_ref[2].numpy(), outs_mp[2].numpy()
    assert np.abs(v_mp - v_ref).max() <= 2e-2 * np.abs(v_ref).max()
    np.testing.assert_allclose(outs_mp[0].numpy(), outs_ref[0].numpy(), atol=1e-4)
    l0, g0 = _loss_and_grads(ref, tf.keras.Model(ref.inputs, _outputs(ref)), batch)
    l1, g1 = _loss_and_grads(mp, tf.keras.Model(mp.inputs, _outputs(mp)), batch)
    assert float(l1) == pytest.approx(float(l0), rel=1e-3)
    # gradients: compared as whole vectors (cosine and norm), float16 rounding moves single entries more
    a = np.concatenate([g.numpy().ravel() for g in g0 if g is not None])
    b = np.concatenate([g.numpy().ravel() for g in g1 if g is not None])
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
    assert np.linalg.norm(b) == pytest.approx(np.linalg.norm(a), rel=5e-2)


def test_setup_registration_switches_take_a_step():
    """The trainer's step with each switch on the tiny preset: finite, loss-scaled under mixed precision, and the
    remat step's loss equals the plain one (same seed, same batch)."""
    cfg = dataclasses.replace(TINY, ch=4)
    arr = bench_memory.synthetic_arrays(cfg.inshape, n=3)
    losses = {}
    for name, flags in {"none": {}, "remat": {"remat": True}, "mp": {"mixed_precision": True}}.items():
        s = training.setup_registration(cfg, "mi", arr, lr=1e-6, **flags)
        out = s.step(training._distribute(s.strategy, s.sampler.batch(0)))
        losses[name] = float(out["loss"])
        assert np.isfinite(losses[name])
        if name == "mp":
            assert isinstance(s.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    assert losses["remat"] == pytest.approx(losses["none"], rel=1e-6)
    assert losses["mp"] == pytest.approx(losses["none"], rel=1e-2)


def test_cpu_float16_max_pool_matches_keras():
    """The CPU stand-in for float16 MaxPooling3D: values and gradient equal Keras's float32 pooling (the inputs
    are float16 numbers, so both see the same values; gradients of distinct maxima are 0 or the upstream value)."""
    from contrareg_tf.networks.memory import _ReshapeMaxPool

    x16 = tf.constant(np.random.default_rng(0).random((2, 8, 6, 4, 3)).astype(np.float16))
    x32 = tf.cast(x16, tf.float32)
    w = tf.constant(np.arange(2 * 4 * 3 * 2 * 3, dtype=np.float32).reshape(2, 4, 3, 2, 3))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x16, x32])
        y = _ReshapeMaxPool(2, dtype="mixed_float16")(x16)
        yr = tf.keras.layers.MaxPooling3D(2)(x32)
        l, lr = tf.reduce_sum(tf.cast(y, tf.float32) * w), tf.reduce_sum(yr * w)
    assert y.dtype == tf.float16
    np.testing.assert_array_equal(tf.cast(y, tf.float32).numpy(), yr.numpy())
    np.testing.assert_array_equal(tf.cast(tape.gradient(l, x16), tf.float32).numpy(), tape.gradient(lr, x32).numpy())
