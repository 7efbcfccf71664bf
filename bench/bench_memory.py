#!/usr/bin/env python
"""Peak bytes TensorFlow itself allocates in one training step of the λ-conditioned network, per configuration
family and grid, a straight-line fit peak = a + b·voxels per configuration, and its prediction at the paper's
160×192×160 (issue 25).

    python bench/bench_memory.py                                   # default families × grids, writes no file
    python bench/bench_memory.py --configs mi cr --grids 32x32x32 48x48x48 --switches none mp remat
    python bench/bench_memory.py --out bench/results/memory_$(date +%F).md

Measured: ``tf.config.experimental.get_memory_info('CPU:0')['peak']`` over one step, after one warm-up step
(tracing, optimizer slots) and ``reset_memory_stats`` — the model's own tensors, not the process RSS (which
adds the Python heap, TF's code and the allocator's cached pages). Each (configuration, grid, switch) runs in
its own process, one at a time, so that one run's cached memory does not leak into the next. The step is the
trainer's own (``training.setup_registration``, as ``bench/bench_steps.py`` builds it) on random smooth
images (the peak does not depend on the image content; random frozen autoencoders stand in for trained ones).

Configuration families (batch 1, the paper's widths: ch 64 / 5 levels, paper autoencoders and heads, ns 1024):
``mi`` (set A, non-contrastive: global MI, 48 bins), ``cr``, ``mcr`` (set A, PatchNCE), ``mi-256`` / ``cr-256``
(set B: preset ``paper-ch256``, ch 256, ts 32), ``core``, ``accr`` (extra rows, the ch-64 network).
Switches: ``none``, ``mp`` (``--mixed-precision``: the U-Net in float16, integration / warps / losses float32),
``remat`` (``--remat``: full-resolution U-Net blocks recomputed in the backward pass), ``xla``, and
combinations joined with ``+`` (``mp+remat``).

The CPU's Conv3D backprop allocates an im2col buffer that cuDNN does not (``REFERENCE.md`` §9): ``--conv`` also
measures one full-resolution conv layer's backward alone against its own tensors, so that the GPU estimate
can leave that buffer out (the table says how).
"""
import argparse
import dataclasses
import datetime
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PAPER_GRID = (160, 192, 160)
GB = 1e9
# family → (preset, --loss name)
FAMILIES = {"mi": ("paper", "mi"), "cr": ("paper", "cr"), "mcr": ("paper", "mcr"),
            "mi-256": ("paper-ch256", "mi"), "cr-256": ("paper-ch256", "cr"),
            "core": ("paper", "core"), "accr": ("paper", "accr")}
SWITCHES = ("none", "mp", "remat", "xla")


# ------------------------------------------------------------------------------------------------ helpers
def parse_grid(text):
    return tuple(int(s) for s in str(text).lower().split("x"))


def grid_name(grid):
    return "×".join(map(str, grid))


def switch_flags(switch):
    """'mp+remat' → {'mixed_precision': True, 'remat': True, 'xla': False}."""
    parts = set(str(switch).split("+")) - {"none"}
    bad = parts - set(SWITCHES)
    if bad:
        raise ValueError(f"unknown switch(es) {sorted(bad)}; choose from {SWITCHES} joined with '+'")
    return {"mixed_precision": "mp" in parts, "remat": "remat" in parts, "xla": "xla" in parts}


def measure_peak(fn, device="CPU:0"):
    """Run ``fn()`` with TF's peak-allocation counter of ``device`` reset first; returns
    ``(result, peak_bytes, current_bytes_before)``. The peak includes everything alive during ``fn`` (weights,
    optimizer slots, the batch), which is what a device must hold."""
    import tensorflow as tf

    tf.config.experimental.reset_memory_stats(device)
    before = tf.config.experimental.get_memory_info(device)["current"]
    out = fn()
    return out, tf.config.experimental.get_memory_info(device)["peak"], before


def fit_line(voxels, peaks):
    """Least-squares peak = a + b·voxels; returns (a, b, residuals). One point: a line through the origin."""
    x = np.asarray(voxels, np.float64)
    y = np.asarray(peaks, np.float64)
    if x.size == 1:
        b = float(y[0] / x[0])
        return 0.0, b, y - b * x
    A = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(a), float(b), y - (a + b * x)


def synthetic_arrays(grid, n=3, seed=0, labels=False):
    """n random smooth 'subjects' in [0, 1] with a foreground and optional 4-class label maps (memory does not
    depend on the content)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = {"t1": [], "t2": [], "mask1": [], "mask2": []}
    zz = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in grid], indexing="ij"))
    ball = (zz ** 2).sum(0) < 0.7
    for _ in range(n):
        for key in ("t1", "t2"):
            coarse = rng.random([max(2, s // 8) for s in grid])
            img = ndimage.zoom(coarse, [s / c for s, c in zip(grid, coarse.shape)], order=1)[tuple(slice(0, s) for s in grid)]
            out[key].append((img * ball).astype(np.float32))
        out["mask1"].append(ball.astype(np.float32))
        out["mask2"].append(ball.astype(np.float32))
    arr = {k: np.stack(v) for k, v in out.items()}
    if labels:
        arr["labels"] = (np.digitize(arr["t1"], [0.25, 0.5, 0.75]) * ball).astype(np.int32)
    return arr


# ------------------------------------------------------------------------------------------------ workers
def family_config(family, grid):
    from contrareg_tf.config import get_preset

    preset, loss = FAMILIES[family]
    return dataclasses.replace(get_preset(preset), inshape=tuple(grid)), loss


def step_worker(family, grid, switch, device="CPU:0"):
    """One process: warm-up step, then one step with the peak counter reset."""
    import tensorflow as tf

    from contrareg_tf import training
    from contrareg_tf.losses.similarity import LossSpec

    cfg, loss = family_config(family, grid)
    arr = synthetic_arrays(grid, labels=LossSpec.parse(loss).needs_labels)
    with tf.device(device):
        s = training.setup_registration(cfg, loss, arr, rand_ae=True, lr=1e-6, **switch_flags(switch))
        b0 = training._distribute(s.strategy, s.sampler.batch(0))
        t = time.time()
        float(s.step(b0)["loss"])
        warm = time.time() - t
        b1 = training._distribute(s.strategy, s.sampler.batch(1))
        t = time.time()
        out, peak, before = measure_peak(lambda: float(s.step(b1)["loss"]), device)
        dt = time.time() - t
    return {"family": family, "grid": list(grid), "voxels": int(np.prod(grid)), "switch": switch, "ch": cfg.ch,
            "loss_value": out, "peak": int(peak), "resident": int(before), "step_s": dt, "warmup_s": warm,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def conv_worker(grid, c_in, c_out=64, device="CPU:0"):
    """One full-resolution Conv3D (3³, 'same') forward + backward alone: peak vs the tensors it must hold
    (input, output, upstream gradient, input gradient, kernel and its gradient). The excess is the backprop's
    workspace (CPU: the im2col buffer)."""
    import tensorflow as tf

    with tf.device(device):
        conv = tf.keras.layers.Conv3D(c_out, 3, padding="same", use_bias=False)
        x = tf.random.uniform((1, *grid, c_in))
        conv.build(x.shape)

        @tf.function
        def fb(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = conv(x)
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x, conv.kernel])

        fb(x)
        _, peak, before = measure_peak(lambda: [g.numpy() for g in fb(x)], device)
    vox = int(np.prod(grid))
    tensors = 4 * (vox * (2 * c_in + 2 * c_out) + 2 * 27 * c_in * c_out)
    return {"grid": list(grid), "voxels": vox, "c_in": c_in, "c_out": c_out, "peak": int(peak),
            "resident": int(before), "tensors": int(tensors), "im2col_formula": int(vox * 27 * c_in * 4)}


def run_worker(args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(args)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        print(f"worker {args} failed (rc {r.returncode}):\n{r.stderr[-2500:]}", file=sys.stderr)
        return None
    return json.loads(line[0][7:])


# ------------------------------------------------------------------------------------------------ report
def table(rows, convs, target=PAPER_GRID):
    vt = int(np.prod(target))
    lines = ["| config | switch | ch | grid | voxels | TF peak GB | resident GB | step s | RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['switch']} | {r['ch']} | {grid_name(r['grid'])} | {r['voxels']:,} | "
                     f"{r['peak'] / GB:.3f} | {r['resident'] / GB:.3f} | {r['step_s']:.1f} | "
                     f"{r['rss_mib'] / 1024:.1f} |")
    lines += ["", f"Fit peak = a + b·voxels per (config, switch); prediction at {grid_name(target)} "
              f"({vt:,} voxels). Residuals in MB, in grid order.", "",
              f"| config | switch | points | a GB | b bytes/voxel | residuals MB | predicted GB at {grid_name(target)} |",
              "|---|---|---|---|---|---|---|"]
    fits = {}
    for key in dict.fromkeys((r["family"], r["switch"]) for r in rows):
        pts = sorted((r["voxels"], r["peak"]) for r in rows if (r["family"], r["switch"]) == key)
        a, b, res = fit_line(*zip(*pts))
        fits[key] = a + b * vt
        lines.append(f"| {key[0]} | {key[1]} | {len(pts)} | {a / GB:.3f} | {b:.0f} | "
                     f"{', '.join(f'{x / 1e6:+.0f}' for x in res)} | {fits[key] / GB:.1f} |")
    if convs:
        lines += ["", "One full-resolution Conv3D (3³) forward + backward alone, batch 1: TF peak vs the tensors it "
                  "holds (x, y, dy, dx, kernel, dkernel); the excess is the CPU backprop's workspace.", "",
                  "| grid | C_in → C_out | TF peak MB | tensors MB | excess MB | voxels·27·C_in·4 MB | excess bytes/voxel |",
                  "|---|---|---|---|---|---|---|"]
        for c in convs:
            ex = c["peak"] - c["tensors"]
            lines.append(f"| {grid_name(c['grid'])} | {c['c_in']} → {c['c_out']} | {c['peak'] / 1e6:.0f} | "
                         f"{c['tensors'] / 1e6:.0f} | {ex / 1e6:.0f} | {c['im2col_formula'] / 1e6:.0f} | "
                         f"{ex / c['voxels']:.0f} |")
    return "\n".join(lines), fits


def _append(path, record):
    """One finished point to the JSON-lines file (when one is given), at once: an interrupted run keeps it."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["mi", "cr", "mcr"], choices=sorted(FAMILIES))
    p.add_argument("--grids", nargs="+", default=["32x32x32", "48x48x48", "32x48x32", "64x64x64"])
    p.add_argument("--switches", nargs="+", default=["none"])
    p.add_argument("--conv", nargs="*", metavar="GRIDxC_IN", help="also one conv layer's backward alone, e.g. "
                   "48x48x48x128 (grid x input channels)")
    p.add_argument("--max-voxels", type=int, default=None, help="skip (config, grid) points above this many voxels "
                   "(per config: ch 256 rows get a quarter of it)")
    p.add_argument("--out", help="also write the table (with the command) to this Markdown file")
    p.add_argument("--jsonl", help="append every measured point to this file as it comes (a partial run keeps them)")
    p.add_argument("--from-jsonl", nargs="+", metavar="FILE", help="print the table of points already measured "
                   "(--jsonl files) instead of measuring")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        w = json.loads(a.worker)
        res = (conv_worker(tuple(w["grid"]), w["c_in"]) if w.get("conv")
               else step_worker(w["family"], tuple(w["grid"]), w["switch"]))
        print("RESULT " + json.dumps(res))
        return
    for s in a.switches:
        switch_flags(s)
    rows, convs = [], []
    if a.from_jsonl:
        for path in a.from_jsonl:
            with open(path) as f:
                for r in map(json.loads, filter(str.strip, f)):
                    (convs if "c_in" in r else rows).append(r)
        a.configs, a.conv = [], None
    for fam in a.configs:
        for sw in a.switches:
            for g in map(parse_grid, a.grids):
                lim = a.max_voxels and (a.max_voxels // (4 if fam.endswith("256") else 1))
                if lim and np.prod(g) > lim:
                    print(f"  skip {fam} {sw} {grid_name(g)}: above --max-voxels", file=sys.stderr)
                    continue
                r = run_worker({"family": fam, "grid": g, "switch": sw})
                if r:
                    rows.append(r)
                    _append(a.jsonl, r)
                    print(f"  {fam:7s} {sw:9s} {grid_name(g):10s} peak {r['peak'] / GB:.3f} GB "
                          f"step {r['step_s']:.1f} s rss {r['rss_mib'] / 1024:.1f} GiB", file=sys.stderr)
    for spec in a.conv or []:
        *g, c = parse_grid(spec)
        r = run_worker({"conv": True, "grid": g, "c_in": c})
        if r:
            convs.append(r)
            _append(a.jsonl, r)
    text, _ = table(rows, convs)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# Memory of one training step ({datetime.date.today()})\n\n"
                    f"    python {' '.join(sys.argv)}\n\n{text}\n")


if __name__ == "__main__":
    main()
