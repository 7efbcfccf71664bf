"""An autoencoder's feature layers 1..L with the last one evaluated only where PatchNCE samples: a speed device
(model surgery on a Keras functional graph), not part of the loss's equation (``losses/patchnce.py``).

Why it exists: the last feature layer of the paper's autoencoder (f_L = Conv(Up(a)), 32 channels at full
resolution) is its largest convolution, and PatchNCE reads it at only ns sampled locations per sample. At 64³ the
full map costs 2·64³·27·32·32 = 14.5 GFLOP per autoencoder pass, four forward passes and two input gradients per
step (bench/results/steps_2026-12-07.md). :func:`point_split` cuts the functional model before that convolution
(a ``trunk`` with outputs [f1, .., f_{L-1}, a]) and :class:`PointConv` computes f_L at given flat locations from a:
the k^ndim·C input patch of each location gathered and multiplied by the kernel, the same sum as the convolution
(float additions in another order).

Why here: it reads private Keras attributes (``tensor._keras_history``, ``layer.inbound_nodes``,
``model._is_graph_network``) to walk the graph; a Keras or TF upgrade that changes them breaks this module and
nothing else. Where it does not apply (not a functional model, another last layer) :func:`point_split` returns
None and the caller uses the full maps (:func:`encode` with ``split=None``): the same values.
"""
import numpy as np
import tensorflow as tf

from ..errors import ContraRegInputError
from .layers import NearestUpsample


def _conv_input(tensor):
    """The Keras layer that produced a functional-model tensor and that layer's input tensor."""
    hist = tensor._keras_history
    node = hist.layer.inbound_nodes[hist.node_index]
    return hist.layer, node.input_tensors


def point_split(ae, nb_layers):
    """``(trunk, point)`` so that ``ae``'s feature layer L = ``nb_layers`` is evaluated at sampled locations only,
    or None where that does not apply (then the loss calls ``ae`` and gathers from the full maps).

    Applies to a Keras functional model whose output L is a ``Conv{2,3}D`` (kernel k, any stride, 'same'
    padding, no dilation), optionally fed by an integer nearest up-sampling (:class:`NearestUpsample` /
    ``UpSampling{2,3}D``). ``trunk`` is a model (same layers and weights) with outputs [f1, .., f_{L-1}, a],
    a = that conv's (pre-up-sampling) input; ``point`` a :class:`PointConv` that computes f_L at given flat
    locations from a. Exact: the same sum over the k^ndim·C inputs as the convolution (the order of the
    float additions differs). f_L feeds nothing the loss uses, so nothing else needs the full map."""
    if not (isinstance(ae, tf.keras.Model) and getattr(ae, "_is_graph_network", False)):
        return None
    try:
        conv, x = _conv_input(ae.outputs[nb_layers])
    except (AttributeError, IndexError, TypeError):
        return None
    L = tf.keras.layers
    if (not isinstance(conv, (L.Conv2D, L.Conv3D)) or isinstance(conv, (L.Conv2DTranspose, L.Conv3DTranspose))
            or conv.padding != "same" or any(d != 1 for d in conv.dilation_rate) or conv.groups != 1
            or conv.data_format != "channels_last" or isinstance(x, (list, tuple))):
        return None
    factor, prev = 1, x._keras_history.layer
    if isinstance(prev, NearestUpsample):
        factor = prev.factor
    elif isinstance(prev, (L.UpSampling2D, L.UpSampling3D)):
        size = set(prev.size)
        if len(size) != 1 or getattr(prev, "interpolation", "nearest") != "nearest":
            return None
        factor = size.pop()
    if factor != 1:
        prev, x = _conv_input(x)
    trunk = tf.keras.Model(ae.inputs, list(ae.outputs[1:nb_layers]) + [x], name=f"{ae.name}_trunk{nb_layers}")
    return trunk, PointConv(conv, factor)


class PointConv:
    """A Keras Conv layer (after an optional ×``factor`` nearest up-sampling) at flat output locations:
    ``(a (B, *S, C), idx (B, n)) -> (B, n, C_out)``: the k^ndim·C input patch of each location (zeros outside
    the up-sampled grid, TF's 'same' padding: ⌊total/2⌋ before) gathered and multiplied by the kernel."""

    def __init__(self, conv, factor=1):
        self.conv, self.factor = conv, int(factor)
        self.ksize, self.strides = tuple(conv.kernel_size), tuple(conv.strides)
        self.ndim = len(self.ksize)
        self.offsets = np.stack(np.meshgrid(*[np.arange(k) for k in self.ksize], indexing="ij"),
                                -1).reshape(-1, self.ndim).astype(np.int32)   # row-major = kernel layout

    def out_shape(self, src_shape):
        return [None if s is None else -(-s * self.factor // st) for s, st in zip(src_shape, self.strides)]

    def __call__(self, a, idx):
        sp = a.shape[1:-1].as_list()
        c, cout = a.shape[-1], self.conv.filters
        up = [s * self.factor for s in sp]
        out = self.out_shape(sp)
        rem, coords = idx, [None] * self.ndim
        for ax in reversed(range(self.ndim)):
            coords[ax], rem = rem % out[ax], rem // out[ax]
        flat, ok = 0, None
        for ax in range(self.ndim):
            pad_lo = max((out[ax] - 1) * self.strides[ax] + self.ksize[ax] - up[ax], 0) // 2
            u = coords[ax][..., None] * self.strides[ax] + (self.offsets[:, ax] - pad_lo)   # (B, n, K)
            inside = tf.logical_and(u >= 0, u < up[ax])
            ok = inside if ok is None else tf.logical_and(ok, inside)
            flat = flat * sp[ax] + tf.clip_by_value(u, 0, up[ax] - 1) // self.factor
        b, n, kk = tf.shape(a)[0], tf.shape(idx)[1], len(self.offsets)
        g = tf.gather(tf.reshape(a, [b, -1, c]), flat, batch_dims=1)                    # (B, n, K, C)
        g = tf.reshape(g * tf.cast(ok, g.dtype)[..., None], [-1, kk * c])
        y = tf.matmul(g, tf.cast(tf.reshape(self.conv.kernel, [kk * c, cout]), g.dtype))
        if self.conv.use_bias:
            y = y + tf.cast(self.conv.bias, y.dtype)
        return tf.reshape(self.conv.activation(y), [b, n, cout])


class FeatureTaps:
    """One image batch's features for layers 1..L: full maps, and (``point``) the last layer only at the
    locations asked for, computed from ``src``."""

    def __init__(self, maps, point=None, src=None):
        self.maps, self.point, self.src = maps, point, src

    def _is_point(self, k):
        return self.point is not None and k == len(self.maps)

    def spatial(self, k):
        if self._is_point(k):
            return self.point.out_shape(self.src.shape[1:-1].as_list())
        return self.maps[k].shape[1:-1].as_list()

    def all_locations(self, k):
        """(B, N_k) all-True: every location of layer k may be sampled."""
        sp = self.spatial(k)
        b = tf.shape(self.src if self._is_point(k) else self.maps[k])[0]
        n = int(np.prod(sp)) if None not in sp else tf.reduce_prod(tf.shape(self.maps[k])[1:-1])
        return tf.ones(tf.stack([b, n]), tf.bool)

    def at(self, k, idx):
        """Layer k's features at flat locations idx (B, n): (B, n, C_k)."""
        if self._is_point(k):
            return self.point(self.src, idx)
        f = self.maps[k]
        return tf.gather(tf.reshape(f, [tf.shape(f)[0], -1, f.shape[-1]]), idx, batch_dims=1)


def encode(ae, x, nb_layers, split=None, frozen=True, what="x"):
    """The features of ``ae(x)`` for layers 1..``nb_layers`` as :class:`FeatureTaps` (the last one at asked-for
    locations only when ``split``, a :func:`point_split`, is given and x has a static spatial shape).
    ``ae(x)`` returns [recon, f1, .., fL]; a frozen Keras autoencoder runs in inference mode. ``what`` names x
    in the error raised when ``ae`` returns fewer outputs."""
    call = ((lambda m, t: m(t, training=False)) if (frozen and isinstance(ae, tf.keras.layers.Layer))
            else (lambda m, t: m(t)))
    if split is not None and None not in x.shape[1:-1].as_list():
        trunk, point = split
        outs = call(trunk, x)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return FeatureTaps(list(outs[:-1]), point, outs[-1])
    outs = call(ae, x)
    if not isinstance(outs, (list, tuple)) or len(outs) < nb_layers + 1:
        got = f"{len(outs)} outputs" if isinstance(outs, (list, tuple)) else type(outs).__name__
        raise ContraRegInputError(f"{what}: the autoencoder must return [recon, f1, .., f{nb_layers}], got {got}")
    return FeatureTaps(list(outs[1:1 + nb_layers]))
