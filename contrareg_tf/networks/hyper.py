"""λ-conditioned VoxelMorph registration network (ContraReg paper §2: hypernetwork conditioning as in
HyperMorph, Hoopes et al., IPMI 2021, with the FiLM framework of Mok & Chung, MICCAI 2021; voxelmorph 0.2's
``VxmDense``).

``FiLMVxmDense`` *is* voxelmorph 0.2's ``VxmDense`` (U-Net, SVF rescaling, scaling-and-squaring ``VecInt``,
bidirectional ``SpatialTransformer``s) built with

* ``nb_unet_features = [[ch]*(L-1), [ch]*(L-1) + [ch]*3]`` — vxm's default topology at constant width ch
  (L = ``nb_levels`` U-Net levels, 3 full-resolution decoder convs);
* ``hyp_model`` = the hypernetwork: λ (B, 1) → ``hyp_layers`` × Dense(``hyp_units``, relu) = the shared
  embedding (paper: 4 × 128);
* ``conditioning='film'`` (default, the paper's): while the Unet is constructed, ``voxelmorph.tf.networks.
  _conv_block`` (which vxm's ``Unet`` looks up at call time and hands ``hyp_tensor``) is temporarily replaced
  by ``_film_conv_block``: bias-free Conv → ``FiLM`` with (γ, β) = ``Dense(2C, L2 film_l2 on kernel and
  bias)`` of the embedding → LeakyReLU(0.2). vxm's ``_upsample_block`` is likewise swapped for one that
  uses ``NearestUpsample`` (same values as vxm's ``UpSampling2D/3D``; XLA-compilable in 2-D, so ``--xla``
  works). The original blocks are restored in a ``finally``.
  ``conditioning='hyperconv'``: vxm's own HyperMorph conditioning (``HyperConvFromDense``: every conv kernel
  generated from the embedding), kept for comparison.
* ``reg_field='preintegrated'``: the third output is the velocity v at integration resolution, the field
  that L_reg = ‖v‖² regularises.

Inputs ``[source, target, lam]``; outputs ``[y_source, y_target, v]`` with y_source = source∘φ,
y_target = target∘φ⁻¹ (φ⁻¹ integrates −v). Displacements are voxel units, ij order (vxm's convention).
"""
import contextlib

import numpy as np
import tensorflow as tf

import contrareg_tf  # noqa: F401  (compat shim before neurite / voxelmorph)
import neurite as ne
import voxelmorph as vxm
from voxelmorph.tf import networks as _vxm_networks

from ..config import HYP_ACTIVATIONS, PAPER, Config
from ..errors import ContraRegInputError
from ..ops import check_image, warp_array as warp  # noqa: F401  (warp: public re-export)
from .layers import FiLM, NearestUpsample
from .memory import current_options, mixed_precision_build
from .weights import load_weights

CONDITIONINGS = ("film", "hyperconv")


# ---------------------------------------------------------------------------------------------------------
# private blocks
# ---------------------------------------------------------------------------------------------------------

def _hypernet(nb_layers, nb_units, name, activation="relu"):
    """λ (B, 1) → nb_layers × Dense(nb_units, activation): the shared embedding (paper §2: ReLU;
    ``leaky_relu``: slope 0.2, ``config.Config.hyp_activation`` says why)."""
    if activation not in HYP_ACTIVATIONS:
        raise ContraRegInputError(f"hyp_activation {activation!r}: choose one of {', '.join(HYP_ACTIVATIONS)}")
    lam = tf.keras.Input(shape=(1,), name=f"{name}_hyp_input")
    last = lam
    for n in range(nb_layers):
        if activation == "relu":
            last = tf.keras.layers.Dense(nb_units, activation="relu", name=f"{name}_hyp_dense_{n + 1}")(last)
        else:
            last = tf.keras.layers.Dense(nb_units, name=f"{name}_hyp_dense_{n + 1}")(last)
            last = tf.keras.layers.LeakyReLU(0.2, name=f"{name}_hyp_act_{n + 1}")(last)
    return tf.keras.Model(lam, last, name=f"{name}_hypernet")


def _make_film_conv_block(film_l2, registry):
    """Return a drop-in for ``voxelmorph.tf.networks._conv_block`` that applies FiLM conditioning.

    Conv (no bias: β replaces it) → FiLM((1+γ)x+β), γ, β = Dense(2C)(embedding) with L2(film_l2) on
    kernel and bias (Atlas-GAN's TF2 FiLM pattern; Keras default init: glorot-uniform kernel, zero bias)
    → LeakyReLU(0.2) when ``include_activation`` (vxm semantics). Created layers are appended to
    ``registry`` (dicts with 'conv', 'dense', 'film').
    """
    reg = tf.keras.regularizers.L2

    def _film_conv_block(x, nfeat, strides=1, name=None, do_res=False, hyp_tensor=None,
                         include_activation=True, kernel_initializer="he_normal"):
        if do_res:
            raise NotImplementedError("FiLM conv block: do_res is not supported (vxm's Unet default is False)")
        if hyp_tensor is None:
            raise ValueError("FiLM conv block needs the hypernetwork embedding (hyp_tensor)")
        ndims = len(x.shape) - 2
        Conv = getattr(tf.keras.layers, f"Conv{ndims}D")
        conv = Conv(nfeat, kernel_size=3, padding="same", strides=strides, use_bias=False,
                    kernel_initializer=kernel_initializer, name=name)
        dense = tf.keras.layers.Dense(2 * nfeat, kernel_regularizer=reg(film_l2), bias_regularizer=reg(film_l2),
                                      name=f"{name}_film_dense")
        film = FiLM(name=f"{name}_film")
        out = film([conv(x), dense(hyp_tensor)])
        if include_activation:
            out = tf.keras.layers.LeakyReLU(0.2, name=f"{name}_activation")(out)
        registry.append({"conv": conv, "dense": dense, "film": film})
        return out

    return _film_conv_block


def _upsample_block(x, connection, factor=2, name=None):
    """vxm's ``_upsample_block`` (up-sample, concatenate the skip connection) with ``NearestUpsample``."""
    up = NearestUpsample(factor, name=name)(x)
    return tf.keras.layers.concatenate([up, connection], name=name + "_concat" if name else None)


@contextlib.contextmanager
def _vxm_blocks(conv_block):
    """Temporarily install ``conv_block`` and ``_upsample_block`` as voxelmorph's U-Net blocks (restored
    even on error)."""
    original = _vxm_networks._conv_block, _vxm_networks._upsample_block
    _vxm_networks._conv_block, _vxm_networks._upsample_block = conv_block, _upsample_block
    try:
        yield
    finally:
        _vxm_networks._conv_block, _vxm_networks._upsample_block = original


def _validate(inshape, ch, nb_levels, int_steps, int_resolution, conditioning):
    try:
        inshape = tuple(int(s) for s in inshape)
    except TypeError:
        raise ContraRegInputError(f"inshape must be a sequence of ints, got {inshape!r}") from None
    if len(inshape) not in (2, 3):
        raise ContraRegInputError(f"inshape {inshape}: need 2 or 3 spatial dimensions, got {len(inshape)}")
    if min(inshape) < 1:
        raise ContraRegInputError(f"inshape {inshape}: sizes must be positive")
    if conditioning not in CONDITIONINGS:
        raise ContraRegInputError(f"conditioning={conditioning!r}: choose one of {CONDITIONINGS}")
    if int(nb_levels) < 1 or int(ch) < 1 or int(int_steps) < 0 or int(int_resolution) < 1:
        raise ContraRegInputError(
            f"need nb_levels >= 1, ch >= 1, int_steps >= 0, int_resolution >= 1; got nb_levels={nb_levels}, "
            f"ch={ch}, int_steps={int_steps}, int_resolution={int_resolution}")
    div = 2 ** (int(nb_levels) - 1)
    if int_steps > 0:
        div = int(np.lcm(div, int(int_resolution)))
    bad = [s for s in inshape if s % div]
    if bad:
        raise ContraRegInputError(
            f"inshape {inshape}: every spatial size must be divisible by {div} (2**(nb_levels-1) = "
            f"{2 ** (int(nb_levels) - 1)} U-Net poolings, int_resolution={int_resolution}); "
            f"{bad} {'is' if len(bad) == 1 else 'are'} not — crop or pad the images")
    return inshape


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------

class FiLMVxmDense(ne.modelio.LoadableModel):
    """vxm ``VxmDense`` conditioned on λ ∈ [0, 1] through a hypernetwork (FiLM or HyperConv).

    Inputs ``[source (B,*vol,1), target (B,*vol,1), lam (B,1)]``; outputs ``[y_source, y_target, v]``
    (``[y_source, v]`` if ``bidir=False``). ``references``: vxm's (unet_model, source, target, svf,
    preint_flow, postint_flow, pos_flow, neg_flow, y_source, y_target, hyp_input) plus hyper_val (= hyp_input,
    as in vxm's HyperVxmDense), hyp_model, embedding, conditioning, film_blocks (list of dicts with the
    'conv', 'dense' (γ,β projection) and 'film' layers of every U-Net conv; empty for 'hyperconv').
    """

    @ne.modelio.store_config_args
    def __init__(self, inshape, ch=PAPER.ch, nb_levels=PAPER.nb_levels, int_steps=PAPER.int_steps,
                 int_resolution=PAPER.int_resolution, bidir=PAPER.bidir, hyp_layers=PAPER.hyp_layers,
                 hyp_units=PAPER.hyp_units, film_l2=PAPER.film_l2, conditioning="film", mixed_precision=None,
                 name=None, hyp_activation=PAPER.hyp_activation):
        # mixed_precision: None = the enclosing ``memory.build_options`` (float32 outside one); True = the
        # U-Net in float16, integration / warps float32 (networks/memory.py)
        if mixed_precision is None:
            mixed_precision = current_options().mixed_precision
        inshape = _validate(inshape, ch, nb_levels, int_steps, int_resolution, conditioning)
        if name is None:
            name = "film_vxm_dense" if conditioning == "film" else "hyper_vxm_dense"
        ch, nb_levels = int(ch), int(nb_levels)
        nb_features = [[ch] * (nb_levels - 1), [ch] * (nb_levels - 1) + [ch] * 3]
        hyp_model = _hypernet(int(hyp_layers), int(hyp_units), name, str(hyp_activation))

        film_blocks = []
        block = (_make_film_conv_block(float(film_l2), film_blocks) if conditioning == "film"
                 else _vxm_networks._conv_block)
        with _vxm_blocks(block), mixed_precision_build(bool(mixed_precision)):
            core = vxm.networks.VxmDense(
                inshape, nb_unet_features=nb_features, int_steps=int(int_steps),
                int_resolution=int(int_resolution), bidir=bool(bidir), hyp_model=hyp_model,
                reg_field="preintegrated", name=name)

        super().__init__(name=name, inputs=core.inputs, outputs=core.outputs)

        self.references = core.references
        self.references.hyper_val = core.references.hyp_input
        self.references.hyp_model = hyp_model
        self.references.embedding = hyp_model.output
        self.references.conditioning = conditioning
        self.references.film_blocks = film_blocks
        self.references.inshape = inshape
        self.references.bidir = bool(bidir)
        self.references.int_steps = int(int_steps)
        self.references.registration_model = None
        self.references.mixed_precision = bool(mixed_precision)

    # -- inference helpers --------------------------------------------------------------------------------
    def get_registration_model(self):
        """Model ``[source, target, lam] → [y_source, pos_flow, neg_flow]`` (no neg_flow if not bidir)."""
        if self.references.registration_model is None:
            outs = [self.references.y_source, self.references.pos_flow]
            if self.references.bidir:
                outs.append(self.references.neg_flow)
            self.references.registration_model = tf.keras.Model(self.inputs, outs, name=f"{self.name}_register")
        return self.references.registration_model

    def register(self, moving, fixed, lam, batch_size=1):
        """See module-level ``register``."""
        return register(self, moving, fixed, lam, batch_size=batch_size)

    def integrate(self, v):
        """Apply this model's own integration layers to a velocity ``v`` at integration resolution.

        Returns ``(pos_flow, neg_flow)`` full-resolution displacements (neg_flow None if not bidir) —
        exactly the path ``preint_flow → pos_flow / neg_flow`` inside the model (Negate, VecInt,
        RescaleTransform).
        """
        v = tf.convert_to_tensor(v, tf.float32)
        names = [lyr.name for lyr in self.layers]

        def _maybe(suffix, x):
            key = f"{self.name}_{suffix}"
            return self.get_layer(key)(x) if key in names else x

        pos = _maybe("diffflow", _maybe("flow_int", v))
        neg = None
        if self.references.bidir:
            neg = _maybe("neg_diffflow", _maybe("neg_flow_int", self.get_layer(f"{self.name}_neg_flow")(v)))
        return pos, neg


def build_hyper_vxm(config: Config = PAPER, conditioning="film", name=None):
    """``FiLMVxmDense`` with inshape / ch / nb_levels / int_steps / int_resolution / bidir / hypernetwork
    sizes / film_l2 read from a ``contrareg_tf.config.Config``."""
    return FiLMVxmDense(tuple(config.inshape), ch=config.ch, nb_levels=config.nb_levels,
                        int_steps=config.int_steps, int_resolution=config.int_resolution, bidir=config.bidir,
                        hyp_layers=config.hyp_layers, hyp_units=config.hyp_units, film_l2=config.film_l2,
                        conditioning=conditioning, name=name, hyp_activation=config.hyp_activation)


# ---------------------------------------------------------------------------------------------------------
# numpy-level helpers
# ---------------------------------------------------------------------------------------------------------

def _as_batch(arr, inshape, what):
    """(*vol), (*vol, 1) or (B, *vol, 1) → float32 (B, *vol, 1)."""
    a = np.asarray(arr)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ContraRegInputError(f"{what}: expected a numeric array, got dtype {a.dtype}")
    a = a.astype(np.float32)
    nd = len(inshape)
    if a.shape == tuple(inshape):
        a = a[None, ..., None]
    elif a.ndim == nd + 1 and a.shape[:nd] == tuple(inshape) and a.shape[-1] == 1:
        a = a[None]
    if a.ndim != nd + 2 or a.shape[1:-1] != tuple(inshape) or a.shape[-1] != 1:
        raise ContraRegInputError(
            f"{what}: shape {np.shape(arr)} does not match the model's input (B, *{tuple(inshape)}, 1)")
    return check_image(a, what, channels=1, ndim=nd).numpy()


def _as_lambda(lam):
    l = np.asarray(lam, dtype=np.float64)
    if l.ndim == 2 and l.shape[1] == 1:
        l = l[:, 0]
    if l.ndim > 1:
        raise ContraRegInputError(f"lam: expected a scalar, (B,) or (B, 1), got shape {l.shape}")
    l = np.atleast_1d(l)
    if l.size == 0:
        raise ContraRegInputError("lam: empty")
    if not np.all(np.isfinite(l)) or l.min() < 0 or l.max() > 1:
        raise ContraRegInputError(f"lam: values must lie in [0, 1], got {l.tolist() if l.size < 20 else l}")
    return l.astype(np.float32)[:, None]


def register(model, moving, fixed, lam, batch_size=1):
    """Register ``moving`` to ``fixed`` at regularisation weight(s) ``lam`` (numpy in, numpy out).

    moving, fixed: (*vol), (*vol, 1) or (B, *vol, 1); lam: scalar, (B,) or (B, 1) in [0, 1]. Batch sizes
    broadcast (one pair × 17 λ values is fine). Returns ``(moved, pos_flow, neg_flow)`` as float32 arrays
    with a batch axis: moved = moving∘φ (B, *vol, 1), pos_flow = u of φ, neg_flow = u of φ⁻¹
    (B, *vol, ndim), voxel units, ij order (neg_flow None for a non-bidirectional model).
    """
    inshape = tuple(model.inputs[0].shape[1:-1])
    m = _as_batch(moving, inshape, "moving")
    f = _as_batch(fixed, inshape, "fixed")
    lam = _as_lambda(lam)
    sizes = {m.shape[0], f.shape[0], lam.shape[0]} - {1}
    if len(sizes) > 1:
        raise ContraRegInputError(
            f"batch sizes do not broadcast: moving {m.shape[0]}, fixed {f.shape[0]}, lam {lam.shape[0]}")
    b = sizes.pop() if sizes else 1
    m, f, lam = (np.broadcast_to(a, (b,) + a.shape[1:]).copy() for a in (m, f, lam))
    reg = model.get_registration_model() if hasattr(model, "get_registration_model") else model
    outs = reg.predict([m, f, lam], batch_size=batch_size, verbose=0)
    outs = [np.asarray(o, np.float32) for o in outs]
    return outs[0], outs[1], (outs[2] if len(outs) > 2 else None)


def load_registration_weights(model, path):
    """``model.load_weights(path)`` after checking the ``.h5`` file's layers / weight shapes against the
    model (``ContraRegInputError`` naming the first mismatch)."""
    return load_weights(model, path)
