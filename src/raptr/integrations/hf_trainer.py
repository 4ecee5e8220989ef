"""RaPTr for an existing Hugging Face ``Trainer`` script, by adding one callback.

    from raptr.integrations import RaPTrCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[RaPTrCallback("6-8-10-12")])

What the callback does, event by event:

- ``on_train_begin``: finds the model's layer stack (unwrapping DDP's ``.module``) and puts RaPTr's
  gates on it in place (``raptr.wrap``, ``total_steps = state.max_steps``); makes the Trainer's FLOPs
  count only the layers that run (see below); warns if DDP is set up so that skipped layers would
  fail (``ddp_find_unused_parameters=False``, ``ddp_static_graph=True``).
- ``on_step_begin`` fires once per optimizer step, before the first micro-batch, so every
  micro-batch of a gradient-accumulation cycle runs the same path: ``rp.step(state.global_step)``.
- ``on_log`` adds ``raptr/stage``, ``raptr/path_length`` (mean layers run per step since the last
  log) and ``raptr/keep_prob`` to the Trainer's training logs and ``state.log_history``.
- ``on_train_end`` gives the layers their own classes back: the model is the plain HF model again
  (picklable, nothing left behind); the Trainer's FLOPs hook is removed.

Resume: the path of a step is a pure function of (schedule, seed, total_steps, global_step), so a
resumed run continues exactly without any sampler state. The callback is an ``ExportableState``:
its arguments and the ``total_steps`` the schedule was built for are written to
``trainer_state.json``; with ``TrainingArguments(restore_callback_states_from_checkpoint=True)``
the Trainer rebuilds the callback from them (even if the script now passes other arguments).
Without that flag the script's own callback is used, and a mismatch with the checkpoint warns.

FLOPs (``state.total_flos``): the Trainer counts ``6 · tokens · num_parameters(exclude_embeddings)``
per micro-batch, for the full model. ``flops="hf"`` (default) keeps exactly that convention but
counts only the parameters of what ran: ``6 · tokens · (non-embedding params − params of skipped
layers)``, so a run with the callback and one without are directly comparable and equal when
every layer runs. ``flops="analytic"`` counts ``raptr.flops.ModelFlops`` instead (matmuls incl.
attention scores and the LM head on every position, 3× forward). ``flops="off"`` leaves the
Trainer's count alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from raptr.core import RaPTr
from raptr.errors import RaptrError
from raptr.methods.raptr import RaPTrOptions, wrap
from raptr.models.registry import find_layer_stack, model_flops

FLOPS_MODES = ("hf", "analytic", "off")
_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(RaPTrOptions) if f.name != "schedule")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP(1) (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None) if not hasattr(model, "config") else None
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def _owning_trainer(callback: TrainerCallback) -> Trainer | None:
    """The ``Trainer`` whose callback handler is calling ``callback`` right now.

    The callback API passes the model, optimizer and dataloaders but not the Trainer itself, and
    in transformers 5 ``Trainer.floating_point_ops`` no longer asks the model, so the FLOPs hook
    has to be put on the Trainer instance. It is found by walking up the call stack (the frames
    of ``CallbackHandler.call_event`` and the training loop) to the Trainer method that fired the event.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(16):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and any(cb is callback for cb in owner.callback_handler.callbacks):
                return owner
    finally:
        del frame
    return None


def _non_embedding_params(model: nn.Module, exclude_embeddings: bool) -> int:
    if hasattr(model, "num_parameters"):
        return int(model.num_parameters(exclude_embeddings=exclude_embeddings))
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                params.pop(id(module.weight), None)
    return sum(_numel(p) for p in params.values())


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # DeepSpeed ZeRO-3 keeps the true size in ds_numel


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


class RaPTrCallback(TrainerCallback, ExportableState):
    """RaPTr for ``transformers.Trainer``: ``callbacks=[RaPTrCallback("6-8-10-12")]``.

    Args:
        schedule: expected path length per stage (``"6-8-10-12"`` for a 12-layer model) or keep
            probabilities (``"p:0.5-0.67-0.83-1"``); stages split ``state.max_steps``.
        seed: seed of the path sampler; the path of step ``s`` depends only on (seed, s).
        flops: what ``state.total_flos`` counts: ``"hf"`` (the Trainer's 6·tokens·params, only
            for the layers that ran), ``"analytic"`` (``raptr.flops``), or ``"off"``.
        **options: fields of ``raptr.RaPTrOptions``: ``stage_lengths``, ``fixed``, ``count_fixed``,
            ``sampling``, ``scaling``, ``full_warmup``, ``require_full_final``.

    After ``on_train_begin``: ``.raptr`` is the ``raptr.RaPTr`` object (schedule, sampler, gates)
    and ``.total_steps`` the number of steps the schedule spans.
    """

    def __init__(self, schedule: str = "6-8-10-12", seed: int = 0, flops: str = "hf", **options: Any):
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise RaptrError(f"unknown RaPTrCallback option(s) {', '.join(unknown)}: use {', '.join(_OPTION_NAMES)}")
        if flops not in FLOPS_MODES:
            raise RaptrError(f"unknown flops={flops!r}: use one of {', '.join(FLOPS_MODES)}")
        self.schedule = schedule
        self.seed = int(seed)
        self.flops = flops
        self.options = dict(options)
        self.total_steps: int | None = None  # set at on_train_begin, or restored from a checkpoint
        self.raptr: RaPTr | None = None
        self._model: nn.Module | None = None
        self._trainer: Trainer | None = None
        self._params: dict[bool, int] = {}
        self._layer_params: list[int] = []
        self._window_layers = 0
        self._window_steps = 0
        self._began = False  # on_train_begin ran on this instance (else a set total_steps was restored)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"RaPTrCallback({self.schedule!r}, seed={self.seed}, flops={self.flops!r}{opts})"

    # ---- resume (transformers.trainer_callback.ExportableState) ------------------------------

    def state(self) -> dict:
        return {
            "args": _jsonable({"schedule": self.schedule, "seed": self.seed, "flops": self.flops, **self.options}),
            "attributes": {"total_steps": self.total_steps},
        }

    def _check_checkpoint(self, state) -> None:
        """On resume, warn if the checkpoint was written with another RaPTr configuration."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step == 0 or not isinstance(saved, dict):
            return
        mine = self.state()
        saved_total = saved.get("attributes", {}).get("total_steps")
        path_args = lambda a: {k: v for k, v in (a or {}).items() if k != "flops"}  # noqa: E731
        if path_args(saved.get("args")) != path_args(mine["args"]):
            warnings.warn(
                f"RaPTrCallback: the checkpoint was trained with {saved.get('args')}, this run uses {mine['args']}; "
                "paths from here on follow the new configuration. Pass the same arguments, or "
                "TrainingArguments(restore_callback_states_from_checkpoint=True) to take the checkpoint's.",
                stacklevel=3,
            )
        elif saved_total is not None and saved_total != self.total_steps:
            warnings.warn(
                f"RaPTrCallback: the checkpoint's schedule spans {saved_total} steps, this run's {self.total_steps} "
                "(max_steps changed), so stage boundaries move. Set "
                "restore_callback_states_from_checkpoint=True to keep the checkpoint's schedule.",
                stacklevel=3,
            )

    # ---- events -----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise RaptrError("RaPTrCallback got no model in on_train_begin: use it with transformers.Trainer")
        if self.raptr is not None:  # a second train() with the same callback
            self._detach()
        model = unwrap_model(model)
        restored = self.total_steps is not None and not self._began
        self._began = True
        if restored and self.total_steps != state.max_steps:
            warnings.warn(
                f"RaPTrCallback: keeping the checkpoint's schedule over {self.total_steps} steps "
                f"(this run has max_steps={state.max_steps}); steps past it stay in the last stage.",
                stacklevel=2,
            )
        if not restored:
            self.total_steps = int(state.max_steps)
        self._check_checkpoint(state)
        _warn_about_ddp(args, model)
        self.raptr = wrap(model, self.schedule, self.total_steps, self.seed, **self.options)
        self._model = model
        self._window_layers = self._window_steps = 0
        self._trainer = _owning_trainer(self)
        if self._trainer is not None:
            # First in line: its path is set before any other callback's on_step_begin, and its
            # keys are in `logs` before report_to integrations (TensorBoard, W&B) send them.
            callbacks = self._trainer.callback_handler.callbacks
            callbacks.insert(0, callbacks.pop(next(i for i, cb in enumerate(callbacks) if cb is self)))
        if self.flops != "off":
            self._install_flops(model)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.raptr is not None:
            plan = self.raptr.step(state.global_step)
            self._window_layers += plan.path_length
            self._window_steps += 1
        return control

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs):
        if self.raptr is None or logs is None or "loss" not in logs or self._window_steps == 0:
            return control
        plan = self.raptr.last_plan
        extra = {
            "raptr/stage": plan.stage,
            "raptr/path_length": self._window_layers / self._window_steps,
            "raptr/keep_prob": plan.keep_prob,
        }
        logs.update(extra)
        # The Trainer appended a copy of `logs` to the history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step and "loss" in state.log_history[-1]:
            state.log_history[-1].update(extra)
        self._window_layers = self._window_steps = 0
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._detach()
        return control

    # ---- FLOPs ------------------------------------------------------------------------------

    def _install_flops(self, model: nn.Module) -> None:
        if self.flops == "analytic":
            model_flops(model, 1)  # raises a RaptrError naming the fix if the shape is unknown
        self._params = {flag: _non_embedding_params(model, flag) for flag in (True, False)}
        self._layer_params = [sum(_numel(p) for p in layer.parameters()) for layer in find_layer_stack(model)]
        # transformers 4.x: Trainer.floating_point_ops returns self.model.floating_point_ops(inputs).
        model.floating_point_ops = self.floating_point_ops
        # transformers 5.x computes 6·tokens·params itself: put the hook on the Trainer instance,
        # unless a Trainer subclass has its own floating_point_ops (then it is left alone).
        trainer = self._trainer
        if trainer is None:
            warnings.warn("RaPTrCallback: could not find the Trainer; state.total_flos counts the full model", stacklevel=3)
        elif type(trainer).floating_point_ops is Trainer.floating_point_ops:
            trainer.floating_point_ops = self.floating_point_ops
        else:
            warnings.warn(
                f"RaPTrCallback: {type(trainer).__name__} overrides floating_point_ops, so its count is kept; "
                "return model.floating_point_ops(inputs) there to count only the layers RaPTr runs",
                stacklevel=3,
            )

    def floating_point_ops(self, inputs: dict, exclude_embeddings: bool = True) -> int:
        """FLOPs of one forward+backward on ``inputs`` with this step's path (full model in eval mode)."""
        model = self._model
        ids = inputs.get(getattr(model, "main_input_name", "input_ids")) if hasattr(inputs, "get") else None
        if ids is None or model is None:
            return 0
        active = self._active()
        if self.flops == "analytic":
            batch = ids.numel() // ids.shape[-1] if ids.dim() > 1 else 1
            return int(model_flops(model, ids.shape[-1]).train_step(sum(active), batch))
        skipped = sum(n for n, run in zip(self._layer_params, active) if not run)
        return 6 * ids.numel() * (self._params[bool(exclude_embeddings)] - skipped)

    def _active(self) -> tuple[bool, ...]:
        n = len(self._layer_params) or len(find_layer_stack(self._model))
        plan = self.raptr.last_plan if self.raptr is not None else None
        if plan is None or not self._model.training:
            return (True,) * n
        return plan.active

    def _detach(self) -> None:
        """Leave the model and Trainer as they were: plain layer classes, no FLOPs hooks."""
        if self.raptr is not None:
            self.raptr.gates.unwrap()
        for obj in (self._model, self._trainer):
            if obj is not None and obj.__dict__.get("floating_point_ops") == self.floating_point_ops:
                del obj.__dict__["floating_point_ops"]
        self.raptr = None


def _warn_about_ddp(args, model: nn.Module) -> None:
    """Skipped layers leave parameters unused: DDP must be told to look for them."""
    find_unused = getattr(args, "ddp_find_unused_parameters", None)
    on_model = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    checkpointing = bool(
        getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False)
        or getattr(model, on_model, False)
    )
    distributed = getattr(args, "world_size", 1) > 1
    if find_unused is False or (find_unused is None and checkpointing and distributed):
        why = "ddp_find_unused_parameters=False" if find_unused is False else "gradient checkpointing makes the Trainer default ddp_find_unused_parameters to False"
        warnings.warn(
            f"RaPTrCallback: {why}, but RaPTr skips layers, so multi-GPU DDP will fail on their unused parameters: "
            "set TrainingArguments(ddp_find_unused_parameters=True) (with gradient checkpointing also "
            "gradient_checkpointing_kwargs={'use_reentrant': False})",
            stacklevel=3,
        )
    if getattr(args, "ddp_static_graph", None):
        warnings.warn(
            "RaPTrCallback: ddp_static_graph=True assumes the same parameters are used every step, but RaPTr's "
            "path changes each step: leave ddp_static_graph unset",
            stacklevel=3,
        )
