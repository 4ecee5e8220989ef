"""RaPTr as a training method (``raptr.wrap`` hosts it, or any other, in your own loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


from raptr.core import RaPTr, Schedule
from raptr.methods.base import Method, StepInfo, TrainingContext
from raptr.models.registry import check_must_run, layer_contract


@dataclass
class RaPTrOptions:
    # Default: paths of 1/4, 1/2, 3/4 and all of the depth (3-6-9-12 of 12 layers) with Prop-1 stage
    # lengths (T_i ∝ i), 0.75x the layer FLOPs. It beat the paper's 6-8-10-12 (equal stages) on our
    # clm-tiny and ul2-tiny suites and was nowhere worse (docs/results.md §6.5); the paper's schedule
    # is the preset bert-tiny-raptr-paper, or schedule="6-8-10-12", stage_lengths="equal".
    schedule: str = "f:0.25-0.5-0.75-1"  # path length per stage: layers "6-8-10-12", depth fractions "f:...", or "p:..." keep probs
    stage_lengths: str = "prop:1"  # equal | prop:ALPHA | relative lengths "1,1,2,4"
    fixed: str = "first,last"  # always-run layers: first,last | none | 0-based indices
    count_fixed: bool = True  # fixed layers count towards the path length
    sampling: Literal["bernoulli", "uniform"] = "bernoulli"  # uniform: a fixed-size subset
    scaling: Literal["none", "sqrt", "linear"] = "none"  # factor on kept layers' residual branch
    full_warmup: float = 0.0  # full-model stage first: steps, or a fraction of training if < 1
    require_full_final: bool = True  # last stage must train the full model

    def check(self, num_layers: int | None = None, total_steps: int | None = None) -> None:
        """Schedule mistakes surface here (with the model's depth and the run's length, all of them)."""
        if num_layers is not None and total_steps is not None:
            build_schedule(self, num_layers, total_steps)


def build_schedule(options: RaPTrOptions, num_layers: int, total_steps: int) -> Schedule:
    return Schedule.parse(
        options.schedule, num_layers, total_steps, count_fixed=options.count_fixed, fixed=options.fixed,
        stage_lengths=options.stage_lengths, full_warmup=options.full_warmup,
        require_full_final=options.require_full_final,
    )


class RaPTrMethod(Method):
    """Random path training with growing paths (Panigrahi et al. 2024)."""

    name = "raptr"
    Options = RaPTrOptions

    def attach(self, context: TrainingContext) -> None:
        self.context = context  # no separate options.check: building the schedule is that check
        schedule = build_schedule(self.options, len(context.layers), context.total_steps)
        check_must_run(context.model, schedule.fixed, "method.raptr.fixed")
        self.raptr = RaPTr(context.layers, schedule, context.seed, self.options.sampling, self.options.scaling,
                           check_every=0, passthrough=layer_contract(context.model)[0])  # the host checks ranks
        self.gates = self.raptr.gates

    def begin_step(self, step: int) -> StepInfo:
        plan = self.raptr.step(step)
        return StepInfo(plan.stage, plan.path_length, plan.active, extra={"keep_prob": plan.keep_prob})

    def stage_of(self, step: int) -> int:
        return self.raptr.schedule.stage_at(step).index

    def stage_boundaries(self) -> list[int]:
        return self.raptr.schedule.boundaries

    def expected_relative_flops(self) -> float:
        return self.raptr.schedule.relative_layer_flops()

    def extra_state(self) -> dict:
        return self.raptr.state_dict()

    def load_extra_state(self, state: dict) -> None:
        self.raptr.load_state_dict(state)
