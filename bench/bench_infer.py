#!/usr/bin/env python
"""Forward-only inference of the λ-conditioned network as ``register.py`` runs it (``networks.hyper.register``:
the registration model's ``predict`` on one pair and one λ), its FLOPs and this machine's Conv3D FLOP/s peak,
measured in the same run. Prints a Markdown table and a per-layer table (ms and GFLOP/s of every conv).

    python bench/bench_infer.py                          # paper network: ch 64, 160×192×160, batch 1
    python bench/bench_infer.py --shape 96 112 96        # a smaller grid (same network widths)

FLOPs are counted analytically: every convolution (2·k^ndim·C_in·C_out per output voxel) and Dense layer
(2·in·out per row), i.e. multiply-adds × 2; the warps (SpatialTransformer), integration (VecInt) and the
element-wise ops are not counted (they are O(voxels·ndim), < 0.1 % of the convolutions here, but they do take
time; they show up in the per-layer table). Peak: a plain Conv3D (3³ kernel, 64 → 64 channels on a 64³ grid,
batch 1, 'same'), the same op the U-Net's full-resolution layers run, as a tf.function, best of 3.
Per-layer times come from one extra forward under ``tf.profiler`` (op times summed per Keras layer; the
profiler adds a little overhead).
"""
import argparse
import collections
import dataclasses
import glob
import os
import re
import resource
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _layers(model):
    """Every layer, nested models flattened (each once)."""
    return [lyr for lyr in model._flatten_layers(include_self=False, recursive=True)
            if not isinstance(lyr, __import__("tensorflow").keras.Model)]


def layer_flops(model):
    """{layer name: (FLOPs per forward at batch 1, output shape)} for the conv and Dense layers."""
    import tensorflow as tf

    out = {}
    for lyr in _layers(model):
        if isinstance(lyr, (tf.keras.layers.Conv1D, tf.keras.layers.Conv2D, tf.keras.layers.Conv3D)):
            for node in lyr.inbound_nodes:
                shape = node.outputs.shape if not isinstance(node.outputs, (list, tuple)) else node.outputs[0].shape
                vox = int(np.prod(shape[1:-1]))
                k = int(np.prod(lyr.kernel.shape[:-2]))
                cin, cout = int(lyr.kernel.shape[-2]), int(lyr.kernel.shape[-1])
                out[lyr.name] = (out.get(lyr.name, (0,))[0] + 2 * vox * k * cin * cout, tuple(shape[1:]))
        elif isinstance(lyr, tf.keras.layers.Dense):
            out[lyr.name] = (2 * int(lyr.kernel.shape[0]) * int(lyr.kernel.shape[1]), (int(lyr.kernel.shape[1]),))
    return out


def conv_peak(repeats=3, size=64, ch=64):
    """GFLOP/s of a plain Conv3D (3³, ch → ch, size³ grid, batch 1)."""
    import tensorflow as tf

    x = tf.random.normal((1, size, size, size, ch))
    w = tf.random.normal((3, 3, 3, ch, ch)) * 0.05
    f = tf.function(lambda a: tf.nn.conv3d(a, w, [1] * 5, "SAME"))
    f(x).numpy()
    best = min(_timed(lambda: f(x).numpy()) for _ in range(repeats))
    return 2.0 * size ** 3 * 27 * ch * ch / best / 1e9, best


def _timed(fn):
    t = time.time()
    fn()
    return time.time() - t


def profile_layers(fn, names):
    """Run ``fn`` once under tf.profiler; ms per Keras layer (op times summed over the compute threads; a
    conv's FiLM / activation ops count with it)."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="bench_infer_prof_")
    tf.profiler.experimental.start(logdir)
    fn()
    tf.profiler.experimental.stop()
    xs = xplane_pb2.XSpace()
    xs.ParseFromString(open(sorted(glob.glob(logdir + "/**/*.xplane.pb", recursive=True))[-1], "rb").read())
    per = collections.Counter()
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))
    for pl in xs.planes:
        for line in pl.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for ev in line.events:
                name = pl.event_metadata[ev.metadata_id].name
                if ":" not in name or name.startswith("ExecutorState"):
                    continue
                m = pattern.search(name.rpartition(":")[0])
                per[m.group(0) if m else "(other: warps, integration, element-wise)"] += ev.duration_ps / 1e9
    return per


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs="+", help="grid (default: the paper's 160 192 160)")
    p.add_argument("--ch", type=int, help="U-Net width (default: the paper's 64)")
    p.add_argument("--repeats", type=int, default=1, help="timed forwards after one warm-up (default 1)")
    p.add_argument("--no-layers", action="store_true", help="skip the profiled per-layer forward")
    a = p.parse_args()

    import tensorflow as tf

    from contrareg_tf.config import PAPER
    from contrareg_tf.errors import ContraRegInputError
    from contrareg_tf.networks.hyper import build_hyper_vxm, register

    cfg = PAPER
    if a.shape:
        cfg = dataclasses.replace(cfg, inshape=tuple(a.shape))
    if a.ch:
        cfg = dataclasses.replace(cfg, ch=a.ch)
    try:
        model = build_hyper_vxm(cfg)
    except ContraRegInputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    rng = np.random.default_rng(0)
    mov, fix = (rng.random(cfg.inshape).astype(np.float32) for _ in range(2))
    run = (lambda: register(model, mov, fix, 0.5))
    t = _timed(run)                                   # warm-up: builds and traces the predict function
    times = [_timed(run) for _ in range(a.repeats)]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 ** 2
    reg = model.get_registration_model()
    flops = layer_flops(reg)
    gflop = sum(f for f, _ in flops.values()) / 1e9
    peak, peak_s = conv_peak()
    sec = float(np.median(times))
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU threads visible; network ch {cfg.ch}, "
          f"{cfg.nb_levels} levels, grid {'×'.join(map(str, cfg.inshape))}, batch 1, FiLM λ input; first call "
          f"(trace + run) {t:.1f} s")
    print()
    print("| what | time s | GFLOP | GFLOP/s | % of peak | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    print(f"| register() forward, {'×'.join(map(str, cfg.inshape))} | {sec:.2f} | {gflop:.1f} | {gflop / sec:.1f} | "
          f"{100 * gflop / sec / peak:.0f} | {peak_rss:.1f} |")
    print(f"| plain Conv3D 64→64, 64³ (peak) | {peak_s:.3f} | {2 * 64 ** 3 * 27 * 64 * 64 / 1e9:.1f} | {peak:.1f} | "
          f"100 | |")
    if a.no_layers:
        return
    per = profile_layers(run, list(flops))
    tot = sum(per.values())
    print()
    print(f"Per layer (one profiled forward; op time summed over the compute threads = {tot / 1e3:.1f} s):")
    print()
    print("| layer | output | GFLOP | ms | % of op time | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    rest = sum(ms for _, ms in per.items() if ms < 0.005 * tot)
    for name, ms in per.most_common():
        if ms < 0.005 * tot:
            continue
        f, shape = flops.get(name, (0, ()))
        rate = f"{f / 1e9 / (ms / 1e3):.1f}" if f and ms > 0 else ""
        print(f"| {name} | {'×'.join(map(str, shape))} | {f / 1e9:.2f} | {ms:.0f} | {100 * ms / tot:.1f} | {rate} |")
    print(f"| (layers under 0.5 % each) | | | {rest:.0f} | {100 * rest / tot:.1f} | |")


if __name__ == "__main__":
    main()
