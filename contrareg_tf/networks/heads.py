"""PatchNCE projection heads F1^k / F2^k (ContraReg paper §2; CUT's PatchSampleF MLP).

One head per autoencoder feature layer k: a ``nb_layers``-layer, ``units``-wide MLP
(Dense–ReLU–Dense–ReLU–Dense for the paper's 3 × 256) followed by ``x / (‖x‖₂ + 1e-7)`` onto the unit
hypersphere. Heads are trainable (optimised jointly with the registration network).

Init: CUT initialises its MLP xavier-normal with gain 0.02 (``init_type='xavier', init_gain=0.02``) and zero
biases; the Keras equivalent used here is ``VarianceScaling(scale=0.02**2, mode='fan_avg',
distribution='untruncated_normal')`` (std = 0.02·sqrt(2 / (fan_in + fan_out))). Pass
``kernel_initializer`` to override.

A head takes sampled feature vectors (N, C_k) — or (B, N, C_k), any leading axes — and returns
(…, units) unit vectors. Heads are small subclassed Keras models (a functional model would reject the
extra leading axis); they are built on creation so ``count_params`` / ``save_weights`` work at once.
"""
import tensorflow as tf

from ..config import PAPER
from ..errors import ContraRegInputError
from .layers import L2Normalize


def cut_initializer(gain=0.02, seed=None):
    """CUT's xavier-normal(gain) as a Keras initializer."""
    return tf.keras.initializers.VarianceScaling(scale=gain ** 2, mode="fan_avg",
                                                 distribution="untruncated_normal", seed=seed)


class ProjectionHead(tf.keras.Model):
    """MLP (nb_layers Dense, ReLU between) + L2 normalisation; input (..., in_channels)."""

    def __init__(self, in_channels, units=PAPER.head_units, nb_layers=PAPER.head_layers, kernel_initializer=None,
                 eps=1e-7, name="head", **kwargs):
        super().__init__(name=name, **kwargs)
        if int(in_channels) < 1 or int(units) < 1 or int(nb_layers) < 1:
            raise ContraRegInputError(f"{name}: need in_channels, units, nb_layers >= 1; got "
                                      f"{in_channels}, {units}, {nb_layers}")
        self.in_channels, self.units, self.nb_layers = int(in_channels), int(units), int(nb_layers)
        self.dense_layers = []
        for i in range(self.nb_layers):
            init = kernel_initializer if kernel_initializer is not None else cut_initializer()
            self.dense_layers.append(tf.keras.layers.Dense(
                self.units, activation="relu" if i < self.nb_layers - 1 else None,
                kernel_initializer=init, bias_initializer="zeros", name=f"{name}_dense_{i + 1}"))
        self.normalize = L2Normalize(eps=eps, name=f"{name}_l2norm")
        self.build((None, self.in_channels))

    def call(self, x):
        if x.shape[-1] is not None and x.shape[-1] != self.in_channels:
            raise ContraRegInputError(f"{self.name}: expected {self.in_channels} input channels (last axis), "
                                      f"got shape {tuple(x.shape)}")
        for layer in self.dense_layers:
            x = layer(x)
        return self.normalize(x)

    def get_config(self):
        return {"in_channels": self.in_channels, "units": self.units, "nb_layers": self.nb_layers,
                "eps": self.normalize.eps, "name": self.name}


def build_heads(feature_channels, units=PAPER.head_units, nb_layers=PAPER.head_layers, name="heads1",
                kernel_initializer=None):
    """One ``ProjectionHead`` per feature layer: heads for channels C_1..C_L, named ``{name}_{k}`` (k from 1)."""
    chans = [int(c) for c in feature_channels]
    if not chans:
        raise ContraRegInputError("feature_channels: empty")
    return [ProjectionHead(c, units, nb_layers, kernel_initializer=kernel_initializer, name=f"{name}_{k + 1}")
            for k, c in enumerate(chans)]
