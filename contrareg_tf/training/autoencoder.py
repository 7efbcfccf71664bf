"""Autoencoder pretraining (paper §3: A1 / A2, L1 + local NCC on random crops) and SupPretrain (A1, A2, F1, F2
jointly on aligned same-subject pairs)."""
import os
import time

import numpy as np
import tensorflow as tf
import voxelmorph as vxm

from ..atomic import write_json
from ..config import PAPER, Config
from ..data import augment
from ..losses.patchnce import PatchNCE
from ..networks.autoencoder import build_autoencoder, feature_channels, save_autoencoder
from ..networks.heads import build_heads
from ..runs import save_trained_heads
from .loop import run_loop, step_rng


# --------------------------------------------------------------------------------------------------------------
# autoencoder pretraining (paper §3) and SupPretrain
# --------------------------------------------------------------------------------------------------------------
def reconstruction_loss(x, recon, win=PAPER.ae_ncc_win):
    """Per-sample L1 + local NCC (window 7) (paper §3; vxm's NCC loss is −NCC)."""
    ndim = len(x.shape) - 2
    l1 = tf.reduce_mean(tf.abs(x - recon), axis=list(range(1, ndim + 2)))
    ncc = vxm.losses.NCC(win=[win] * ndim).loss(x, recon)
    return l1 + tf.reshape(ncc, [-1])


def _augment_batch(images, step, seed, crop, batch_size, stream=0):
    rng = step_rng(seed, step, stream)
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
        rng = step_rng(cfg.seed, i, 2)
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
