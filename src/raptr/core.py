"""RaPTr in one file: schedule -> path sampler -> layer skipping.

RaPTr (Panigrahi et al., arXiv 2402.05913) keeps the full model, but at every optimizer step
trains only a random *path*: a subset of its layers. Stage by stage the expected path grows
(e.g. 6-8-10-12 of 12 layers) until the last stage trains the full model.

    schedule = Schedule.parse("6-8-10-12", num_layers=12, total_steps=10_000)
    raptr = RaPTr(model.blocks, schedule, seed=0)    # wraps the nn.ModuleList in place
    for step in range(10_000):
        raptr.step(step)             # draws this step's path; skipped layers cost nothing
        loss = model(batch).loss; loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)   # skipped layers keep grad=None

Three pieces, each usable alone:
1. ``Schedule``: stages of (steps, keep probability p), a pure function of the step, so a
   resumed run needs no schedule state at all.
2. ``PathSampler``: which layers run at a step. Fixed layers (default: first and last) always
   run; the others are kept by Bernoulli(p) (the paper) or as a uniform subset of fixed size.
   The draw comes from a generator seeded by (seed, step): every rank of a distributed job
   draws the same path with no communication, and resume needs no RNG state.
3. ``GatedLayers``: wraps a layer stack in place. The list keeps its length and the layers keep
   their class, names and parameters (state-dict keys do not change); a skipped layer returns its
   input untouched, so it costs no forward or backward compute and its parameters get no
   gradient. With ``zero_grad(set_to_none=True)`` their ``.grad`` stays ``None``, so AdamW
   neither moves their moments nor applies weight decay on steps they sat out (our choice: a
   skipped layer is frozen for that step, as if the step had not happened for it).
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from raptr import layer_calls as calls
from raptr.errors import RaptrError
from raptr.ranks import PATH_STREAM, RankAgreement, path_hash, step_generator

# --------------------------------------------------------------------------------------------
# 1. Schedule
# --------------------------------------------------------------------------------------------

SCALINGS = ("none", "sqrt", "linear")
SAMPLINGS = ("bernoulli", "uniform")


@dataclass(frozen=True)
class Stage:
    """One stage of every staged schedule: steps [start, end) and the stage's value in (0, 1] — the
    keep probability of a non-fixed layer (RaPTr's ``Schedule``) or the kept width fraction
    (``raptr.width.WidthSchedule``)."""

    index: int
    start: int  # first step of the stage
    end: int  # one past its last step
    value: float
    path_length: float | None = None  # RaPTr: expected layers run per step, fixed layers included

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def keep_prob(self) -> float:
        return self.value

    @property
    def fraction(self) -> float:
        return self.value


def parse_numbers(body: str, spec: str, how: str, kind: str = "schedule") -> list[float]:
    """The numbers of a '-'/','-separated schedule; empty parts (a stray or minus sign) are refused."""
    if not body:
        raise RaptrError(f"empty {kind} {spec!r}: {how}")
    parts = body.replace(",", "-").split("-")
    if any(p == "" for p in parts):
        raise RaptrError(f"cannot read {kind} {spec!r}: it has an empty or negative part; {how}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise RaptrError(f"cannot read {kind} {spec!r}: {how}") from None


def parse_fixed(spec: str | Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """``"first,last"`` (default), ``"none"``, or 0-based indices like ``"0,11"`` / ``[0, 11]``."""
    if spec is None or spec == "none" or spec == "":
        return ()
    items: list[Any] = spec.replace(" ", "").split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if item == "first":
            out.append(0)
        elif item == "last":
            out.append(num_layers - 1)
        else:
            try:
                index = int(item)
            except (TypeError, ValueError):
                raise RaptrError(
                    f"unknown fixed-layer option {item!r}: use 'first', 'last', 'none' or 0-based layer indices"
                ) from None
            if not 0 <= index < num_layers:
                raise RaptrError(f"fixed layer {index} is outside 0..{num_layers - 1}: use indices of the {num_layers}-layer stack")
            out.append(index)
    return tuple(sorted(set(out)))


def parse_stage_lengths(spec: str | Sequence[float], num_stages: int, total_steps: int) -> list[int]:
    """Steps per stage from ``equal``, ``prop:ALPHA`` (T_i ∝ i^α), or relative lengths per stage."""
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "equal":
            weights = [1.0] * num_stages
        elif spec.startswith("prop:") or spec.startswith("prop-"):
            try:
                alpha = float(spec[5:])
            except ValueError:
                raise RaptrError(f"bad stage lengths {spec!r}: write prop:ALPHA, e.g. prop:1") from None
            weights = [(i + 1) ** alpha for i in range(num_stages)]
        else:
            try:
                weights = [float(x) for x in spec.replace("-", ",").split(",")]
            except ValueError:
                raise RaptrError(
                    f"unknown stage lengths {spec!r}: use 'equal', 'prop:ALPHA', fractions '0.1,0.2,0.3,0.4' or steps '100,200,300,400'"
                ) from None
    else:
        weights = [float(x) for x in spec]
    if len(weights) != num_stages:
        raise RaptrError(f"{len(weights)} stage lengths given for {num_stages} stages: give one per stage")
    if any(w <= 0 for w in weights):
        raise RaptrError(f"stage lengths must be positive, got {weights}")
    # Relative lengths (fractions, or step counts adding up to total_steps, give themselves back
    # exactly): stage ends by cumulative rounding, a pure function of the step.
    total = sum(weights)
    bounds = [round(total_steps * sum(weights[: i + 1]) / total) for i in range(num_stages)]
    steps = [b - a for a, b in zip([0] + bounds[:-1], bounds)]
    if any(s <= 0 for s in steps):
        raise RaptrError(f"{total_steps} total steps is too few for {num_stages} stages with lengths {spec}: train longer or use fewer stages")
    return steps


def keep_prob_for_path(path_length: float, num_layers: int, num_fixed: int, count_fixed: bool) -> float:
    """Keep probability p of the non-fixed layers for an expected path length.

    count_fixed=True (default): fixed layers count towards the path, E[#run] = |I| + p (L - |I|),
    so the FLOPs ratio is exactly the path ratio. count_fixed=False: p = path / L applied to the
    non-fixed layers (the path then runs a little longer than its name).
    """
    if count_fixed:
        free = num_layers - num_fixed
        return 1.0 if free == 0 else (path_length - num_fixed) / free
    return path_length / num_layers


class Stages:
    """The stage machinery every staged method shares, with no model in it.

    Stage i covers steps [start_i, end_i) and carries a value in (0, 1] that never decreases: the
    keep probability of a non-fixed layer (``Schedule``), the kept width fraction
    (``raptr.width.WidthSchedule``). Lengths come from ``stage_lengths``; an optional full-model
    warm-up stage (value 1) goes first. A pure function of the step: nothing to save or restore.
    ``what``/``shown``/``full_hint`` only word the errors (what the value is, how the schedule was
    written, how to end it at the full model).
    """

    def __init__(self, values: Sequence[float], total_steps: int, stage_lengths: str | Sequence[float] = "equal",
                 full_warmup: float = 0, require_full_final: bool = True, *, what: str = "keep probability",
                 shown: str | None = None, full_hint: str = "end the schedule at 1, or set require_full_final=false if that is intended", example: str = "6-8-10-12"):
        if total_steps < 1:
            raise RaptrError(f"total_steps must be >= 1, got {total_steps}")
        values = [float(v) for v in values]
        if not values:
            raise RaptrError(f"empty schedule: give at least one stage, e.g. '{example}'")
        for v in values:
            if not 0.0 < v <= 1.0:
                raise RaptrError(f"{what} {v:g} is outside (0, 1]: every stage must train some of the model and at most all of it")
        shown = shown or "-".join(f"{v:g}" for v in values)
        if any(b < a for a, b in zip(values, values[1:])):
            raise RaptrError(f"schedule {shown} decreases: RaPTr subnetworks must grow (or stay) stage by stage")
        if require_full_final and values[-1] < 1.0:
            raise RaptrError(f"the last stage keeps {what} {values[-1]:g}, not the full model: {full_hint}")
        # Optional full-model warm-up stage (UL2's strong configuration): steps, or a fraction if < 1.
        warm = int(round(full_warmup * total_steps)) if 0 < full_warmup < 1 else int(full_warmup)
        if warm < 0 or warm >= total_steps:
            raise RaptrError(f"full_warmup={full_warmup} must be >= 0 and shorter than total_steps={total_steps}")
        lengths = parse_stage_lengths(stage_lengths, len(values), total_steps - warm)
        if warm:
            values, lengths = [1.0] + values, [warm] + lengths
        spans, start = [], 0
        for i, (v, n) in enumerate(zip(values, lengths)):
            spans.append(Stage(i, start, start + n, v))
            start += n
        self.spans: tuple[Stage, ...] = tuple(spans)
        self.total_steps = total_steps
        self.full_warmup_steps = warm

    def index_at(self, step: int) -> int:
        for span in self.spans:
            if step < span.end:
                return span.index
        return self.spans[-1].index  # training past total_steps keeps the last stage

    @property
    def boundaries(self) -> list[int]:
        """Steps at which a new stage starts (not counting step 0)."""
        return [s.start for s in self.spans[1:]]


class Schedule:
    """Stages of RaPTr: stage s lasts ``steps`` and keeps each non-fixed layer with prob ``p_s``."""

    def __init__(
        self,
        num_layers: int,
        total_steps: int,
        keep_probs: Sequence[float],
        stage_lengths: str | Sequence[float] = "equal",
        fixed: str | Sequence[int] | None = "first,last",
        full_warmup: float = 0,
        require_full_final: bool = True,
        path_lengths: Sequence[float] | None = None,
    ):
        if num_layers < 1:
            raise RaptrError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.total_steps = total_steps
        self.fixed = parse_fixed(fixed, num_layers)
        self.spans = Stages(keep_probs, total_steps, stage_lengths, full_warmup, require_full_final,
                            shown=self._describe(path_lengths, [float(p) for p in keep_probs]),
                            full_hint=f"end the schedule at {num_layers} layers, or set require_full_final=false "
                                      "(config key method.raptr.require_full_final=false) if that is intended")
        free = num_layers - len(self.fixed)
        self.stages: tuple[Stage, ...] = tuple(Stage(s.index, s.start, s.end, s.value, len(self.fixed) + s.value * free)
                                               for s in self.spans.spans)
        self.full_warmup_steps = self.spans.full_warmup_steps

    @staticmethod
    def _describe(path_lengths, probs) -> str:
        if path_lengths is not None:
            return "-".join(f"{x:g}" for x in path_lengths)
        return "p=" + "-".join(f"{x:g}" for x in probs)

    @classmethod
    def parse(
        cls,
        spec: str,
        num_layers: int,
        total_steps: int,
        *,
        count_fixed: bool = True,
        fixed: str | Sequence[int] | None = "first,last",
        **kwargs: Any,
    ) -> "Schedule":
        """``"6-8-10-12"`` (expected path length per stage), ``"f:0.25-0.5-0.75-1"`` (path length as a
        fraction of the depth: 3-6-9-12 of 12 layers, 8-16-24-32 of 32) or ``"p:0.4-0.6-0.8-1"``
        (keep probabilities of the non-fixed layers)."""
        if num_layers < 1:
            raise RaptrError(f"the model has {num_layers} layers: give a layer count >= 1")
        text = spec.strip().replace(" ", "")
        fixed_layers = parse_fixed(fixed, num_layers)
        prefix = text[:2] if text[:2] in ("p:", "p=", "f:", "f=") else ""
        values = parse_numbers(text[len(prefix):], spec, "write path lengths like '6-8-10-12', fractions of the depth like "
                               "'f:0.25-0.5-0.75-1' or keep probabilities like 'p:0.4-0.6-0.8-1'")
        if prefix.startswith("p"):
            return cls(num_layers, total_steps, values, fixed=fixed_layers, **kwargs)
        if prefix.startswith("f"):
            if any(not 0 < v <= 1 for v in values):
                raise RaptrError(f"depth fractions in {spec!r} must lie in (0, 1]: write e.g. 'f:0.25-0.5-0.75-1'")
            values = [v * num_layers for v in values]
        for length in values:
            if length > num_layers:
                raise RaptrError(f"path length {length:g} in {spec!r} exceeds the model's {num_layers} layers: use lengths <= {num_layers}")
            if length <= 0:
                raise RaptrError(f"path length {length:g} in {spec!r} must be positive")
            if count_fixed and length <= len(fixed_layers) < num_layers:
                raise RaptrError(
                    f"path length {length:g} in {spec!r} (of {num_layers} layers) is not more than the {len(fixed_layers)} fixed "
                    f"layers {list(fixed_layers)}: use longer paths or fewer fixed layers (fixed='none'); "
                    f"`raptr plan --layers {num_layers} --target 0.75` proposes schedules"
                )
        if count_fixed and len(fixed_layers) == num_layers and any(v < num_layers for v in values):
            raise RaptrError("every layer is fixed, so no path can be shorter than the model: fix fewer layers")
        probs = [keep_prob_for_path(v, num_layers, len(fixed_layers), count_fixed) for v in values]
        return cls(num_layers, total_steps, probs, fixed=fixed_layers, path_lengths=values, **kwargs)

    # The schedule is a pure function of the step: nothing to save or restore.
    def stage_at(self, step: int) -> Stage:
        return self.stages[self.spans.index_at(step)]

    def keep_prob(self, step: int) -> float:
        return self.stage_at(step).keep_prob

    @property
    def boundaries(self) -> list[int]:
        """Steps at which a new stage starts (not counting step 0)."""
        return self.spans.boundaries

    def relative_layer_flops(self) -> float:
        """Expected layer FLOPs of the whole schedule over a full-model run of equal steps."""
        return sum(s.steps * s.path_length for s in self.stages) / (self.total_steps * self.num_layers)

    def __repr__(self) -> str:
        parts = ", ".join(f"[{s.start},{s.end}) p={s.keep_prob:.3f} path={s.path_length:.2f}" for s in self.stages)
        return f"Schedule(L={self.num_layers}, fixed={list(self.fixed)}: {parts})"


# --------------------------------------------------------------------------------------------
# 2. Path sampler
# --------------------------------------------------------------------------------------------


class PathSampler:
    """Which layers run at a step. Fixed layers always run; the rest are drawn with prob p."""

    def __init__(self, num_layers: int, fixed: Sequence[int] = (), seed: int = 0, mode: str = "bernoulli"):
        if mode not in SAMPLINGS:
            raise RaptrError(f"unknown sampling {mode!r}: use one of {', '.join(SAMPLINGS)}")
        self.num_layers, self.fixed, self.seed, self.mode = num_layers, tuple(fixed), int(seed), mode
        self._free = torch.tensor([i for i in range(num_layers) if i not in self.fixed], dtype=torch.long)

    def sample(self, step: int, keep_prob: float) -> tuple[bool, ...]:
        active = torch.zeros(self.num_layers, dtype=torch.bool)
        active[list(self.fixed)] = True
        if keep_prob >= 1.0:
            active[:] = True
        elif len(self._free):
            gen = step_generator(self.seed, step, PATH_STREAM)
            if self.mode == "bernoulli":
                active[self._free] = torch.rand(len(self._free), generator=gen) < keep_prob
            else:
                # Fixed size k = p * |free|; a fractional k is rounded up with prob frac(k) so the
                # expected path length (hence FLOPs) matches the Bernoulli sampler's exactly.
                target = keep_prob * len(self._free)
                k = int(target) + int(torch.rand((), generator=gen).item() < target - int(target))
                chosen = torch.randperm(len(self._free), generator=gen)[:k]
                active[self._free[chosen]] = True
        return tuple(active.tolist())

    def state_dict(self) -> dict:
        return {"num_layers": self.num_layers, "fixed": list(self.fixed), "seed": self.seed, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint resumes only into the same sampler (one rule for every method: refuse, never adopt)."""
        saved = (state["num_layers"], tuple(state["fixed"]), int(state["seed"]), state["mode"])
        mine = (self.num_layers, self.fixed, self.seed, self.mode)
        if saved != mine:
            raise RaptrError(
                f"checkpoint's path sampler is for {saved[0]} layers, fixed {list(saved[1])}, seed {saved[2]}, {saved[3]} "
                f"sampling; this run has {mine[0]}, fixed {list(mine[1])}, seed {mine[2]}, {mine[3]}: resume with the same "
                "model, schedule and seed"
            )


def branch_scale(keep_prob: float, scaling: str) -> float:
    """Factor on a kept, non-fixed layer's residual-branch output during training."""
    if scaling == "none" or keep_prob >= 1.0:
        return 1.0
    if scaling == "sqrt":
        return 1.0 / math.sqrt(keep_prob)
    if scaling == "linear":
        return 1.0 / keep_prob
    raise RaptrError(f"unknown scaling {scaling!r}: use one of {', '.join(SCALINGS)}")


# --------------------------------------------------------------------------------------------
# 3. Skipping for real
# --------------------------------------------------------------------------------------------


class LayerGate:
    """Mixin put in front of a layer's class: skips the layer or scales its residual branch.

    It overrides ``__call__`` (not ``forward``), so the decision is plain Python outside the
    layer's hooks, gradient checkpointing and compiled code: ``layer.compile()`` or FSDP2's
    ``fully_shard(layer)`` never see it, and changing paths never recompiles anything. A skipped
    layer returns its input, in the structure the layer's own output has; what that takes in
    transformers (tuples, collected outputs, KV caches) is ``raptr.layer_calls``.
    """

    _gate_run: bool = True
    _gate_scale: float = 1.0
    _gate_serve: bool = False  # eval follows the path too (a model served at reduced depth: GatedLayers.serve)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training and not self._gate_serve:  # eval runs every layer, unscaled: compile traces straight through
            return calls.seen(self, super().__call__(*args, **kwargs))
        return self._gate_train_call(*args, **kwargs)

    # Whole-model ``torch.compile(model)`` must not trace the path decision: dynamo would guard on
    # ``_gate_run`` and compile a graph per path until its recompile limit, then run eager. Skipping
    # this one frame (``recursive=False``) makes each train-mode layer call a graph break: the layer's
    # own ``forward`` is compiled as a frame of its own, one graph shared by the layers of a class
    # whatever the path (tests/test_compile.py counts), and the decision and bookkeeping around it
    # run eagerly in ``_gate_before`` / ``_gate_after``, which dynamo never looks into.
    @torch.compiler.disable(recursive=False)
    def _gate_train_call(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs, skipped = self._gate_before(args, kwargs)
        if skipped is not None:
            return skipped
        return self._gate_after(args, kwargs, super().__call__(*args, **kwargs))

    @torch.compiler.disable
    def _gate_before(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, Any]:
        """The layer's arguments (with no fresh KV cache), and its output if it is skipped (else None)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        args, kwargs = calls.train_mode_cache(self, args, kwargs, hidden, self._gate_run)
        host = self.__dict__.get("_gate_host")
        if host is not None and not host["stepped"] and not host["warned"]:
            host["warned"] = True
            warnings.warn("raptr: a wrapped model ran a training forward before any path was set, so it trains the "
                          "full model: call rp.step(step) before each optimizer step", stacklevel=3)
        if host is not None and host["partial"]:
            calls.refuse_inner_cache(self)
        if self._gate_run:
            return args, kwargs, None
        out = calls.identity(self, hidden, args, kwargs)  # identity: y_l = y_{l-1}
        calls.record_skipped(self, args, out)
        return args, kwargs, out

    @torch.compiler.disable
    def _gate_after(self, args: tuple, kwargs: dict, out: Any) -> Any:
        out = calls.seen(self, out)
        if self._gate_scale == 1.0:
            return out
        # y_l = y_{l-1} + a * f(y_{l-1}): scale the whole residual branch of the layer.
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(out, tuple):
            return (hidden + self._gate_scale * (out[0] - hidden),) + out[1:]
        return hidden + self._gate_scale * (out - hidden)

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickle / ``torch.save(model)``: the gated class is made at run time and cannot be found by
        name, so a gated layer is saved as its own class and gated again on load (raptr must be importable)."""
        _, _, state, *rest = super().__reduce_ex__(protocol)
        return (_new_gated, (type(self).__bases__[1],), state, *rest)


_GATED_CLASSES: dict[type, type] = {}


def _new_gated(cls: type) -> nn.Module:
    gated = _gated_class(cls)
    return gated.__new__(gated)


def _gated_class(cls: type) -> type:
    if issubclass(cls, LayerGate):
        return cls
    if cls not in _GATED_CLASSES:
        _GATED_CLASSES[cls] = type(f"Gated{cls.__name__}", (LayerGate, cls), {"__module__": cls.__module__})
    return _GATED_CLASSES[cls]


class GatedLayers:
    """Puts a ``LayerGate`` on every layer of an ``nn.ModuleList``, in place.

    Models index layers by position (Qwen2's ``layer_types[i]``, rotary tables), so the list
    keeps its length; each layer keeps its attribute names, so ``state_dict`` keys are unchanged.
    """

    def __init__(self, layers: nn.ModuleList, passthrough: dict[int, str] | None = None):
        if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
            raise RaptrError(f"expected the model's nn.ModuleList of layers, got {type(layers).__name__}")
        if any(isinstance(layer, LayerGate) for layer in layers):
            raise RaptrError("these layers are already wrapped by raptr (a RaPTr, PLD or LayerDrop gate): wrap a model "
                             "once, or call .gates.unwrap() on the first wrapper before wrapping again")
        self.layers = layers
        self.original_classes = [type(layer) for layer in layers]
        self.contracts: dict[type, int] = {}  # output tuple length per layer class, shared by the stack
        # has a path been set (warn once if a training forward comes first)? is it partial?
        self.host = {"stepped": False, "warned": False, "partial": False}
        for layer in layers:
            layer.__class__ = _gated_class(type(layer))
            layer.__dict__["_gate_stack"] = self.contracts
            layer.__dict__["_gate_host"] = self.host
            if passthrough:
                layer.__dict__["_gate_passthrough"] = dict(passthrough)

    def __len__(self) -> int:
        return len(self.layers)

    def set_path(self, active: Sequence[bool], scales: Sequence[float] | float = 1.0) -> None:
        if len(active) != len(self.layers):
            raise RaptrError(f"path has {len(active)} entries for {len(self.layers)} layers")
        if isinstance(scales, (int, float)):
            scales = [float(scales)] * len(self.layers)
        for layer, run, scale in zip(self.layers, active, scales):
            layer._gate_run, layer._gate_scale = bool(run), float(scale)
        self.host["stepped"] = True
        self.host["partial"] = not all(active) or any(scale != 1.0 for scale in scales)

    def run_all(self) -> None:
        self.set_path([True] * len(self.layers))

    def serve(self, active: Sequence[bool] | None) -> None:
        """Evaluate (and generate) with only the ``active`` layers, the others skipped as in training;
        ``None``: every layer again. Eval mode otherwise ignores the path."""
        self.set_path([True] * len(self.layers) if active is None else active)
        for layer in self.layers:
            layer._gate_serve = active is not None

    def unwrap(self) -> None:
        """Give the layers their own classes back (e.g. before pickling the whole model)."""
        for layer, cls in zip(self.layers, self.original_classes):
            for name in ("_gate_run", "_gate_scale", "_gate_serve", "_gate_out_len", "_gate_passthrough", "_gate_stack",
                         "_gate_host"):
                layer.__dict__.pop(name, None)
            layer.__class__ = cls


# --------------------------------------------------------------------------------------------
# All three together
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    step: int
    stage: int
    keep_prob: float
    active: tuple[bool, ...]
    scale: float  # on kept non-fixed layers

    @property
    def path_length(self) -> int:
        return sum(self.active)


class RaPTr:
    """Schedule + sampler + gated layers. Call ``step(step)`` before each optimizer step.

    One path per optimizer step: with gradient accumulation, call it once and run all
    micro-batches; in eval mode (``model.eval()``) every layer runs, unscaled.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        schedule: Schedule,
        seed: int = 0,
        sampling: str = "bernoulli",
        scaling: str = "none",
        check_every: int = 50,
        passthrough: dict[int, str] | None = None,
    ):
        if len(layers) != schedule.num_layers:
            raise RaptrError(f"schedule is for {schedule.num_layers} layers but the stack has {len(layers)}: build the schedule with num_layers={len(layers)}")
        if scaling not in SCALINGS:
            raise RaptrError(f"unknown scaling {scaling!r}: use one of {', '.join(SCALINGS)}")
        self.schedule, self.scaling = schedule, scaling
        self.sampler = PathSampler(schedule.num_layers, schedule.fixed, seed, sampling)
        self.gates = GatedLayers(layers, passthrough)
        self.last_plan: StepPlan | None = None
        self.agreement = RankAgreement(check_every)  # under torch.distributed: all ranks, same path

    def plan(self, step: int) -> StepPlan:
        """The path of ``step`` without touching the model (pure)."""
        try:
            step = operator.index(step)
        except TypeError:
            step = -1
        if step < 0:
            raise RaptrError(f"step must be an integer >= 0 (the optimizer step about to run): rp.step(step) before each optimizer step")
        stage = self.schedule.stage_at(step)
        active = self.sampler.sample(step, stage.keep_prob)
        return StepPlan(step, stage.index, stage.keep_prob, active, branch_scale(stage.keep_prob, self.scaling))

    def step(self, step: int) -> StepPlan:
        plan = self.plan(step)
        self.agreement(step, path_hash(plan.active, step))
        fixed = set(self.schedule.fixed)
        self.gates.set_path(plan.active, [1.0 if i in fixed else plan.scale for i in range(len(plan.active))])
        self.last_plan = plan
        return plan

    def full(self) -> None:
        """Run every layer, unscaled, also in train mode (e.g. to measure the full model)."""
        self.gates.run_all()

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "scaling": self.scaling,
                "stages": [(s.start, s.end, s.keep_prob) for s in self.schedule.stages]}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        mine = [(s.start, s.end, s.keep_prob) for s in self.schedule.stages]
        if [tuple(x) for x in state["stages"]] != mine:
            raise RaptrError("checkpoint was written with a different RaPTr schedule: resume with the same schedule and total steps")
        if state["scaling"] != self.scaling:
            raise RaptrError(f"checkpoint was written with RaPTr scaling={state['scaling']!r}, this run has {self.scaling!r}: "
                             "resume with the same scaling")
