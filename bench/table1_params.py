#!/usr/bin/env python
"""Parameter counts of every Table-1 row's models at a preset (default: the paper's), built as graphs only
(no data, no forward pass): the λ-conditioned registration network (FiLM hypernetwork included), the
similarity's trainable part (PatchNCE heads F1+F2; CoRe / ACCR feature networks), and the frozen
autoencoders A1+A2 of the contrastive rows. Prints a Markdown table (README quotes it).

    python bench/table1_params.py                 # paper preset (sets B/D at paper-ch256)
    python bench/table1_params.py --preset cpu-demo
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _count(variables):
    return int(sum(int(v.shape.num_elements()) for v in variables))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper")
    p.add_argument("--rows", default="A,B,C,D,extra")
    a = p.parse_args()

    import tensorflow as tf

    from contrareg_tf import experiment
    from contrareg_tf.config import SM_PAPER, get_preset
    from contrareg_tf.losses.similarity import LossSpec
    from contrareg_tf.networks.autoencoder import random_autoencoder
    from contrareg_tf.networks.synthmorph import SynthMorphVxm
    from contrareg_tf.training.registration import build_components

    cfg = get_preset(a.preset)
    rows, _ = experiment.select_rows(a.rows.split(","))
    lines = [f"Preset `{cfg.name}` ({'×'.join(map(str, cfg.inshape))}); sets B/D at its wide companion.", "",
             "| Set | Row | width | ts | registration network | similarity (trainable) | frozen AEs | "
             "trainable total |", "|---|---|---|---|---|---|---|---|"]
    cache = {}
    t0 = time.time()
    for r in rows:
        rc = experiment.row_config(cfg, r)
        key = (experiment.row_run_name(cfg, r).replace("_suppretrain", "").replace("_randae", ""))
        if key not in cache:
            tf.keras.backend.clear_session()
            if r.method.startswith("sm-"):
                net = SynthMorphVxm(rc, SM_PAPER)
                cache[key] = (net.count_params(), 0, 0, SM_PAPER.int_steps)
            else:
                ndim = len(rc.inshape)
                aes = (None, None)
                if LossSpec.parse(r.method).contrastive:
                    aes = tuple(random_autoencoder(ndim, seed=k, filters=rc.ae_filters) for k in (0, 1))
                model, _, _, sim = build_components(rc, r.method, *aes)
                frozen = sum(_count(ae.weights) for ae in aes if ae is not None)
                cache[key] = (_count(model.trainable_variables), _count(sim.trainable_variables), frozen,
                              rc.int_steps)
        net, sim_n, frozen, ts = cache[key]
        lines.append(f"| {r.set} | {r.label} | {rc.ch} | {ts} | {net:,} | {sim_n:,} | {frozen:,} | "
                     f"{net + sim_n:,} |")
    lines += ["", f"({time.time() - t0:.0f} s to build every graph)"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
