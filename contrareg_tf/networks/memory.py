"""Memory switches of the λ-conditioned registration network (issue 25), both opt-in; the paper's setting is
float32 without recomputation.

* **Mixed precision** (``build_options(mixed_precision=True)`` while the network is built; ``train_hyper.py
  --mixed-precision``): the U-Net (its convolutions, FiLM, activations, the flow convolution) computes in float16
  under Keras's ``mixed_float16`` policy, variables stay float32. Everything numerically sensitive stays float32:
  the SVF resize, negation, scaling-and-squaring (``VecInt``), the full-resolution rescale and both warps
  (``SpatialTransformer``) are built with a float32 policy (they cast the float16 velocity up on entry), and the
  autoencoders, PatchNCE heads and logits / τ, MI histograms and L_reg are built after the policy is restored
  (float32). The trainer adds dynamic loss scaling (``LossScaleOptimizer``).
* **Rematerialisation** (``remat_call(model, outputs)``; ``--remat``): a training-time forward pass over the
  *same* layers and weights in which every full-resolution FiLM block (Conv → FiLM → LeakyReLU) runs inside
  ``tf.recompute_grad``: the backward pass recomputes the block's convolution and FiLM output instead of keeping
  them, so each such block stores only its input and output (2 of its 4 full-resolution tensors are dropped).
  The saved model is unchanged (same layers, same ``.h5``), so remat is a training switch only.

Why a build-time scope instead of arguments: ``training.build_components`` builds the network through
``build_hyper_vxm(cfg)``; the scope lets ``setup_registration`` switch precision without widening that call.
"""
import contextlib
import dataclasses

import numpy as np
import tensorflow as tf

import contrareg_tf  # noqa: F401  (compat shim before neurite / voxelmorph)
import neurite as ne
from voxelmorph.tf import layers as _vxm_layers
from voxelmorph.tf import networks as _vxm_networks

from .layers import FiLM


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    mixed_precision: bool = False


_CURRENT = [BuildOptions()]


@contextlib.contextmanager
def build_options(mixed_precision=False):
    """Networks built inside take these options as their defaults (``FiLMVxmDense(mixed_precision=None)``)."""
    _CURRENT.append(BuildOptions(bool(mixed_precision)))
    try:
        yield _CURRENT[-1]
    finally:
        _CURRENT.pop()


def current_options() -> BuildOptions:
    return _CURRENT[-1]


# ----------------------------------------------------------------------------------------- mixed precision
def _float32_factory(cls):
    """A constructor of ``cls`` with its dtype policy pinned to float32 (Keras casts floating inputs to the
    layer's compute dtype, so a float16 velocity enters these layers as float32). A function, not a subclass:
    neurite's ``super(Negate, self)`` must still find its own class."""
    def make(*args, **kwargs):
        kwargs["dtype"] = "float32"
        return cls(*args, **kwargs)

    return make


class _ReshapeMaxPool(tf.keras.layers.Layer):
    """Max-pooling by ``pool_size`` (stride = size, 'valid') as a reshape and ``reduce_max``: the same values as
    ``MaxPooling{2,3}D``, for float16 on a CPU (TF 2.15 has no float16 CPU kernel for MaxPool3D). Only used
    when no GPU is visible, so that the memory benchmark and the tests can run the mixed-precision network."""

    def __init__(self, pool_size=2, **kwargs):
        kwargs.pop("strides", None), kwargs.pop("padding", None)
        super().__init__(**kwargs)
        self.pool_size = int(pool_size if not isinstance(pool_size, (list, tuple)) else pool_size[0])

    def call(self, x):
        k, sp, c = self.pool_size, x.shape[1:-1], x.shape[-1]
        n = len(sp)
        blocks = [-1] + [d for s in sp for d in (s // k, k)] + [c]
        # window axes last, as one axis of k^n: a rank-2 layout (the CPU's Equal does not broadcast rank 8)
        perm = [0] + list(range(1, 2 * n, 2)) + [2 * n + 1] + list(range(2, 2 * n + 1, 2))
        inv = list(np.argsort(perm))
        out_shape = [-1] + [s // k for s in sp] + [c]

        def windows(x):
            return tf.reshape(tf.transpose(tf.reshape(tf.cast(x, tf.float32), blocks), perm), [-1, k ** n])

        # TF 2.15's CPU kernels lack float16 comparisons, so the max and its gradient are taken in float32 from
        # the stored float16 input (as MaxPool3D's own gradient keeps its input): no float32 copy is kept
        @tf.custom_gradient
        def pool(x):
            def grad(dy):
                w = windows(x)
                hit = tf.cast(tf.equal(w, tf.reduce_max(w, axis=1, keepdims=True)), tf.float32)
                hit = hit / tf.reduce_sum(hit, axis=1, keepdims=True) * tf.reshape(tf.cast(dy, tf.float32), [-1, 1])
                t = tf.reshape(hit, [-1] + [s // k for s in sp] + [c] + [k] * n)
                return tf.cast(tf.reshape(tf.transpose(t, inv), tf.shape(x)), x.dtype)

            return tf.cast(tf.reshape(tf.reduce_max(windows(x), axis=1), out_shape), x.dtype), grad

        return pool(x)


class _Override:
    """A stand-in for a module: the given attributes replaced, everything else looked up in ``module``."""

    def __init__(self, module, **attrs):
        self._module = module
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        return getattr(self._module, name)


@contextlib.contextmanager
def mixed_precision_build(enabled):
    """While a vxm network is built: ``mixed_float16`` for its Keras layers, float32 for integration / warps /
    negation (voxelmorph's ``networks`` module sees float32 constructors of those layers; the previous global
    policy is restored afterwards, so later builds are float32)."""
    if not enabled:
        yield
        return
    policy = tf.keras.mixed_precision.global_policy()
    layers, neurite = _vxm_networks.layers, _vxm_networks.ne
    f32 = {n: _float32_factory(getattr(_vxm_layers, n)) for n in ("VecInt", "RescaleTransform", "SpatialTransformer")}
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    _vxm_networks.layers = _Override(_vxm_layers, **f32)
    keras_layers = _vxm_networks.KL
    if not tf.config.list_physical_devices("GPU"):
        _vxm_networks.KL = _Override(keras_layers, MaxPooling2D=_ReshapeMaxPool, MaxPooling3D=_ReshapeMaxPool)
    _vxm_networks.ne = _Override(ne, layers=_Override(ne.layers, Negate=_float32_factory(ne.layers.Negate)))
    try:
        yield
    finally:
        _vxm_networks.layers, _vxm_networks.ne, _vxm_networks.KL = layers, neurite, keras_layers
        tf.keras.mixed_precision.set_global_policy(policy)


def uses_mixed_precision(model):
    """True when any layer of ``model`` computes in float16."""
    return any(getattr(l, "compute_dtype", "float32") == "float16" for l in model.layers)


# ----------------------------------------------------------------------------------------- rematerialisation
def _full_res_blocks(model):
    """{activation layer: (conv layer, FiLM layer)} for the FiLM blocks whose output has the model's input
    spatial size."""
    inshape = tuple(model.inputs[0].shape[1:-1])
    blocks = {}
    for b in model.references.film_blocks:
        conv, film = b["conv"], b["film"]
        if tuple(conv.output.shape[1:-1]) != inshape:
            continue
        consumers = film._outbound_nodes
        if len(consumers) != 1 or not isinstance(consumers[0].layer, tf.keras.layers.LeakyReLU):
            continue
        blocks[id(consumers[0].layer)] = (conv, film)
    return blocks


def _fused(conv, film, act):
    def block(x, gb):
        return act(film([conv(x), gb]))

    return tf.recompute_grad(block)


def remat_call(model, outputs):
    """A callable ``f([source, target, lam]) -> [tensors of outputs]`` computing the functional ``model``'s
    ``outputs`` (Keras tensors of its graph) with the full-resolution FiLM blocks rematerialised (module
    docstring). Same layers, same values; only what the backward pass keeps differs."""
    sub = tf.keras.Model(model.inputs, outputs)  # the sub-graph that feeds ``outputs``
    blocks = _full_res_blocks(model)
    if not blocks:
        return sub
    skip = {id(l) for conv, film in blocks.values() for l in (conv, film)}
    fused = {}
    nodes = [n for d in sorted(sub._nodes_by_depth, reverse=True) for n in sub._nodes_by_depth[d]]
    ids = lambda ts: [str(id(t)) for t in tf.nest.flatten(ts)]  # noqa: E731

    def call(inputs, training=None):
        values = {i: x for i, x in zip(ids(sub.inputs), tf.nest.flatten(inputs))}
        for node in nodes:
            layer = node.layer
            if node.is_input or id(layer) in skip:
                continue
            if id(layer) in blocks:
                conv, film = blocks[id(layer)]
                (x_in,) = ids(conv.input)
                gb = ids(film.input[1])[0]
                if id(layer) not in fused:
                    fused[id(layer)] = _fused(conv, film, layer)
                out = fused[id(layer)](values[x_in], values[gb])
            else:
                args, kwargs = node.map_arguments({k: [v] * 8 for k, v in values.items()})
                out = layer(*args, **kwargs)
            for i, y in zip(node.flat_output_ids, tf.nest.flatten(out)):
                values[i] = y
        return [values[i] for i in ids(sub.outputs)]

    call.layers_rematerialised = len(blocks)
    return call
