"""The statistics a comparison's verdicts come from: paired differences over seeds, t intervals,
time-to-target by interpolation. Plain Python, checked against hand-computed values in the tests.
"""

from __future__ import annotations

import math
from typing import Sequence

# Two-sided 95% quantiles of Student's t (0.975 quantile) by degrees of freedom (standard tables).
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
        10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 16: 2.1199, 17: 2.1098,
        18: 2.1009, 19: 2.0930, 20: 2.0860, 25: 2.0595, 30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799}

# A difference this small (nats of validation loss) is what the paper's claims turn on (e.g. RaPTr
# 1.75 vs baseline 1.76 on BERT-base): a CI wider than this cannot decide them.
DECISIVE_HALF_WIDTH = 0.03


def t975(df: int) -> float:
    """0.975 quantile of t with ``df`` degrees of freedom (tabled values; the next lower entry between them)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 observations")
    if df in T975:
        return T975[df]
    below = [d for d in T975 if d < df]
    return T975[max(below)] if df <= 120 else 1.9600


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_difference(a: dict, b: dict) -> dict:
    """Mean of a[k] − b[k] over the keys (seeds) both have, with its 95% t interval.

    Returns ``{"n", "seeds", "diffs", "mean_diff", "std", "ci95": [lo, hi] | None, "half_width"}``.
    """
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {"n": len(seeds), "seeds": seeds, "diffs": diffs, "mean_diff": None, "std": None, "ci95": None,
           "half_width": None}
    if not diffs:
        return out
    mean, std = mean_std(diffs)
    out.update(mean_diff=mean, std=std)
    if std is not None:
        half = t975(len(diffs) - 1) * std / math.sqrt(len(diffs))
        out.update(ci95=[mean - half, mean + half], half_width=half)
    return out


def verdict(diff: dict, lower_is_better: bool = True) -> str:
    """A word from the interval: better / worse / no detectable difference (with the half-width)."""
    if not diff["n"]:
        return "no paired runs"
    if diff["ci95"] is None:
        return "one seed: no interval"
    lo, hi = diff["ci95"]
    if hi < 0:
        return "better" if lower_is_better else "worse"
    if lo > 0:
        return "worse" if lower_is_better else "better"
    return f"no detectable difference (±{diff['half_width']:.3f})"


def decisive(diff: dict) -> bool:
    """Whether the interval is narrow enough (≤ DECISIVE_HALF_WIDTH) or excludes zero."""
    if diff["ci95"] is None:
        return False
    lo, hi = diff["ci95"]
    return hi < 0 or lo > 0 or diff["half_width"] <= DECISIVE_HALF_WIDTH


def seeds_needed(diff: dict, half_width: float = DECISIVE_HALF_WIDTH, most: int = 1000) -> int | None:
    """Seeds at which the interval of a difference with this seed-to-seed sd would be ``half_width``
    wide: the least n with t(n-1) * sd / sqrt(n) <= half_width (None without an sd, or beyond ``most``)."""
    if diff.get("std") is None:
        return None
    for n in range(2, most + 1):
        if t975(n - 1) * diff["std"] / math.sqrt(n) <= half_width:
            return n
    return None


def first_crossing(xs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The x (FLOPs, seconds, ...) at which ``losses`` first reaches ``target`` or below, linearly
    interpolated between the two evaluations around the crossing; None if it never does."""
    for i, (x, loss) in enumerate(zip(xs, losses)):
        if loss <= target:
            if i == 0:
                return x
            x0, l0 = xs[i - 1], losses[i - 1]
            return x0 + (x - x0) * (l0 - target) / (l0 - loss)
    return None


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """y at x, linear between the points around it (xs ascending); None outside their range."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if xs and x == xs[-1]:
        return ys[-1]
    return None
