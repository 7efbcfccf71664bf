"""SynthMorph training (Hoffmann et al., "SynthMorph: learning contrast-invariant registration without acquired
images", IEEE TMI 2022) — Table 1's external baselines SM-brains and SM-shapes, trained here with
voxelmorph 0.2's recipe (``scripts/tf/train_synthmorph.py``) on the shared loop (``loop.run_loop``).

Each step: two label maps s1, s2 (``vxm.generators.synthmorph``'s draw: two random maps of the pool, the same
random set of axes flipped in both), each turned by its own ``neurite.models.labels_to_image`` synthesizer
into a random deformation of itself (Perlin SVF, std ≤ 0.5 at 1/16, integrated) and an image of random
contrast (per-label Gaussian intensities, background zeroed with probability 0.2, blur ≤ 1, bias field
std ≤ 0.3 at 1/40, min-max normalisation, gamma std 0.25), returned with the deformed map one-hot
(m1, m2). ``VxmDense(input_model=…)`` registers image 1 to image 2 (φ = exp(v), v at half resolution);
the loss is voxelmorph 0.2's

    L = 1 + Dice(m2, m1∘φ) + λ_SM · Grad_l2(u),    Dice = −mean over batch and labels of 2|a·b| / (|a| + |b|)

with m1∘φ warped linearly, u = φ − Id the full-resolution displacement (the script regularises
``pos_flow``) and λ_SM = ``SynthMorphConfig.reg_weight`` = 1 (the script's ``--reg-param`` default).
Every label of the pool is one Dice channel (background included), as the script does with its default
``--out-labels``; a label absent from both maps of a pair adds 0 to the mean (``divide_no_nan``).

Label maps: ``sm-brains`` — the training subjects' label maps (the built-in data's CerebrA parcellation,
or a data set's labels); ``sm-shapes`` — no anatomy: a pool of argmax maps of ``shape_labels`` Perlin-noise
channels (neurite ``draw_perlin``). Choices the paper leaves open (ours): the pool size and noise scales of
SM-shapes (``config.SynthMorphConfig``); the U-Net width, depth, learning rate, batch size and iterations
are the preset's (``ch`` 256 in ``paper-ch256``, the width the paper's SynthMorph rows used), so SynthMorph
trains with the same optimiser as the other Table-1 methods (the script's own lr is 1e-4: ``--lr``); the
integration is SynthMorph's (5 steps at half resolution, ``SynthMorphConfig``) whatever the preset's ``int_steps``
(ContraReg's ts) is, and the run's ``config.json`` records it.

The image synthesis is training-only: the run folder holds the registration network alone
(``networks.synthmorph.SynthMorphVxm``, inputs ``[moving, fixed, λ]`` with λ ignored), so ``register.py``,
``eval_hyper.py`` and ``reproduce_table1.py`` load it like any λ-conditioned run (one Table-1 row, a flat
Fig. 3 line). Resume: weights, Adam moments, the step and every label-map / flip draw (``step_rng``) are
restored exactly; the synthesizers' in-graph draws are neurite's stateful random ops, so after a resume they
continue from a re-seeded stream (the same distribution, not the same numbers as an uninterrupted run).
"""
import dataclasses
import os
import time
from typing import Callable, NamedTuple

import neurite as ne
import numpy as np
import tensorflow as tf
import voxelmorph as vxm
from neurite.tf.utils.augment import draw_perlin

from .. import ops
from ..atomic import write_json
from ..config import SM_PAPER, SYNTHMORPH_METHODS, Config, SynthMorphConfig
from ..errors import ContraRegInputError
from ..lock import out_dir_lock
from ..networks.synthmorph import NAME, SynthMorphVxm, build_core, copy_weights
from ..runs import data_spacing, prepare_run_dir, save_trained
from .loop import (_per_replica_mean, _reduce_terms, get_strategy, is_chief, peak_rss_mb, run_loop, step_rng,
                   val_curve_callback)

__all__ = ["METHODS", "is_synthmorph", "brain_label_maps", "shape_label_maps", "method_label_maps",
           "LabelMapSampler", "dice_loss", "build_training_model", "train_synthmorph"]


# --------------------------------------------------------------------------------------------------------------
# label maps (the methods)
# --------------------------------------------------------------------------------------------------------------
def brain_label_maps(cfg: Config, sm: SynthMorphConfig = SM_PAPER, train_arrays=None):
    """SM-brains: the training subjects' label maps (N, *inshape), int32."""
    labels = None if train_arrays is None else train_arrays.get("labels")
    if labels is None:
        raise ContraRegInputError("sm-brains needs label maps of the training subjects; the data set has none")
    labels = np.asarray(labels)
    if tuple(labels.shape[1:]) != tuple(cfg.inshape):
        raise ContraRegInputError(f"training label maps have shape {tuple(labels.shape[1:])} but the config "
                                  f"expects {tuple(cfg.inshape)}")
    return labels.astype(np.int32)


def shape_label_maps(cfg: Config, sm: SynthMorphConfig = SM_PAPER, train_arrays=None):
    """SM-shapes: ``sm.shape_maps`` maps (N, *inshape), uint8 labels 0..``shape_labels``−1, each the argmax
    over ``shape_labels`` channels of neurite's ``draw_perlin`` noise at ``shape_points`` samples along the
    longest axis (per-scale std ~ U[0, 1]). Deterministic for ``cfg.seed`` (TF's seed is reset first)."""
    inshape = tuple(int(s) for s in cfg.inshape)
    scales = [max(inshape) / float(p) for p in sm.shape_points]
    tf.random.set_seed(cfg.seed)            # fresh kernels: the same pool whatever ran before in this process
    rng = np.random.default_rng([int(cfg.seed), 7])
    out = np.empty((int(sm.shape_maps),) + inshape, np.uint8)
    for i in range(int(sm.shape_maps)):
        noise = draw_perlin((*inshape, int(sm.shape_labels)), scales=scales, min_std=0.0, max_std=1.0,
                            seed=int(rng.integers(2 ** 31)))
        out[i] = np.argmax(noise.numpy(), axis=-1)
    return out


class Method(NamedTuple):
    """A SynthMorph baseline: where its label maps come from, and whether both maps of a pair are the same map
    (``same_subj``: two independent synthetic deformations of one map — the only correspondence random shapes
    have) or two different maps (inter-subject brains)."""
    label_maps: Callable
    same_subj: bool


# the methods; experiment.train_method and train_hyper consult this before the similarity registry
METHODS = {"sm-brains": Method(brain_label_maps, same_subj=False),
           "sm-shapes": Method(shape_label_maps, same_subj=True)}
assert tuple(METHODS) == SYNTHMORPH_METHODS


def is_synthmorph(name) -> bool:
    """Whether a ``--loss`` / Table-1 method name is one of the SynthMorph baselines."""
    return str(name).strip().lower() in METHODS


def method_label_maps(method, cfg: Config, sm: SynthMorphConfig = SM_PAPER, train_arrays=None):
    key = str(method).strip().lower()
    if key not in METHODS:
        raise ContraRegInputError(f"unknown SynthMorph method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key].label_maps(cfg, sm, train_arrays)


class LabelMapSampler:
    """voxelmorph 0.2's ``generators.synthmorph`` draw as a pure function of (seed, step): two random maps per
    sample (source, target; the same map twice with ``same_subj``), a random subset of axes flipped in the whole
    batch."""

    def __init__(self, label_maps, batch_size=1, seed=0, flip=True, same_subj=False):
        self.maps = np.asarray(label_maps)
        if self.maps.ndim not in (3, 4) or len(self.maps) < 1:
            raise ContraRegInputError(f"label maps: expected a stack (N, *vol) of 2-D or 3-D maps, got shape "
                                      f"{self.maps.shape}")
        self.batch_size, self.seed, self.flip, self.same_subj = int(batch_size), int(seed), bool(flip), \
            bool(same_subj)

    def batch(self, step):
        rng = step_rng(self.seed, step, 0)
        b, ndim = self.batch_size, self.maps.ndim - 1
        ind = rng.integers(len(self.maps), size=2 * b)
        if self.same_subj:
            ind[b:] = ind[:b]
        x = self.maps[ind][..., None]
        if self.flip:
            axes = rng.choice(ndim, size=int(rng.integers(ndim + 1)), replace=False, shuffle=False)
            x = np.flip(x, axis=tuple(int(a) + 1 for a in axes))
        x = np.ascontiguousarray(x, np.float32)
        return {"labels1": x[:b], "labels2": x[b:]}


# --------------------------------------------------------------------------------------------------------------
# model and loss
# --------------------------------------------------------------------------------------------------------------
def dice_loss(y_true, y_pred):
    """SynthMorph's data term: 1 + voxelmorph 0.2 ``Dice().loss`` (soft Dice, mean over batch and channels)."""
    y_true, y_pred = (tf.convert_to_tensor(y, tf.float32) for y in (y_true, y_pred))
    return 1.0 + vxm.losses.Dice().loss(y_true, y_pred)


def synthesizer(cfg: Config, sm: SynthMorphConfig, label_ids, id=0, **extra):
    """One ``neurite.models.labels_to_image`` with SynthMorph's settings: label map (B, *vol, 1) →
    [image (B, *vol, 1), deformed one-hot map (B, *vol, L), …] (``extra``: e.g. ``return_def=True``)."""
    return ne.models.labels_to_image(
        list(cfg.inshape), list(label_ids), warp_std=sm.vel_std, warp_res=list(sm.vel_res), bias_std=sm.bias_std,
        bias_res=list(sm.bias_res), blur_std=sm.blur_std, gamma_std=sm.gamma_std,
        zero_background=sm.zero_background, one_hot=True, id=id, **extra)


def build_training_model(cfg: Config, sm: SynthMorphConfig, label_ids):
    """voxelmorph 0.2's SynthMorph training graph: two synthesizers → ``VxmDense(input_model=…)`` → m1∘φ.
    Returns ``(core, model)``: the ``VxmDense`` and ``[labels1, labels2] → [m1∘φ, m2, u, image1, image2]``."""
    gens = [synthesizer(cfg, sm, label_ids, id=i) for i in (0, 1)]
    (ima1, map1), (ima2, map2) = (g.outputs[:2] for g in gens)
    input_model = tf.keras.Model(gens[0].inputs + gens[1].inputs, [ima1, ima2], name=f"{NAME}_synth")
    core = build_core(cfg, sm, input_model=input_model)
    flow = core.references.pos_flow
    pred = vxm.layers.SpatialTransformer(interp_method="linear", name=f"{NAME}_pred")([map1, flow])
    return core, tf.keras.Model(core.inputs, [pred, map2, flow, ima1, ima2], name=f"{NAME}_train")


def make_train_step(train_model, variables, optimizer, reg_weight, strategy, global_batch):
    """One Adam step on 1 + Dice(m2, m1∘φ) + reg_weight · Grad_l2(u)."""
    def replica_step(b):
        with tf.GradientTape() as tape:
            pred, map2, flow, _, _ = train_model([b["labels1"], b["labels2"]], training=True)
            l_reg = float(reg_weight) * ops.grad(flow, "l2")     # (B,): vxm Grad('l2'), the one diffusion term
            l_dice = dice_loss(map2, pred) * tf.ones_like(l_reg)  # batch mean, per sample
            loss = _per_replica_mean(strategy, l_dice + l_reg, global_batch)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients([(g, w) for g, w in zip(grads, variables) if g is not None])
        return {"loss": loss, "dice": _per_replica_mean(strategy, l_dice, global_batch),
                "reg": _per_replica_mean(strategy, l_reg, global_batch)}

    @tf.function
    def step(batch):
        return _reduce_terms(strategy, strategy.run(replica_step, args=(batch,)))

    return step


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------
def train_synthmorph(cfg: Config, method, out_dir, train_arrays=None, sm: SynthMorphConfig = SM_PAPER, **kwargs):
    """Train SM-brains / SM-shapes (``method``) at ``cfg``'s grid and width; ``train_arrays``: the training
    split (``labels`` for sm-brains, ``affines`` for the recorded voxel size). Writes ``out_dir/{config.json,
    ckpt/, tb/, model.h5, card.json}`` (a run folder ``runs.load_trained`` reads); returns the history.
    Keyword arguments: label_maps (overrides the method's), iters, lr, batch_size, resume, strategy, progress,
    command, validate (``validate(model) -> float`` at every checkpoint, logged to ``val_curve.csv``), overwrite
    (``runs.prepare_run_dir``: an ``out_dir`` holding a run needs ``resume`` of the same run or ``overwrite``).
    ``out_dir`` is locked for the run; ``out_dir=None`` writes nothing (tests)."""
    if out_dir is None:
        return _train(cfg, method, None, train_arrays, sm, **kwargs)
    with out_dir_lock(out_dir, kwargs.get("command")):
        return _train(cfg, method, out_dir, train_arrays, sm, **kwargs)


def _train(cfg, method, out_dir, train_arrays, sm, label_maps=None, iters=None, lr=None, batch_size=None,
           resume=False, strategy="default", progress=True, command=None, validate=None, overwrite=False):
    method = str(method).strip().lower()
    if method not in METHODS:
        raise ContraRegInputError(f"unknown SynthMorph method {method!r}; choose one of {', '.join(METHODS)}")
    maps = method_label_maps(method, cfg, sm, train_arrays) if label_maps is None else np.asarray(label_maps)
    if tuple(maps.shape[1:]) != tuple(cfg.inshape):
        raise ContraRegInputError(f"label maps have shape {tuple(maps.shape[1:])}, the config expects "
                                  f"{tuple(cfg.inshape)}")
    label_ids = [int(v) for v in np.unique(maps)]
    iters = int(cfg.iters if iters is None else iters)
    lr = float(lr or cfg.lr)
    batch_size = int(batch_size or cfg.batch_size)
    # the run's Config describes the network that is saved (SynthMorph's integration settings)
    cfg_run = dataclasses.replace(cfg, int_steps=int(sm.int_steps), int_resolution=int(sm.int_resolution))
    strat = get_strategy(strategy)
    tf.keras.utils.set_random_seed(cfg.seed)   # same initial weights and synthesis streams for the same seed
    with strat.scope():
        core, train_model = build_training_model(cfg_run, sm, label_ids)
        variables = core.trainable_variables
        optimizer = tf.keras.optimizers.Adam(lr)
        optimizer.build(variables)
        step_var = tf.Variable(0, dtype=tf.int64, name="step", trainable=False)
        ckpt = tf.train.Checkpoint(model=core, optimizer=optimizer, step=step_var)
        step = make_train_step(train_model, variables, optimizer, sm.reg_weight, strat, batch_size)
    sampler = LabelMapSampler(maps, batch_size=batch_size, seed=cfg.seed, flip=sm.flip,
                              same_subj=METHODS[method].same_subj)
    meta = {"config": dataclasses.asdict(cfg_run), "loss": method, "method": NAME,
            "synthmorph": dataclasses.asdict(sm), "same_subj": METHODS[method].same_subj,
            "label_maps": int(len(maps)), "labels": label_ids, "lr": lr,
            "iters": iters, "batch_size": batch_size, "command": command}
    spacing = data_spacing(train_arrays, len(cfg.inshape)) if train_arrays is not None else None
    if spacing is not None:      # register.py runs the model at this voxel size (inference.model_window)
        meta["data_spacing"] = spacing
    chief = is_chief(strat)   # multi-worker: the other workers train in lock-step but write nothing here
    if out_dir is not None and chief:   # only the chief: the other workers would find its config.json
        prepare_run_dir(out_dir, meta, resume, overwrite)
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "config.json"), meta)
    t0 = time.time()
    on_ckpt = None
    if validate is not None and out_dir is not None:   # validated through the λ-ignoring interface
        eval_model = SynthMorphVxm(cfg_run, sm)
        on_ckpt = val_curve_callback(out_dir, core, lambda c: validate(copy_weights(c, eval_model)))
    history = run_loop(step, sampler.batch, ckpt, out_dir, iters, cfg.ckpt_every, strat, resume, progress,
                       desc=f"train {method}", on_checkpoint=on_ckpt)
    elapsed = time.time() - t0
    if out_dir is None or not chief:
        return history
    model = copy_weights(core, SynthMorphVxm(cfg_run, sm))
    save_trained(out_dir, model)
    card = dict(meta, steps_run=len(history), seconds=round(elapsed, 2),
                final=history[-1] if history else None, sec_per_step=round(elapsed / max(1, len(history)), 4),
                peak_rss_mb=peak_rss_mb())
    write_json(os.path.join(out_dir, "card.json"), card)
    return history
