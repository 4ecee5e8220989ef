"""The probe classifier: multinomial logistic regression (LBFGS, standardised features, grouped L2 choice).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from raptr.experiments.probes.tasks import split_groups


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, steps: int = 200) -> Callable:
    """Multinomial logistic regression on standardised features, L2 on the weights, LBFGS.

    Returns ``predict(x) -> class ids``.
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    y = y.long()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_, b_ = w.detach(), b.detach()

    def predict(xs: torch.Tensor) -> torch.Tensor:
        return (((xs.double() - mean) / std) @ w_ + b_).argmax(dim=1)

    return predict


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def linear_probe(x_train: torch.Tensor, y_train: Sequence[int], x_test: torch.Tensor, y_test: Sequence[int],
                 groups: Sequence[str] | None = None, seed: int = 0, l2_grid: Sequence[float] = L2_GRID) -> dict:
    """Fit on train (L2 picked on a group-held-out 20% of train), report test accuracy."""
    yt, ye = torch.as_tensor(list(y_train)), torch.as_tensor(list(y_test))
    n_classes = int(max(yt.max(), ye.max())) + 1 if len(ye) else int(yt.max()) + 1
    groups = list(groups) if groups is not None else [str(i) for i in range(len(yt))]
    val_groups = split_groups(groups, 0.2, seed + 7)
    val = torch.tensor([g in val_groups for g in groups])
    best_l2, best_acc = l2_grid[-1], -1.0
    if val.any() and (~val).any() and len(set(yt[~val].tolist())) > 1:
        for l2 in sorted(l2_grid, reverse=True):  # ties go to the stronger regulariser
            acc = (fit_logistic(x_train[~val], yt[~val], n_classes, l2)(x_train[val]) == yt[val]).double().mean().item()
            if acc > best_acc:
                best_l2, best_acc = l2, acc
    predict = fit_logistic(x_train, yt, n_classes, best_l2)
    hit = predict(x_test) == ye
    acc = hit.double().mean().item()
    return {"accuracy": acc, "stderr": binomial_se(acc, len(ye)), "l2": best_l2, "correct": correct_string(hit.tolist())}


def fingerprint(items: Sequence) -> str:
    """A short hash of a task's test examples: two runs' accuracies pair only on the same examples."""
    import hashlib

    return hashlib.sha256(json.dumps([str(x) for x in items]).encode()).hexdigest()[:16]


def correct_string(hits: Sequence[bool]) -> str:
    """Per test example, '1' if right: two runs probed on the same examples compare pairwise."""
    return "".join("1" if h else "0" for h in hits)


MIN_DISCORDANT = 10  # examples on which exactly one of two runs is right, below which no verdict is given


def paired_accuracy_difference(a: str, b: str, z: float = 1.959964) -> tuple[float, float, float, int] | None:
    """Accuracy of ``a`` minus ``b`` on the same test examples (per-example correctness strings), its
    95% interval (normal approximation to the paired per-example difference, widened by the
    continuity correction 1/n) and the number of discordant examples (only these carry information;
    report no verdict below ``MIN_DISCORDANT``). None if they differ in length."""
    if not a or len(a) != len(b):
        return None
    d = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n) + 1 / n
    return mean, mean - half, mean + half, sum(1 for v in d if v)


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def majority_rate(labels: Sequence) -> float:
    return max(Counter(labels).values()) / len(labels) if labels else float("nan")
