"""Pure (weight-free) Keras layers used by the networks: FiLM modulation and unit-sphere projection.

* ``FiLM``: feature-wise linear modulation (Perez et al. 2018) as used by ContraReg's hypernetwork
  (paper §2, after Mok & Chung 2021): ``out = (1 + γ) · x + β`` with per-sample, per-channel γ, β
  broadcast over space. γ, β come from a separate ``Dense(2C)`` projection (see ``hyper.py``); this
  layer only applies them, so it can be tested against numpy in isolation.
* ``L2Normalize``: ``x / (‖x‖₂ + eps)`` along the last axis — CUT's ``Normalize(2)`` that puts the
  PatchNCE projection-head outputs on the unit hypersphere (paper §2; CUT, Park et al., ECCV 2020).
* ``NearestUpsample``: ×factor nearest-neighbour up-sampling by ``tf.repeat`` — the values of Keras
  ``UpSampling{1,2,3}D``, but XLA-compilable with its gradient (see the class).
"""
import tensorflow as tf

from ..errors import ContraRegInputError
from ..ops import L2_EPS, l2_normalize


class FiLM(tf.keras.layers.Layer):
    """Apply FiLM: inputs ``[x, gamma_beta]`` with x (B, *vol, C), gamma_beta (B, 2C) = concat(γ, β).

    Returns ``(1 + γ) · x + β`` (γ, β reshaped to (B, 1, ..., 1, C)). The ``1 +`` makes γ = β = 0 the
    identity, so a zero projection leaves the unconditioned network unchanged.
    """

    def build(self, input_shape):
        x_shape, gb_shape = input_shape
        if len(gb_shape) != 2:
            raise ContraRegInputError(f"{self.name}: gamma_beta must have shape (B, 2C), got {tuple(gb_shape)}")
        if gb_shape[-1] is not None and x_shape[-1] is not None and gb_shape[-1] != 2 * x_shape[-1]:
            raise ContraRegInputError(
                f"{self.name}: gamma_beta has {gb_shape[-1]} channels, expected 2 x {x_shape[-1]} = {2 * x_shape[-1]}")
        super().build(input_shape)

    def call(self, inputs):
        x, gamma_beta = inputs
        gamma, beta = tf.split(gamma_beta, 2, axis=-1)
        bshape = tf.concat([tf.shape(gamma)[:1], tf.ones([tf.rank(x) - 2], tf.int32), tf.shape(gamma)[-1:]], 0)
        gamma = tf.reshape(gamma, bshape)
        beta = tf.reshape(beta, bshape)
        return (1.0 + gamma) * x + beta

    def compute_output_shape(self, input_shape):
        return input_shape[0]


class L2Normalize(tf.keras.layers.Layer):
    """``ops.l2_normalize`` as a layer: ``x / (‖x‖₂ + eps)`` over the last axis (CUT's Normalize)."""

    def __init__(self, eps=L2_EPS, **kwargs):
        super().__init__(**kwargs)
        self.eps = float(eps)

    def call(self, x):
        return l2_normalize(x, self.eps)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


class NearestUpsample(tf.keras.layers.Layer):
    """×``factor`` nearest-neighbour up-sampling of (B, *vol, C) by ``tf.repeat`` on every spatial axis.

    Same values as Keras ``UpSampling{1,2,3}D(size=factor)``. Used instead of them in the U-Net decoder and
    the autoencoders because Keras' 2-D layer calls ``tf.image.resize``, whose gradient op
    (``ResizeNearestNeighborGrad``) has no XLA kernel in TF 2.15: ``--xla`` failed on every 2-D model.
    ``tf.repeat``'s gradient (reshape + sum) compiles.
    """

    def __init__(self, factor=2, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)
        if self.factor < 1:
            raise ContraRegInputError(f"{self.name}: factor must be a positive integer, got {factor}")

    def call(self, x):
        for axis in range(1, x.shape.rank - 1):
            x = tf.repeat(x, self.factor, axis=axis)
        return x

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        return tuple(shape[:1] + [None if s is None else s * self.factor for s in shape[1:-1]] + shape[-1:])

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}
