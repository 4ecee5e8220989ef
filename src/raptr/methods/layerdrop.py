"""LayerDrop / stochastic depth with a constant keep probability (Fan et al. 2019; Huang et al. 2016).

Every step, each non-fixed layer runs with the same probability p (one Bernoulli per layer per
step from ``core.step_generator(seed, step)``, the draw RaPTr's sampler makes); fixed layers
always run. Kept non-fixed layers scale their residual branch by ``core.branch_scale(p, scaling)``
(``linear`` = 1/p, the stochastic-depth default; ``sqrt``; ``none``). Eval runs the full model,
unscaled. This is the constant-rate control the RaPTr reviewers asked for: RaPTr with a single
stage that never reaches the full model. ``keep_prob_for_flops`` picks p to match another
method's FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from raptr.core import GatedLayers, PathSampler, branch_scale, parse_fixed
from raptr.errors import RaptrError
from raptr.methods.base import Method, StepInfo, TrainingContext
from raptr.models.registry import check_must_run, layer_contract


@dataclass
class LayerDropOptions:
    keep_prob: float = 0.75  # constant keep probability of every non-fixed layer
    fixed: str = "none"
    scaling: Literal["none", "sqrt", "linear"] = "linear"  # stochastic depth rescales kept blocks by 1/p

    def check(self, num_layers: int | None = None, total_steps: int | None = None) -> None:
        if not 0.0 < self.keep_prob <= 1.0:
            raise RaptrError(f"LayerDrop keep_prob (method.layerdrop.keep_prob) must be in (0, 1], got {self.keep_prob}")
        if num_layers is not None:
            parse_fixed(self.fixed, num_layers)


def keep_prob_for_flops(target_relative: float, num_layers: int, fixed: str | Sequence[int] | None = "none") -> float:
    """Keep probability p whose expected layer FLOPs are ``target_relative`` of the full model.

    Solves (|fixed| + p (L − |fixed|)) / L = target, e.g. to match RaPTr 6-8-10-12 (0.75) on 12
    layers with no fixed layers: p = 0.75; with first and last fixed: p = (9 − 2)/10 = 0.7.
    """
    fixed_layers = parse_fixed(fixed, num_layers)
    free = num_layers - len(fixed_layers)
    floor = len(fixed_layers) / num_layers
    if free == 0:
        if abs(target_relative - 1.0) > 1e-12:
            raise RaptrError(f"every layer is fixed, so the FLOPs are 1.0, not {target_relative:g}: fix fewer layers")
        return 1.0
    p = (target_relative * num_layers - len(fixed_layers)) / free
    if not 0.0 < p <= 1.0 + 1e-12:
        raise RaptrError(
            f"relative FLOPs {target_relative:g} cannot be reached with {len(fixed_layers)} of {num_layers} layers fixed: "
            f"pick a target in ({floor:g}, 1] or fix fewer layers"
        )
    return min(p, 1.0)


class LayerDrop(Method):
    """Constant-probability layer dropping (name ``"layerdrop"``)."""

    name = "layerdrop"
    extendable = True  # a constant rate: nothing depends on the run length
    Options = LayerDropOptions

    @property
    def keep_prob(self) -> float:
        return self.options.keep_prob

    def attach(self, context: TrainingContext) -> None:
        super().attach(context)
        self.num_layers = len(context.layers)
        self.fixed = parse_fixed(self.options.fixed, self.num_layers)
        self.sampler = PathSampler(self.num_layers, self.fixed, context.seed, "bernoulli")
        self.scale = branch_scale(self.keep_prob, self.options.scaling)
        self.scales = [1.0 if i in self.fixed else self.scale for i in range(self.num_layers)]
        check_must_run(context.model, self.fixed, "method.layerdrop.fixed")
        self.gates = GatedLayers(context.layers, layer_contract(context.model)[0])

    def path(self, step: int) -> tuple[bool, ...]:
        """Which layers run at ``step`` (pure: a function of (seed, step) only)."""
        return self.sampler.sample(step, self.keep_prob)

    def begin_step(self, step: int) -> StepInfo:
        active = self.path(step)
        self.gates.set_path(active, self.scales)
        return StepInfo(0, sum(active), active, extra={"keep_prob": self.keep_prob})

    def expected_relative_flops(self) -> float:
        """(|fixed| + p (L − |fixed|)) / L."""
        L, k = self.num_layers, len(self.fixed)
        return (k + self.keep_prob * (L - k)) / L

    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
