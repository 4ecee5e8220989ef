"""Gradual stacking (Reddi et al. 2023) and MIDAS (Saunshi et al. 2024): grow the depth by copying.

The model starts shallow and grows at stage boundaries until it has its full depth:

    "6-9-12" on a 12-layer model: train layers 0-5, then copy 3 layers to get 9, then 12.

``attach`` shrinks the model's layer ``nn.ModuleList`` **in place** to the first stage's depth by
keeping its bottom layers; the layers above are dropped for good (their random initialisation
is never used, and the trainer's full-depth FLOPs model is built before ``attach``). At the first
step of each later stage, ``begin_step`` inserts copies of trained layers:

- ``copy="top"`` (gradual stacking): copies of the current top ``n`` layers, stacked on top.
- ``copy="middle"`` (MIDAS): the stack is read as blocks of ``n`` layers; the middle block,
  number ``ceil(k/2)`` of ``k = ceil(L/n)`` (1-based, clipped to the stack), is copied and the
  copy inserted right after it. For an odd number of blocks this is the centred block.

A growth by more layers than the stack has (2 -> 6) is done as repeated growths by at most the
current depth (2 -> 4 -> 6), so every copy has a trained source.

The copies' AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``) is cloned from their sources
(``optimizer_state="copy"``) or left empty (``"reset"``: AdamW starts them at step 0). Then the
optimizer's two groups are rebuilt in model order with ``decay_groups(model)``; existing state
stays attached to its parameters by identity. The learning rate may be re-warmed up linearly
over ``rewarmup_steps`` after every growth (Reddi et al. restart a 10k-step warm-up per stage).

HF models: ``config.num_hidden_layers`` is kept equal to the current depth (Llama-style models
run ``self.layers[:config.num_hidden_layers]``), ``config.layer_types`` follows the layers, and
each attention's ``layer_idx`` is renumbered to its new position (KV-cache slots).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from raptr.core import parse_stage_lengths
from raptr.errors import RaptrError
from raptr.methods.base import Method, StepInfo, TrainingContext, decay_groups


@dataclass
class StackingOptions:
    schedule: str = "6-9-12"  # depth per stage
    stage_lengths: str = "equal"
    copy: Literal["top", "middle"] = "top"  # top: gradual stacking, middle: MIDAS
    optimizer_state: Literal["copy", "reset"] = "copy"  # Adam moments of the new layers
    rewarmup_steps: int = 0  # linear LR re-warm-up at each growth (Reddi et al. use one)

    def check(self, num_layers: int | None = None, total_steps: int | None = None) -> None:
        # copy / optimizer_state choices: checked by their Literal types (raptr.typed) before this runs
        if self.rewarmup_steps < 0:
            raise RaptrError(f"stacking rewarmup_steps (method.stacking.rewarmup_steps) must be >= 0, got {self.rewarmup_steps}")
        depths = parse_depths(self.schedule)
        if num_layers is not None and depths[-1] != num_layers:
            raise RaptrError(
                f"stacking schedule {self.schedule!r} (method.stacking.schedule) ends at {depths[-1]} layers but the model "
                f"has {num_layers}: end the schedule at the model's depth (e.g. '{max(1, num_layers // 2)}-{num_layers}') "
                f"or set model.n_layers={depths[-1]}")
        if total_steps is not None:
            parse_stage_lengths(self.stage_lengths, len(depths), total_steps)


COPY_MODES = ("top", "middle")


def parse_depths(spec: str) -> list[int]:
    """``"6-9-12"`` -> [6, 9, 12]: the depth of every stage, strictly growing."""
    text = str(spec).strip().replace(" ", "").replace(",", "-")
    try:
        depths = [int(x) for x in text.split("-") if x != ""]
    except ValueError:
        raise RaptrError(f"cannot read stacking schedule {spec!r}: write whole depths per stage like '6-9-12'") from None
    if not depths:
        raise RaptrError(f"empty stacking schedule {spec!r}: write depths per stage like '6-9-12'")
    if depths[0] < 1:
        raise RaptrError(f"stacking schedule {spec!r} starts at depth {depths[0]}: the first stage needs at least 1 layer")
    if any(b <= a for a, b in zip(depths, depths[1:])):
        raise RaptrError(f"stacking schedule {spec!r} must grow at every stage: use strictly increasing depths like '6-9-12'")
    return depths


def growth_plan(depth: int, new_depth: int, mode: str) -> list[tuple[int, int, int]]:
    """Growths ``(start, n, insert_at)`` taking a stack of ``depth`` layers to ``new_depth``.

    Each growth copies layers ``start .. start+n-1`` and inserts the copies at ``insert_at``
    (positions in the stack as it is just before that growth). Pure: resume replays it.
    """
    if mode not in COPY_MODES:
        raise RaptrError(f"unknown stacking copy mode {mode!r}: use one of {', '.join(COPY_MODES)}")
    plan = []
    while depth < new_depth:
        n = min(new_depth - depth, depth)
        if mode == "top":
            start = depth - n
        else:
            blocks = math.ceil(depth / n)
            start = min((math.ceil(blocks / 2) - 1) * n, depth - n)
        plan.append((start, n, start + n))
        depth += n
    return plan


class GradualStacking(Method):
    """Grow a shallow model stage by stage by copying trained layers (name ``"stacking"``).

    Python use (the trainer does all of this for you)::

        method = GradualStacking(StackingOptions(schedule="6-9-12", copy="top"))
        method.attach(TrainingContext(model, find_layer_stack(model), total_steps))  # shrinks to 6
        opt = torch.optim.AdamW(...from decay_groups(model)...); method.context.optimizer = opt
        for step in range(total_steps):
            info = method.begin_step(step)     # grows at stage starts, regroups ``opt``
            set lr = base_lr(step) * info.lr_factor; forward, backward, opt.step()
    """

    name = "stacking"
    skips_layers = False  # every layer of the current (grown) model runs
    changes_model = True
    supports_fsdp = False
    Options = StackingOptions

    def __init__(self, options: StackingOptions | None = None):
        super().__init__(options)
        self.depths = parse_depths(self.options.schedule)
        self.stage = 0  # stages grown so far (the model has depth depths[stage])
        self.lineage: list[int] = []  # for each current layer: the index of the original layer it descends from

    # ------------------------------------------------------------------ setup
    def attach(self, context: TrainingContext) -> None:
        super().attach(context)  # checks the schedule against the model's depth
        from raptr.models.registry import is_joined_stack

        if context.model is not None and is_joined_stack(context.model, context.layers):
            raise RaptrError("stacking grows one stack of layers, but this model's layers span several stacks "
                             "(an encoder-decoder): use a path method (raptr, pld, layerdrop) instead")
        lengths = parse_stage_lengths(self.options.stage_lengths, len(self.depths), context.total_steps)
        self.starts = [sum(lengths[:i]) for i in range(len(lengths))]
        self.ends = [s + n for s, n in zip(self.starts, lengths)]
        self.lengths = lengths
        self.stage = 0
        first = self.depths[0]
        self.lineage = list(range(first))
        self._sync_model(list(range(first)))
        del context.layers[first:]  # the layers above the first stage are dropped for good
        self._renumber()
        if context.optimizer is not None:  # attached after the optimizer was built: forget the dropped layers
            self._regroup(context.optimizer)

    @property
    def depth(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ schedule (pure)
    def stage_of(self, step: int) -> int:
        for i, end in enumerate(self.ends):
            if step < end:
                return i
        return len(self.ends) - 1

    def stage_boundaries(self) -> list[int]:
        return self.starts[1:]

    def lr_factor(self, step: int) -> float:
        """Linear re-warm-up over ``rewarmup_steps`` after each growth (1.0 in stage 0 or when off)."""
        stage, warm = self.stage_of(step), self.options.rewarmup_steps
        if stage == 0 or warm <= 0:
            return 1.0
        return min(1.0, (step - self.starts[stage] + 1) / warm)

    def expected_relative_flops(self) -> float:
        """Σ_s T_s L_s / (T L_final): layer FLOPs over a full-depth run of equal steps."""
        total = sum(self.lengths)
        return sum(n * d for n, d in zip(self.lengths, self.depths)) / (total * self.depths[-1])

    # ------------------------------------------------------------------ the step
    def begin_step(self, step: int) -> StepInfo:
        target = self.stage_of(step)
        grew = self.stage < target
        while self.stage < target:
            self.grow()
        return StepInfo(self.stage, self.depth, None, self.lr_factor(step), model_changed=grew,
                        extra={"depth": self.depth, "grew": grew})

    def grow(self) -> None:
        """Grow to the next stage's depth by copying layers (and their optimizer state)."""
        if self.stage + 1 >= len(self.depths):
            raise RaptrError(f"stacking is already at its final depth {self.depths[-1]}")
        layers, optimizer = self.layers, self.context.optimizer
        pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        for start, n, at in growth_plan(len(layers), self.depths[self.stage + 1], self.options.copy):
            sources = [layers[i] for i in range(start, start + n)]
            copies = [self._clone_layer(layer) for layer in sources]
            for src, dst in zip(sources, copies):
                pairs += list(zip(src.parameters(), dst.parameters()))
            order = list(range(at)) + list(range(start, start + n)) + list(range(at, len(layers)))
            self._sync_model(order)
            self.lineage = [self.lineage[i] for i in order]
            for j, layer in enumerate(copies):
                layers.insert(at + j, layer)
        self.stage += 1
        self._renumber()
        if optimizer is not None:
            if self.options.optimizer_state == "copy":
                for src, dst in pairs:
                    state = optimizer.state.get(src)
                    if state:
                        optimizer.state[dst] = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}
            self._regroup(optimizer)

    # ------------------------------------------------------------------ helpers
    def _configs(self) -> list[Any]:
        """Model configs that may record the depth (``model.config``, ``model.hf.config``)."""
        model, found = self.context.model, []
        for owner in (model, getattr(model, "hf", None)):
            cfg = getattr(owner, "config", None) if owner is not None else None
            if cfg is not None and all(cfg is not c for c in found):
                found.append(cfg)
        return found

    def _clone_layer(self, layer: nn.Module) -> nn.Module:
        memo = {id(cfg): cfg for cfg in self._configs()}  # layers that keep a config share it, not copy it
        clone = copy.deepcopy(layer, memo)
        for p in clone.parameters():
            p.grad = None
        return clone

    def _sync_model(self, order: list[int]) -> None:
        """Make the configs describe the stack ``[old[i] for i in order]``."""
        for cfg in self._configs():
            if hasattr(cfg, "num_hidden_layers"):  # HF (GPT-2's n_layer is an alias of it)
                cfg.num_hidden_layers = len(order)
            elif isinstance(getattr(cfg, "n_layers", None), int):  # our TransformerConfig
                cfg.n_layers = len(order)
            types = getattr(cfg, "layer_types", None)
            if isinstance(types, (list, tuple)) and len(types) >= max(order) + 1:
                cfg.layer_types = [types[i] for i in order]

    def _renumber(self) -> None:
        """HF attentions carry ``layer_idx`` (their KV-cache slot): number them by position."""
        for i, layer in enumerate(self.layers):
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = i

    def _regroup(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer groups in model order (``decay_groups``); state follows parameters by identity."""
        model = self.context.model
        if len(optimizer.param_groups) == 2:
            decay, no_decay = decay_groups(model)
            optimizer.param_groups[0]["params"], optimizer.param_groups[1]["params"] = decay, no_decay
        elif len(optimizer.param_groups) == 1:  # AdamW(model.parameters())
            optimizer.param_groups[0]["params"] = list(model.parameters())
        else:
            raise RaptrError(
                f"stacking regroups the trainer's two AdamW groups (decay, no decay) but this optimizer has "
                f"{len(optimizer.param_groups)}: build it from raptr.methods.base.decay_groups(model)"
            )
        alive = {id(p) for p in model.parameters()}
        for p in [p for p in optimizer.state if id(p) not in alive]:
            del optimizer.state[p]

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict:
        return {"stage": self.stage, "depth": self.depth, "depths": list(self.depths), "copy": self.options.copy,
                "stage_ends": list(self.ends), "lineage": list(self.lineage)}

    def load_extra_state(self, state: dict) -> None:
        """Re-grow a freshly attached model to the saved depth (placeholders; load the weights next)."""
        if list(state["depths"]) != self.depths or state["copy"] != self.options.copy or list(state["stage_ends"]) != self.ends:
            raise RaptrError(
                f"checkpoint was written by stacking {'-'.join(map(str, state['depths']))} (copy={state['copy']}), "
                f"this run uses {self.options.schedule} (copy={self.options.copy}) with other stage ends: resume with the same schedule and total steps"
            )
        if self.stage > state["stage"]:
            raise RaptrError(
                f"the model already has depth {self.depth}, deeper than the checkpoint's {state['depth']}: "
                "load the stacking state into a freshly attached method"
            )
        while self.stage < state["stage"]:
            self.grow()
        if self.depth != state["depth"] or self.lineage != list(state["lineage"]):
            raise RaptrError("re-growing the stack did not reproduce the checkpoint's layer order: resume with the same raptr version")
