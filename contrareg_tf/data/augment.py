"""Seeded augmentation (numpy).

- Autoencoder pretraining (ContraReg paper §2): random crops, random flips, brightness / contrast /
  "saturation" (gamma) jitter.
- DNS training (DNS paper, Mok et al., CVPR 2024, §3): stochastic monotone Bézier intensity transform through (0,0)
  and (1,1) with ``n_ctrl`` random control points in [0,1] (coordinates sorted, so the curve is monotone),
  applied to 1 − x with probability ``invert_prob``. :func:`bezier_lut` + :func:`apply_lut` give the same
  transform as a look-up table usable on tf tensors too.

Arrays are single volumes with the spatial axes first: (*vol) or (*vol, C). ``rng`` is a
``np.random.Generator``, an int seed, or None (fresh entropy).
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ..config import AUGMENT, DNS_PAPER
from ..errors import ContraRegInputError
from .io import crop_or_pad


def as_rng(rng) -> np.random.Generator:
    """``np.random.Generator`` from a Generator, an int seed or None."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _as_list(x):
    return (list(x), True) if isinstance(x, (list, tuple)) else ([x], False)


def random_crop(x, size: Sequence[int], rng=None):
    """Random crop of the leading ``len(size)`` axes to ``size`` (zero-padded, centred, first where the
    array is smaller). ``x`` may be a list/tuple of arrays with equal spatial shape: same crop for all."""
    rng = as_rng(rng)
    xs, is_list = _as_list(x)
    size = tuple(int(s) for s in size)
    nd = len(size)
    base = np.asarray(xs[0]).shape[:nd]
    for a in xs[1:]:
        if np.asarray(a).shape[:nd] != base:
            raise ContraRegInputError(f"random_crop: spatial shapes differ: {base} vs {np.asarray(a).shape[:nd]}")
    padded = [np.asarray(a) for a in xs]
    target = tuple(max(b, s) for b, s in zip(base, size))
    if target != base:
        padded = [crop_or_pad(a, target)[0] for a in padded]
    start = [int(rng.integers(0, t - s + 1)) for t, s in zip(target, size)]
    sl = tuple(slice(st, st + s) for st, s in zip(start, size))
    out = [a[sl] for a in padded]
    return out if is_list else out[0]


def random_flip(x, rng=None, axes: Optional[Sequence[int]] = None, p: float = AUGMENT.flip_prob,
                ndim: Optional[int] = None):
    """Flip each spatial axis (default: the first ``ndim`` axes, ``ndim`` = x.ndim if not given, or
    ``axes``) independently with probability ``p``; same flips for every array of a list."""
    rng = as_rng(rng)
    xs, is_list = _as_list(x)
    if axes is None:
        axes = range(ndim if ndim is not None else np.asarray(xs[0]).ndim)
    flip = [ax for ax in axes if rng.random() < p]
    out = [np.flip(np.asarray(a), axis=flip) if flip else np.asarray(a) for a in xs]
    return out if is_list else out[0]


def random_brightness(x, rng=None, max_delta: float = AUGMENT.brightness):
    """x + δ, δ ~ U[−max_delta, max_delta], clipped to [0, 1]."""
    return np.clip(np.asarray(x, np.float32) + as_rng(rng).uniform(-max_delta, max_delta), 0, 1).astype(np.float32)


def random_contrast(x, rng=None, lower: float = AUGMENT.contrast[0], upper: float = AUGMENT.contrast[1]):
    """(x − mean)·c + mean, c ~ U[lower, upper], clipped to [0, 1]."""
    x = np.asarray(x, np.float32)
    c = as_rng(rng).uniform(lower, upper)
    m = x.mean()
    return np.clip((x - m) * c + m, 0, 1).astype(np.float32)


def random_gamma(x, rng=None, lower: float = AUGMENT.gamma[0], upper: float = AUGMENT.gamma[1]):
    """"Saturation" jitter as a gamma curve: x ** γ, log γ ~ U[log lower, log upper]; x clipped to [0, 1]."""
    g = math.exp(as_rng(rng).uniform(math.log(lower), math.log(upper)))
    return np.power(np.clip(np.asarray(x, np.float32), 0, 1), g).astype(np.float32)


def intensity_jitter(x, rng=None, brightness: float = AUGMENT.brightness,
                     contrast: Tuple[float, float] = AUGMENT.contrast, gamma: Tuple[float, float] = AUGMENT.gamma):
    """Brightness, contrast and gamma jitter in sequence (autoencoder pretraining); output in [0, 1]."""
    rng = as_rng(rng)
    x = random_brightness(x, rng, brightness)
    x = random_contrast(x, rng, *contrast)
    return random_gamma(x, rng, *gamma)



def bezier_curve(ctrl: np.ndarray, n: int = 1001) -> Tuple[np.ndarray, np.ndarray]:
    """Points (xs, ys) of the Bézier curve with control points ``ctrl`` (K, 2), sampled at ``n`` t values."""
    ctrl = np.asarray(ctrl, np.float64)
    k = len(ctrl) - 1
    t = np.linspace(0.0, 1.0, n)[:, None]
    basis = np.stack([math.comb(k, i) * t[:, 0] ** i * (1 - t[:, 0]) ** (k - i) for i in range(k + 1)], 1)
    pts = basis @ ctrl
    return pts[:, 0], pts[:, 1]


def random_bezier_ctrl(rng=None, n_ctrl: int = DNS_PAPER.bezier_points) -> np.ndarray:
    """Control points (n_ctrl + 2, 2): (0,0), n_ctrl random points in [0,1]² with x and y each sorted
    (monotone curve), (1,1)."""
    rng = as_rng(rng)
    xs = np.sort(rng.uniform(0, 1, n_ctrl))
    ys = np.sort(rng.uniform(0, 1, n_ctrl))
    return np.concatenate([[[0.0, 0.0]], np.stack([xs, ys], 1), [[1.0, 1.0]]], 0)


def bezier_lut(rng=None, n_ctrl: int = DNS_PAPER.bezier_points, invert_prob: float = DNS_PAPER.invert_prob,
               size: int = 1025):
    """Random Bézier transform as a look-up table on the uniform grid linspace(0, 1, size) of input
    intensities; returns ``(lut, inverted)``. ``inverted``: the curve is applied to 1 − x."""
    rng = as_rng(rng)
    ctrl = random_bezier_ctrl(rng, n_ctrl)
    inverted = bool(rng.random() < invert_prob)
    cx, cy = bezier_curve(ctrl, 4 * size)
    grid = np.linspace(0.0, 1.0, size)
    lut = np.interp(1.0 - grid if inverted else grid, cx, cy)
    return lut.astype(np.float32), inverted


def apply_lut(x, lut):
    """Piecewise-linear look-up of ``x`` (clipped to [0, 1]) in ``lut`` sampled on linspace(0, 1, len(lut)).
    Works on numpy arrays and tf tensors (returns the same kind)."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        lut = np.asarray(lut, np.float32)
        return np.interp(np.clip(x, 0, 1), np.linspace(0, 1, len(lut)), lut).astype(np.float32)
    lut = tf.convert_to_tensor(lut, tf.float32)
    k = tf.cast(tf.shape(lut)[0] - 1, tf.float32)
    pos = tf.clip_by_value(tf.cast(x, tf.float32), 0.0, 1.0) * k
    i0 = tf.clip_by_value(tf.floor(pos), 0.0, k - 1.0)
    w = pos - i0
    i0 = tf.cast(i0, tf.int32)
    return tf.gather(lut, i0) * (1.0 - w) + tf.gather(lut, i0 + 1) * w


def bezier_intensity(x, rng=None, n_ctrl: int = DNS_PAPER.bezier_points, invert_prob: float = DNS_PAPER.invert_prob,
                     return_inverted: bool = False):
    """DNS stochastic intensity transform: B(x) or, with probability ``invert_prob``, B(1 − x), for a
    random monotone Bézier curve B through (0,0) and (1,1) with ``n_ctrl`` control points. ``x`` in
    [0, 1] (clipped); returns float32 (and whether it was inverted if ``return_inverted``)."""
    rng = as_rng(rng)
    ctrl = random_bezier_ctrl(rng, n_ctrl)
    inverted = bool(rng.random() < invert_prob)
    cx, cy = bezier_curve(ctrl)
    xin = np.clip(np.asarray(x, np.float64), 0, 1)
    y = np.interp(1.0 - xin if inverted else xin, cx, cy).astype(np.float32)
    return (y, inverted) if return_inverted else y
