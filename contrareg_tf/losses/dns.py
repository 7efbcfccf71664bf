"""DNS similarity (DNS paper, Mok et al., CVPR 2024, §3.4 Eq. 5): the negated cosine similarity of
Gaussian-smoothed MASR-Net descriptors,

    L_sim(F, M) = − mean_x cos( ψ_σ(D_F)(x), ψ_σ(D_M)(x) ),

with D = MASR-Net(image) (``networks/masr.py``, frozen) and ψ_σ a per-channel Gaussian filter
(``ops.gaussian_smooth``: separable, truncated at ⌈3σ⌉, replicate border — the same ψ_σ as instance
optimisation, so a loss value here equals IO's similarity term at the identity).
Per sample: (B,), in [−1, 1] (−1 = identical descriptors).

In the Keras ``.loss(y_true, y_pred)`` form the descriptor of the *warped moving image* is used
(D(M∘φ)); the paper warps the descriptor instead (D_M∘φ) — for instance optimisation, compute the
descriptors once (``DNS.descriptors``) and call ``descriptor_similarity`` on the warped descriptor.
σ is not given in the paper: ``DNS_SMOOTH_SIGMA`` = 1 voxel is our assumption.

Default weights: ``DNS()`` with no model loads the shipped ``models/dns_proxy{2,3}d.h5`` matching the
input's dimensionality on first use (trained on the built-in proxy, see ``models/DNS_MODEL_CARD.md``).
"""
import os

import tensorflow as tf

from .. import ops
from ..config import DNS_PAPER
from ..errors import ContraRegInputError
from ..networks.masr import check_image, default_weights_path, dns_features, load_masr  # noqa: F401

DNS_SMOOTH_SIGMA = DNS_PAPER.smooth_sigma   # ψ_σ in voxels (not stated in the paper; = IO's σ)


def smooth(desc, sigma=DNS_SMOOTH_SIGMA):
    """ψ_σ: ``ops.gaussian_smooth`` (per channel, σ in voxels, replicate border; 0 = identity) — the same
    filter instance optimisation applies to its descriptors."""
    return ops.gaussian_smooth(desc, sigma)


def descriptor_similarity(desc_f, desc_m, smooth_sigma=DNS_SMOOTH_SIGMA, mask=None):
    """Per-sample (B,) mean cosine similarity of ψ_σ(desc_f) and ψ_σ(desc_m) ((B, *vol, C) each);
    ``mask`` (B, *vol, 1) restricts the mean to its non-zero voxels (weighted mean)."""
    desc_f = tf.convert_to_tensor(desc_f, tf.float32)
    desc_m = tf.convert_to_tensor(desc_m, tf.float32)
    if desc_f.shape.rank not in (4, 5) or desc_f.shape.rank != desc_m.shape.rank:
        raise ContraRegInputError(f"descriptors must be (B, *vol, C) with 2 or 3 spatial dims, got "
                                  f"{tuple(desc_f.shape)} and {tuple(desc_m.shape)}")
    if desc_f.shape[1:].is_fully_defined() and desc_m.shape[1:].is_fully_defined() \
            and desc_f.shape[1:] != desc_m.shape[1:]:
        raise ContraRegInputError(f"descriptor shapes differ: {tuple(desc_f.shape)} vs {tuple(desc_m.shape)}")
    cos = ops.cosine(smooth(desc_f, smooth_sigma), smooth(desc_m, smooth_sigma))   # (B, *vol)
    axes = list(range(1, cos.shape.rank))
    if mask is None:
        return tf.reduce_mean(cos, axis=axes)
    w = tf.cast(tf.convert_to_tensor(mask)[..., 0] > 0, cos.dtype)
    return tf.reduce_sum(cos * w, axis=axes) / tf.maximum(tf.reduce_sum(w, axis=axes), 1.0)


class DNS:
    """DNS similarity loss with a frozen MASR-Net.

    model: a ``build_masr`` / ``load_masr`` model, a path to its .h5 weights, or None (the shipped weights
    for the input's dimensionality, loaded on first call). ``.loss(y_true, y_pred)`` → (B,) =
    −cos(ψ_σ D(y_true), ψ_σ D(y_pred)); gradients flow to the images, never into the frozen network."""

    def __init__(self, model=None, smooth_sigma=DNS_SMOOTH_SIGMA):
        if smooth_sigma is None or smooth_sigma < 0:
            raise ContraRegInputError(f"DNS: smooth_sigma must be >= 0, got {smooth_sigma}")
        self.smooth_sigma = float(smooth_sigma)
        self._models = {}
        if model is not None:
            m = self._load(model)
            self._models[len(m.inputs[0].shape) - 2] = m

    @staticmethod
    def _load(model):
        if isinstance(model, (str, os.PathLike)):
            model = load_masr(model)
        if not isinstance(model, tf.keras.Model) or getattr(model, "masr_config", None) is None:
            raise ContraRegInputError(f"DNS: model must be a MASR-Net (build_masr / load_masr) or its .h5 path, "
                                      f"got {type(model).__name__}")
        model.trainable = False
        return model

    def model_for(self, ndim):
        """The frozen MASR-Net for ``ndim`` (loads the shipped weights if none was given)."""
        if ndim not in self._models:
            if self._models:
                have = sorted(self._models)
                raise ContraRegInputError(f"DNS: the MASR-Net is {have[0]}-D but the images are {ndim}-D")
            path = default_weights_path(ndim)
            if not os.path.isfile(path):
                raise ContraRegInputError(f"DNS: no MASR-Net given and no shipped {ndim}-D weights at {path}; "
                                          "train one with train_scripts/train_dns.py")
            self._models[ndim] = self._load(path)
        return self._models[ndim]

    def descriptors(self, x):
        """Frozen descriptor D(x): (B, *vol, 1) → (B, *vol, C_d), spatial sizes divisible by 8."""
        x = tf.convert_to_tensor(x, tf.float32)
        ndim = x.shape.rank - 2
        if ndim not in (2, 3):
            raise ContraRegInputError(f"DNS: images must be (B, *vol, 1) with 2 or 3 spatial dims, "
                                      f"got shape {tuple(x.shape)}")
        model = self.model_for(ndim)
        return model(check_image(x, ndim), training=False)

    def loss(self, y_true, y_pred):
        """(B,) negated cosine similarity of the smoothed descriptors of fixed and moved images."""
        return -descriptor_similarity(self.descriptors(y_true), self.descriptors(y_pred), self.smooth_sigma)

    def __call__(self, y_true, y_pred):
        return self.loss(y_true, y_pred)


def dns_loss(y_true, y_pred, model=None, smooth_sigma=DNS_SMOOTH_SIGMA):
    """Functional form of ``DNS(model, smooth_sigma).loss(y_true, y_pred)`` → (B,)."""
    return DNS(model, smooth_sigma).loss(y_true, y_pred)
