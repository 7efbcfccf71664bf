"""bench/bench_io.py's cropped HD95 equals metrics.hd95 on the full volume (the reference), including
structures that touch the image border and a structure the warp lost (nan, left out of the mean)."""
import importlib.util
import os

import numpy as np

from contrareg_tf import metrics

_SPEC = importlib.util.spec_from_file_location(
    "bench_io", os.path.join(os.path.dirname(__file__), os.pardir, "bench", "bench_io.py"))
bench_io = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_io)


def test_hd95_mean_crop_equals_full_volume():
    rng = np.random.default_rng(0)
    shape = (24, 20, 16)
    fixed = np.zeros(shape, np.int32)
    moved = np.zeros(shape, np.int32)
    for k in range(1, 6):                       # random boxes, some clipped at the image border
        for lab in (fixed, moved):
            lo = rng.integers(-3, np.array(shape) - 4)
            hi = lo + rng.integers(3, 9, size=3)
            lab[tuple(slice(max(0, a), b) for a, b in zip(lo, hi))] = k
    fixed[0:4, 0:5, 0:3] = 7                     # in the fixed map only: moved lost it -> nan
    ids = [k for k in range(1, 8) if (fixed == k).any()]
    spacing = (1.5, 1.0, 2.0)
    full = metrics.hd95(fixed, moved, spacing, labels=ids)
    assert np.isnan(full[7])
    expected = np.nanmean([full[k] for k in ids])
    assert bench_io.hd95_mean(fixed, moved, ids, spacing) == expected
