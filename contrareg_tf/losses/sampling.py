"""Where a contrastive loss looks: distinct random locations per sample, foreground first (PatchNCE, CoRe, ACCR).

A loss over sampled locations needs a fixed number n of them per sample (static shapes for tracing) while the
foreground differs in size between samples. :func:`sample_locations` takes the top n of (uniform noise + 2 on the
foreground): a uniformly random subset of the foreground when it has ≥ n locations, else all of it plus random
background picks flagged ``valid = False`` (the losses neither query nor contrast those). :func:`resize_mask`
brings a foreground mask to a feature map's resolution (a location is foreground if its block touches it).
"""
import numpy as np
import tensorflow as tf

from ..config import PAPER


def _uniform(shape, seed):
    """U[0,1) from ``seed``: None (global RNG), int / (int, int) (stateless) or a tf.random.Generator."""
    if seed is None:
        return tf.random.uniform(shape)
    if isinstance(seed, tf.random.Generator):
        return seed.uniform(shape)
    s = [int(seed), 0] if np.ndim(seed) == 0 else [int(v) for v in seed]
    return tf.random.stateless_uniform(shape, seed=s)


def sample_locations(mask, num_patches=PAPER.num_patches, seed=None):
    """Sample min(ns, N) distinct flat locations per sample, foreground first.

    mask: (B, N) bool/numeric, nonzero = may be sampled (pass all-ones for CR).
    Returns ``idx`` (B, n) int32 and ``valid`` (B, n) bool (False where the pick fell on background
    because the sample has fewer than n foreground locations).
    """
    mask = tf.cast(mask, tf.bool)
    n_loc = mask.shape[-1]
    k = min(int(num_patches), n_loc) if n_loc is not None else tf.minimum(num_patches, tf.shape(mask)[-1])
    scores = _uniform(tf.shape(mask), seed) + 2.0 * tf.cast(mask, tf.float32)
    idx = tf.math.top_k(scores, k=k, sorted=False).indices
    return idx, tf.gather(mask, idx, batch_dims=1)


def resize_mask(mask, spatial_shape):
    """Binary mask (B, *vol[, 1]) → (B, *spatial_shape) bool at a feature map's resolution.

    Integer down-factors: max-pool (a feature location is foreground if its block touches the foreground);
    otherwise nearest neighbour.
    """
    mask = tf.cast(mask, tf.float32)
    ndim = len(spatial_shape)
    if mask.shape.rank == ndim + 1:
        mask = mask[..., None]
    vol = mask.shape[1:-1].as_list()
    if list(vol) == list(spatial_shape):
        return mask[..., 0] > 0
    if all(v % s == 0 for v, s in zip(vol, spatial_shape)):
        f = [v // s for v, s in zip(vol, spatial_shape)]
        return tf.nn.max_pool(mask, ksize=f, strides=f, padding="VALID")[..., 0] > 0
    for d, (v, s) in enumerate(zip(vol, spatial_shape)):
        mask = tf.gather(mask, np.floor((np.arange(s) + 0.5) * v / s).astype(np.int32), axis=d + 1)
    return mask[..., 0] > 0
