"""One host for every training loop: what a loop does around a method, written once.

Our trainer, the Hugging Face and Lightning callbacks, the experiments and a user's own loop all
drive a method through a ``Host``::

    host = raptr.wrap(model, total_steps=10_000)  # RaPTr, default schedule; any method by name: method="pld", ...
    for step, batch in enumerate(loader):
        info = host.step(step, optimizer)        # this optimizer step's subnetwork; lr × lr_factor
        model(**batch).loss.backward()
        optimizer.step()
        host.after_optimizer_step(optimizer)     # the lr factor undone, before any scheduler steps
        optimizer.zero_grad(set_to_none=True)

It owns, once for every host:

- options: checked at construction by the typed converter YAML configs go through;
- one ``lr_factor`` rule: multiply the step's learning rate, restore it after the optimizer step;
- the sequence length: given by the host (``seq_len=``) where the method needs it (width
  subnetworks price attention by it), never guessed;
- one FLOPs count (``step_flops``): ``raptr.flops.ModelFlops`` of the layer units that ran;
- rank agreement: under ``torch.distributed`` one small all-reduce every ``check_every`` steps
  (and at the first) checks that all ranks drew the same subnetwork (``Method.fingerprint``);
- logging windows (means of the path length and the method's numbers since the last log);
- resume (``state_dict`` / ``load_state_dict``: a checkpoint of another method, options or seed is
  refused in one line) and ``detach`` (the model's own layer classes back).

``core.RaPTr`` and ``width.WidthRaPTr`` stay the functional layer beneath (Composer's ``apply_*``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raptr.errors import RaptrError
from raptr.methods.base import Method, StepInfo, TrainingContext
from raptr.methods.registry import method_class
from raptr.ranks import RankAgreement


def make_method(method: str | Method, options: dict, who: str = "") -> Method:
    """A method from its registered name and options (typed-checked, unknown names refused in one
    line), or the given instance (which carries its own options)."""
    if isinstance(method, Method):
        if options:
            raise RaptrError(f"options {', '.join(sorted(options))} given with a built {type(method).__name__}: "
                             "pass the method by name with its options, or build it with them")
        return method
    cls = method_class(method)
    if cls.Options is None:
        if options:
            raise RaptrError(f"the {method} method has no options, got {', '.join(sorted(options))}")
        return cls()
    import dataclasses

    known = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise RaptrError(f"unknown {who or method + ' method'} option(s) {', '.join(unknown)}: use {', '.join(known)}")
    from raptr import typed

    return cls(typed.from_dict(cls.Options, options))  # the names the caller used, e.g. sampling=


class Host:
    """Hosts one method on one model (see the module docstring).

    Args:
        method: a registered method's name (``"raptr"``, ``"pld"``, ``"layerdrop"``, ``"stacking"``,
            ``"width"``, ...) or a built ``Method``.
        seed: seed of the method's randomness: a step's subnetwork depends only on (seed, step).
        check_every: rank-agreement interval under torch.distributed (0: never).
        **options: fields of the method's ``Options``.
    """

    def __init__(self, method: str | Method = "raptr", *, seed: int = 0, check_every: int = 50, **options: Any):
        self.method = make_method(method, options)
        self.seed = int(seed)
        self.agreement = RankAgreement(int(check_every))
        self.context: TrainingContext | None = None
        self.flops_model = None
        self.last: StepInfo | None = None
        self._lrs: list[float] | None = None
        self._window: dict[str, float] = {}
        self._window_steps = 0

    @property
    def name(self) -> str:
        return self.method.name

    # ---------------------------------------------------------------- life cycle
    def attach(self, model: nn.Module, total_steps: int, *, seq_len: int | None = None, optimizer: Any = None,
               layers: nn.ModuleList | None = None, flops: Any = None) -> "Host":
        """Put the method on ``model`` for a run of ``total_steps`` optimizer steps.

        ``seq_len``: tokens per sequence (required by methods that declare ``needs_seq_len``);
        ``flops``: a ``raptr.flops.ModelFlops`` for ``step_flops`` (default: from the model, at seq_len).
        """
        from raptr.models.registry import find_layer_stack

        if self.context is not None:
            raise RaptrError("this host is attached already: detach() it first, or build another")
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise RaptrError(f"total_steps={total_steps!r}: give the number of optimizer steps of the run (>= 1)")
        if seq_len is None and self.method.needs_seq_len:
            raise RaptrError(f"the {self.name} method prices attention by the sequence length: pass seq_len= (the "
                             "tokens per training sequence, e.g. your tokenizer's max_length)")
        layers = find_layer_stack(model) if layers is None else layers
        context = TrainingContext(model, layers, total_steps, self.seed, optimizer, seq_len or 0)
        self.method.attach(context)
        self.context, self.flops_model, self.last = context, flops, None
        return self

    def detach(self) -> None:
        """The model's layers get their own classes back (call when training ends; safe twice)."""
        if self.context is not None:
            self.method.detach()
        self.context = None

    @property
    def model(self) -> nn.Module:
        return self._context().model

    @property
    def gates(self):
        """The gated layer stack of a layer-skipping method (``.unwrap()`` before pickling by class)."""
        return getattr(self.method, "gates", None)

    def _context(self) -> TrainingContext:
        if self.context is None:
            raise RaptrError("the host is not attached to a model: call host.attach(model, total_steps) first")
        return self.context

    # ---------------------------------------------------------------- every step
    def step(self, step: int, optimizer: Any = None) -> StepInfo:
        """Set the subnetwork of optimizer step ``step`` (before its first forward; once per optimizer
        step, so every micro-batch of a gradient-accumulation cycle runs the same path) and multiply
        the optimizer's learning rates by the method's ``lr_factor`` (undone by ``after_optimizer_step``)."""
        self._context()
        info = self.method.begin_step(step)
        self.agreement(step, self.method.fingerprint(info, step), self.method.agreement_of)
        self.after_optimizer_step(optimizer)  # a factor still applied from a step that never stepped
        if info.lr_factor != 1.0 and optimizer is not None:
            self._lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] *= info.lr_factor
        self.last = info
        self._window_steps += 1
        numbers = {"path_length": info.layers_run, "layer_units": info.layer_units,
                   **{k: v for k, v in info.extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        for k, v in numbers.items():
            self._window[k] = self._window.get(k, 0.0) + v
        return info

    def after_optimizer_step(self, optimizer: Any = None) -> None:
        """Give the optimizer back the learning rates it had before ``step`` applied the lr factor."""
        if self._lrs is not None and optimizer is not None:
            for group, lr in zip(optimizer.param_groups, self._lrs):
                group["lr"] = lr
        self._lrs = None

    def step_flops(self, sequences: int, labelled_positions: float | None = None) -> float:
        """Training FLOPs of the last step for ``sequences`` sequences, counting the layer units that ran."""
        fl = self._flops()
        return fl.train_step(self.last.layer_units if self.last is not None else fl.num_layers, sequences, labelled_positions)

    def full_flops(self, sequences: int, labelled_positions: float | None = None) -> float:
        """What the same step costs with every layer."""
        return self._flops().full_step(sequences, labelled_positions)

    def _flops(self):
        if self.flops_model is None:
            from raptr.models.registry import model_flops

            context = self._context()
            if not context.seq_len:
                raise RaptrError("counting FLOPs needs the sequence length: attach(..., seq_len=N)")
            self.flops_model = model_flops(context.model, context.seq_len)
        return self.flops_model

    def window(self) -> dict[str, float]:
        """Means over the steps since the last call (path length, layer units, the method's numbers) and
        the latest stage; empty if no step ran. Resets the window."""
        if not self._window_steps or self.last is None:
            return {}
        out = {"stage": float(self.last.stage), **{k: v / self._window_steps for k, v in self._window.items()}}
        self._window, self._window_steps = {}, 0
        return out

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        context = self._context()
        return {"method": self.method.state_dict(), "total_steps": context.total_steps}

    def load_state_dict(self, state: dict) -> None:
        """Continue a checkpointed run: another method, options or seed is refused in one line."""
        self.method.load_state_dict(state["method"] if "method" in state and "total_steps" in state else state)

    # ---------------------------------------------------------------- what the method is
    def stage_of(self, step: int) -> int:
        return self.method.stage_of(step)

    def stage_boundaries(self) -> list[int]:
        return self.method.stage_boundaries()

    def expected_relative_flops(self) -> float:
        return self.method.expected_relative_flops()

    def __repr__(self) -> str:
        where = "detached" if self.context is None else f"{len(self.context.layers)} layers, {self.context.total_steps} steps"
        return f"Host({self.name}, seed={self.seed}, {where})"


def init_optimizer_state(optimizer: Any) -> None:
    """Give every parameter the optimizer state its first update would create, now, for checkpoints
    that save each parameter's state (torch.distributed.checkpoint, torchtitan).

    Optimizers create a parameter's state at its first update, so a checkpoint written before a
    skipped layer first trained has no state for it, while a fresh optimizer's load template (DCP's
    ``get_optimizer_state_dict``) has state for every parameter: the resume then fails with "Missing
    key in checkpoint state_dict". This runs one step with zero gradients, learning rate 0 and weight
    decay 0 (no parameter moves, no moment fills) and sets ``step`` back to 0: for AdamW, Adam and SGD
    with momentum (without dampening) the state is then exactly what the first real update would have
    created, so training is unchanged (tested bitwise for all three, with weight decay). Call it after
    building the optimizer and before loading a checkpoint; an optimizer that already has state is left alone."""
    for opt in getattr(optimizer, "optimizers", None) or [optimizer]:  # torchtitan's container holds several
        if opt.state:
            continue
        params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        if any(p.grad is not None for p in params):
            raise RaptrError("init_optimizer_state: call it before training (parameters already have gradients)")
        saved = [(group["lr"], group.get("weight_decay")) for group in opt.param_groups]
        for group in opt.param_groups:  # no step size, and no weight decay added to the zero gradients
            group["lr"] = 0.0 if not torch.is_tensor(group["lr"]) else torch.zeros_like(group["lr"])
            if "weight_decay" in group:
                group["weight_decay"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        for group, (lr, wd) in zip(opt.param_groups, saved):
            group["lr"] = lr
            if wd is not None:
                group["weight_decay"] = wd
        for p in params:
            p.grad = None
        for state in opt.state.values():
            if "step" in state:
                state["step"] = state["step"].zero_() if torch.is_tensor(state["step"]) else 0


def wrap(model: nn.Module, schedule: str | None = None, total_steps: int = 10_000, seed: int = 0, *,
         method: str | Method = "raptr", check_every: int = 50, seq_len: int | None = None, optimizer: Any = None,
         **options: Any) -> Host:
    """Put a method (RaPTr by default) on a model in place and return its ``Host``; call
    ``.step(step)`` (or ``.step(step, optimizer)`` for methods with an lr factor) before each
    optimizer step's forward. ``schedule`` and ``options`` are fields of the method's ``Options``
    (RaPTr: ``RaPTrOptions``; default 3-6-9-12 of 12 layers, i.e. "f:0.25-0.5-0.75-1", with Prop-1 stage lengths). Under torch.distributed, every
    ``check_every`` steps (and at the first) one all-reduce checks that every rank drew the same
    subnetwork (0 = never). ``model.eval()`` always runs the full model."""
    if schedule is not None:
        options["schedule"] = schedule
    host = Host(method, seed=seed, check_every=check_every, **options)
    return host.attach(model, total_steps, seq_len=seq_len, optimizer=optimizer)
