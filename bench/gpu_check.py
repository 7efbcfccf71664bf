#!/usr/bin/env python
"""Device check of the memory model (issue 25): on one device, for each (configuration, switch) a warm-up step
and a few timed training steps at the paper's grid, TF's peak allocation (``get_memory_info(device)['peak']``),
and the prediction of ``bench/bench_memory.py``'s fit beside it.

    python bench/gpu_check.py --device GPU:0 --predict bench/results/memory_2026-12-07.jsonl    # 160×192×160
    python bench/gpu_check.py --device CPU:0 --grid 32x32x32 --runs mi:none mi:remat --steps 1      # CPU smoke test

``--runs`` takes ``config:switch`` pairs (configs and switches of ``bench_memory.py``, e.g. ``cr:mp+remat``);
each runs in its own process (its own peak; an out-of-memory run is reported as such and the next one still
runs). The default set — MI, CR, mCR at ch 64 with and without the switches, one ch-256 row — is sized for
about 5 minutes on one GPU. Times are per step after the warm-up (tracing excluded).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_memory import (GB, PAPER_GRID, fit_line, grid_name, measure_peak, parse_grid,  # noqa: E402
                          switch_flags, synthetic_arrays, family_config)

DEFAULT_RUNS = ("mi:none", "mi:remat", "cr:none", "cr:remat", "mcr:none", "mcr:mp+remat", "cr-256:mp+remat")


def worker(family, switch, grid, device, steps):
    import tensorflow as tf

    from contrareg_tf import training
    from contrareg_tf.losses.similarity import LossSpec

    cfg, loss = family_config(family, grid)
    arr = synthetic_arrays(grid, labels=LossSpec.parse(loss).needs_labels)
    with tf.device(device):
        s = training.setup_registration(cfg, loss, arr, rand_ae=True, lr=1e-6, **switch_flags(switch))
        batches = [training._distribute(s.strategy, s.sampler.batch(i)) for i in range(steps + 1)]
        float(s.step(batches[0])["loss"])

        def timed():
            t = []
            for b in batches[1:]:
                t0 = time.time()
                float(s.step(b)["loss"])
                t.append(time.time() - t0)
            return t

        times, peak, _ = measure_peak(timed, device)
    return {"family": family, "switch": switch, "grid": list(grid), "s_per_step": float(np.median(times)),
            "peak": int(peak)}


def predictions(paths, grid):
    """{(family, switch): predicted bytes at ``grid``} from bench_memory.py's --jsonl points."""
    pts = {}
    for path in paths or []:
        with open(path) as f:
            for r in map(json.loads, filter(str.strip, f)):
                if "family" in r:
                    pts.setdefault((r["family"], r["switch"]), []).append((r["voxels"], r["peak"]))
    out = {}
    for key, p in pts.items():
        a, b, _ = fit_line(*zip(*sorted(p)))
        out[key] = a + b * float(np.prod(grid))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="GPU:0", help="TF device, e.g. GPU:0 or CPU:0")
    p.add_argument("--grid", default="x".join(map(str, PAPER_GRID)))
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), metavar="CONFIG:SWITCH")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    p.add_argument("--predict", nargs="*", metavar="JSONL", help="bench_memory.py --jsonl points to predict from")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    grid = parse_grid(a.grid)
    if a.worker:
        fam, sw = a.worker.split(":")
        print("RESULT " + json.dumps(worker(fam, sw, grid, a.device, a.steps)))
        return
    for r in a.runs:
        switch_flags(r.split(":")[1])
    pred = predictions(a.predict, grid)
    print(f"device {a.device}, grid {grid_name(grid)}, {a.steps} timed steps after one warm-up\n")
    print("| config | switch | s/step | TF peak GB | predicted GB | measured / predicted |")
    print("|---|---|---|---|---|---|")
    for run in a.runs:
        fam, sw = run.split(":")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", run, "--device", a.device, "--grid", a.grid,
               "--steps", str(a.steps)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        pr = pred.get((fam, sw))
        prs = f"{pr / GB:.1f}" if pr else "–"
        if r.returncode or not line:
            oom = "ResourceExhausted" in r.stderr or "OOM" in r.stderr
            print(f"| {fam} | {sw} | {'out of memory' if oom else 'failed'} | – | {prs} | – |", flush=True)
            if not oom:
                print(r.stderr[-2000:], file=sys.stderr)
            continue
        res = json.loads(line[0][7:])
        ratio = f"{res['peak'] / pr:.2f}" if pr else "–"
        print(f"| {fam} | {sw} | {res['s_per_step']:.2f} | {res['peak'] / GB:.2f} | {prs} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
