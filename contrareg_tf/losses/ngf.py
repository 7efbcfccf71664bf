"""Normalised gradient fields (Haber & Modersitzki 2006), the NGF baseline of ContraReg (Table 1).

    NGF(S, T) = 1 − mean_x ( (∇S·∇T)² / ((‖∇S‖² + ε²)(‖∇T‖² + ε²)) )

per sample, over the interior voxels (∇ = central differences (x[i+1] − x[i−1]) / 2 in voxel units along
every spatial axis, so the one-voxel border is dropped). 0 for perfectly aligned edges, 1 where either image
is flat or the gradients are orthogonal. NGF(S, S) = 1 − mean(‖∇S‖⁴ / (‖∇S‖² + ε²)²): ≈ 0 where ‖∇S‖ ≫ ε
(it is not a strict minimum over T: a contrast-amplified T = cS, c > 1, scores slightly lower).

ε (edge parameter, ``NGF_EPS`` = 0.01): gradients with ‖∇‖ ≲ ε count as noise. The paper does not state
its value; 0.01 intensity units per voxel is our assumption for [0, 1] images (typical tissue edges are
0.05–0.5 per voxel, scanner noise gradients ≈ 0.01).
"""
import tensorflow as tf

from .. import ops
from ..errors import ContraRegInputError

NGF_EPS = 0.01
"""Default edge parameter ε (assumption, see module docstring)."""


def _central_gradients(x):
    """Central differences of (B, *vol, C) on the interior -> list of ndim tensors (B, *(vol − 2), C)."""
    ndim = x.shape.rank - 2
    grads = []
    for i in range(ndim):
        hi = [slice(None)] + [slice(2, None) if j == i else slice(1, -1) for j in range(ndim)] + [slice(None)]
        lo = [slice(None)] + [slice(None, -2) if j == i else slice(1, -1) for j in range(ndim)] + [slice(None)]
        grads.append(0.5 * (x[tuple(hi)] - x[tuple(lo)]))
    return grads


def ngf_loss(y_true, y_pred, eps=NGF_EPS):
    """NGF distance (module docstring) between (B, *vol, 1) images, 2-D or 3-D -> (B,)."""
    if not eps > 0:
        raise ContraRegInputError(f"NGF: eps must be > 0, got {eps!r}")
    s, t = (tf.cast(ops.check_image(v, f"NGF: {arg}", channels=1, min_size=3, finite=False), tf.float32)
            for arg, v in (("y_true", y_true), ("y_pred", y_pred)))
    if not s.shape.is_compatible_with(t.shape):
        raise ContraRegInputError(f"NGF: y_true shape {s.shape} != y_pred shape {t.shape}")
    gs, gt = _central_gradients(s), _central_gradients(t)
    dot = tf.add_n([a * b for a, b in zip(gs, gt)])
    ns = tf.add_n([tf.square(a) for a in gs]) + eps ** 2
    nt = tf.add_n([tf.square(b) for b in gt]) + eps ** 2
    axes = list(range(1, s.shape.rank))
    return 1.0 - tf.reduce_mean(tf.square(dot) / (ns * nt), axis=axes)


class NGF:
    """Normalised gradient fields; ``.loss(y_true, y_pred)`` = NGF distance per sample (B,)."""

    def __init__(self, eps=NGF_EPS):
        if not eps > 0:
            raise ContraRegInputError(f"NGF: eps must be > 0, got {eps!r}")
        self.eps = eps

    def loss(self, y_true, y_pred):
        return ngf_loss(y_true, y_pred, self.eps)
