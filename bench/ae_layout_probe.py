#!/usr/bin/env python
"""Does the reconstruction probe of ``networks.autoencoder.check_layout`` tell a paper-layout autoencoder from one
of the same weight shapes trained in another layout? (sets ``config.AE_LAYOUT_MIN_CORR``)

Both layouts are trained the same way (L1, Adam 1e-3, batch 4, ``--iters``) on the cpu-demo training T1w slices;
each is then loaded by shape into the paper layout and asked to reconstruct the three test T1w slices; the shipped
cpu-demo autoencoders (paper layout, 15000 iterations, L1 + local NCC) and random weights are scored alike.
Prints a table of Pearson correlations (image vs reconstruction) per test slice.

    python bench/ae_layout_probe.py [--iters 1500]
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "data"))

from contrareg_tf import assets, experiment  # noqa: E402
from contrareg_tf.config import get_preset  # noqa: E402
from contrareg_tf.networks.autoencoder import build_autoencoder, load_autoencoder, reconstruction_corr  # noqa: E402
from make_ae_layout_fixtures import fit, wrong_layout_ae  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=1500)
    a = p.parse_args()
    cfg = get_preset("cpu-demo")
    desc = experiment.resolve_data(cfg)
    tr, te = (experiment.split_arrays(desc, s, cfg) for s in ("train", "test"))
    x = tr["t1"][..., None].astype(np.float32)
    tmp = tempfile.mkdtemp()
    rows = []
    tf.keras.utils.set_random_seed(0)
    for label, model in (("other layout (pool / up-sample after conv)", wrong_layout_ae(cfg.ae_filters)),
                         ("paper layout", build_autoencoder(2, filters=cfg.ae_filters))):
        fit(model, x, a.iters)
        rows.append((f"{label}, in its own layout", reconstruction_corr(model, te["t1"])))
        path = os.path.join(tmp, "ae.h5")
        model.save_weights(path)
        loaded = load_autoencoder(path, 2, cfg.ae_filters)
        rows.append((f"{label}, loaded into the paper layout", reconstruction_corr(loaded, te["t1"])))
    for m in ("t1", "t2"):
        shipped = load_autoencoder(assets.shipped(f"ae_{m}_cpu-demo.h5"), 2, cfg.ae_filters)
        rows.append((f"shipped cpu-demo A{m[-1]} (paper layout) on test {m.upper()}w",
                     reconstruction_corr(shipped, te[m])))
    rows.append(("random weights (seed 3), paper layout",
                 reconstruction_corr(build_autoencoder(2, cfg.ae_filters, seed=3), te["t1"])))
    print(f"| autoencoder ({a.iters} training iterations unless stated) | r per test slice | min |")
    print("|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {' '.join(f'{v:.3f}' for v in r)} | {min(r):.3f} |")


if __name__ == "__main__":
    main()
