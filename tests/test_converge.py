"""The convergence study's parts: the plateau stopping rule (synthetic curves, and a training run it ends), the
paired statistics (against hand computations and an exact enumeration), and the benchmark's resume."""
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from contrareg_tf import evaluation, stats
from contrareg_tf.config import CONVERGE, PlateauRule, get_preset
from contrareg_tf.training import plateau

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULE = PlateauRule(check_every=100, min_steps=1000, window=0.2, min_gain=0.002, patience=1, max_steps=10_000)


# --------------------------------------------------------------------------------------------------------------
# the stopping rule
# --------------------------------------------------------------------------------------------------------------
def _first_stop(steps, values, rule=RULE):
    for k in range(1, len(steps) + 1):
        if plateau.plateau_reached(steps[:k], values[:k], rule):
            return steps[k - 1]
    return None


def test_gain_is_the_difference_of_window_means():
    steps = [100, 200, 300, 400, 500]
    values = [0.1, 0.2, 0.3, 0.4, 0.5]
    # s = 500, w = 0.2: last window (400, 500] = {0.5}; previous (300, 400] = {0.4}
    assert plateau.plateau_gain(steps, values, 0.2) == pytest.approx(0.1)
    # w = 0.4: last (300, 500] = {0.4, 0.5}; previous (100, 300] = {0.2, 0.3}
    assert plateau.plateau_gain(steps, values, 0.4) == pytest.approx(0.45 - 0.25)


def test_saturating_curve_stops_where_its_rise_over_a_window_falls_below_min_gain():
    steps = list(range(100, 20_001, 100))
    values = [0.7 - 0.3 * np.exp(-t / 1500.0) for t in steps]
    stop = _first_stop(steps, values)
    assert stop is not None
    # analytic: gain(s) = 0.3·(mean of exp(−t/1500) over the previous window − over the last one), decreasing in s;
    # the stop is the first check where it is < 0.002 (window means over the discrete checks, as the rule uses)
    expect = next(s for s in steps if s >= RULE.min_steps and plateau.plateau_gain(
        [t for t in steps if t <= s], [0.7 - 0.3 * np.exp(-t / 1500.0) for t in steps if t <= s], 0.2) < 0.002)
    assert stop == expect
    assert 0.7 - values[steps.index(stop)] < 0.02


def test_steadily_rising_curve_never_stops():
    steps = list(range(100, 10_001, 100))
    values = [0.4 + 2e-5 * t for t in steps]   # a rise of 2e-5 · 0.2 s per window: 0.004 at s = 1000, more later
    assert _first_stop(steps, values) is None


def test_nothing_stops_before_min_steps_or_without_two_windows():
    flat = [0.5] * 9
    assert _first_stop(list(range(100, 901, 100)), flat) is None       # all before min_steps = 1000
    assert not plateau.plateau_reached([1000], [0.5], RULE)             # one check: no previous window
    assert plateau.plateau_reached([800, 1000], [0.5, 0.5], RULE)       # windows (600, 800], (800, 1000]


def test_noisy_curves_flat_stops_rising_does_not():
    rng = np.random.default_rng(0)
    steps = list(range(100, 10_001, 100))
    noise = rng.normal(0, 0.003, len(steps))
    flat = [0.6 + e for e in noise]
    assert _first_stop(steps, flat) is not None
    rising = [0.3 + 1e-4 * t + e for t, e in zip(steps, noise)]      # +0.02 per window at s = 1000, more later
    assert _first_stop(steps, rising) is None


def test_a_training_run_ends_at_its_plateau(tmp_path):
    """train_hyper with a monitor that never changes: the first check with two windows ends the run there."""
    from scipy.ndimage import gaussian_filter

    from contrareg_tf import training

    cfg = dataclasses.replace(get_preset("tiny2d"), ckpt_every=2)
    rng = np.random.default_rng(0)
    t1 = np.stack([gaussian_filter(rng.random(cfg.inshape), 2.0) for _ in range(4)])
    t1 = ((t1 - t1.min()) / (t1.max() - t1.min())).astype(np.float32)
    arrays = {"t1": t1, "t2": 1.0 - t1}
    rule = PlateauRule(check_every=2, min_steps=4, window=0.2, min_gain=0.002, patience=1, max_steps=20)
    out = str(tmp_path / "run")
    training.train_hyper(cfg, "mi", out, arrays, iters=20, progress=False, monitor=(lambda m: 0.5, rule))
    with open(os.path.join(out, "card.json")) as f:
        card = json.load(f)
    # checks at 2, 4, 6: at 4 the previous window (2.4, 3.2] is empty; at 6 the windows (3.6, 4.8], (4.8, 6] hold one each
    assert (card["stopped"]["step"], card["stopped"]["reason"]) == (6, "plateau")
    assert card["stopped"]["rule"]["patience"] == 1
    assert card["steps_run"] == 6
    with open(os.path.join(out, "monitor_curve.csv")) as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["2", "4", "6"]


# --------------------------------------------------------------------------------------------------------------
# paired statistics
# --------------------------------------------------------------------------------------------------------------
A = np.array([0.61, 0.58, 0.66, 0.70, 0.52, 0.63])
B = np.array([0.59, 0.575, 0.61, 0.71, 0.49, 0.60])


def _exact_wilcoxon_p(d):
    """Two-sided exact signed-rank p by enumerating all 2^n sign patterns (no ties, no zeros)."""
    r = sps.rankdata(np.abs(d))
    w = np.sum(r[d > 0])
    null = np.array([np.sum(r[np.array(s, bool)]) for s in itertools.product((0, 1), repeat=len(d))])
    mid = len(d) * (len(d) + 1) / 4
    return float(np.mean(np.abs(null - mid) >= abs(w - mid) - 1e-12))


def test_paired_difference_matches_hand_computation():
    d = A - B
    r = stats.paired_difference(A, B)
    assert r.n == 6 and r.mean == pytest.approx(d.mean())
    half = 2.570581835636314 * d.std(ddof=1) / np.sqrt(6)   # t_{0.975, 5} from tables
    assert (r.ci_low, r.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert r.t_p == pytest.approx(sps.ttest_rel(A, B).pvalue)
    assert r.wilcoxon_p == pytest.approx(_exact_wilcoxon_p(d))


def test_paired_difference_ties_and_degenerate_inputs():
    r = stats.paired_difference(A, A)                  # all differences zero
    assert (r.mean, r.ci_low, r.ci_high, r.t_p, r.wilcoxon_p) == (0.0, 0.0, 0.0, 1.0, 1.0)
    shifted = stats.paired_difference(A + 0.01, A)     # constant difference: a point interval, t-test certain
    assert shifted.ci_low == pytest.approx(0.01) and shifted.ci_high == pytest.approx(0.01) and shifted.t_p < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        stats.paired_difference([0.5], [0.4])
    with pytest.raises(ValueError, match="equally many"):
        stats.paired_difference(A, B[:3])
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_difference(np.r_[A[:5], np.nan], B)


def test_crossing_interpolates_linearly_and_refuses_out_of_range():
    lam = [0.0, 0.5, 1.0]
    sd = [0.30, 0.20, 0.10]
    i, w = stats.crossing(lam, sd, 0.15)
    assert (i, w) == (1, pytest.approx(0.5))
    rows = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    np.testing.assert_allclose(stats.at_crossing(rows, (i, w)), [0.4, 0.5])
    assert stats.crossing(lam, sd, 0.35) is None


# --------------------------------------------------------------------------------------------------------------
# the benchmark: resume skips finished work and reproduces the table
# --------------------------------------------------------------------------------------------------------------
def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_converge", os.path.join(ROOT, "bench", "bench_converge.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_run_is_unfinished_under_a_higher_cap_or_another_rule():
    finished = _bench().finished
    now = dataclasses.asdict(CONVERGE)
    assert finished({"stopped": {"step": 4000, "reason": "plateau", "rule": now}}, 10_000)
    assert finished({"stopped": {"step": 4000, "reason": "plateau", "rule": dict(now, max_steps=1)}}, 10_000)
    assert not finished({"stopped": {"step": 4000, "reason": "plateau", "rule": dict(now, patience=1)}}, 10_000)
    assert not finished({"stopped": {"step": 4000, "reason": "plateau"}}, 10_000)      # rule not recorded
    assert finished({"stopped": {"step": 10_000, "reason": "cap"}}, 10_000)
    assert not finished({"stopped": {"step": 10_000, "reason": "cap"}}, 20_000)
    assert not finished({}, 10_000)


def test_patience_needs_the_plateau_at_consecutive_checks():
    """A rising curve with one dip: patience 1 stops at the dip, patience 3 does not (the MI run of seed 0 in
    bench/results/converge_cpu-bench stopped this way); a flat curve stops two checks later with patience 3."""
    steps = list(range(250, 10_001, 250))
    rising = [0.4 + 1e-5 * t for t in steps]
    rising[steps.index(5000)] -= 0.04   # at 5000: gain 0.01 − 0.04 / 4 = 0 < 0.002; at 4750 and 5250 ≥ 0.0025
    one = dataclasses.replace(RULE, check_every=250, min_steps=2500)
    three = dataclasses.replace(one, patience=3)
    assert _first_stop(steps, rising, one) is not None
    assert _first_stop(steps, rising, three) is None
    flat = [0.5] * len(steps)
    assert _first_stop(steps, flat, three) == _first_stop(steps, flat, one) + 2 * 250


def _table(md):
    """Table-1 rows of the report without the last column (seconds)."""
    return [line.rsplit("|", 2)[0] for line in md.splitlines() if line.startswith("| ")]


@pytest.mark.slow
def test_bench_converge_resume_skips_finished_runs(tmp_path):
    res = tmp_path / "results" / "converge_tiny2d"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_converge.py"), "--preset", "tiny2d", "--methods", "mi",
           "ngf", "--seeds", "0", "--max-steps", "2", "--workers", "1", "--out", str(tmp_path / "runs"),
           "--results", str(res)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=ROOT)
    first = (tmp_path / "results" / "table1_converged_tiny2d.md").read_text()
    mi_card = (res / "mi_s0" / "card.json").stat().st_mtime_ns
    shutil.rmtree(res / "ngf_s0")                     # as if interrupted before NGF finished
    shutil.rmtree(tmp_path / "runs" / "ngf_s0")
    out = subprocess.run(cmd + ["--resume"], check=True, env=env, capture_output=True, text=True, cwd=ROOT).stdout
    assert "done ngf s0" in out and "done mi s0" not in out
    assert (res / "mi_s0" / "card.json").stat().st_mtime_ns == mi_card
    second = (tmp_path / "results" / "table1_converged_tiny2d.md").read_text()
    assert _table(second) == _table(first) and len(_table(first)) >= 4


def test_lambda_use_finds_a_dead_lambda_range():
    """First hypernetwork layer set to relu(λ − 0.3) in every unit: nothing is active up to λ = 0.3, every unit
    above it, and the embedding (hence the registration) is the same for all λ ≤ 0.3."""
    from contrareg_tf.networks.hyper import build_hyper_vxm

    model = build_hyper_vxm(get_preset("tiny2d"))
    first = model.references.hyp_model.layers[1]
    k, b = first.get_weights()
    first.set_weights([np.ones_like(k), np.full_like(b, -0.3)])
    st = evaluation.lambda_use(model)
    n = k.shape[1]
    assert st["units"] == n
    assert st["active_first_layer"] == {"0": 0, "0.1": 0, "0.5": n, "1": n}
    assert st["flat_up_to"] == pytest.approx(0.3)
    k2, b2 = first.get_weights()
    first.set_weights([np.zeros_like(k2), np.full_like(b2, -1.0)])   # every unit dead: one output for all λ
    assert evaluation.lambda_use(model)["flat_up_to"] == 1.0
