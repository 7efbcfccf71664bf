"""Training of the λ-conditioned registration network (paper §2–3): inter-subject T1w/T2w pairs, λ ~ U[0, 1]
per sample, α(1−λ)·L_sim + λ·L_reg with the similarity of ``losses.similarity.build_similarity``.
Outputs a run folder (``runs.py``)."""
import dataclasses
import os
import time
import warnings

import numpy as np
import tensorflow as tf

from ..atomic import write_json
from ..config import AE_LAYOUT_PROBES, Config
from ..data.pairs import PairSampler
from ..errors import ContraRegInputError, ContraRegWarning
from ..evaluation import lambda_use
from ..lock import out_dir_lock
from ..losses.objective import hyper_loss, velocity_regulariser
from ..losses.similarity import LossSpec, build_similarity
from ..networks import autoencoder as ae_mod
from ..networks.heads import build_heads
from ..networks.hyper import build_hyper_vxm
from ..networks.memory import build_options, remat_call
from ..runs import data_spacing, load_trained_heads, prepare_run_dir, save_trained
from .loop import (_per_replica_mean, _reduce_terms, any_callback, get_strategy, is_chief, peak_rss_mb, run_loop,
                   set_mixed_precision, val_curve_callback)


# --------------------------------------------------------------------------------------------------------------
# λ-conditioned registration (paper §2)
# --------------------------------------------------------------------------------------------------------------
def build_components(cfg, loss, ae1=None, ae2=None, rand_ae=False, conditioning="film", dns_model=None,
                     rng=None, probes=(None, None)):
    """Model, head sets and the bidirectional similarity for ``loss`` (a ``--loss`` name or its parsed
    ``LossSpec``; call inside a strategy scope). ``rng``: a ``tf.random.Generator`` for the PatchNCE locations
    (checkpointed, so resume is exact). ``probes``: a few training T1w / T2w images that an autoencoder file
    written elsewhere must reconstruct in the paper layout (``autoencoder.check_layout``)."""
    spec = LossSpec.parse(loss)     # a LossSpec passes through unchanged
    ndim = len(cfg.inshape)
    model = build_hyper_vxm(cfg, conditioning=conditioning)
    heads1 = heads2 = None
    if spec.contrastive:
        aes = []
        for k, (src, probe) in enumerate(zip((ae1, ae2), probes)):
            if rand_ae:
                a = ae_mod.random_autoencoder(ndim, seed=cfg.seed + k, filters=cfg.ae_filters)
            elif isinstance(src, (str, os.PathLike)):
                a = ae_mod.load_autoencoder(src, ndim, filters=cfg.ae_filters, probe=probe)
            elif src is None:
                raise ContraRegInputError(f"loss {spec.name!r} needs --ae1/--ae2 autoencoder weights or --rand-ae")
            else:
                a = src
            aes.append(ae_mod.freeze(a))
        ae1, ae2 = aes
        chans = ae_mod.feature_channels(cfg.ae_filters, cfg.ae_nb_feature_layers)
        heads1 = build_heads(chans, units=cfg.head_units, nb_layers=cfg.head_layers, name="heads1")
        heads2 = build_heads(chans, units=cfg.head_units, nb_layers=cfg.head_layers, name="heads2")
    sim = build_similarity(spec, cfg, ae1, ae2, heads1, heads2, dns_model=dns_model, seed=rng)
    return model, heads1, heads2, sim


def _training_model(model):
    r = model.references
    return tf.keras.Model(model.inputs, [r.y_source, r.y_target, r.preint_flow, r.pos_flow, r.neg_flow])


def make_train_step(model, sim, reg, alpha, optimizer, strategy, global_batch, jit=False, remat=False):
    """One Adam step on α(1−λ)·L_sim + λ·L_reg (+ FiLM weight decay), per-sample λ; ``sim`` (a
    ``BidirSimilarity``) takes what it needs from the batch (masks, ExtNegs images). ``remat``: the forward pass
    recomputes the full-resolution U-Net blocks in the backward pass (``networks.memory.remat_call``; same
    values, less memory). A ``LossScaleOptimizer`` (mixed precision) gets its loss scaled and gradients unscaled."""
    if remat:
        r = model.references
        train_model = remat_call(model, [r.y_source, r.y_target, r.preint_flow, r.pos_flow, r.neg_flow])
    else:
        train_model = _training_model(model)
    scaled = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    variables = model.trainable_variables + sim.trainable_variables

    def replica_step(b):
        with tf.GradientTape() as tape:
            # source = I2 (T2w, subject b), target = I1 (T1w, subject a)
            moved2, moved1, v, pos, neg = train_model([b["img2"], b["img1"], b["lam"]], training=True)
            terms = sim.training_terms(b, moved2, moved1, pos, neg)
            l_reg = reg(v)
            per_sample = hyper_loss(b["lam"], terms["sim"], l_reg, alpha=alpha, reduce=False)
            loss = _per_replica_mean(strategy, per_sample, global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled_loss = optimizer.get_scaled_loss(loss) if scaled else loss
        grads = tape.gradient(scaled_loss, variables)
        if scaled:
            grads = optimizer.get_unscaled_gradients(grads)
        optimizer.apply_gradients([(g, w) for g, w in zip(grads, variables) if g is not None])
        out = {"loss": loss, "sim": _per_replica_mean(strategy, terms["sim"], global_batch),
               "reg": _per_replica_mean(strategy, l_reg, global_batch)}
        return out

    @tf.function(jit_compile=jit or None, autograph=False)   # nothing in the step needs autograph's conversion
    def step(batch):
        return _reduce_terms(strategy, strategy.run(replica_step, args=(batch,)))

    return step


def train_hyper(cfg: Config, loss, out_dir, train_arrays, **kwargs):
    """Train the λ-conditioned network (paper §2–3) with the similarity ``loss`` (a ``--loss`` name or its
    ``LossSpec``) on ``train_arrays`` = dict with stacks ``t1``, ``t2``
    (N, *inshape) and optional ``mask1``/``mask2``. Writes ``out_dir/{config.json, ckpt/, tb/, model.h5,
    heads1.h5, heads2.h5, card.json}``; returns the history (list of dicts). Keyword arguments: ae1, ae2,
    rand_ae, heads, iters, lr, batch_size, resume, strategy, conditioning, mixed_precision, xla, dns_model,
    progress, reg_penalty, command, validate, monitor, overwrite. ``heads``: a folder with ``heads1.h5``/``heads2.h5`` to start the
    PatchNCE heads from (SupPretrain, paper §3). ``validate(model) -> float``: called at every checkpoint, its
    value logged to ``val_curve.csv`` (Fig. 3 col. 4). ``monitor = (fn, rule)``: ``fn(model) -> float`` logged to
    ``monitor_curve.csv`` at every checkpoint; training ends when that curve meets ``rule`` (a ``config.PlateauRule``,
    ``training.plateau``) or at ``iters``; the card says which. An ``out_dir`` that holds a run is refused unless
    ``resume`` names the same run or ``overwrite`` is set (``runs.prepare_run_dir``, checked before anything is
    written). ``out_dir`` is locked for the run (``lock.py``: a second run into it is refused).
    ``strategy="multiworker"``: every worker of the ``TF_CONFIG`` cluster calls this with the same arguments and
    ``out_dir``; only the chief writes into it (``loop.run_loop``)."""
    if kwargs.get("strategy") == "multiworker":
        get_strategy("multiworker")  # first: it names this worker's lock (train.lock on the chief only)
    with out_dir_lock(out_dir, kwargs.get("command")):
        return _train_hyper(cfg, LossSpec.parse(loss), out_dir, train_arrays, **kwargs)


@dataclasses.dataclass
class RegistrationSetup:
    """Everything one training run of the λ-conditioned network needs, built in a fixed order (so the same
    seed gives the same initial weights): what ``train_hyper`` runs and what ``bench/bench_steps.py`` times."""
    model: tf.keras.Model
    heads1: object
    heads2: object
    sim: object                   # losses.similarity.BidirSimilarity
    optimizer: tf.keras.optimizers.Optimizer
    ckpt: tf.train.Checkpoint
    step: object                  # tf.function: batch dict -> dict of scalar terms
    sampler: PairSampler
    strategy: tf.distribute.Strategy
    lr: float
    batch_size: int


def setup_registration(cfg: Config, loss, train_arrays, ae1=None, ae2=None, rand_ae=False, lr=None,
                       batch_size=None, strategy="default", conditioning="film", mixed_precision=False, xla=False,
                       dns_model=None, reg_penalty=None, heads=None, remat=False) -> RegistrationSetup:
    """Model, heads, similarity, Adam, checkpoint, the traced step and the pair sampler for ``loss`` (a
    ``--loss`` name, parsed here once, or its ``LossSpec``).
    ``heads``: folder of pretrained ``heads1.h5``/``heads2.h5`` (SupPretrain) for a contrastive loss.
    Memory switches (``networks/memory.py``, off = the paper's setting): ``mixed_precision`` = the U-Net in
    float16 (integration, warps, autoencoders, heads and losses float32; dynamic loss scaling), ``remat`` =
    full-resolution U-Net blocks recomputed in the backward pass, ``xla`` = the step XLA-compiled."""
    spec = LossSpec.parse(loss)
    lr = float(lr or cfg.lr)
    batch_size = int(batch_size or cfg.batch_size)
    if tuple(train_arrays["t1"].shape[1:]) != tuple(cfg.inshape):
        raise ContraRegInputError(f"training images have shape {tuple(train_arrays['t1'].shape[1:])} but the "
                                  f"config expects {tuple(cfg.inshape)}")
    # the global policy stays float32: only the U-Net is built in float16 (build_options below), so the
    # autoencoders, heads, PatchNCE logits / τ and MI histograms built after it stay float32
    set_mixed_precision(False)
    strat = get_strategy(strategy)
    tf.keras.utils.set_random_seed(cfg.seed)  # same initial weights for the same seed (exact resume / re-runs)
    with strat.scope():
        rng = tf.random.Generator.from_seed(cfg.seed)
        with build_options(mixed_precision=mixed_precision):
            probes = tuple(np.asarray(train_arrays[m][:AE_LAYOUT_PROBES], np.float32) for m in ("t1", "t2"))
            model, heads1, heads2, sim = build_components(cfg, spec, ae1, ae2, rand_ae, conditioning,
                                                          dns_model, rng=rng, probes=probes)
        if heads is not None:
            if heads1 is None:
                raise ContraRegInputError(f"--heads: loss {spec.name!r} has no PatchNCE heads")
            load_trained_heads(heads, heads1, heads2)
        optimizer = tf.keras.optimizers.Adam(lr)
        if mixed_precision:  # float16 gradients underflow without it (Keras's dynamic loss scaling)
            optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables + sim.trainable_variables)
        step_var = tf.Variable(0, dtype=tf.int64, name="step", trainable=False)
        objs = {"model": model, "optimizer": optimizer, "step": step_var, "rng": rng, **sim.checkpoint_items()}
        ckpt = tf.train.Checkpoint(**objs)
        reg = velocity_regulariser(reg_penalty or cfg.reg_penalty)
        step = make_train_step(model, sim, reg, spec.alpha(cfg), optimizer, strat,
                               global_batch=batch_size, jit=xla, remat=remat)
    if spec.needs_labels and train_arrays.get("labels") is None:
        raise ContraRegInputError(f"loss {spec.name!r} needs label maps of the training subjects")
    sampler = PairSampler(train_arrays["t1"], train_arrays["t2"], train_arrays.get("mask1"),
                          train_arrays.get("mask2"), batch_size=batch_size, seed=cfg.seed, ext=spec.needs_ext,
                          labels=train_arrays.get("labels") if spec.needs_labels else None,
                          with_labels=spec.needs_labels)
    return RegistrationSetup(model, heads1, heads2, sim, optimizer, ckpt, step, sampler, strat, lr, batch_size)


def _train_hyper(cfg: Config, spec: LossSpec, out_dir, train_arrays, ae1=None, ae2=None, rand_ae=False, iters=None,
                 lr=None, batch_size=None, resume=False, strategy="default", conditioning="film",
                 mixed_precision=False, xla=False, dns_model=None, progress=True, reg_penalty=None,
                 command=None, heads=None, validate=None, monitor=None, overwrite=False, remat=False):
    iters = int(cfg.iters if iters is None else iters)
    os.makedirs(out_dir, exist_ok=True)
    s = setup_registration(cfg, spec, train_arrays, ae1, ae2, rand_ae, lr, batch_size, strategy, conditioning,
                           mixed_precision, xla, dns_model, reg_penalty, heads, remat=remat)
    lr, batch_size, model, heads1, heads2 = s.lr, s.batch_size, s.model, s.heads1, s.heads2
    meta = {"config": dataclasses.asdict(cfg), "loss": spec.name, "conditioning": conditioning,
            "rand_ae": bool(rand_ae), "ae1": str(ae1) if isinstance(ae1, (str, os.PathLike)) else None,
            "ae2": str(ae2) if isinstance(ae2, (str, os.PathLike)) else None, "lr": lr, "iters": iters,
            "batch_size": batch_size, "reg_penalty": reg_penalty or cfg.reg_penalty, "command": command,
            "heads_init": str(heads) if heads is not None else None}
    spacing = data_spacing(train_arrays, len(cfg.inshape))
    if spacing is not None:      # register.py runs the model at this voxel size (inference.model_window)
        meta["data_spacing"] = spacing
    chief = is_chief(s.strategy)  # multi-worker: the other workers train in lock-step but write nothing here
    heads_files = [os.path.join(heads, n) for n in ("heads1.h5", "heads2.h5")] if heads is not None else []
    if chief:   # the other workers of a multi-worker run would find the chief's config.json and refuse
        prepare_run_dir(out_dir, meta, resume, overwrite, inputs=[a for a in (ae1, ae2, dns_model)
                                                                  if isinstance(a, (str, os.PathLike))] + heads_files)
        write_json(os.path.join(out_dir, "config.json"), meta)
    t0 = time.time()
    on_checkpoint = any_callback(
        val_curve_callback(out_dir, model, validate) if validate else None,
        val_curve_callback(out_dir, model, monitor[0], "monitor_curve.csv", rule=monitor[1]) if monitor else None)
    history = run_loop(s.step, s.sampler.batch, s.ckpt, out_dir, iters, cfg.ckpt_every, s.strategy, resume,
                       progress, desc=f"train {spec.name}", on_checkpoint=on_checkpoint)
    elapsed = time.time() - t0
    final_step = int(s.ckpt.step.numpy())
    if monitor:
        meta["stopped"] = {"step": final_step, "reason": "plateau" if final_step < iters else "cap",
                           "rule": dataclasses.asdict(monitor[1])}
    if chief:
        save_trained(out_dir, model, heads1, heads2)
        card = dict(meta, steps_run=len(history), seconds=round(elapsed, 2),
                    final=history[-1] if history else None,
                    sec_per_step=round(elapsed / max(1, len(history)), 4), peak_rss_mb=peak_rss_mb(),
                    lambda_use=lambda_use(model))
        if card["lambda_use"]["flat_up_to"] >= 1.0:
            card["warnings"] = [f"the λ-conditioning collapsed: one registration for every λ in [0, 1] (no unit "
                                f"of the hypernetwork's first layer responds to λ); the run is not λ-conditioned"]
            warnings.warn(ContraRegWarning(f"{out_dir}: {card['warnings'][0]}"))
        write_json(os.path.join(out_dir, "card.json"), card)
    return history
