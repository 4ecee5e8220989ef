"""The method protocol: a training method is a small object the host calls at named points.

    attach(context)        once, before the first step (wrap layers, read total steps, ...)
    begin_step(step)       before the forward of every optimizer step; returns what ran (StepInfo)
    state_dict() / load_state_dict(state)   saved in every checkpoint

A method carries its own typed options (``Options``, a dataclass whose fields are the config keys
``method.<name>.*``; ``Options.check(num_layers, total_steps)`` validates them) and declares what
hosts need (``skips_layers``, ``changes_model``, ``supports_fsdp``, ``extendable``). Hosts (our
trainer, the HF and Lightning callbacks, a user's loop) ask those, never the method's name. A
new method is one file plus one line in ``raptr.methods.registry``.

One resume rule for every method: ``state_dict`` records the method's name, options and seed, and
``load_state_dict`` refuses a checkpoint whose record differs (one error line naming the keys).

Methods may change the model (skip layers, grow the stack) but never the loss or the data, so
every method can be compared with any other on equal terms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from raptr import typed
from raptr.errors import RaptrError

if TYPE_CHECKING:
    from torch import nn


@dataclass
class TrainingContext:
    """What a method may look at and change: the trainer (or an HF callback) fills it in."""

    model: "nn.Module"
    layers: "nn.ModuleList"
    total_steps: int
    seed: int = 0
    optimizer: Any = None  # set once the optimizer exists; methods that grow the model need it
    seq_len: int = 128  # tokens per sequence (width methods' FLOPs depend on it through attention)


@dataclass(frozen=True)
class StepInfo:
    stage: int  # index of the method's stage (0 for methods without stages)
    layers_run: int  # layers executed this step: drives the exact FLOPs count
    path: tuple[bool, ...] | None = None  # which layers ran, if the method samples paths
    lr_factor: float = 1.0  # multiplies the trainer's learning rate (stacking's re-warm-up)
    model_changed: bool = False  # the method changed the model's parameters this step (stacking grew it)
    extra: dict[str, Any] = field(default_factory=dict)
    # Per layer, the share of its FLOPs computed this step (0 skipped, 1 full, between: width
    # subnetworks); None means "the layers in ``path`` (or all) ran in full".
    layer_fractions: tuple[float, ...] | None = None

    @property
    def layer_units(self) -> float:
        """Full-layer equivalents computed this step: what the exact FLOPs count multiplies."""
        return float(sum(self.layer_fractions)) if self.layer_fractions is not None else float(self.layers_run)

    def fractions(self, num_layers: int) -> tuple[float, ...]:
        """``layer_fractions``, or 1/0 per layer from ``path`` (every layer when there is none)."""
        if self.layer_fractions is not None:
            return tuple(self.layer_fractions)
        if self.path is not None:
            return tuple(1.0 if run else 0.0 for run in self.path)
        return (1.0,) * num_layers


def decay_groups(model: "nn.Module") -> tuple[list, list]:
    """AdamW parameter groups in model order: matrices get weight decay, biases and norms don't.

    The trainer builds its optimizer from this, and a method that changes the model (stacking)
    regroups with it, so the optimizer's parameter order is always the model's (resume relies on it).
    """
    params = list(model.parameters())
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def options_dict(options: Any) -> dict:
    return dataclasses.asdict(options) if options is not None else {}


class Method:
    name = "method"
    Options: ClassVar[type | None] = None  # typed options dataclass (None: the method has no knobs)
    # What hosts need to know, declared (hosts never switch on ``name``):
    skips_layers = True  # some steps leave layers out: DDP needs find_unused_parameters
    changes_model = False  # adds parameters during training (regroup the optimizer, re-wrap DDP)
    supports_fsdp = True  # FSDP2 shards the model once, so methods that change it cannot use it
    # Whether a run may be extended (``train.steps`` raised on resume): only methods whose schedule
    # does not depend on the total number of steps.
    extendable = False
    needs_seq_len = False  # its FLOPs depend on tokens per sequence (width: attention): hosts must give it
    agreement_of = "layer paths"  # what all ranks must draw alike, in the rank-agreement error

    def __init__(self, options: Any = None):
        if options is None and self.Options is not None:
            options = self.Options()
        if self.Options is not None and not isinstance(options, self.Options):
            raise RaptrError(f"{type(self).__name__} takes {self.Options.__name__}, got {type(options).__name__}")
        if options is not None:
            typed.check_fields(options, f"method.{self.name}.")  # the same checks as a config file's
        self.options = options
        if hasattr(options, "check"):
            options.check()  # what can be checked without the model

    def attach(self, context: TrainingContext) -> None:
        self.context = context
        if hasattr(self.options, "check"):
            self.options.check(len(context.layers), context.total_steps)

    @property
    def layers(self) -> "nn.ModuleList":
        return self.context.layers

    def begin_step(self, step: int) -> StepInfo:
        raise NotImplementedError

    def detach(self) -> None:
        """Leave the model as it was found (plain layer classes): hosts call it when training ends."""
        gates = getattr(self, "gates", None)
        if gates is not None:
            gates.unwrap()

    def fingerprint(self, info: StepInfo, step: int) -> int:
        """A hash of what every rank must compute alike this step (the host all-reduces it now and then)."""
        from raptr.ranks import path_hash

        return path_hash(info.path, step)

    def stage_of(self, step: int) -> int:
        return 0

    def stage_boundaries(self) -> list[int]:
        return []

    def expected_relative_flops(self) -> float:
        """Expected layer FLOPs over a full-model run of equal steps (1.0 for standard)."""
        return 1.0

    # ------------------------------------------------------------------ checkpoints: one rule
    def state_dict(self) -> dict:
        """What a checkpoint needs: the record checked on resume, plus the method's own state."""
        return {"record": self.resume_record(), "state": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if "record" in state:
            saved, mine = state["record"], self.resume_record()
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            if diff:
                shown = ", ".join(f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in diff[:3])
                raise RaptrError(f"the checkpoint was written by another method configuration ({shown}): "
                                 "resume with the checkpoint's method, options and seed, or start a fresh run")
            state = state["state"]
        self.load_extra_state(state)

    def resume_record(self) -> dict:
        """Name, options and seed: a checkpoint resumes only into the same."""
        context = getattr(self, "context", None)
        return {"method": self.name, **{f"options.{k}": v for k, v in options_dict(self.options).items()},
                "seed": getattr(context, "seed", None)}

    def extra_state(self) -> dict:
        """State beyond the record (most methods are pure functions of (options, seed, step): none)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class Standard(Method):
    """Standard training: every step trains the full model."""

    name = "standard"
    skips_layers = False
    extendable = True

    def begin_step(self, step: int) -> StepInfo:
        return StepInfo(0, len(self.layers))
