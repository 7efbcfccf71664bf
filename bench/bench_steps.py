#!/usr/bin/env python
"""Time per training step of the λ-conditioned network for MI vs CR vs mCR (same network, same data) on a
2-D and a small 3-D preset, with peak memory. Each (preset, loss) runs in its own process so that its peak
RSS is its own. Prints a Markdown table; the paper reports (m)CR ≈ 1.15× the MI step (target here ≤ 1.05×).

    python bench/bench_steps.py                       # cpu-demo (2-D) and small3d, 10 timed steps each
    python bench/bench_steps.py --presets cpu-demo --steps 20 --losses mi cr mcr
    python bench/bench_steps.py --presets paper64 --steps 3        # the paper's widths on a 64³ grid (~21 s/step)
    python bench/bench_steps.py --compare /tmp/old_checkout        # also time another checkout, interleaved

``paper64`` (defined here only, not a config preset): small3d's data and grid (64³, batch 1) with the paper's
network and loss widths (ch 64, ns 1024; autoencoders and heads are paper-width in every preset).
``--compare DIR`` runs DIR's own bench_steps.py worker right after each of ours (same preset, loss, steps), so
that both see the same machine load; ratios are within one code version.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def bench_preset(name):
    """A config preset, or one of the bench-only presets (``paper64``)."""
    import dataclasses

    from contrareg_tf.config import PAPER, get_preset

    if name == "paper64":
        return dataclasses.replace(get_preset("small3d"), name="paper64", ch=PAPER.ch, nb_levels=PAPER.nb_levels,
                                   num_patches=PAPER.num_patches, head_units=PAPER.head_units,
                                   ae_filters=PAPER.ae_filters)
    return get_preset(name)


def worker(preset, loss, steps, warmup):
    import numpy as np

    from contrareg_tf import experiment, training

    cfg = bench_preset(preset)
    arr = experiment.split_arrays(experiment.resolve_data(cfg), "train", cfg)
    # the trainer's own setup (same seed, same order); time per step does not depend on the learning rate, and
    # a tiny one keeps random-AE CR runs from diverging during the timing (RandAE + τ = 0.007 at lr 2e-3 blows up)
    s = training.setup_registration(cfg, loss, arr, rand_ae=True, lr=1e-6)
    step, sampler, strat = s.step, s.sampler, s.strategy
    t0 = time.time()
    for i in range(warmup):
        float(step(training._distribute(strat, sampler.batch(i)))["loss"])
    trace = time.time() - t0
    times = []
    for i in range(steps):
        b = training._distribute(strat, sampler.batch(warmup + i))
        t = time.time()
        float(step(b)["loss"])
        times.append(time.time() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # MiB on Linux
    return {"preset": preset, "loss": loss, "median_s": float(np.median(times)), "mean_s": float(np.mean(times)),
            "first_steps_s": trace, "peak_rss_mib": peak, "shape": list(cfg.inshape), "batch": cfg.batch_size,
            "ch": cfg.ch, "ns": cfg.num_patches}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["cpu-demo", "small3d"])
    p.add_argument("--losses", nargs="+", default=["mi", "cr", "mcr"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compare", metavar="DIR", help="another checkout whose bench/bench_steps.py is timed "
                   "interleaved with this one")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        preset, loss = a.worker.split(":")
        print("RESULT " + json.dumps(worker(preset, loss, a.steps, a.warmup)))
        return
    roots = [("this", __file__)]
    if a.compare:
        other = os.path.join(os.path.abspath(a.compare), "bench", "bench_steps.py")
        if not os.path.isfile(other):
            print(f"error: --compare {a.compare}: no bench/bench_steps.py there", file=sys.stderr)
            sys.exit(2)
        roots.append((os.path.abspath(a.compare), other))
    rows = []
    for preset in a.presets:
        for loss in a.losses:
            for code, script in roots:
                cmd = [sys.executable, script, "--worker", f"{preset}:{loss}", "--steps", str(a.steps),
                       "--warmup", str(a.warmup)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode or not line:
                    print(f"{code} {preset}/{loss} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
                    continue
                rows.append(dict(json.loads(line[0][7:]), code=code))
                print(f"  {code[-12:]:12s} {preset:9s} {loss:4s} {rows[-1]['median_s']:.3f} s/step", file=sys.stderr)
    code_col = len(roots) > 1
    print(f"| {'code | ' if code_col else ''}preset | shape | batch | ch | ns | loss | median s/step | ×MI | "
          f"first {a.warmup} steps (trace) s | peak RSS MiB |")
    print("|---" * (10 + code_col) + "|")
    for r in rows:
        mi = [x for x in rows if x["preset"] == r["preset"] and x["loss"] == "mi" and x["code"] == r["code"]]
        ratio = r["median_s"] / mi[0]["median_s"] if mi else float("nan")
        print(f"| {r['code'] + ' | ' if code_col else ''}{r['preset']} | {'×'.join(map(str, r['shape']))} | {r['batch']} | {r['ch']} | {r['ns']} | "
              f"{r['loss']} | {r['median_s']:.3f} | {ratio:.2f} | {r['first_steps_s']:.1f} | "
              f"{r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
