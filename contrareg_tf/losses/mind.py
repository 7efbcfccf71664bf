"""MIND and MIND-SSC self-similarity descriptors and the MIND loss (Heinrich et al.,
MedIA 2012; MIND-SSC: Heinrich et al., MICCAI 2013, as in convexAdam, Siebert et al. 2021).

* **MIND** (Heinrich et al., MedIA 2012): for each offset r_k of the six-neighbourhood at distance d
  (2-D: the four-neighbourhood), D_k = box_p[(I − I(· + r_k))²] is the patch SSD (p^n box mean);
  V = mean_k D_k; mind_k = exp(−D_k / V) / max_j exp(−D_j / V)  (= exp(−(D_k − min_j D_j) / V)).
  The ContraReg baseline uses distance 2, patch 3 (``PAPER.mind_distance``, ``PAPER.mind_patch``).
* **MIND-SSC** (Heinrich et al., MICCAI 2013; the convexAdam / Learn2Reg formulation): the 12 pairs (a, b)
  of six-neighbourhood points that are √2 apart (no centre), both scaled by the dilation δ;
  D_k = box_{2r+1}[(I(· + δa) − I(· + δb))²]; D_k ← D_k − min_j D_j; V = mean_k D_k;
  mind_k = exp(−D_k / V).  2-D analogue (our choice): the 4 pairs of four-neighbourhood points that are √2
  apart (the diagonals (±1,0)–(0,±1)), i.e. the same rule "pairs of the 4-NH at distance √2" → 4 channels.

Shared conventions (documented choices):
* Shifts and box filters use **replicate** (edge) padding (``ops.replicate_shift`` / ``ops.box_filter``):
  I(· + o) at the border reads the nearest in-image voxel.
* V is clamped to [1e-3, 1e3] × its **per-sample** global mean (convexAdam clamps with the mean over the
  whole batch; per sample keeps a batch of images equal to each image alone). The same clamp is used for
  MIND (the 2012 Matlab code uses another clamp; without one, flat regions give 0/0). A floor of 1e-12
  guards constant images. The clamp is relative, so both descriptors are exactly invariant to I → a·I + b.
* Channel order: MIND — offsets (+d, −d) per axis, axis 0 first; MIND-SSC — pairs (i, j), i > j, of the
  six-neighbourhood list [(-1,0,0), (0,0,-1), (0,-1,0), (0,0,1), (1,0,0), (0,1,0)] (convexAdam's list
  minus the centre), in row-major order (no C++ reordering; the order does not matter for losses).

Inputs: (B, *vol, 1) float images, 2-D or 3-D (ndim from the rank). Outputs (B, *vol, K), K = 6 | 4
(MIND) or 12 | 4 (MIND-SSC).
"""
import itertools

import tensorflow as tf

from .. import ops
from ..config import PAPER
from ..errors import ContraRegInputError
from ..ops import box_filter, replicate_shift


# --------------------------------------------------------------------------------------------- helpers
def _as_image(x, name="image"):
    return ops.check_image(x, name, channels=1, finite=False)   # static checks only (traced in losses)


def _clamp_var(v):
    """V clamped to [1e-3, 1e3] × its per-sample global mean (``ops.clamp_variance``)."""
    return ops.clamp_variance(v, range(1, v.shape.rank))


def neighbourhood(ndim, distance=1):
    """The 2·ndim axis offsets ±distance (six-NH in 3-D, four-NH in 2-D), axis 0 first, + before −."""
    offs = []
    for ax in range(ndim):
        for s in (1, -1):
            o = [0] * ndim
            o[ax] = s * distance
            offs.append(tuple(o))
    return offs


def ssc_pairs(ndim):
    """Pairs (a, b) of neighbourhood points √2 apart: 12 in 3-D (convexAdam's enumeration), 4 in 2-D."""
    if ndim == 3:
        nh = [(-1, 0, 0), (0, 0, -1), (0, -1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0)]
    else:
        nh = [(-1, 0), (0, -1), (0, 1), (1, 0)]
    pairs = []
    for i, j in itertools.product(range(len(nh)), repeat=2):
        if i > j and sum((a - b) ** 2 for a, b in zip(nh[i], nh[j])) == 2:
            pairs.append((nh[i], nh[j]))
    return pairs


def _check_params(distance, patch, name_d="distance", name_p="patch"):
    if int(distance) != distance or distance < 1:
        raise ContraRegInputError(f"MIND {name_d} must be a positive integer, got {distance!r}")
    if int(patch) != patch or patch < 1 or patch % 2 == 0:
        raise ContraRegInputError(f"MIND {name_p} must be a positive odd integer, got {patch!r}")


# ------------------------------------------------------------------------------------------ descriptors
def mind(image, distance=PAPER.mind_distance, patch=PAPER.mind_patch):
    """MIND (Heinrich 2012, Eq. 4 with the six-/four-neighbourhood): (B,*vol,1) → (B,*vol,6|4)."""
    _check_params(distance, patch)
    x = _as_image(image)
    ndim = x.shape.rank - 2
    d = tf.concat([box_filter(tf.square(x - replicate_shift(x, o)), int(patch))
                   for o in neighbourhood(ndim, int(distance))], axis=-1)
    v = _clamp_var(tf.reduce_mean(d, axis=-1, keepdims=True))
    d = d - tf.reduce_min(d, axis=-1, keepdims=True)   # ≡ dividing exp(-D/V) by its max over k
    return tf.exp(-d / v)


def mind_ssc(image, dilation=PAPER.mind_distance, radius=PAPER.mind_patch // 2):
    """MIND-SSC (convexAdam formulation): (B,*vol,1) → (B,*vol,12) in 3-D, (B,*vol,4) in 2-D."""
    _check_params(dilation, 2 * radius + 1, "dilation", "radius")
    x = _as_image(image)
    ndim = x.shape.rank - 2
    dil = int(dilation)
    d = []
    for a, b in ssc_pairs(ndim):
        xa = replicate_shift(x, [dil * t for t in a])
        xb = replicate_shift(x, [dil * t for t in b])
        d.append(tf.square(xa - xb))
    d = box_filter(tf.concat(d, axis=-1), 2 * int(radius) + 1)
    d = d - tf.reduce_min(d, axis=-1, keepdims=True)
    v = _clamp_var(tf.reduce_mean(d, axis=-1, keepdims=True))
    return tf.exp(-d / v)


def descriptor(image, variant="mind", distance=PAPER.mind_distance, patch=PAPER.mind_patch):
    """``variant='mind'``: :func:`mind` (distance, patch); ``'ssc'``: :func:`mind_ssc` with dilation =
    distance and radius = patch // 2."""
    if variant == "mind":
        return mind(image, distance, patch)
    if variant in ("ssc", "mindssc"):
        _check_params(distance, patch)
        return mind_ssc(image, distance, int(patch) // 2)
    raise ContraRegInputError(f"MIND variant must be 'mind' or 'ssc', got {variant!r}")


class MINDDescriptor(tf.keras.layers.Layer):
    """Keras layer wrapping :func:`descriptor` (no weights)."""

    def __init__(self, variant="mind", distance=PAPER.mind_distance, patch=PAPER.mind_patch, **kwargs):
        super().__init__(**kwargs)
        self.variant, self.distance, self.patch = variant, distance, patch

    def call(self, x):
        return descriptor(x, self.variant, self.distance, self.patch)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(variant=self.variant, distance=self.distance, patch=self.patch)
        return cfg


# ------------------------------------------------------------------------------------------------- loss
class MIND:
    """MIND loss: per-sample mean over voxels and channels of |MIND(I) − MIND(J)| (``penalty='l1'``) or
    its square (``'l2'``). ``.loss(y_true, y_pred) -> (B,)`` is usable as a Keras loss."""

    def __init__(self, distance=PAPER.mind_distance, patch=PAPER.mind_patch, variant="mind", penalty="l1"):
        if penalty not in ("l1", "l2"):
            raise ContraRegInputError(f"MIND penalty must be 'l1' or 'l2', got {penalty!r}")
        if variant not in ("mind", "ssc", "mindssc"):
            raise ContraRegInputError(f"MIND variant must be 'mind' or 'ssc', got {variant!r}")
        _check_params(distance, patch)
        self.distance, self.patch, self.variant, self.penalty = distance, patch, variant, penalty

    def descriptor(self, x):
        return descriptor(x, self.variant, self.distance, self.patch)

    def loss(self, y_true, y_pred):
        diff = self.descriptor(y_true) - self.descriptor(y_pred)
        diff = tf.abs(diff) if self.penalty == "l1" else tf.square(diff)
        return tf.reduce_mean(tf.reshape(diff, [tf.shape(diff)[0], -1]), axis=-1)


def mind_loss(y_true, y_pred, distance=PAPER.mind_distance, patch=PAPER.mind_patch, variant="mind",
              penalty="l1"):
    """Functional form of :class:`MIND` (per-sample (B,))."""
    return MIND(distance, patch, variant, penalty).loss(y_true, y_pred)


__all__ = ["mind", "mind_ssc", "descriptor", "MINDDescriptor", "MIND", "mind_loss", "neighbourhood", "ssc_pairs"]
