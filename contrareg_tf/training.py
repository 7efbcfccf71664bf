"""Training loops (paper §3): the λ-conditioned registration network and autoencoder pretraining.

Both loops share ``run_loop``: a ``tf.function`` step, a tqdm bar with the loss terms and it/s, TensorBoard
scalars, checkpoints (weights + optimizer moments + step + RNG state) every ``ckpt_every`` steps, exact resume,
and a hard stop on a NaN/Inf loss that keeps the last good checkpoint.

Exact resume: every random choice of a step (which subjects form the pair, λ ~ U[0,1], augmentation) is a
pure function of ``(seed, step)``, and the PatchNCE locations come from a ``tf.random.Generator`` whose state
is checkpointed, so a resumed run draws exactly what the uninterrupted run would have drawn.
(``tf.random.set_seed`` per step would also do it, but it clears TF's kernel caches: 10× slower steps.)
"""
import dataclasses
import math
import os
import time

import numpy as np
import tensorflow as tf

from .atomic import write_json
from .config import PAPER, Config
from .errors import ContraRegInputError, TrainingDiverged  # noqa: F401  (re-exported)
from .runs import data_spacing, save_trained, save_trained_heads


# --------------------------------------------------------------------------------------------------------------
# distribution, precision
# --------------------------------------------------------------------------------------------------------------
def get_strategy(name="default"):
    """``default`` | ``mirrored`` (all local GPUs, or CPUs when none) | ``multiworker`` (TF_CONFIG)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ContraRegInputError(f"unknown strategy {name!r}; choose default, mirrored or multiworker")


def set_mixed_precision(enabled):
    """Keras mixed_float16 policy (GPU only; off on CPU where it only slows things down)."""
    policy = "mixed_float16" if enabled else "float32"
    tf.keras.mixed_precision.set_global_policy(policy)


# --------------------------------------------------------------------------------------------------------------
# step-keyed data
# --------------------------------------------------------------------------------------------------------------
def _rng(seed, step, stream):
    return np.random.default_rng([int(seed), int(step), int(stream)])


class PairSampler:
    """Inter-subject pairs (I1 = T1w of subject a, I2 = T2w of subject b ≠ a), λ ~ U[0,1] per sample and,
    for ExtNegs, a third subject c's T1w/T2w. ``batch(step)`` is a pure function of (seed, step)."""

    def __init__(self, t1, t2, mask1=None, mask2=None, batch_size=1, seed=0, ext=False):
        t1, t2 = np.asarray(t1, np.float32), np.asarray(t2, np.float32)
        if t1.shape != t2.shape:
            raise ContraRegInputError(f"T1w stack {t1.shape} and T2w stack {t2.shape} differ in shape")
        n = t1.shape[0]
        if n < (3 if ext else 2):
            raise ContraRegInputError(f"need at least {3 if ext else 2} subjects for inter-subject pairs, got {n}")
        self.t1, self.t2 = t1[..., None], t2[..., None]
        self.m1 = (np.asarray(mask1, np.float32) if mask1 is not None else (t1 > 0).astype(np.float32))[..., None]
        self.m2 = (np.asarray(mask2, np.float32) if mask2 is not None else (t2 > 0).astype(np.float32))[..., None]
        self.n, self.batch_size, self.seed, self.ext = n, batch_size, seed, ext

    def batch(self, step):
        rng = _rng(self.seed, step, 0)
        a = rng.integers(0, self.n, self.batch_size)
        b = (a + rng.integers(1, self.n, self.batch_size)) % self.n          # b != a
        out = {"img1": self.t1[a], "img2": self.t2[b], "mask1": self.m1[a], "mask2": self.m2[b],
               "lam": rng.uniform(0.0, 1.0, (self.batch_size, 1)).astype(np.float32)}
        if self.ext:
            c = rng.integers(0, self.n, self.batch_size)
            for i in range(self.batch_size):
                while c[i] == a[i] or c[i] == b[i]:
                    c[i] = (c[i] + 1) % self.n
            out["ext1"], out["ext2"] = self.t1[c], self.t2[c]
        return out


# --------------------------------------------------------------------------------------------------------------
# the shared loop
# --------------------------------------------------------------------------------------------------------------
def _distribute(strategy, batch):
    """Split a numpy batch across replicas (identity for the default strategy)."""
    n = strategy.num_replicas_in_sync
    if n == 1:
        return {k: tf.convert_to_tensor(v) for k, v in batch.items()}

    def value_fn(ctx):
        i = ctx.replica_id_in_sync_group
        return {k: tf.convert_to_tensor(np.array_split(v, n)[i]) for k, v in batch.items()}

    return strategy.experimental_distribute_values_from_function(value_fn)


def run_loop(step_fn, batch_fn, ckpt, out_dir, iters, ckpt_every, strategy=None, resume=False, progress=True,
             desc="train", log_every=1):
    """Run ``step_fn(batch) -> dict of scalar tensors`` (must contain ``'loss'``) from the checkpoint's step
    to ``iters``. Returns the history (list of dicts); raises ``TrainingDiverged`` on a NaN/Inf loss."""
    from tqdm.auto import tqdm

    strategy = strategy or tf.distribute.get_strategy()
    manager = tf.train.CheckpointManager(ckpt, os.path.join(out_dir, "ckpt"), max_to_keep=3)
    if resume and manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    elif resume:
        raise ContraRegInputError(f"--resume: no checkpoint found in {os.path.join(out_dir, 'ckpt')}")
    start = int(ckpt.step.numpy())
    writer = tf.summary.create_file_writer(os.path.join(out_dir, "tb"))
    history = []
    bar = tqdm(range(start, iters), initial=start, total=iters, desc=desc, disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        try:
            terms = step_fn(_distribute(strategy, batch_fn(step)))
            terms = {k: float(v) for k, v in terms.items()}
        except tf.errors.InvalidArgumentError as e:
            # a NaN velocity turns into out-of-range gather indices inside vxm's interpolation
            if "indices" not in str(e) and "NaN" not in str(e) and "Inf" not in str(e):
                raise
            terms = {"loss": float("nan")}
        if not all(math.isfinite(v) for v in terms.values()):
            last = manager.latest_checkpoint or "none (no checkpoint was written yet)"
            bar.close()
            raise TrainingDiverged(f"non-finite loss at step {step} ({terms}); stopped. Last good checkpoint "
                                   f"kept: {last}")
        ckpt.step.assign(step + 1)
        history.append({"step": step + 1, **terms})
        if (step + 1) % log_every == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()})
            with writer.as_default():
                for k, v in terms.items():
                    tf.summary.scalar(k, v, step=step + 1)
        if (step + 1) % ckpt_every == 0 or step + 1 == iters:
            manager.save(checkpoint_number=step + 1)
    bar.close()
    writer.flush()
    return history


def _per_replica_mean(strategy, per_sample, global_batch):
    if strategy.num_replicas_in_sync == 1:
        return tf.reduce_mean(per_sample)
    return tf.nn.compute_average_loss(per_sample, global_batch_size=global_batch)


def _reduce_terms(strategy, terms):
    if strategy.num_replicas_in_sync == 1:
        return terms
    return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in terms.items()}


# --------------------------------------------------------------------------------------------------------------
# λ-conditioned registration (paper §2)
# --------------------------------------------------------------------------------------------------------------
def build_components(cfg, loss_name, ae1=None, ae2=None, rand_ae=False, conditioning="film", dns_model=None,
                     rng=None):
    """Model, head sets and the bidirectional similarity for ``loss_name`` (call inside a strategy scope).
    ``rng``: a ``tf.random.Generator`` for the PatchNCE locations (checkpointed, so resume is exact)."""
    from .losses.similarity import LossSpec, build_similarity
    from .networks import autoencoder as ae_mod
    from .networks.heads import build_heads
    from .networks.hyper import build_hyper_vxm

    ndim = len(cfg.inshape)
    model = build_hyper_vxm(cfg, conditioning=conditioning)
    heads1 = heads2 = None
    if LossSpec.parse(loss_name).contrastive:
        aes = []
        for k, src in enumerate((ae1, ae2)):
            if rand_ae:
                a = ae_mod.random_autoencoder(ndim, seed=cfg.seed + k, filters=cfg.ae_filters)
            elif isinstance(src, (str, os.PathLike)):
                a = ae_mod.load_autoencoder(src, ndim, filters=cfg.ae_filters)
            elif src is None:
                raise ContraRegInputError(f"loss {loss_name!r} needs --ae1/--ae2 autoencoder weights or --rand-ae")
            else:
                a = src
            aes.append(ae_mod.freeze(a))
        ae1, ae2 = aes
        chans = ae_mod.feature_channels(cfg.ae_filters, cfg.ae_nb_feature_layers)
        heads1 = build_heads(chans, units=cfg.head_units, nb_layers=cfg.head_layers, name="heads1")
        heads2 = build_heads(chans, units=cfg.head_units, nb_layers=cfg.head_layers, name="heads2")
    sim = build_similarity(loss_name, cfg, ae1, ae2, heads1, heads2, dns_model=dns_model, seed=rng)
    return model, heads1, heads2, sim


def _training_model(model):
    r = model.references
    return tf.keras.Model(model.inputs, [r.y_source, r.y_target, r.preint_flow, r.pos_flow, r.neg_flow])


def make_train_step(model, sim, reg, alpha, optimizer, strategy, global_batch, jit=False):
    """One Adam step on α(1−λ)·L_sim + λ·L_reg (+ FiLM weight decay), per-sample λ; ``sim`` (a
    ``BidirSimilarity``) takes what it needs from the batch (masks, ExtNegs images)."""
    from .losses.objective import hyper_loss

    train_model = _training_model(model)
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
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients([(g, w) for g, w in zip(grads, variables) if g is not None])
        out = {"loss": loss, "sim": _per_replica_mean(strategy, terms["sim"], global_batch),
               "reg": _per_replica_mean(strategy, l_reg, global_batch)}
        return out

    @tf.function(jit_compile=jit or None)
    def step(batch):
        return _reduce_terms(strategy, strategy.run(replica_step, args=(batch,)))

    return step


def train_hyper(cfg: Config, loss_name, out_dir, train_arrays, **kwargs):
    """Train the λ-conditioned network (paper §2–3) on ``train_arrays`` = dict with stacks ``t1``, ``t2``
    (N, *inshape) and optional ``mask1``/``mask2``. Writes ``out_dir/{config.json, ckpt/, tb/, model.h5,
    heads1.h5, heads2.h5, card.json}``; returns the history (list of dicts). Keyword arguments: ae1, ae2,
    rand_ae, iters, lr, batch_size, resume, strategy, conditioning, mixed_precision, xla, dns_model, progress,
    reg_penalty, command. ``out_dir`` is locked for the run (``lock.py``: a second run into it is refused)."""
    from .lock import out_dir_lock

    with out_dir_lock(out_dir, kwargs.get("command")):
        return _train_hyper(cfg, loss_name, out_dir, train_arrays, **kwargs)


def _train_hyper(cfg: Config, loss_name, out_dir, train_arrays, ae1=None, ae2=None, rand_ae=False, iters=None,
                 lr=None, batch_size=None, resume=False, strategy="default", conditioning="film",
                 mixed_precision=False, xla=False, dns_model=None, progress=True, reg_penalty=None,
                 command=None):
    from .losses.objective import velocity_regulariser
    from .losses.similarity import LossSpec

    iters = int(cfg.iters if iters is None else iters)
    lr = float(lr or cfg.lr)
    batch_size = int(batch_size or cfg.batch_size)
    os.makedirs(out_dir, exist_ok=True)
    if tuple(train_arrays["t1"].shape[1:]) != tuple(cfg.inshape):
        raise ContraRegInputError(f"training images have shape {tuple(train_arrays['t1'].shape[1:])} but the "
                                  f"config expects {tuple(cfg.inshape)}")
    set_mixed_precision(mixed_precision)
    strat = get_strategy(strategy)
    spec = LossSpec.parse(loss_name)
    tf.keras.utils.set_random_seed(cfg.seed)  # same initial weights for the same seed (exact resume / re-runs)
    with strat.scope():
        rng = tf.random.Generator.from_seed(cfg.seed)
        model, heads1, heads2, sim = build_components(cfg, loss_name, ae1, ae2, rand_ae, conditioning, dns_model,
                                                      rng=rng)
        optimizer = tf.keras.optimizers.Adam(lr)
        optimizer.build(model.trainable_variables + sim.trainable_variables)
        step_var = tf.Variable(0, dtype=tf.int64, name="step", trainable=False)
        objs = {"model": model, "optimizer": optimizer, "step": step_var, "rng": rng}
        if heads1 is not None:
            objs.update({f"heads1_{k}": h for k, h in enumerate(heads1)})
            objs.update({f"heads2_{k}": h for k, h in enumerate(heads2)})
        ckpt = tf.train.Checkpoint(**objs)
        reg = velocity_regulariser(reg_penalty or cfg.reg_penalty)
        step = make_train_step(model, sim, reg, spec.alpha(cfg), optimizer, strat,
                               global_batch=batch_size, jit=xla)
    meta = {"config": dataclasses.asdict(cfg), "loss": loss_name, "conditioning": conditioning,
            "rand_ae": bool(rand_ae), "ae1": str(ae1) if isinstance(ae1, (str, os.PathLike)) else None,
            "ae2": str(ae2) if isinstance(ae2, (str, os.PathLike)) else None, "lr": lr, "iters": iters,
            "batch_size": batch_size, "reg_penalty": reg_penalty or cfg.reg_penalty, "command": command}
    spacing = data_spacing(train_arrays, len(cfg.inshape))
    if spacing is not None:      # register.py runs the model at this voxel size (inference.model_window)
        meta["data_spacing"] = spacing
    write_json(os.path.join(out_dir, "config.json"), meta)
    sampler = PairSampler(train_arrays["t1"], train_arrays["t2"], train_arrays.get("mask1"),
                          train_arrays.get("mask2"), batch_size=batch_size, seed=cfg.seed, ext=spec.needs_ext)

    t0 = time.time()
    history = run_loop(step, sampler.batch, ckpt, out_dir, iters, cfg.ckpt_every, strat, resume, progress,
                       desc=f"train {loss_name}")
    elapsed = time.time() - t0
    save_trained(out_dir, model, heads1, heads2)
    card = dict(meta, steps_run=len(history), seconds=round(elapsed, 2),
                final=history[-1] if history else None,
                sec_per_step=round(elapsed / max(1, len(history)), 4))
    write_json(os.path.join(out_dir, "card.json"), card)
    return history


# --------------------------------------------------------------------------------------------------------------
# autoencoder pretraining (paper §3) and SupPretrain
# --------------------------------------------------------------------------------------------------------------
def reconstruction_loss(x, recon, win=PAPER.ae_ncc_win):
    """Per-sample L1 + local NCC (window 7) (paper §3; vxm's NCC loss is −NCC)."""
    import voxelmorph as vxm

    ndim = len(x.shape) - 2
    l1 = tf.reduce_mean(tf.abs(x - recon), axis=list(range(1, ndim + 2)))
    ncc = vxm.losses.NCC(win=[win] * ndim).loss(x, recon)
    return l1 + tf.reshape(ncc, [-1])


def _augment_batch(images, step, seed, crop, batch_size, stream=0):
    from .data import augment

    rng = _rng(seed, step, stream)
    idx = rng.integers(0, images.shape[0], batch_size)
    out = []
    for i in idx:
        x = images[i]
        x = augment.random_crop(x, crop, rng) if tuple(crop) != tuple(x.shape) else x
        x = augment.random_flip(x, rng)
        x = augment.intensity_jitter(x, rng)
        out.append(x)
    return np.stack(out)[..., None].astype(np.float32), idx


def train_autoencoder(cfg: Config, images, out_path, modality="t1", iters=None, lr=None, batch_size=None,
                      resume=False, progress=True, seed=None, command=None):
    """Pretrain one modality's autoencoder on random crops (``cfg.ae_crop``) with flips and intensity
    jitter; L1 + local NCC. Writes ``out_path`` (.h5) and ``out_path`` with ``.json`` (model card)."""
    from .networks.autoencoder import build_autoencoder, save_autoencoder

    images = np.asarray(images, np.float32)
    ndim = images.ndim - 1
    iters = int(cfg.iters if iters is None else iters)
    lr = float(cfg.ae_lr if lr is None else lr)
    batch_size = int(batch_size or cfg.batch_size)
    seed = cfg.seed if seed is None else seed
    crop = tuple(min(c, s) for c, s in zip(cfg.ae_crop, images.shape[1:]))
    work = os.path.splitext(out_path)[0] + "_work"
    os.makedirs(work, exist_ok=True)
    tf.keras.utils.set_random_seed(seed)
    ae = build_autoencoder(ndim, filters=cfg.ae_filters, nb_features=cfg.ae_nb_feature_layers, name=f"ae_{modality}")
    opt = tf.keras.optimizers.Adam(lr)
    opt.build(ae.trainable_variables)
    ckpt = tf.train.Checkpoint(model=ae, optimizer=opt, step=tf.Variable(0, dtype=tf.int64, trainable=False))

    @tf.function
    def step(b):
        with tf.GradientTape() as tape:
            recon = ae(b["x"], training=True)[0]
            loss = tf.reduce_mean(reconstruction_loss(b["x"], recon, cfg.ae_ncc_win))
        grads = tape.gradient(loss, ae.trainable_variables)
        opt.apply_gradients(zip(grads, ae.trainable_variables))
        return {"loss": loss}

    t0 = time.time()
    history = run_loop(step, lambda i: {"x": _augment_batch(images, i, seed, crop, batch_size)[0]}, ckpt, work,
                       iters, max(1, min(cfg.ckpt_every, iters)), None, resume, progress, desc=f"AE {modality}")
    save_autoencoder(ae, out_path)
    card = {"modality": modality, "preset": cfg.name, "iters": iters, "lr": lr, "batch_size": batch_size,
            "crop": crop, "filters": cfg.ae_filters, "loss": "L1 + local NCC (win %d)" % cfg.ae_ncc_win,
            "final_loss": history[-1]["loss"] if history else None, "seconds": round(time.time() - t0, 1),
            "n_images": int(images.shape[0]), "image_shape": list(images.shape[1:]), "command": command}
    write_json(os.path.splitext(out_path)[0] + ".json", card)
    return ae, history


def train_sup_pretrain(cfg: Config, arrays, out_dir, iters=None, lr=None, batch_size=None, resume=False,
                       progress=True, command=None, lam_sp=None):
    """SupPretrain (paper §3): A1, A2, F1, F2 trained jointly on aligned same-subject pairs with
    λsp·d12(I1, I2) + Σ_i (L1 + NCC)(I_i, Î_i), λsp = 0.1. Writes ``ae_t1.h5``, ``ae_t2.h5``,
    ``heads1.h5``, ``heads2.h5`` and ``card.json`` in ``out_dir``."""
    from .losses.patchnce import PatchNCE
    from .networks.autoencoder import build_autoencoder, feature_channels, save_autoencoder
    from .networks.heads import build_heads

    t1, t2 = np.asarray(arrays["t1"], np.float32), np.asarray(arrays["t2"], np.float32)
    ndim = t1.ndim - 1
    iters = int(cfg.iters if iters is None else iters)
    lr = float(cfg.ae_lr if lr is None else lr)
    lam_sp = float(cfg.lam_sp if lam_sp is None else lam_sp)
    batch_size = int(batch_size or cfg.batch_size)
    os.makedirs(out_dir, exist_ok=True)
    tf.keras.utils.set_random_seed(cfg.seed)
    ae1 = build_autoencoder(ndim, filters=cfg.ae_filters, nb_features=cfg.ae_nb_feature_layers, name="ae_t1")
    ae2 = build_autoencoder(ndim, filters=cfg.ae_filters, nb_features=cfg.ae_nb_feature_layers, name="ae_t2")
    chans = feature_channels(cfg.ae_filters, cfg.ae_nb_feature_layers)
    heads1 = build_heads(chans, units=cfg.head_units, nb_layers=cfg.head_layers, name="heads1")
    heads2 = build_heads(chans, units=cfg.head_units, nb_layers=cfg.head_layers, name="heads2")
    rng = tf.random.Generator.from_seed(cfg.seed)
    d12 = PatchNCE(ae1, heads1, ae2, heads2, num_patches=cfg.num_patches, tau=cfg.nce_tau, seed=rng,
                   freeze_autoencoders=False)
    variables = (ae1.trainable_variables + ae2.trainable_variables
                 + [v for h in heads1 + heads2 for v in h.trainable_variables])
    opt = tf.keras.optimizers.Adam(lr)
    opt.build(variables)
    objs = {"ae1": ae1, "ae2": ae2, "optimizer": opt, "step": tf.Variable(0, dtype=tf.int64, trainable=False),
            "rng": rng}
    objs.update({f"heads1_{k}": h for k, h in enumerate(heads1)})
    objs.update({f"heads2_{k}": h for k, h in enumerate(heads2)})
    ckpt = tf.train.Checkpoint(**objs)

    @tf.function
    def step(b):
        with tf.GradientTape() as tape:
            nce = tf.reduce_mean(d12.loss(b["x1"], b["x2"]))
            rec = tf.reduce_mean(reconstruction_loss(b["x1"], ae1(b["x1"], training=True)[0], cfg.ae_ncc_win)
                                 + reconstruction_loss(b["x2"], ae2(b["x2"], training=True)[0], cfg.ae_ncc_win))
            loss = lam_sp * nce + rec
        grads = tape.gradient(loss, variables)
        opt.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
        return {"loss": loss, "nce": nce, "rec": rec}

    def batch_fn(i):
        rng = _rng(cfg.seed, i, 2)
        idx = rng.integers(0, t1.shape[0], batch_size)   # same subject: aligned T1w/T2w
        return {"x1": t1[idx][..., None], "x2": t2[idx][..., None]}

    t0 = time.time()
    history = run_loop(step, batch_fn, ckpt, out_dir, iters, max(1, min(cfg.ckpt_every, iters)), None, resume,
                       progress, desc="SupPretrain")
    save_autoencoder(ae1, os.path.join(out_dir, "ae_t1.h5"))
    save_autoencoder(ae2, os.path.join(out_dir, "ae_t2.h5"))
    save_trained_heads(out_dir, heads1, heads2)
    write_json(os.path.join(out_dir, "card.json"), {
        "what": "SupPretrain A1, A2, F1, F2", "lam_sp": lam_sp, "preset": cfg.name, "iters": iters, "lr": lr,
        "final": history[-1] if history else None, "seconds": round(time.time() - t0, 1), "command": command})
    return history
