"""Progressive Layer Dropping (Zhang & He, NeurIPS 2020), DeepSpeed's schedule exactly.

Global keep rate, decaying from 1 to θ̄ (DeepSpeed ``ProgressiveLayerDrop.update_state``)::

    θ(t) = (1 − θ̄)·exp(−γ·t) + θ̄          t = optimizer steps taken (the trainer's 0-based step)

Per-layer keep probability, falling linearly with depth (DeepSpeedExamples
``modelingpreln_layerdrop.py``: ``p = 1`` for layer 0, then ``p -= (1−θ)/L`` after each layer)::

    p_i(t) = 1 − (i/L)·(1 − θ(t))          i = 0 .. L−1 (0-based; layer 0 always runs)

The paper (§4.2) writes the 1-based form p_l = 1 − (l/L)(1 − θ(t)), l = 1..L, which drops a
little more (its last layer has p = θ); we implement the DeepSpeedExamples form above.

Each step draws one Bernoulli(p_i) per layer from ``core.step_generator(seed, step)`` (shared by
all micro-batches and every rank); a dropped layer is skipped for real (identity, no compute, no
gradient), a kept layer's residual branch is scaled by 1/p_i. In eval mode every layer runs,
unscaled.

Where we differ from DeepSpeed, on purpose:
- DeepSpeed's engine updates θ with ``global_steps`` just before the optimizer step, so its
  forward at step t uses θ(t−1) (θ = 1 for the first two steps); we use θ(t): one step earlier.
- DeepSpeedExamples appears to rescale a kept layer by the probability of the *next* layer (it
  passes ``p`` after ``p -= step``; code reading, docs/paper.md); we scale by 1/p_i,
  the probability the layer was actually kept with, so E[scaled branch] = branch.
- DeepSpeedExamples scales the attention and the FFN branch outputs of a pre-LN block separately
  (so the FFN sees the rescaled attention output); our gate scales the block's whole residual
  update, ``y = x + (block(x) − x)/p_i``, which is the same for the attention part and differs
  only in the FFN input.
- Skipped layers keep ``grad=None`` (AdamW does not touch them); DeepSpeed's gradient reduction
  turns missing gradients into zeros, so its moments still decay and weight decay still applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raptr.core import GatedLayers
from raptr.ranks import PATH_STREAM, step_generator
from raptr.errors import RaptrError
from raptr.methods.base import Method, StepInfo, TrainingContext
from raptr.models.registry import check_must_run, layer_contract


@dataclass
class PLDOptions:
    theta: float = 0.5  # θ̄: final global keep rate
    gamma: float = 0.001  # decay speed of θ(t) = (1-θ̄)e^{-γt} + θ̄

    def check(self, num_layers: int | None = None, total_steps: int | None = None) -> None:
        if not 0.0 < self.theta <= 1.0:
            raise RaptrError(f"PLD theta (θ̄, method.pld.theta) must be in (0, 1], got {self.theta}")
        if self.gamma < 0:
            raise RaptrError(f"PLD gamma (γ, method.pld.gamma) must be >= 0, got {self.gamma}")


class ProgressiveLayerDrop(Method):
    """Progressive Layer Dropping with DeepSpeed's θ(t) and linear-in-depth keep probabilities."""

    name = "pld"
    Options = PLDOptions
    num_layers: int | None = None

    def attach(self, context: TrainingContext) -> None:
        super().attach(context)
        self.num_layers = len(context.layers)
        check_must_run(context.model, (0,), "a method that can skip them (PLD always runs layer 0 only)")
        self.gates = GatedLayers(context.layers, layer_contract(context.model)[0])

    # ------------------------------------------------------------------ the schedule (pure)
    def theta(self, step: int) -> float:
        """Global keep rate θ(t) = (1 − θ̄)·exp(−γ·t) + θ̄."""
        bar, gamma = self.options.theta, self.options.gamma
        return (1.0 - bar) * math.exp(-gamma * step) + bar

    def keep_probs(self, step: int, num_layers: int | None = None) -> list[float]:
        """p_i(t) = 1 − (i/L)(1 − θ(t)) for the 0-based layers i = 0..L−1."""
        L = num_layers or self.num_layers
        if not L:
            raise RaptrError("PLD needs the number of layers: attach the method first or pass num_layers")
        drop = 1.0 - self.theta(step)
        return [1.0 - (i / L) * drop for i in range(L)]

    def path(self, step: int) -> tuple[bool, ...]:
        """Which layers run at ``step`` (pure: a function of (seed, step) only)."""
        probs = torch.tensor(self.keep_probs(step), dtype=torch.float64)
        draws = torch.rand(len(probs), generator=step_generator(self.context.seed, step, PATH_STREAM), dtype=torch.float64)
        return tuple((draws < probs).tolist())

    def expected_relative_flops(self) -> float:
        """Mean over the run's steps t = 0..T−1 of mean_i p_i(t), summed exactly (not sampled).

        mean_i p_i(t) = 1 − (1 − θ(t))·(L − 1)/(2L), and Σ_t exp(−γt) is a geometric sum.
        """
        T, L = self.context.total_steps, self.num_layers
        bar, gamma = self.options.theta, self.options.gamma
        geometric = T if gamma == 0 else -math.expm1(-gamma * T) / -math.expm1(-gamma)
        mean_theta = bar + (1.0 - bar) * geometric / T
        return 1.0 - (1.0 - mean_theta) * (L - 1) / (2 * L)

    # ------------------------------------------------------------------ the step
    def begin_step(self, step: int) -> StepInfo:
        probs = self.keep_probs(step)
        active = self.path(step)
        self.gates.set_path(active, [1.0 / p for p in probs])
        return StepInfo(0, sum(active), active, extra={"theta": self.theta(step)})

    # checkpoints: the schedule is a pure function of (options, seed, step), so the base class's
    # record (name, options, seed) is all a resume needs.
