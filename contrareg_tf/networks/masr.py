"""MASR-Net and the Deep Neighbourhood Self-similarity (DNS) descriptor (DNS paper, Mok et al., CVPR
2024, §3.2–3.3). Its anatomy-aware contrastive training is ``training/masr.py`` (``train_masr``).

Architecture (``build_masr``), image (B, *vol, 1) → descriptor D (B, *vol, C_d), 2-D and 3-D:

* **Feature extractor** (§3.2 "Feature extraction", supp. Fig. 5): 4-level encoder–decoder with skips,
  Conv(3^n)–LeakyReLU(0.2) blocks (``nb_conv_per_level`` per level), **BlurPool** down-sampling (binomial
  [1,2,1]^n low-pass, reflect padding, then stride 2; Zhang 2019) and (bi/tri)linear ×2 up-sampling
  (half-pixel centres, edge clamp), max stride 8; a linear Conv(3^n) gives the feature map h with C_h
  channels. *Assumptions* (the paper's Fig. 5 is not in our copy): widths 8-16-32-64 and C_h = 4 (an
  unofficial reproduction's choice), two convs per level.
* **DNS** (Eq. 1, ``dns_layout``): for a layout of radius r, the pairs (a, b) of the 2n-neighbourhood
  {±r·e_k} that are √2·r apart (no centre, opposite points excluded): 12 pairs in 3-D (6-NH), 4 in 2-D
  (our 2-D choice: the 4-NH, i.e. the same rule "pairs of the axis neighbourhood at distance √2·r").
  Per channel c: d_p = (h_c(x + a_p) − h_c(x + b_p))², σ² = mean_p d_p (the noise estimate),
  S_p = exp(−d_p / σ²). Two layouts: direct (r = 1) and dilated (r = ``dilation``, 2 is an *assumption*,
  the paper does not state it) → 24 (3-D) or 8 (2-D) similarities per channel.
* **Feature squeezing** (§3.2, supp. Fig. 6): a linear 1×1 conv over the flattened (C_h × 24) DNS map
  to 24 channels (h^c), then Conv(3^n)–LeakyReLU–Conv(3^n) to C_d = 24, L2-normalised per voxel.

Documented conventions:

* Shifts h(x + o) use **replicate** (edge) padding: at the border the nearest in-image voxel is read.
* σ² is clamped to [1e-3, 1e3] × its per-sample, per-channel spatial mean (the MIND-SSC clamp, same as
  ``losses/mind.py``), then floored at 1e-12; flat regions would otherwise give 0/0 or amplify noise.
* Pair order: combinations (i < j) of the neighbour list [+r·e_0, −r·e_0, +r·e_1, −r·e_1, (+r·e_2, −r·e_2)]
  skipping same-axis pairs (see ``layout_pairs``). DNS map channel index = c · P + p (channel-major).
* Spatial sizes must be divisible by 8 (three BlurPool levels).

Training (§3.3, ``training.train_masr``): an augmented copy I' = B(I) or B(1 − I) (stochastic monotone Bézier
curve with 3 random control points, inversion with p = 0.5; ``data.augment.bezier_intensity``), N = 8196
foreground locations sampled per step, InfoNCE (Eq. 4) between D(I) and D(I') at those locations with
τ = 0.07 (``contrastive_loss``), Adam 1e-4, batch 1; T1w and T2w images both serve as training images.
"""
import itertools
import json
import os
import types
import warnings

import numpy as np
import tensorflow as tf

from ..assets import shipped
from ..atomic import atomic_path, write_json
from ..config import DNS_PAPER
from ..errors import ContraRegInputError, ContraRegWarning
from ..ops import clamp_variance, l2_normalize, replicate_pad, shift, check_image as _check
from .layers import L2Normalize
from .weights import load_weights, read_json_attr, write_json_attr

# DNS paper §4.2 "Implementation" (not in config.PAPER, which holds ContraReg's defaults).
# defaults: config.DNSConfig (paper values and this reproduction's assumptions, one place)
DNS_WIDTHS, DNS_FEAT_CHANNELS, DNS_DILATION = DNS_PAPER.widths, DNS_PAPER.feat_channels, DNS_PAPER.dilation
DNS_DESC_CHANNELS, SQUEEZE_CHANNELS = DNS_PAPER.desc_channels, DNS_PAPER.squeeze_channels
DNS_NUM_SAMPLES, DNS_TAU, DNS_LR = DNS_PAPER.num_samples, DNS_PAPER.tau, DNS_PAPER.lr
DNS_INVERT_PROB, DNS_BEZIER_POINTS = DNS_PAPER.invert_prob, DNS_PAPER.bezier_points
_STRIDE = 8
_CONFIG_ATTR = "masr_config"


# --------------------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------------------
def layout_pairs(ndim, radius=1):
    """Offset pairs (a, b) of the axis neighbourhood {±r·e_k} that are √2·r apart: 12 (3-D), 4 (2-D)."""
    if ndim not in (2, 3):
        raise ContraRegInputError(f"ndim must be 2 or 3, got {ndim}")
    nbrs = []
    for k in range(ndim):
        for s in (1, -1):
            o = [0] * ndim
            o[k] = s * int(radius)
            nbrs.append((k, tuple(o)))
    return [(a, b) for (ka, a), (kb, b) in itertools.combinations(nbrs, 2) if ka != kb]


def dns_layout(features, radius=1):
    """Deep neighbourhood self-similarity (Eq. 1) of one layout of radius ``radius``.

    features: (B, *vol, C) → (B, *vol, C, P), P = 12 (3-D) or 4 (2-D): S_p = exp(−d_p / σ²) with
    d_p = (h(x + a_p) − h(x + b_p))² per channel, σ² = mean_p d_p clamped (module docstring)."""
    h = tf.convert_to_tensor(features)
    if h.dtype != tf.float32 and h.dtype != tf.float64:
        h = tf.cast(h, tf.float32)
    ndim = len(h.shape) - 2
    if ndim not in (2, 3):
        raise ContraRegInputError(f"dns_layout: features must be (B, *vol, C) with 2 or 3 spatial dims, "
                                  f"got shape {tuple(h.shape)}")
    r = int(radius)
    if r < 1:
        raise ContraRegInputError(f"dns_layout: radius must be >= 1, got {radius}")
    shape = tf.shape(h)[1:-1]
    hp = replicate_pad(h, r)
    d = []
    for a, b in layout_pairs(ndim, r):
        d.append(tf.square(shift(hp, a, r, shape) - shift(hp, b, r, shape)))
    d = tf.stack(d, axis=-1)                                        # (B, *vol, C, P)
    var = clamp_variance(tf.reduce_mean(d, axis=-1, keepdims=True), range(1, ndim + 1))  # (B, *vol, C, 1)
    return tf.exp(-d / var)


def blur_pool(x):
    """BlurPool (Zhang 2019): binomial [1,2,1]/4 low-pass along every spatial axis (reflect padding by 1),
    then stride 2. (B, *vol, C) → (B, *ceil(vol/2), C)."""
    ndim = len(x.shape) - 2
    x = tf.pad(x, [[0, 0]] + [[1, 1]] * ndim + [[0, 0]], mode="REFLECT")
    for ax in range(1, ndim + 1):
        n = tf.shape(x)[ax]
        a = _slice_axis(x, ax, 0, n - 2, ndim)
        b = _slice_axis(x, ax, 1, n - 1, ndim)
        c = _slice_axis(x, ax, 2, n, ndim)
        x = 0.25 * a + 0.5 * b + 0.25 * c                            # [1,2,1]/4, length n - 2
        x = _slice_axis(x, ax, 0, n - 2, ndim, stride=2)
    return x


def _slice_axis(x, ax, start, stop, ndim, stride=1):
    idx = [slice(None)] * (ndim + 2)
    idx[ax] = slice(start, stop, stride)
    return x[tuple(idx)]


def upsample_linear(x):
    """×2 (bi/tri)linear up-sampling with half-pixel centres and edge clamp (= ``tf.image.resize``
    bilinear / PyTorch ``align_corners=False``), separable along each spatial axis."""
    ndim = len(x.shape) - 2
    for ax in range(1, ndim + 1):
        n = tf.shape(x)[ax]
        prev = tf.concat([_slice_axis(x, ax, 0, 1, ndim), _slice_axis(x, ax, 0, -1, ndim)], axis=ax)
        nxt = tf.concat([_slice_axis(x, ax, 1, None, ndim), _slice_axis(x, ax, -1, None, ndim)], axis=ax)
        even = 0.75 * x + 0.25 * prev
        odd = 0.75 * x + 0.25 * nxt
        y = tf.stack([even, odd], axis=ax + 1)                      # (..., n, 2, ...)
        shp = tf.shape(x)
        new = tf.concat([shp[:ax], [2 * n], shp[ax + 1:]], axis=0)
        x = tf.ensure_shape(tf.reshape(y, new), [None] * (ndim + 1) + [x.shape[-1]])
    return x


def contrastive_loss(d, d_aug, tau=DNS_TAU):
    """Anatomy-aware InfoNCE (Eq. 4) on sampled vectors d, d_aug: (N, C) (row i of both = same location).

    ℓ_i = −log[ exp(d_i·d'_i/τ) / Σ_j exp(d_i·d'_j/τ) ] after L2-normalising both; returns mean_i ℓ_i
    (a scalar; the paper does not say sum or mean: the mean keeps the scale independent of N)."""
    d = l2_normalize(tf.convert_to_tensor(d))
    d_aug = l2_normalize(tf.convert_to_tensor(d_aug))
    logits = tf.matmul(d, d_aug, transpose_b=True) / tau
    labels = tf.range(tf.shape(d)[0])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


# --------------------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------------------
class BlurPool(tf.keras.layers.Layer):
    """Keras wrapper of ``blur_pool``."""

    def call(self, x):
        return blur_pool(x)


class LinearUpsample(tf.keras.layers.Layer):
    """Keras wrapper of ``upsample_linear`` (×2)."""

    def call(self, x):
        return upsample_linear(x)


class DNSLayer(tf.keras.layers.Layer):
    """Dual-layout DNS: concat of ``dns_layout`` at each radius, flattened channel-major to
    (B, *vol, C·P·len(radii))."""

    def __init__(self, radii=(1, DNS_DILATION), **kwargs):
        super().__init__(**kwargs)
        self.radii = tuple(int(r) for r in radii)

    def call(self, h):
        s = tf.concat([dns_layout(h, r) for r in self.radii], axis=-1)   # (B, *vol, C, 2P)
        shp = tf.shape(s)
        out = tf.reshape(s, tf.concat([shp[:-2], [shp[-2] * shp[-1]]], axis=0))
        return tf.ensure_shape(out, h.shape[:-1] + [h.shape[-1] * s.shape[-1]])

    def get_config(self):
        return {**super().get_config(), "radii": self.radii}


# --------------------------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------------------------
def _conv(x, nf, ndim, name, ksize=3, act=True):
    conv = getattr(tf.keras.layers, f"Conv{ndim}D")
    x = conv(nf, ksize, padding="same", kernel_initializer="he_normal", name=name)(x)
    return tf.keras.layers.LeakyReLU(0.2, name=name + "_act")(x) if act else x


def _conv_block(x, nf, ndim, nb_conv, name):
    for i in range(nb_conv):
        x = _conv(x, nf, ndim, f"{name}_conv{i}")
    return x


def masr_config(ndim, widths=DNS_WIDTHS, feat_channels=DNS_FEAT_CHANNELS, dilation=DNS_DILATION,
                desc_channels=DNS_DESC_CHANNELS, nb_conv_per_level=2):
    """The build arguments of ``build_masr`` as a JSON-able dict (stored inside saved weights)."""
    return dict(ndim=int(ndim), widths=[int(w) for w in widths], feat_channels=int(feat_channels),
                dilation=int(dilation), desc_channels=int(desc_channels),
                nb_conv_per_level=int(nb_conv_per_level))


def build_masr(ndim, widths=DNS_WIDTHS, feat_channels=DNS_FEAT_CHANNELS, dilation=DNS_DILATION,
               desc_channels=DNS_DESC_CHANNELS, nb_conv_per_level=2, name="masr"):
    """MASR-Net: image (B, *vol, 1) → L2-normalised descriptor (B, *vol, desc_channels); any spatial size
    divisible by 8. ``model.references``: ``features`` (h), ``dns`` (h^s), ``squeezed`` (h^c), ``descriptor``;
    ``model.masr_config``: the build arguments."""
    if ndim not in (2, 3):
        raise ContraRegInputError(f"build_masr: ndim must be 2 or 3, got {ndim}")
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4 or min(widths) < 1:
        raise ContraRegInputError(f"build_masr: widths must be 4 positive ints (4 levels), got {widths}")
    if int(dilation) < 1 or int(feat_channels) < 1 or int(desc_channels) < 1:
        raise ContraRegInputError("build_masr: dilation, feat_channels and desc_channels must be >= 1")
    cfg = masr_config(ndim, widths, feat_channels, dilation, desc_channels, nb_conv_per_level)
    inp = tf.keras.Input(shape=(None,) * ndim + (1,), name=f"{name}_image")

    # encoder: levels at stride 1, 2, 4, 8
    skips = []
    x = inp
    for lvl, nf in enumerate(widths):
        if lvl > 0:
            x = BlurPool(name=f"{name}_blurpool{lvl}")(x)
        x = _conv_block(x, nf, ndim, nb_conv_per_level, f"{name}_enc{lvl}")
        skips.append(x)
    # decoder
    for lvl in range(len(widths) - 2, -1, -1):
        x = LinearUpsample(name=f"{name}_up{lvl}")(x)
        x = tf.keras.layers.Concatenate(name=f"{name}_cat{lvl}")([x, skips[lvl]])
        x = _conv_block(x, widths[lvl], ndim, nb_conv_per_level, f"{name}_dec{lvl}")
    feats = _conv(x, feat_channels, ndim, f"{name}_features", act=False)

    # DNS + feature squeezing
    dns = DNSLayer(radii=(1, dilation), name=f"{name}_dns")(feats)
    squeezed = _conv(dns, SQUEEZE_CHANNELS, ndim, f"{name}_squeeze", ksize=1, act=False)
    y = _conv(squeezed, SQUEEZE_CHANNELS, ndim, f"{name}_head0")
    y = _conv(y, desc_channels, ndim, f"{name}_head1", act=False)
    desc = L2Normalize(name=f"{name}_descriptor")(y)

    model = tf.keras.Model(inp, desc, name=name)
    model.references = types.SimpleNamespace(features=feats, dns=dns, squeezed=squeezed, descriptor=desc)
    model.masr_config = cfg
    return model


# --------------------------------------------------------------------------------------------------------------
# input checks, convenience, save / load
# --------------------------------------------------------------------------------------------------------------
def check_image(image, ndim=None, name="image"):
    """(B, *vol, 1) finite float32 image with spatial sizes divisible by 8 (``ops.check_image``), else
    ContraRegInputError. Also accepts a bare (*vol,) array when ``ndim`` is given."""
    if ndim is not None and len(np.shape(image)) == ndim:
        image = tf.reshape(tf.cast(image, tf.float32), (1,) + tuple(np.shape(image)) + (1,))
    return tf.cast(_check(image, name, channels=1, ndim=ndim, multiple=_STRIDE), tf.float32)


def dns_features(image, model):
    """Descriptor D = model(image), after the input checks: (B, *vol, 1) → (B, *vol, C_d) tensor."""
    ndim = len(model.inputs[0].shape) - 2
    return model(check_image(image, ndim), training=False)


def get_config(model):
    """The build arguments of a ``build_masr`` model as a plain dict (Keras wraps dict attributes)."""
    cfg = getattr(model, "masr_config", None)
    if cfg is None:
        raise ContraRegInputError(f"model {model.name!r} is not a MASR-Net (no masr_config)")
    return {k: (list(v) if isinstance(v, (list, tuple)) or hasattr(v, "__len__") and not isinstance(v, str)
                else v) for k, v in dict(cfg).items()}


def save_masr(model, path, card=None):
    """Save weights to ``path`` (.h5) with the build config as an HDF5 attribute; ``card`` (dict) is also
    written as ``<path without .h5>.json``."""
    path = os.fspath(path)
    if not path.endswith(".h5"):
        raise ContraRegInputError(f"{path}: MASR-Net weights must be saved as .h5")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        model.save_weights(tmp, save_format="h5")
        write_json_attr(tmp, _CONFIG_ATTR, get_config(model))
    if card is not None:
        write_json(path[:-3] + ".json", card)
    return path


def load_masr(path, ndim=None, **build_kwargs):
    """Build MASR-Net and load ``path`` (.h5 from ``save_masr``). The topology comes from the file's stored
    config; any ``ndim`` / build argument given must agree with it. Files without a stored config are
    built from the arguments. Any mismatch (dimensionality, layer names, weight shapes) raises
    ContraRegInputError naming the file and the mismatch."""
    path = os.fspath(path)
    cfg = read_json_attr(path, _CONFIG_ATTR)
    if cfg is not None:
        want = dict(build_kwargs, **({"ndim": ndim} if ndim is not None else {}))
        for k, v in want.items():
            if k not in cfg:
                raise ContraRegInputError(f"{path}: unknown MASR-Net argument {k!r}")
            v = [int(t) for t in v] if isinstance(v, (list, tuple)) else v
            if v != cfg[k]:
                raise ContraRegInputError(f"{path}: weights were built with {k}={cfg[k]} but {k}={v} "
                                          "was requested")
        build = {k: v for k, v in cfg.items()}
    else:
        if ndim is None:
            raise ContraRegInputError(f"{path}: no stored MASR-Net config; pass ndim (and build arguments)")
        build = masr_config(ndim, **build_kwargs)
    return load_weights(build_masr(**build), path)


# --------------------------------------------------------------------------------------------------------------
# where weights apply
# --------------------------------------------------------------------------------------------------------------
def default_weights_path(ndim):
    """Path of the shipped MASR-Net weights for ``ndim`` (``models/dns_proxy{ndim}d.h5``, see ``assets``)."""
    return shipped(f"dns_proxy{int(ndim)}d.h5")


def card_path(path):
    """The JSON card written beside a ``save_masr`` .h5 file."""
    path = os.fspath(path)
    return (path[:-3] if path.endswith(".h5") else path) + ".json"


def training_spacing(path):
    """The voxel size (mm per axis) the weights at ``path`` were trained at, from the ``spacing_mm`` of their
    card; None when there is no card or it does not say."""
    try:
        with open(card_path(path)) as f:
            sp = json.load(f).get("spacing_mm")
    except (OSError, ValueError, AttributeError):
        return None
    if sp is None:
        return None
    sp = [float(v) for v in np.atleast_1d(sp)]
    return sp if all(np.isfinite(v) and v > 0 for v in sp) else None


def check_training_spacing(path, spacing, factor=DNS_PAPER.spacing_factor):
    """Warn (``ContraRegWarning``, naming the file and both spacings) when images of voxel size ``spacing`` (mm,
    scalar or per axis) are more than ``factor`` times finer or coarser, along any axis, than the training
    spacing on the card of the weights at ``path``: the descriptors degrade away from it. Returns the ratio
    (>= 1), or None when the card does not say."""
    train = training_spacing(path)
    if train is None:
        return None
    sp = np.atleast_1d(np.asarray(spacing, np.float64))
    tr = np.atleast_1d(np.asarray(train, np.float64))
    if tr.size == 1:
        tr = np.full(sp.shape, tr[0])
    if sp.size == 1:
        sp = np.full(tr.shape, sp[0])
    if sp.shape != tr.shape:
        tr = np.full(sp.shape, float(np.mean(tr)))
    ratio = float(np.max(np.maximum(sp / tr, tr / sp)))
    if ratio > factor:
        fmt = lambda v: "x".join(f"{x:g}" for x in v)  # noqa: E731
        warnings.warn(f"DNS weights {path} were trained at {fmt(tr)} mm but the images are at {fmt(sp)} mm "
                      f"({ratio:.2g}x away, more than {factor:g}x): the descriptors degrade away from their training "
                      f"resolution; resample the images or train weights at this resolution "
                      f"(train_scripts/train_dns.py --data)", ContraRegWarning, stacklevel=2)
    return ratio
