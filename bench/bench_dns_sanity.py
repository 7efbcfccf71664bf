#!/usr/bin/env python
"""Sanity check of MASR-Net weights (the table in models/DNS_MODEL_CARD.md): on held-out subjects of the built-in
data the weights were trained on, is a subject's T1w closer (DNS loss, −cosine of σ-smoothed descriptors) to its
own aligned T2w than to the next subject's T2w? Trained weights vs a random initialisation.

    python bench/bench_dns_sanity.py --preset cpu-demo --weights models/dns_proxy2d.h5
    python bench/bench_dns_sanity.py --preset small3d --weights models/dns_proxy3d.h5
"""
import argparse

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--pairs", type=int, default=4,
                   help="at most this many pairs (i, i+1) of consecutive held-out subjects (fewer if the preset "
                        "holds fewer held-out subjects)")
    a = p.parse_args(argv)

    import tensorflow as tf

    from contrareg_tf.config import get_preset
    from contrareg_tf.data.io import crop_or_pad, load_nifti
    from contrareg_tf.experiment import resolve_data
    from contrareg_tf.losses.dns import DNS
    from contrareg_tf.networks.masr import build_masr, load_masr

    cfg = get_preset(a.preset)
    ndim = len(cfg.inshape)
    desc = resolve_data(cfg)
    subs = (desc.split("test") + desc.split("val"))[: a.pairs + 1]

    def vol(path):
        x = load_nifti(path, ndim=ndim).data
        x, _ = crop_or_pad(x, [-(-n // 8) * 8 for n in x.shape])
        return np.asarray(x, np.float32)[None, ..., None]

    t1 = [vol(s.t1) for s in subs]
    t2 = [vol(s.t2) for s in subs]
    tf.keras.utils.set_random_seed(0)
    models = {"trained": load_masr(a.weights, ndim=ndim), "random init": build_masr(ndim)}
    print(f"data: built-in {cfg.data_source}, preset {a.preset} ({'x'.join(map(str, cfg.inshape))} @ "
          f"{cfg.spacing:g} mm), held-out subjects {[s.subject for s in subs]}")
    print("| model | aligned T1w–T2w | misaligned T1w–T2w | margin | aligned better |")
    print("| --- | --- | --- | --- | --- |")
    for name, m in models.items():
        loss = DNS(m)
        al = [float(loss.loss(t1[i], t2[i])) for i in range(len(subs) - 1)]
        mis = [float(loss.loss(t1[i], t2[i + 1])) for i in range(len(subs) - 1)]
        better = sum(x < y for x, y in zip(al, mis))
        print(f"| {ndim}-D {name} | {np.mean(al):.3f} | {np.mean(mis):.3f} | {np.mean(mis) - np.mean(al):.3f} "
              f"| {better}/{len(al)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
