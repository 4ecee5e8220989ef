"""The method protocol: a training method is a small object the trainer calls at named points.

    attach(context)        once, before the first step (wrap layers, read total steps, ...)
    begin_step(step)       before the forward of every optimizer step; returns what ran
    state_dict() / load_state_dict(state)   saved in every checkpoint

Methods may change the model (skip layers, grow the stack) but never the loss or the data, so
every method can be compared with any other on equal terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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


@dataclass(frozen=True)
class StepInfo:
    stage: int  # index of the method's stage (0 for methods without stages)
    layers_run: int  # layers executed this step: drives the exact FLOPs count
    path: tuple[bool, ...] | None = None  # which layers ran, if the method samples paths
    lr_factor: float = 1.0  # multiplies the trainer's learning rate (stacking's re-warm-up)
    model_changed: bool = False  # the method changed the model's parameters this step (stacking grew it)
    extra: dict[str, Any] = field(default_factory=dict)


def decay_groups(model: "nn.Module") -> tuple[list, list]:
    """AdamW parameter groups in model order: matrices get weight decay, biases and norms don't.

    The trainer builds its optimizer from this, and a method that changes the model (stacking)
    regroups with it, so the optimizer's parameter order is always the model's (resume relies on it).
    """
    params = list(model.parameters())
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


class Method:
    name = "method"
    # What hosts need to know, declared (hosts never switch on ``name``):
    skips_layers = True  # some steps leave layers out: DDP needs find_unused_parameters
    changes_model = False  # adds parameters during training (regroup the optimizer, re-wrap DDP)
    supports_fsdp = True  # FSDP2 shards the model once, so methods that change it cannot use it
    # Whether a run may be extended (``train.steps`` raised on resume): only methods whose schedule
    # does not depend on the total number of steps.
    extendable = False

    def attach(self, context: TrainingContext) -> None:
        self.context = context

    @property
    def layers(self) -> "nn.ModuleList":
        return self.context.layers

    def begin_step(self, step: int) -> StepInfo:
        raise NotImplementedError

    def stage_of(self, step: int) -> int:
        return 0

    def stage_boundaries(self) -> list[int]:
        return []

    def expected_relative_flops(self) -> float:
        """Expected layer FLOPs over a full-model run of equal steps (1.0 for standard)."""
        return 1.0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Standard(Method):
    """Standard training: every step trains the full model."""

    name = "standard"
    skips_layers = False
    extendable = True

    def begin_step(self, step: int) -> StepInfo:
        return StepInfo(0, len(self.layers))
