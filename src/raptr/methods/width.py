"""Width subnetworks as training methods: ``width`` (random heads and FFN units) and ``depthwidth``.

``width`` (RaPTr v2, "random part training"): every step each layer trains a random subset of its
attention heads (KV groups) and FFN units; the kept fraction grows by stage (``"0.5-0.75-1"``) to
the full model. The engine is ``raptr.width.WidthRaPTr`` (sliced matmuls, no masks).

``depthwidth`` (the Evolving-Subnetwork-Training family): a random RaPTr path of layers *and*
random heads/units inside the layers that run, both growing by stage. The two schedules have
the same number of stages over the same steps (``stage_lengths``).

Both report, per layer, the share of its FLOPs computed (``StepInfo.layer_fractions``: sub-layer
FLOPs / full-layer FLOPs at the run's sequence length, 0 for a skipped layer), so every host
counts exact FLOPs. Width slices receive zero gradients (not None): DDP needs no
``find_unused_parameters`` for ``width``; ``depthwidth`` skips layers and does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from raptr.core import RaPTr, parse_stage_lengths
from raptr.errors import RaptrError
from raptr.methods.base import Method, StepInfo, TrainingContext
from raptr.methods.raptr import RaPTrOptions, build_schedule
from raptr.models.registry import check_must_run, layer_contract
from raptr.width import WidthRaPTr, WidthSchedule, plan_hash


@dataclass
class WidthOptions:
    schedule: str = "0.5-0.75-1"  # kept fraction of heads and FFN units per stage, ending at 1
    stage_lengths: str = "equal"  # equal | prop:ALPHA | relative lengths "1,1,2"
    scaling: Literal["none", "sqrt", "linear"] = "none"  # factor on the kept heads'/units' output
    heads: bool = True  # sample attention heads (KV groups)
    ffn: bool = True  # sample FFN units
    full_warmup: float = 0.0  # full-model stage first: steps, or a fraction of training if < 1

    def check(self, num_layers: int | None = None, total_steps: int | None = None) -> None:
        if not (self.heads or self.ffn):
            raise RaptrError("method.width.heads and method.width.ffn are both false, so nothing is sampled: enable one")
        self.build(total_steps or 1000)  # refuses fractions outside (0, 1], decreasing or not ending at 1

    def build(self, total_steps: int) -> WidthSchedule:
        return WidthSchedule.parse(self.schedule, total_steps, stage_lengths=self.stage_lengths, full_warmup=self.full_warmup)


def _shares(wr: WidthRaPTr, plan, seq_len: int, active=None) -> tuple[float, ...]:
    """Per layer: sub-layer FLOPs / full-layer FLOPs (0 for a layer that did not run)."""
    out = []
    for i, (wl, u) in enumerate(zip(wr.layers, plan.num_units)):
        run = active is None or active[i]
        out.append(wl.sub_shape(wl.head_count(plan, i), u).forward_flops(seq_len) / wl.shape.forward_flops(seq_len) if run else 0.0)
    return tuple(out)


class _WidthFingerprint:
    needs_seq_len = True  # a layer's share of FLOPs depends on the sequence length (attention scores)
    agreement_of = "layer paths, heads and FFN units"

    def fingerprint(self, info: StepInfo, step: int) -> int:
        from raptr.ranks import path_hash

        return (path_hash(info.path, step) * 1_000_003 + plan_hash(self.width.last_plan)) % (2**61 - 1)


class WidthMethod(_WidthFingerprint, Method):
    """Random heads and FFN units per layer and step, kept fractions growing by stage."""

    name = "width"
    Options = WidthOptions
    skips_layers = False  # every layer runs; idle slices get zero gradients, not None

    def attach(self, context: TrainingContext) -> None:
        super().attach(context)
        o = self.options
        self.width = WidthRaPTr(context.layers, o.build(context.total_steps), seed=context.seed, scaling=o.scaling,
                                heads=o.heads, ffn=o.ffn, seq_len=context.seq_len, check_every=0)  # the host checks ranks

    def begin_step(self, step: int) -> StepInfo:
        plan = self.width.step(step)
        shares = _shares(self.width, plan, self.context.seq_len)
        return StepInfo(plan.stage, len(self.layers), None, layer_fractions=shares, extra={"fraction": plan.fraction})

    def stage_of(self, step: int) -> int:
        return self.width.schedule.stage_at(step).index

    def stage_boundaries(self) -> list[int]:
        return self.width.schedule.boundaries

    def expected_relative_flops(self) -> float:
        return self.width.relative_flops(None, self.context.seq_len)

    def extra_state(self) -> dict:
        return self.width.state_dict()

    def load_extra_state(self, state: dict) -> None:
        self.width.load_state_dict(state)

    def detach(self) -> None:
        self.width.unwrap()


@dataclass
class DepthWidthOptions:
    schedule: str = "6-8-10-12"  # RaPTr path length per stage (or "p:..." keep probabilities)
    width_schedule: str = "0.5-0.75-0.875-1"  # kept width fraction per stage, same number of stages
    stage_lengths: str = "equal"
    fixed: str = "first,last"  # layers on every path (they are still width-sampled)
    sampling: Literal["bernoulli", "uniform"] = "bernoulli"
    scaling: Literal["none", "sqrt", "linear"] = "none"  # for both the layers and the heads/units
    heads: bool = True
    ffn: bool = True

    def depth(self) -> RaPTrOptions:
        return RaPTrOptions(schedule=self.schedule, stage_lengths=self.stage_lengths, fixed=self.fixed,
                            sampling=self.sampling, scaling=self.scaling)

    def width(self) -> WidthOptions:
        return WidthOptions(schedule=self.width_schedule, stage_lengths=self.stage_lengths, scaling=self.scaling,
                            heads=self.heads, ffn=self.ffn)

    def check(self, num_layers: int | None = None, total_steps: int | None = None) -> None:
        self.width().check(num_layers, total_steps)
        steps = total_steps or 1000
        n_width = len(self.width().build(steps).stages)
        if num_layers is not None:
            n_depth = len(build_schedule(self.depth(), num_layers, steps).stages)
            if n_depth != n_width:
                raise RaptrError(f"method.depthwidth.schedule has {n_depth} stages but width_schedule has {n_width}: "
                                 "give both schedules the same number of stages")
        parse_stage_lengths(self.stage_lengths, n_width, steps)


class DepthWidth(_WidthFingerprint, Method):
    """A random path of layers and random heads/units in the layers that run, both growing by stage."""

    name = "depthwidth"
    Options = DepthWidthOptions

    def attach(self, context: TrainingContext) -> None:
        super().attach(context)
        o = self.options
        depth = build_schedule(o.depth(), len(context.layers), context.total_steps)
        check_must_run(context.model, depth.fixed, "method.depthwidth.fixed")
        # Width first (it swaps the layers' linears), then the depth gates around each layer.
        self.width = WidthRaPTr(context.layers, o.width().build(context.total_steps), seed=context.seed,
                                scaling=o.scaling, heads=o.heads, ffn=o.ffn, seq_len=context.seq_len, check_every=0)
        self.raptr = RaPTr(context.layers, depth, context.seed, o.sampling, o.scaling, check_every=0,
                           passthrough=layer_contract(context.model)[0])  # the host checks ranks
        self.gates = self.raptr.gates

    def begin_step(self, step: int) -> StepInfo:
        path = self.raptr.step(step)
        plan = self.width.step(step)
        shares = _shares(self.width, plan, self.context.seq_len, path.active)
        return StepInfo(path.stage, path.path_length, path.active, layer_fractions=shares,
                        extra={"keep_prob": path.keep_prob, "fraction": plan.fraction})

    def stage_of(self, step: int) -> int:
        return self.raptr.schedule.stage_at(step).index

    def stage_boundaries(self) -> list[int]:
        return self.raptr.schedule.boundaries

    def expected_relative_flops(self) -> float:
        """Σ_stages steps · (E[path length] / L) · E[width share] / T (path and width are independent)."""
        depth, width, T = self.raptr.schedule, self.width, self.context.seq_len
        full = width.full_layer_flops(T)
        total = sum(d.steps * d.path_length / len(self.layers) * width.expected_layer_flops(w.fraction, T) / full
                    for d, w in zip(depth.stages, width.schedule.stages))
        return total / depth.total_steps

    def extra_state(self) -> dict:
        return {"depth": self.raptr.state_dict(), "width": self.width.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.raptr.load_state_dict(state["depth"])
        self.width.load_state_dict(state["width"])

    def detach(self) -> None:
        self.gates.unwrap()  # the depth gates are outermost: off first
        self.width.unwrap()
