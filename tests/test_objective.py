"""λ objective (paper §2–3): numpy transcriptions, vxm Grad as a peer, α switch."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import voxelmorph as vxm

from contrareg_tf.config import PAPER
from contrareg_tf.errors import ContraRegInputError
from contrareg_tf.losses.objective import (VelocityReg, alpha_for, hyper_loss, loss_weights, velocity_reg,
                                          velocity_regulariser)


def np_grad_l2(v):
    """Mean over axes of the mean squared forward difference of v (B, *vol, nd), per sample."""
    nd = v.ndim - 2
    per = [np.mean(np.diff(v, axis=d) ** 2, axis=tuple(range(1, v.ndim))) for d in range(1, nd + 1)]
    return sum(per) / nd


@pytest.mark.parametrize("alpha", [1.0, PAPER.alpha_contrastive])
def test_hyper_loss_matches_numpy_per_sample_lambda(alpha):
    rng = np.random.default_rng(0)
    lam = rng.random((4, 1)).astype(np.float32)
    l_sim, l_reg = rng.random(4).astype(np.float32) * 10, rng.random(4).astype(np.float32)
    want = np.mean([alpha * (1 - lam[b, 0]) * l_sim[b] + lam[b, 0] * l_reg[b] for b in range(4)])
    assert hyper_loss(lam, l_sim, l_reg, alpha).numpy() == pytest.approx(want, rel=1e-6)
    terms = hyper_loss(lam[:, 0], l_sim, l_reg, alpha, reduction="none").numpy()
    np.testing.assert_array_equal(hyper_loss(lam, l_sim, l_reg, alpha, reduce=False).numpy(), terms)
    np.testing.assert_allclose(terms, alpha * (1 - lam[:, 0]) * l_sim + lam[:, 0] * l_reg, rtol=1e-6)
    # λ = 0 → pure similarity, λ = 1 → pure regularisation
    assert hyper_loss(np.zeros((4, 1)), l_sim, l_reg, alpha).numpy() == pytest.approx(alpha * l_sim.mean())
    assert hyper_loss(np.ones((4, 1)), l_sim, l_reg, alpha).numpy() == pytest.approx(l_reg.mean())


def test_hyper_loss_gradient_and_graph_mode():
    lam = tf.constant([[0.25], [0.75]])
    l_sim = tf.Variable([2.0, 4.0])
    with tf.GradientTape() as tape:
        loss = tf.function(hyper_loss)(lam, l_sim, tf.constant([1.0, 1.0]), 0.1)
    np.testing.assert_allclose(tape.gradient(loss, l_sim).numpy(), [0.1 * 0.75 / 2, 0.1 * 0.25 / 2], rtol=1e-6)


def test_alpha_switch():
    for name in ["cr", "mcr", "CR+ExtNegs", "cr+mi", "cr+mi+extnegs", "mcr+mi", "mcr+extnegs"]:
        assert alpha_for(name) == PAPER.alpha_contrastive == 0.1
    for name in ["mi", "lmi", "mind", "ngf", "dns"]:
        assert alpha_for(name) == 1.0
    with pytest.raises(ContraRegInputError, match="unknown loss 'mcr\\+randae'"):   # RandAE is a flag
        alpha_for("mcr+randae")
    cfg = dataclasses.replace(PAPER, alpha_contrastive=0.3)
    assert alpha_for("mcr", cfg) == 0.3 and alpha_for("mi", cfg) == 1.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_grad_reg_equals_vxm_grad_and_numpy(ndim):
    rng = np.random.default_rng(ndim)
    shape = [12, 10, 8][:ndim]
    v = rng.normal(size=(3, *shape, ndim)).astype(np.float32)
    ours = velocity_reg(v, "l2").numpy()
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, np_grad_l2(v.astype(np.float64)), rtol=1e-5)
    # peer: voxelmorph's Grad('l2') for B=1, and per sample (vxm 0.2 returns (B,) too)
    for b in range(3):
        peer = np.asarray(vxm.losses.Grad("l2").loss(None, tf.constant(v[b:b + 1]))).reshape(-1)
        assert peer.size == 1 and ours[b] == pytest.approx(float(peer[0]), rel=1e-5)
    np.testing.assert_allclose(np.asarray(vxm.losses.Grad("l1").loss(None, tf.constant(v))),
                               velocity_reg(v, "l1").numpy(), rtol=1e-5)
    np.testing.assert_allclose(velocity_regulariser("l2")(v).numpy(), ours, rtol=1e-6)
    np.testing.assert_allclose(VelocityReg("norm").loss(None, v).numpy(),
                               np.mean(v.astype(np.float64) ** 2, axis=tuple(range(1, ndim + 2))), rtol=1e-5)


def test_constant_field_has_zero_smoothness_but_nonzero_norm():
    v = np.full((2, 8, 8, 2), 0.5, np.float32)
    np.testing.assert_array_equal(velocity_reg(v, "l2").numpy(), 0.0)
    np.testing.assert_allclose(velocity_reg(v, "norm").numpy(), 0.25)


def test_loss_weights_reproduce_hyper_loss():
    """Keras drop-in weights [½α(1−λ), ½α(1−λ), λ] on [d12, d21, reg] = hyper_loss, L_sim = ½(d12+d21)."""
    lam, alpha = 0.125, alpha_for("mcr")
    d12, d21, reg = 3.0, 5.0, 0.2
    w = loss_weights(lam, alpha)
    assert w[0] * d12 + w[1] * d21 + w[2] * reg == pytest.approx(
        float(hyper_loss([[lam]], [0.5 * (d12 + d21)], [reg], alpha)))
    assert loss_weights(0.3, 1.0, bidir=False) == [pytest.approx(0.7), 0.3]


def test_bad_inputs_raise():
    with pytest.raises(ContraRegInputError, match="lam"):
        hyper_loss(np.ones((2, 2)), np.ones(2), np.ones(2))
    with pytest.raises(ContraRegInputError, match="lam"):
        hyper_loss(np.full((2, 1), 1.5), np.ones(2), np.ones(2))
    with pytest.raises(ContraRegInputError, match="batch"):
        hyper_loss(np.ones((3, 1)) * 0.5, np.ones(2), np.ones(2))
    with pytest.raises(ContraRegInputError, match="per-sample"):
        hyper_loss(np.ones((2, 1)) * 0.5, 1.0, np.ones(2))
    with pytest.raises(ContraRegInputError, match="penalty"):
        velocity_reg(np.zeros((1, 4, 4, 2)), "l3")
    with pytest.raises(ContraRegInputError, match="penalty"):
        velocity_regulariser("l3")
    with pytest.raises(ContraRegInputError, match="lam"):
        loss_weights(-0.1)
