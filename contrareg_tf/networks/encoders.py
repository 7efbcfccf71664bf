"""Full-resolution convolutional feature encoders for the jointly trained similarities (CoRe, ACCR).

CoRe (Kats et al.) describes its feature extractor as four blocks of a 3×3(×3) convolution, batch normalisation
and ReLU, followed by a one-block projection; ACCR (the review's proposal) asks for two encoders that share
their early layers. Both are built here from one block, so the two methods differ only in how they wire it:

- :func:`conv_blocks`: the list of ``Conv → BatchNorm → ReLU`` layers for ``widths`` (stride 1, "same"
  padding: the feature map keeps the image grid, so feature locations are image locations);
- :func:`feature_encoder`: image (B, *shape, 1) → features (B, *shape, out_channels), the blocks plus a
  1×1(×1) linear projection. ``shared``: layers (from :func:`conv_blocks`) applied first, reused by
  reference, so two encoders built with the same ``shared`` list share those weights.

Choices the papers leave open (ours): kernel 3, stride 1 (no down-sampling: the similarity compares
features voxel by voxel), no normalisation option other than batch normalisation or none.
"""
from typing import Optional, Sequence

import tensorflow as tf


def conv_blocks(ndim: int, widths: Sequence[int], norm: bool = True, name: str = "enc"):
    """``Conv(k=3) → [BatchNorm] → ReLU`` per width, as a list of Keras layers (not yet called)."""
    conv = getattr(tf.keras.layers, f"Conv{int(ndim)}D")
    layers = []
    for k, w in enumerate(widths):
        layers.append(conv(int(w), 3, padding="same", use_bias=not norm, name=f"{name}_conv{k}"))
        if norm:
            layers.append(tf.keras.layers.BatchNormalization(name=f"{name}_bn{k}"))
        layers.append(tf.keras.layers.ReLU(name=f"{name}_relu{k}"))
    return layers


def feature_encoder(ndim: int, widths: Sequence[int], out_channels: int, norm: bool = True,
                    shared: Optional[Sequence[tf.keras.layers.Layer]] = None, name: str = "encoder"):
    """A Keras model image (B, *shape, 1) → features (B, *shape, out_channels) on the image grid; any spatial
    shape (fully convolutional). ``shared`` layers are applied before this encoder's own ``widths``."""
    conv = getattr(tf.keras.layers, f"Conv{int(ndim)}D")
    x = inp = tf.keras.Input((None,) * int(ndim) + (1,), name=f"{name}_image")
    for layer in list(shared or []) + conv_blocks(ndim, widths, norm, name=name):
        x = layer(x)
    out = conv(int(out_channels), 1, name=f"{name}_proj")(x)
    return tf.keras.Model(inp, out, name=name)
