"""Any raptr method in an existing Hugging Face ``Trainer`` script, by adding one callback.

    from raptr.integrations import MethodCallback, RaptrTrainer
    trainer = RaptrTrainer(model, args, train_dataset=ds, callbacks=[MethodCallback("raptr")])

``MethodCallback(method, seed=0, flops="hf", seq_len=None, **options)`` hosts any registered method
(``raptr``, ``pld``, ``layerdrop``, ``stacking``, a user's own) through ``raptr.Host``, the host every
loop shares (lr factor, rank agreement, resume rule); ``options`` are the fields of that method's
``Options``. ``RaPTrCallback(schedule, ...)`` is the RaPTr shorthand.

Event by event:

- ``on_train_begin``: finds the model's layer stack (unwrapping DDP's ``.module``) and attaches the
  method (``total_steps = state.max_steps``; the optimizer, for methods that change the model); on
  resume, loads the method's state from the checkpoint's ``trainer_state.json`` and refuses a
  checkpoint written with another method, options or seed (one rule for every method and host);
  warns if DDP is set up so that skipped layers would fail.
- ``on_step_begin`` fires once per optimizer step, before the first micro-batch, so every
  micro-batch of a gradient-accumulation cycle runs the same path: ``method.begin_step(global_step)``.
  A method's ``lr_factor`` (stacking's re-warm-up) multiplies the learning rate of that step and is
  undone in ``on_optimizer_step`` (after the optimizer step, before the scheduler's).
- ``on_log`` adds ``<method>/stage`` and the means per step since the last log of ``<method>/path_length``,
  ``<method>/layer_units`` and the method's numeric extras (RaPTr's ``keep_prob``, PLD's ``theta``).
- ``on_train_end``: ``method.detach()`` gives the layers their own classes back.

FLOPs (``state.total_flos``) go through the Trainer's sanctioned extension points, never by
patching the Trainer: ``RaptrTrainer`` (or ``MethodTrainerMixin`` before ``Trainer`` in your own
subclass) overrides ``Trainer.floating_point_ops``; transformers 4.x also asks the model's
``floating_point_ops``, which the callback provides. ``flops="hf"`` keeps the Trainer's convention
(``6 · tokens · non-embedding params``) but counts only the layers that ran; ``"analytic"`` counts
``raptr.flops.ModelFlops``; ``"off"`` leaves the count alone. With a plain ``Trainer`` on
transformers 5 the count stays the full model's, and the callback says so once. The mixin also puts
the callback first in line, so its path is set before other callbacks' ``on_step_begin`` and its
keys are in ``logs`` before ``report_to`` integrations send them.

Resume: the callback is an ``ExportableState``: its arguments, the ``total_steps`` the schedule was
built for and the method's state go to ``trainer_state.json``. With
``TrainingArguments(restore_callback_states_from_checkpoint=True)`` the Trainer rebuilds the
callback from them. Methods that change the model (stacking) train under the Trainer in one
process; the Trainer loads a checkpoint into the full-depth model before any callback runs, so
such a run cannot resume past its first growth there (use ``raptr train``): refused clearly.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from raptr.errors import RaptrError
from raptr.integrations.common import Hosted, PathFlops, jsonable, unwrap_model
from raptr.methods.base import options_dict
from raptr.methods.host import Host

class MethodCallback(Hosted, TrainerCallback, ExportableState):
    """Any registered raptr method for ``transformers.Trainer``.

    Args:
        method: a registered method's name (``"raptr"``, ``"pld"``, ``"layerdrop"``, ``"stacking"``, ...).
        seed: seed of the method's randomness (paths, drop masks); a step's path depends only on (seed, step).
        flops: what ``state.total_flos`` counts: ``"hf"``, ``"analytic"`` or ``"off"`` (module docstring).
        seq_len: tokens per training sequence; required by methods whose FLOPs depend on it (width
            subnetworks price attention by it), never guessed.
        **options: fields of the method's ``Options`` dataclass.

    After ``on_train_begin``: ``.method`` is the attached method, ``.total_steps`` the steps it spans
    and ``.last`` the ``StepInfo`` of the latest step.
    """

    def __init__(self, method: str = "raptr", seed: int = 0, flops: str = "hf", seq_len: int | None = None,
                 **options: Any):
        who = type(self).__name__ if type(self) is not MethodCallback else f"{method} method"
        self._build(method, seed, flops, seq_len, options, who)
        self.total_steps: int | None = None  # set at on_train_begin, or restored from a checkpoint
        self._model: nn.Module | None = None
        self._flops: PathFlops | None = None
        self._flops_calls = 0  # floating_point_ops calls through the Trainer (0 after a step: not hosted)
        self._steps = 0
        self._began = False  # on_train_begin ran on this instance (else a set total_steps was restored)

    def __repr__(self) -> str:
        args = self._args()
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"

    def _args(self) -> dict:
        """This callback's constructor arguments (written to checkpoints, rebuilt from them)."""
        return {"method": self.method_name, "seed": self.seed, "flops": self.flops, "seq_len": self.seq_len,
                **options_dict(self.options)}

    # ---- resume (transformers.trainer_callback.ExportableState) ------------------------------

    def state(self) -> dict:
        attributes: dict = {"total_steps": self.total_steps}
        if self.method is not None:
            attributes["method_state"] = jsonable(self.method.state_dict())
        return {"args": jsonable(self._args()), "attributes": attributes}

    def _saved(self, state) -> dict | None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        return saved if isinstance(saved, dict) else None

    # ---- events -----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, optimizer=None, **kwargs):
        if model is None:
            raise RaptrError(f"{type(self).__name__} got no model in on_train_begin: use it with transformers.Trainer")
        if self.host is not None:  # a second train() with the same callback
            self._detach()
        model = unwrap_model(model)
        restored = self.total_steps is not None and not self._began
        self._began = True
        if restored and self.total_steps != state.max_steps:
            warnings.warn(
                f"{type(self).__name__}: keeping the checkpoint's schedule over {self.total_steps} steps "
                f"(this run has max_steps={state.max_steps}); steps past it stay in the last stage.",
                stacklevel=2,
            )
        if not restored:
            self.total_steps = int(state.max_steps)
        host = Host(self.method_cls(self.options), seed=self.seed)
        method = host.method
        if method.changes_model and (getattr(args, "world_size", 1) > 1 or getattr(args, "deepspeed", None)
                                     or getattr(args, "fsdp", None)):
            raise RaptrError(f"{self.method_name} changes the model during training, which the Trainer's DDP/FSDP/DeepSpeed "
                             "set-up cannot follow: train it in one process, or with `raptr train` under torchrun")
        if method.skips_layers:
            _warn_about_ddp(args, model)
        host.attach(model, self.total_steps, seq_len=self.seq_len, optimizer=optimizer)
        self.host, self._model = host, model
        saved = self._saved(state)
        if state.global_step > 0 and saved and "method_state" in saved.get("attributes", {}):
            if method.changes_model and method.stage_of(state.global_step) > 0:
                self._detach()
                raise RaptrError(f"{self.method_name} grew the model before step {state.global_step}, and the Trainer loads "
                                 "a checkpoint into the full-depth model before callbacks run: resume such runs with "
                                 "`raptr train`, or restart from a checkpoint of the first stage")
            try:
                host.load_state_dict(saved["attributes"]["method_state"])  # one rule: a mismatch is refused
            except RaptrError as e:
                self._detach()
                raise RaptrError(f"{e} (with TrainingArguments(restore_callback_states_from_checkpoint=True) the "
                                 "Trainer rebuilds the callback from the checkpoint)") from None
        self._flops_calls, self._steps = 0, 0
        self._flops = PathFlops(model, self.flops)
        if self.flops != "off":
            model.floating_point_ops = self.floating_point_ops  # transformers 4.x asks the model
        return control

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.host is None:
            return control
        info = self.host.step(state.global_step, optimizer)
        if info.model_changed:
            self._flops.recount()
        return control

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.host is not None:  # after optimizer.step(), before the scheduler's step
            self.host.after_optimizer_step(optimizer)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._steps += 1
        if self.method is not None and self.flops != "off" and self._flops_calls == 0 and self._steps == 1:
            self._flops_calls = -1  # warn once
            warnings.warn(
                f"{type(self).__name__}: this Trainer does not ask raptr for FLOPs, so state.total_flos counts every "
                "layer at every step: use raptr.integrations.RaptrTrainer, or put MethodTrainerMixin before Trainer in "
                "your subclass (flops='off' silences this)", stacklevel=2)
        return control

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs):
        if self.host is None or logs is None or "loss" not in logs:
            return control
        window = self.host.window()
        if not window:
            return control
        name = self.method_name
        extra = {f"{name}/stage": self.last.stage, **{f"{name}/{k}": v for k, v in window.items() if k != "stage"}}
        logs.update(extra)
        # The Trainer appended a copy of `logs` to the history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step and "loss" in state.log_history[-1]:
            state.log_history[-1].update(extra)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._detach()
        return control

    # ---- FLOPs ------------------------------------------------------------------------------

    def floating_point_ops(self, inputs: dict, exclude_embeddings: bool = True) -> int:
        """FLOPs of one forward+backward on ``inputs`` with this step's path (full model in eval mode)."""
        model = self._model
        ids = inputs.get(getattr(model, "main_input_name", "input_ids")) if hasattr(inputs, "get") else None
        if ids is None or model is None:
            return 0
        self._flops_calls = max(self._flops_calls, 0) + 1
        return self._flops(ids, self.last, exclude_embeddings)

    def _detach(self) -> None:
        """Leave the model as it was: plain layer classes, no FLOPs hook."""
        if self.host is not None:
            self.host.detach()
        if self._model is not None and self._model.__dict__.get("floating_point_ops") == self.floating_point_ops:
            del self._model.__dict__["floating_point_ops"]
        self.host = None


class RaPTrCallback(MethodCallback):
    """RaPTr for ``transformers.Trainer``: ``callbacks=[RaPTrCallback()]`` (or ``RaPTrCallback("6-8-10-12",
    stage_lengths="equal")`` for the paper's schedule).

    Args:
        schedule: expected path length per stage (``"6-8-10-12"`` for a 12-layer model), fractions of
            the depth (the default, ``"f:0.25-0.5-0.75-1"`` with Prop-1 stage lengths: 3-6-9-12 of 12
            layers) or keep probabilities (``"p:0.5-0.67-0.83-1"``); stages split ``state.max_steps``.
        seed, flops: as ``MethodCallback``.
        **options: the other fields of ``raptr.RaPTrOptions``: ``stage_lengths``, ``fixed``,
            ``count_fixed``, ``sampling``, ``scaling``, ``full_warmup``, ``require_full_final``.
    """

    def __init__(self, schedule: str | None = None, seed: int = 0, flops: str = "hf", seq_len: int | None = None,
                 **options: Any):
        if "method" in options:
            raise RaptrError("RaPTrCallback always hosts RaPTr: use MethodCallback(method=...) for another method")
        if schedule is not None:
            options["schedule"] = schedule
        super().__init__("raptr", seed, flops, seq_len, **options)

    @property
    def raptr(self):
        """The ``raptr.RaPTr`` object (schedule, sampler, gates) while training."""
        return self.method.raptr if self.method is not None else None

    def _args(self) -> dict:
        args = super()._args()
        del args["method"]
        return args


class MethodTrainerMixin:
    """Put before ``transformers.Trainer`` in a subclass: FLOPs come from the hosted method.

    It overrides ``Trainer.floating_point_ops`` (the Trainer's documented extension point) to ask
    the ``MethodCallback`` among its callbacks, and moves those callbacks first in line.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        callbacks = self.callback_handler.callbacks
        ours = [cb for cb in callbacks if isinstance(cb, MethodCallback)]
        callbacks[:] = ours + [cb for cb in callbacks if not isinstance(cb, MethodCallback)]

    def floating_point_ops(self, inputs: dict) -> int:
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, MethodCallback) and cb.method is not None and cb.flops != "off":
                return cb.floating_point_ops(inputs)
        return super().floating_point_ops(inputs)


class RaptrTrainer(MethodTrainerMixin, Trainer):
    """``transformers.Trainer`` whose ``state.total_flos`` counts what the hosted raptr method ran."""


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
            f"raptr: {why}, but the method skips layers, so multi-GPU DDP will fail on their unused parameters: "
            "set TrainingArguments(ddp_find_unused_parameters=True) (with gradient checkpointing also "
            "gradient_checkpointing_kwargs={'use_reentrant': False})",
            stacklevel=3,
        )
    if getattr(args, "ddp_static_graph", None):
        warnings.warn(
            "raptr: ddp_static_graph=True assumes the same parameters are used every step, but the "
            "method's path changes each step: leave ddp_static_graph unset",
            stacklevel=3,
        )
