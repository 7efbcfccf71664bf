"""SynthMorph's registration network (Hoffmann et al., IEEE TMI 2022; voxelmorph 0.2 ``VxmDense``) and the
λ-ignoring wrapper that lets a SynthMorph run stand wherever a λ-conditioned run does.

SynthMorph is one model without a regularisation hyperparameter at test time (its λ is fixed in training),
so Table 1 gets one row and Fig. 3 a flat line: ``SynthMorphVxm`` has the inputs ``[source, target, lam]`` of
``hyper.FiLMVxmDense`` and the same outputs ``[y_source, y_target, v]``, but ``lam`` is connected to
nothing — the warp is the same at every λ. ``get_registration_model`` gives ``[y_source, pos_flow,
neg_flow]`` as ``FiLMVxmDense``'s does, so ``hyper.register``, the evaluation and ``register.py`` call it
unchanged.

Topology (voxelmorph 0.2 ``scripts/tf/train_synthmorph.py``): U-Net encoder ``[ch] * (nb_levels − 1)``,
decoder ``[ch] * (nb_levels − 1 + dec_extra)``, SVF predicted and integrated at half resolution
(``svf_resolution`` = ``int_resolution`` = 2) by scaling and squaring, bidirectional (the inverse warp
integrates −v; no extra weights). Training builds the same ``VxmDense`` (same name, hence the same weight
names and order) on the synthesizers' outputs (``input_model``); the weights are copied into this
inference model (:func:`copy_weights`).
"""
import numpy as np
import tensorflow as tf

import contrareg_tf  # noqa: F401  (compat shim before neurite / voxelmorph)
import voxelmorph as vxm

from ..config import SM_PAPER, Config, SynthMorphConfig
from ..errors import ContraRegInputError

NAME = "synthmorph"


def unet_features(ch, nb_levels, dec_extra=SM_PAPER.dec_extra):
    """``nb_unet_features`` of SynthMorph's script at width ``ch`` (its default: ch 64, 5 levels → 4 + 6)."""
    ch, n = int(ch), int(nb_levels) - 1
    if n < 1 or ch < 1:
        raise ContraRegInputError(f"SynthMorph needs nb_levels >= 2 and ch >= 1, got {nb_levels}, {ch}")
    return [[ch] * n, [ch] * (n + int(dec_extra))]


def build_core(cfg: Config, sm: SynthMorphConfig = SM_PAPER, input_model=None):
    """voxelmorph 0.2 ``VxmDense`` with SynthMorph's settings at ``cfg``'s grid / width / levels; on
    ``input_model``'s two outputs when given (training), else on two image inputs."""
    inshape = tuple(int(s) for s in cfg.inshape)
    div = int(np.lcm(2 ** (int(cfg.nb_levels) - 1), int(np.lcm(sm.svf_resolution, sm.int_resolution))))
    bad = [s for s in inshape if s % div]
    if len(inshape) not in (2, 3) or bad:
        raise ContraRegInputError(f"SynthMorph: inshape {inshape} must be 2-D or 3-D with every size divisible "
                                  f"by {div}")
    return vxm.networks.VxmDense(
        inshape, nb_unet_features=unet_features(cfg.ch, cfg.nb_levels, sm.dec_extra), int_steps=int(sm.int_steps),
        svf_resolution=int(sm.svf_resolution), int_resolution=int(sm.int_resolution), bidir=True,
        input_model=input_model, reg_field="preintegrated", name=NAME)


class SynthMorphVxm(tf.keras.Model):
    """Inputs ``[source, target, lam]`` (``lam`` unused), outputs ``[y_source, y_target, v]``; ``references``
    as voxelmorph's ``VxmDense`` (pos_flow, neg_flow, …) plus ``core`` (the ``VxmDense``)."""

    def __init__(self, cfg: Config, sm: SynthMorphConfig = SM_PAPER):
        core = build_core(cfg, sm)
        lam = tf.keras.Input(shape=(1,), name=f"{NAME}_unused_lambda")
        super().__init__(inputs=list(core.inputs) + [lam], outputs=core.outputs, name=f"{NAME}_vxm")
        self.references = core.references
        self.references.core = core
        self.references.registration_model = None

    def get_registration_model(self):
        """``[source, target, lam] → [y_source, pos_flow, neg_flow]`` (``hyper.register``'s interface)."""
        r = self.references
        if r.registration_model is None:
            r.registration_model = tf.keras.Model(self.inputs, [r.y_source, r.pos_flow, r.neg_flow],
                                                  name=f"{NAME}_register")
        return r.registration_model


def copy_weights(src, dst):
    """Copy ``src``'s weights into ``dst`` after checking that names and shapes match one to one (a training
    ``VxmDense`` on the synthesizers → the inference model)."""
    a, b = src.weights, dst.weights
    if [(w.name, tuple(w.shape)) for w in a] != [(w.name, tuple(w.shape)) for w in b]:
        raise ValueError("SynthMorph training and inference networks differ in their weights")
    for x, y in zip(a, b):
        y.assign(x)
    return dst
