"""Makes the fixtures of tests/test_autoencoder.py::test_layout_check (run from the repository root):

- ``ae_wrong_layout_2d.h5``: an autoencoder with the paper's weight shapes (cpu-demo widths) but another layout —
  Conv(stride 1) → InstanceNorm → LeakyReLU → MaxPool(2) down-sampling, up-sampling *after* the conv — built in
  plain Keras and trained 1500 iterations (L1, Adam 1e-3, batch 4) on the cpu-demo training T1w slices;
- ``ae_probe_t1_2d.npy``: the three cpu-demo test T1w slices (64×80, [0, 1]) the check reconstructs.

    python tests/data/make_ae_layout_fixtures.py
"""
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.getcwd())
from contrareg_tf import experiment  # noqa: E402
from contrareg_tf.config import get_preset  # noqa: E402
from contrareg_tf.networks.layers import NearestUpsample  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def wrong_layout_ae(filters):
    L = tf.keras.layers
    x = inp = tf.keras.Input((None, None, 1))
    feats = []
    for k in range(1, 8):
        f = L.Conv2D(filters[k - 1], 3, padding="same")(x)
        y = L.LeakyReLU(0.2)(L.GroupNormalization(groups=-1)(f))
        x = L.MaxPool2D(2)(y) if k <= 3 else NearestUpsample(2)(y) if k <= 6 else y
        feats.append(f)
    return tf.keras.Model(inp, [L.Conv2D(filters[-1], 3, padding="same")(x)] + feats[:6])


def fit(model, x, iters, seed=0):
    """L1 reconstruction, Adam 1e-3, batches of 4 images drawn from ``x`` (N, *vol, 1) with ``seed``."""
    opt, rng = tf.keras.optimizers.Adam(1e-3), np.random.default_rng(seed)

    @tf.function
    def step(b):
        with tf.GradientTape() as t:
            loss = tf.reduce_mean(tf.abs(model(b)[0] - b))
        opt.apply_gradients(zip(t.gradient(loss, model.trainable_variables), model.trainable_variables))

    for _ in range(iters):
        step(x[rng.integers(0, len(x), 4)])


def main(iters=1500):
    cfg = get_preset("cpu-demo")
    desc = experiment.resolve_data(cfg)
    x = experiment.split_arrays(desc, "train", cfg)["t1"][..., None].astype(np.float32)
    tf.keras.utils.set_random_seed(0)
    model = wrong_layout_ae(cfg.ae_filters)
    fit(model, x, iters)
    model.save_weights(os.path.join(HERE, "ae_wrong_layout_2d.h5"))
    probe = experiment.split_arrays(desc, "test", cfg)["t1"][:3].astype(np.float32)
    np.save(os.path.join(HERE, "ae_probe_t1_2d.npy"), probe)


if __name__ == "__main__":
    main()
