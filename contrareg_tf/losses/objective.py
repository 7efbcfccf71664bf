"""The paper's λ-conditioned objective (ContraReg §2–3).

    L(λ) = mean_b [ α (1 − λ_b) L_sim,b + λ_b L_reg,b ],   λ_b ~ U[0, 1] per sample (hypernetwork input)

α = ``PAPER.alpha_contrastive`` (0.1) for the contrastive losses (CR, mCR and their +ExtNegs / +MI /
+RandAE / +SupPretrain variants), 1 otherwise. L_reg regularises the velocity field v: the paper writes
‖v‖²; the default reads it as voxelmorph's smoothness ``Grad('l2')`` of v (``PAPER.reg_penalty``), 'norm'
is the literal mean of v², 'l1' is ``Grad('l1')``. Per-sample losses have shape (B,).
"""

import numpy as np
import tensorflow as tf

from .. import ops
from ..config import PAPER
from ..errors import ContraRegInputError
from .similarity import LossSpec

PENALTIES = ("l2", "l1", "norm")


def alpha_for(loss_name, cfg=PAPER):
    """α on L_sim for a ``--loss`` name: ``LossSpec.parse(name).alpha(cfg)`` (0.1 for CR / mCR variants)."""
    return LossSpec.parse(loss_name).alpha(cfg)


def velocity_reg(v, penalty=PAPER.reg_penalty):
    """L_reg per sample (B,) for a field v (B, *vol, ndim).

    'l2' / 'l1': mean over axes of the mean squared / absolute forward differences (vxm ``Grad``);
    'norm': mean of v² (the literal ‖v‖²).
    """
    if penalty not in PENALTIES:
        raise ContraRegInputError(f"velocity_reg: penalty must be one of {PENALTIES}, got {penalty!r}")
    v = tf.convert_to_tensor(v)
    if v.shape.rank not in (3, 4, 5):
        raise ContraRegInputError(f"velocity_reg: v must be (B, *vol, ndim), got shape {v.shape}")
    axes = list(range(1, v.shape.rank))
    if penalty == "norm":
        return tf.reduce_mean(tf.square(v), axis=axes)
    return ops.grad(v, penalty)


def velocity_regulariser(penalty=PAPER.reg_penalty):
    """``v -> (B,)`` callable for ``penalty`` (validated now, not at the first call)."""
    return VelocityReg(penalty).loss_fn


class VelocityReg:
    """Keras-loss form of :func:`velocity_reg`: ``VelocityReg('l2').loss(_, v)`` → (B,)."""

    def __init__(self, penalty=PAPER.reg_penalty):
        if penalty not in PENALTIES:
            raise ContraRegInputError(f"VelocityReg: penalty must be one of {PENALTIES}, got {penalty!r}")
        self.penalty = penalty

    def loss(self, _, y_pred):
        return velocity_reg(y_pred, self.penalty)

    def loss_fn(self, v):
        return velocity_reg(v, self.penalty)


def _check_lambda(lam, b):
    lam = tf.convert_to_tensor(lam, tf.float32)
    if lam.shape.rank not in (1, 2) or (lam.shape.rank == 2 and lam.shape[-1] != 1):
        raise ContraRegInputError(f"hyper_loss: lam must have shape (B, 1) or (B,), got {lam.shape}")
    lam = tf.reshape(lam, [-1])
    if lam.shape[0] is not None and b is not None and lam.shape[0] != b:
        raise ContraRegInputError(f"hyper_loss: lam has {lam.shape[0]} entries but the losses have batch {b}")
    if tf.executing_eagerly():
        arr = lam.numpy()
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise ContraRegInputError(f"hyper_loss: lam must lie in [0, 1], got min {arr.min()} max {arr.max()}")
    return lam


def hyper_loss(lam, l_sim, l_reg, alpha=1.0, reduction="mean", reduce=None):
    """mean_b [ α (1 − λ_b) L_sim,b + λ_b L_reg,b ] (paper §2); lam (B, 1) or (B,), losses (B,).
    reduction='none' (or reduce=False) returns the (B,) terms."""
    if reduce is not None:
        reduction = "mean" if reduce else "none"
    l_sim = tf.convert_to_tensor(l_sim, tf.float32)
    l_reg = tf.convert_to_tensor(l_reg, tf.float32)
    if l_sim.shape.rank != 1 or l_reg.shape.rank != 1:
        raise ContraRegInputError(f"hyper_loss: l_sim and l_reg must be per-sample (B,), got {l_sim.shape}, "
                                  f"{l_reg.shape}")
    lam = _check_lambda(lam, l_sim.shape[0])
    terms = alpha * (1.0 - lam) * l_sim + lam * l_reg
    if reduction == "none":
        return terms
    if reduction != "mean":
        raise ContraRegInputError(f"hyper_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    return tf.reduce_mean(terms)


def loss_weights(lam, alpha=1.0, bidir=True):
    """Keras ``loss_weights`` for a vxm model at a fixed λ: outputs [y_source, (y_target), reg] get
    [½α(1−λ), ½α(1−λ), λ] (bidir; L_sim = ½(d12 + d21)) or [α(1−λ), λ]."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ContraRegInputError(f"loss_weights: lam must lie in [0, 1], got {lam}")
    w = alpha * (1.0 - lam)
    return [0.5 * w, 0.5 * w, lam] if bidir else [w, lam]
