"""Modality-specific autoencoders A1 (T1w) / A2 (T2w) whose features feed PatchNCE (ContraReg paper §3).

Architecture (paper: "7 blocks Conv(3)–InstanceNorm–LeakyReLU(0.2), 3 down- and 3 up-sampling layers,
filters 32-64-128-64-32-32-32-1"). Our reading (the paper does not place the resampling):

    block 1..3 : Conv(3, stride 2)            → InstanceNorm → LeakyReLU(0.2)     (down-sampling ×3)
    block 4..6 : UpSampling(2) → Conv(3)       → InstanceNorm → LeakyReLU(0.2)     (up-sampling ×3)
    block 7..  : Conv(3)                       → InstanceNorm → LeakyReLU(0.2)     (full resolution)
    output     : Conv(3) to filters[-1] = 1 channel, linear                        (reconstruction)

so the feature maps f1..f6 (the **post-convolution, pre-norm** outputs of blocks 1..6) live at strides
2, 4, 8, 4, 2, 1 relative to the input (``feature_strides``). No skip connections. Instance norm is
``tf.keras.layers.GroupNormalization(groups=-1)`` (eps 1e-3, affine), numerically identical to tfa's
``InstanceNormalization`` and weight-compatible with it (tested in tests/test_autoencoder.py). Convs: he-normal kernels (vxm's
U-Net default), zero biases. Fully convolutional: input (None,)*ndim + (1,); spatial sizes must be
divisible by 8 (pass ``inshape`` to fix and check them).

Model outputs ``[recon, f1, ..., f6]``. The loss module uses the 6 features of a *frozen* AE (``freeze``);
``random_autoencoder`` gives the RandAE ablation (random, frozen weights).
"""
import os

import numpy as np
import tensorflow as tf

from ..atomic import atomic_path
from ..config import AE_LAYOUT_MIN_CORR, PAPER
from ..errors import ContraRegInputError
from .layers import NearestUpsample
from .weights import load_weights, read_json_attr, write_json_attr

NB_DOWN = 3   # 3 stride-2 blocks, then 3 up-sampling blocks (paper §3)
# HDF5 attribute that marks a file written by save_autoencoder (so in this module's layout; no probe needed)
LAYOUT_ATTR = "contrareg_autoencoder"


def feature_channels(filters=PAPER.ae_filters, n=PAPER.ae_nb_feature_layers):
    """Channels of the n feature maps used by the loss: the first n block widths (32, 64, 128, 64, 32, 32)."""
    if n > len(filters) - 1:
        raise ContraRegInputError(f"n={n} feature layers requested but filters {tuple(filters)} has only "
                                  f"{len(filters) - 1} blocks")
    return [int(f) for f in filters[:n]]


def _block_strides(nb_blocks, nb_down=NB_DOWN):
    s, out = 1, []
    for k in range(nb_blocks):
        if k < nb_down:
            s *= 2
        elif k < 2 * nb_down:
            s //= 2
        out.append(s)
    return out


def feature_strides(n=PAPER.ae_nb_feature_layers, nb_down=NB_DOWN):
    """Down-sampling factor of each feature map relative to the input (paper AE: [2, 4, 8, 4, 2, 1])."""
    return _block_strides(n, nb_down)


def _conv_norm_block(x, nfeat, k, ndim, name, down=False, up=False, seed=None):
    """[UpSampling] → Conv(3, stride 2 if down) → InstanceNorm → LeakyReLU(0.2); returns (out, conv features)."""
    L = tf.keras.layers
    if up:
        x = NearestUpsample(2, name=f"{name}_up_{k}")(x)   # = UpSampling{ndim}D(2), XLA-compilable
    init = tf.keras.initializers.HeNormal(seed=None if seed is None else seed + k)
    feat = getattr(L, f"Conv{ndim}D")(nfeat, 3, strides=2 if down else 1, padding="same",
                                      kernel_initializer=init, name=f"{name}_conv_{k}")(x)
    y = L.GroupNormalization(groups=-1, name=f"{name}_norm_{k}")(feat)
    y = L.LeakyReLU(0.2, name=f"{name}_act_{k}")(y)
    return y, feat


def build_autoencoder(ndim, filters=PAPER.ae_filters, nb_features=PAPER.ae_nb_feature_layers, name="ae",
                      inshape=None, seed=None):
    """Autoencoder with outputs ``[recon, f1, ..., f_nb_features]`` (see module docstring).

    ndim: 2 or 3. filters: block widths + output channels (needs >= 2*3 + 1 entries). inshape: optional
    fixed spatial shape (each size divisible by 8); default fully convolutional. seed: seeds the kernel
    initialisers (reproducible random AEs).
    """
    if ndim not in (2, 3):
        raise ContraRegInputError(f"ndim={ndim}: autoencoder supports 2 or 3 spatial dimensions")
    filters = [int(f) for f in filters]
    nb_blocks = len(filters) - 1
    if nb_blocks < 2 * NB_DOWN or min(filters) < 1:
        raise ContraRegInputError(f"filters {tuple(filters)}: need >= {2 * NB_DOWN} positive block widths + "
                                  "the output channel count")
    if not 1 <= nb_features <= nb_blocks:
        raise ContraRegInputError(f"nb_features={nb_features}: must be in [1, {nb_blocks}]")
    if inshape is not None:
        inshape = tuple(int(s) for s in inshape)
        if len(inshape) != ndim:
            raise ContraRegInputError(f"inshape {inshape}: expected {ndim} spatial sizes")
        bad = [s for s in inshape if s % 2 ** NB_DOWN or s < 1]
        if bad:
            raise ContraRegInputError(f"inshape {inshape}: sizes must be divisible by {2 ** NB_DOWN} "
                                      f"(3 stride-2 blocks); {bad} not")
    x = inp = tf.keras.Input(shape=(inshape or (None,) * ndim) + (1,), name=f"{name}_input")
    feats = []
    for k in range(1, nb_blocks + 1):
        x, f = _conv_norm_block(x, filters[k - 1], k, ndim, name, down=k <= NB_DOWN,
                                up=NB_DOWN < k <= 2 * NB_DOWN, seed=seed)
        feats.append(f)
    init = tf.keras.initializers.HeNormal(seed=None if seed is None else seed + nb_blocks + 1)
    recon = getattr(tf.keras.layers, f"Conv{ndim}D")(filters[-1], 3, padding="same", kernel_initializer=init,
                                                     name=f"{name}_conv_out")(x)
    return tf.keras.Model(inp, [recon] + feats[:nb_features], name=name)


def freeze(model):
    """Make a model non-trainable (frozen autoencoders inside the contrastive loss). Returns it."""
    model.trainable = False
    for layer in model.layers:
        layer.trainable = False
    return model


def random_autoencoder(ndim, seed, **kwargs):
    """RandAE ablation: randomly initialised (seeded), frozen autoencoder."""
    return freeze(build_autoencoder(ndim, seed=int(seed), **kwargs))


# ---------------------------------------------------------------------------------------------------------
# .h5 weights I/O with a topology check
# ---------------------------------------------------------------------------------------------------------

def save_autoencoder(model, path):
    """Save the weights to ``path`` (``.h5``/``.hdf5``, Keras HDF5 weights format)."""
    path = os.fspath(path)
    if not path.endswith((".h5", ".hdf5")):
        raise ContraRegInputError(f"{path}: autoencoder weights must be saved as .h5 / .hdf5")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:      # a crash or a full disk leaves the previous file, not half a file
        model.save_weights(tmp)
        write_json_attr(tmp, LAYOUT_ATTR, {"layout": "contrareg_tf.networks.autoencoder (paper §3)",
                                           "ndim": len(model.inputs[0].shape) - 2})
    return path


def written_here(path):
    """Whether ``path`` was written by :func:`save_autoencoder` (its layout is this module's)."""
    return read_json_attr(path, LAYOUT_ATTR) is not None


def load_autoencoder_weights(model, path):
    """Check the file against ``model`` (``weights.check_weights_file``), then load it. Returns the model."""
    return load_weights(model, path)


def reconstruction_corr(model, images):
    """Pearson correlation between each image and its reconstruction by ``model``: images (N, *vol) in [0, 1]."""
    x = np.asarray(images, np.float32)[..., None]
    rec = np.asarray(model(x, training=False)[0])[..., 0]
    return np.array([np.corrcoef(r.ravel(), i.ravel())[0, 1] for r, i in zip(rec, x[..., 0])])


def check_layout(model, path, images, min_corr=AE_LAYOUT_MIN_CORR):
    """Refuse weights that were not trained in the paper layout of the module docstring.

    A weights-only ``.h5`` stores shapes, not strides: an AE trained with Conv(stride 1) → norm → act →
    MaxPool down-sampling and up-sampling after the conv has the same weight shapes as the paper's, loads, and
    gives features at other strides. Its reconstruction in the paper layout is what gives it away: the same
    training in the paper layout reconstructs held-out images with correlation ≥ 0.98, in the other one 0.70–0.75
    (random weights ≤ 0.25; bench/results/ae_layout_probe.md). So ``images`` (a few of the data the AE will be used on, this modality) must be
    reconstructed with correlation ≥ ``min_corr``; otherwise one ``ContraRegInputError`` naming the file.
    Returns the smallest correlation.
    """
    r = float(np.min(reconstruction_corr(model, images)))
    if not r >= min_corr:
        raise ContraRegInputError(
            f"{os.fspath(path)}: in the paper autoencoder layout (Conv stride 2 ×3, then up-sampling before the "
            f"conv ×3, features = pre-norm conv outputs) it reconstructs the data with correlation {r:.2f} < "
            f"{min_corr}: trained in another layout (e.g. pooling or up-sampling after the conv) or not trained")
    return r


def load_autoencoder(path, ndim, filters=PAPER.ae_filters, nb_features=PAPER.ae_nb_feature_layers, name="ae",
                     inshape=None, frozen=False, probe=None):
    """Build an autoencoder of the given topology and load ``path`` into it: weight shapes checked, and with
    ``probe`` (a few images (N, *vol) of the data it will be used on) the layout of a file written elsewhere
    (not by :func:`save_autoencoder`, e.g. a tfa model's ``.h5``) too (:func:`check_layout`)."""
    model = load_autoencoder_weights(build_autoencoder(ndim, filters, nb_features, name=name, inshape=inshape),
                                     path)
    if probe is not None and not written_here(path):
        check_layout(model, path, probe)
    return freeze(model) if frozen else model
