"""MASR-Net training (DNS paper §3.3): anatomy-aware contrastive learning on single images. Each step: one
random training image (T1w and T2w alike, optionally a random crop centred near a foreground voxel), its
Bézier-augmented copy (3 random monotone control points, inversion with probability δ = 0.5), N^k = 8196
foreground locations, InfoNCE at τ = 0.07 between the descriptors of the two (``networks.masr.contrastive_loss``);
Adam 1e-4, batch 1. Defaults: ``config.DNSConfig``."""
import os
import time

import numpy as np
import tensorflow as tf

from ..config import DNS_PAPER
from ..data.augment import bezier_intensity
from ..errors import ContraRegInputError
from ..networks.masr import build_masr, check_image, contrastive_loss, get_config, save_masr
from .loop import run_loop, step_rng


def _bezier(x, rng):
    return np.clip(np.asarray(bezier_intensity(x, rng, n_ctrl=DNS_PAPER.bezier_points,
                                               invert_prob=DNS_PAPER.invert_prob), np.float32), 0.0, 1.0)


def _random_crop(img, mask, crop, rng):
    if crop is None:
        return img, mask
    crop = tuple(int(c) for c in crop)
    if len(crop) != img.ndim or any(c > s for c, s in zip(crop, img.shape)):
        raise ContraRegInputError(f"crop {crop} does not fit image shape {img.shape}")
    fg = np.argwhere(mask)                                 # centre the crop on a random foreground voxel
    centre = fg[int(rng.integers(len(fg)))] if len(fg) else np.array(img.shape) // 2
    start = [int(np.clip(int(p) - c // 2 + int(rng.integers(-(c // 4), c // 4 + 1)), 0, s - c))
             for p, s, c in zip(centre, img.shape, crop)]
    sl = tuple(slice(a, a + c) for a, c in zip(start, crop))
    return img[sl], mask[sl]


def _loss_curve(history, n_blocks=10):
    """Mean loss of ``n_blocks`` consecutive blocks of steps: [[first step, last step, mean], ...]."""
    if not history:
        return []
    edges = np.unique(np.linspace(0, len(history), n_blocks + 1).astype(int))
    return [[int(a), int(b - 1), round(float(np.mean(history[a:b])), 4)] for a, b in zip(edges[:-1], edges[1:])]


def train_masr(images, masks=None, iters=100, lr=None, num_samples=None, tau=None, seed=0, crop=None, model=None,
               build_kwargs=None, progress=True, out=None, card=None, max_seconds=None, resume=False,
               ckpt_every=100):
    """Anatomy-aware contrastive training of MASR-Net on single images (§3.3).

    images: list of (*vol,) float arrays in [0, 1] (T1w and T2w alike); masks: matching foreground masks
    (default: image > 0). Each step: one random image (optionally a random ``crop``), its Bézier-augmented
    copy, ``num_samples`` foreground locations (without replacement; all of them if fewer), InfoNCE at τ.
    ``max_seconds``: stop early after this much wall time (the card records the steps done).
    Runs on the shared loop (``training.loop.run_loop``): with ``out`` (.h5) checkpoints and TensorBoard go to
    ``<out>_work/`` every ``ckpt_every`` steps, ``resume`` continues from there exactly, and a NaN/Inf loss
    stops with ``TrainingDiverged``. lr / num_samples / tau default to ``config.DNS_PAPER``.
    Returns (model, history) with history = list of per-step losses. ``out``: weights + JSON card."""
    lr = float(DNS_PAPER.lr if lr is None else lr)
    num_samples = int(DNS_PAPER.num_samples if num_samples is None else num_samples)
    tau = float(DNS_PAPER.tau if tau is None else tau)
    if not images:
        raise ContraRegInputError("train_masr: no training images")
    images = [np.asarray(im, np.float32) for im in images]
    ndim = images[0].ndim
    if ndim not in (2, 3) or any(im.ndim != ndim for im in images):
        raise ContraRegInputError(f"train_masr: images must all be 2-D or all 3-D, got "
                                  f"{sorted({im.ndim for im in images})}-D")
    for i, im in enumerate(images):
        if not np.isfinite(im).all():
            raise ContraRegInputError(f"train_masr: image {i} contains NaN/Inf")
        if im.min() < 0 or im.max() > 1:
            raise ContraRegInputError(f"train_masr: image {i} intensities must lie in [0, 1] "
                                      f"(got [{im.min():.3g}, {im.max():.3g}])")
    masks = [im > 0 for im in images] if masks is None else [np.asarray(m) > 0 for m in masks]
    if len(masks) != len(images):
        raise ContraRegInputError(f"train_masr: {len(images)} images but {len(masks)} masks")
    for i, (im, m) in enumerate(zip(images, masks)):
        if m.shape != im.shape:
            raise ContraRegInputError(f"train_masr: mask {i} shape {m.shape} != image shape {im.shape}")
        if not m.any():
            raise ContraRegInputError(f"train_masr: mask {i} is empty")
    for im in images:
        check_image(im[None, ..., None] if crop is None else np.zeros((1,) + tuple(crop) + (1,), np.float32),
                    ndim, name="training image" if crop is None else "crop")

    tf.keras.utils.set_random_seed(seed)
    model = model if model is not None else build_masr(ndim, **(build_kwargs or {}))
    opt = tf.keras.optimizers.Adam(lr)
    opt.build(model.trainable_variables)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt, step=tf.Variable(0, dtype=tf.int64, trainable=False))
    img_spec = tf.TensorSpec((1,) + (None,) * ndim + (1,), tf.float32)

    @tf.function(input_signature=[img_spec, img_spec, tf.TensorSpec((None,), tf.int32)])
    def _step(x, x_aug, idx):
        with tf.GradientTape() as tape:
            d = model(tf.concat([x, x_aug], axis=0), training=True)
            flat = tf.reshape(d, [2, -1, tf.shape(d)[-1]])
            loss = contrastive_loss(tf.gather(flat[0], idx), tf.gather(flat[1], idx), tau)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return {"loss": loss}

    def batch(step):              # a pure function of (seed, step): exact resume
        rng = step_rng(seed, step, 3)
        k = int(rng.integers(len(images)))
        img, m = _random_crop(images[k], masks[k], crop, rng)
        if not m.any():
            m = np.ones_like(m)
        fg = np.flatnonzero(m.ravel())
        idx = rng.choice(fg, size=min(num_samples, fg.size), replace=False).astype(np.int32)
        return {"x": img[None, ..., None], "x_aug": _bezier(img, rng)[None, ..., None], "idx": idx}

    work = None if out is None else os.path.splitext(os.fspath(out))[0] + "_work"
    t0 = time.time()
    hist = run_loop(lambda b: _step(b["x"], b["x_aug"], b["idx"]), batch, ckpt, work, int(iters), ckpt_every,
                    resume=resume, progress=progress, desc="MASR-Net", max_seconds=max_seconds)
    history = [h["loss"] for h in hist]
    elapsed = time.time() - t0
    if out is not None:
        tail = history[-min(len(history), 20):]
        info = dict(model=get_config(model), iterations=int(ckpt.step.numpy()), iterations_requested=int(iters),
                    max_seconds=max_seconds, lr=lr, num_samples=num_samples, tau=tau, seed=int(seed),
                    crop=list(crop) if crop is not None else None, n_images=len(images),
                    image_shape=list(images[0].shape), final_loss=history[-1] if history else None,
                    final_loss_mean_last20=float(np.mean(tail)) if tail else None,
                    first_loss=history[0] if history else None, loss_curve=_loss_curve(history),
                    train_seconds=round(elapsed, 1), tensorflow=tf.__version__)
        info.update(card or {})
        save_masr(model, out, card=info)
    return model, history
