"""When a training curve has stopped rising: the stopping rule of the convergence benchmark
(``bench/bench_converge.py``), stated once in ``config.PlateauRule``.

At a check after step s (every ``check_every`` steps), with the monitored Dice values v_k logged at steps t_k:

    gain(s) = mean{v_k : (1 − w)·s < t_k ≤ s} − mean{v_k : (1 − 2w)·s < t_k ≤ (1 − w)·s}

— the rise of the curve over its last fraction w of the steps, each end an average over the checks in a window
so that the noise of a few validation pairs does not decide alone. The plateau is reached at the first check where
gain < ``min_gain`` held at each of the last ``patience`` checks, all at s ≥ ``min_steps`` (one dip of a noisy
curve is not a plateau: with patience 1 a 12-pair monitor stopped an MI run at half the steps of the others while
its validation Dice still rose); the run stops there, or at ``max_steps`` (the same cap for every method). A window
without a check gives no gain (not reached).
"""
import math
from typing import Sequence


def plateau_gain(steps: Sequence[int], values: Sequence[float], window: float) -> float:
    """gain(s) of the module docstring at s = the last step; NaN when either window holds no check."""
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    if not steps:
        return math.nan
    s = float(steps[-1])
    mid, low = s - window * s, s - 2 * window * s   # not (1 − 2w)·s: 1 − 2·0.4 is 0.19999999999999996
    last = [v for t, v in zip(steps, values) if mid < t <= s]
    prev = [v for t, v in zip(steps, values) if low < t <= mid]
    if not last or not prev:
        return math.nan
    return sum(last) / len(last) - sum(prev) / len(prev)


def plateau_reached(steps: Sequence[int], values: Sequence[float], rule) -> bool:
    """True when the curve (steps, values) meets ``rule`` (a ``config.PlateauRule``) at its last check: the gain
    of each of the last ``rule.patience`` checks (each on the curve up to that check) is below ``rule.min_gain``."""
    k = int(rule.patience)
    if len(steps) < k:
        return False
    for end in range(len(steps) - k + 1, len(steps) + 1):
        if steps[end - 1] < rule.min_steps:
            return False
        gain = plateau_gain(steps[:end], values[:end], rule.window)
        if math.isnan(gain) or gain >= rule.min_gain:
            return False
    return True
