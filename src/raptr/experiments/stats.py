"""The statistics a comparison's verdicts come from: paired differences over seeds, t intervals,
two one-sided tests of equivalence, time-to-target by interpolation. Plain Python, checked against hand-computed values in the tests.
"""

from __future__ import annotations

import math
from typing import Sequence

# Two-sided 95% quantiles of Student's t (0.975 quantile) by degrees of freedom (standard tables).
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
        10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 16: 2.1199, 17: 2.1098,
        18: 2.1009, 19: 2.0930, 20: 2.0860, 25: 2.0595, 30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799}

# One-sided 95% quantiles of t (0.95 quantile), for the 90% interval of a two one-sided test (TOST).
T95 = {1: 6.3138, 2: 2.9200, 3: 2.3534, 4: 2.1318, 5: 2.0150, 6: 1.9432, 7: 1.8946, 8: 1.8595, 9: 1.8331,
       10: 1.8125, 11: 1.7959, 12: 1.7823, 13: 1.7709, 14: 1.7613, 15: 1.7531, 16: 1.7459, 17: 1.7396,
       18: 1.7341, 19: 1.7291, 20: 1.7247, 25: 1.7081, 30: 1.6973, 40: 1.6839, 60: 1.6706, 120: 1.6577}

# A difference this small (nats of validation loss) is what the paper's claims turn on (e.g. RaPTr
# 1.75 vs baseline 1.76 on BERT-base): "matches" is claimed only when a two one-sided test at this
# margin passes (the 90% interval lies inside ±EQUIVALENCE_MARGIN).
EQUIVALENCE_MARGIN = 0.03


def _tabled(table: dict, df: int, infinite: float) -> float:
    """A tabled t quantile; between entries, the next lower df's (a conservative, wider interval)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 observations")
    if df in table:
        return table[df]
    return table[max(d for d in table if d < df)] if df <= 120 else infinite


def t975(df: int) -> float:
    """0.975 quantile of t with ``df`` degrees of freedom."""
    return _tabled(T975, df, 1.9600)


def t95(df: int) -> float:
    """0.95 quantile of t with ``df`` degrees of freedom."""
    return _tabled(T95, df, 1.6449)


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


def equivalence(diff: dict, margin: float = EQUIVALENCE_MARGIN) -> dict:
    """Two one-sided tests (TOST, each at the 5% level) of |true difference| < ``margin``: equivalent
    when the 90% t interval lies inside (−margin, +margin).

    Returns ``{"margin", "ci90": [lo, hi] | None, "equivalent": bool | None}`` (None: one seed, no test).
    """
    if diff.get("std") is None:
        return {"margin": margin, "ci90": None, "equivalent": None}
    half = t95(diff["n"] - 1) * diff["std"] / math.sqrt(diff["n"])
    lo, hi = diff["mean_diff"] - half, diff["mean_diff"] + half
    return {"margin": margin, "ci90": [lo, hi], "equivalent": -margin < lo and hi < margin}


def seeds_needed(diff: dict, margin: float = EQUIVALENCE_MARGIN, most: int = 1000) -> int | None:
    """Seeds at which a TOST at ``margin`` would pass if the mean difference and seed-to-seed sd stayed
    as measured: the least n with |mean| + t95(n-1) * sd / sqrt(n) < margin (None without an sd, when
    |mean| is already at the margin, or beyond ``most``)."""
    if diff.get("std") is None or abs(diff["mean_diff"]) >= margin:
        return None
    for n in range(2, most + 1):
        if abs(diff["mean_diff"]) + t95(n - 1) * diff["std"] / math.sqrt(n) < margin:
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
