"""Any raptr method in a Lightning training script, by adding one callback (``pip install raptr[lightning]``).

    from raptr.integrations.lightning import MethodCallback
    trainer = lightning.Trainer(max_steps=10_000, callbacks=[MethodCallback("raptr")])

``MethodCallback(method, seed=0, flops="hf", seq_len=None, **options)`` hosts any registered method
through ``raptr.Host`` (the host every loop shares); ``options`` are the fields of the method's
``Options``; ``seq_len`` (tokens per sequence) is required by methods whose FLOPs depend on it (width). The LightningModule may be
the transformer itself or hold it (``self.model = AutoModelForCausalLM...``): the callback uses
the first module, outermost first, whose layer stack raptr knows.

Hook by hook:

- ``on_fit_start`` (optimizers exist): attaches the method (``total_steps`` = ``max_steps``, or
  Lightning's ``estimated_stepping_batches``); on resume, loads the method's state that
  ``load_state_dict`` took from the checkpoint, refusing another method, options or seed.
- ``on_train_batch_start``: at the first micro-batch of every optimizer step,
  ``method.begin_step(trainer.global_step)``, so all micro-batches of an accumulation cycle share
  one path; a ``lr_factor`` (stacking's re-warm-up) scales that step's learning rate and is undone
  after the optimizer step (``on_train_batch_end``), before any scheduler steps.
- FLOPs of what ran (``raptr.integrations.common.PathFlops``) accumulate per micro-batch and are
  logged with the stage and path length as ``<method>/flops``, ``<method>/stage``,
  ``<method>/path_length`` (Lightning has no FLOPs counter of its own).
- ``state_dict`` puts the method's state in Lightning's checkpoint (``callbacks`` entry); the
  schedule then continues exactly from ``trainer.global_step``.
- ``on_fit_end`` / ``on_exception``: ``method.detach()`` leaves the model's layers as they were.

Methods that change the model (stacking) train in one process and from a fresh start: Lightning
loads a checkpoint's weights strictly into the full-depth model before any callback runs, and
its DDP wraps the model once; both are refused with one clear error.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from raptr.errors import RaptrError
from raptr.integrations.common import Hosted, PathFlops, unwrap_model
from raptr.methods.base import options_dict
from raptr.methods.host import Host
from raptr.models.registry import find_layer_stack


def find_model(module: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The outermost submodule (``module`` itself first) whose layer stack raptr knows, and that stack."""
    queue = [unwrap_model(module)]
    while queue:
        candidate = queue.pop(0)
        try:
            return candidate, find_layer_stack(candidate)
        except RaptrError:
            queue += list(candidate.children())
    raise RaptrError(f"no transformer layer stack in {type(module).__name__}: keep the model as an attribute of the "
                     "LightningModule, or call raptr.register_layer_stack(model_type, 'path.to.layers')")


def _input_ids(batch: Any):
    if hasattr(batch, "get") and batch.get("input_ids") is not None:
        return batch["input_ids"]
    if isinstance(batch, (list, tuple)) and batch and hasattr(batch[0], "numel"):
        return batch[0]
    return batch if hasattr(batch, "numel") else None


class MethodCallback(Hosted, pl.Callback):
    """Any registered raptr method for ``lightning.Trainer``.

    Args:
        method: a registered method's name (``"raptr"``, ``"pld"``, ``"layerdrop"``, ``"stacking"``, ...).
        seed: seed of the method's randomness; a step's path depends only on (seed, step).
        flops: ``"hf"`` (6 · tokens · params of what ran), ``"analytic"`` (``raptr.flops``) or ``"off"``.
        **options: fields of the method's ``Options`` dataclass.

    While fitting: ``.method`` is the attached method, ``.last`` the latest ``StepInfo`` and
    ``.total_flos`` the FLOPs trained so far (restored on resume).
    """

    def __init__(self, method: str = "raptr", seed: int = 0, flops: str = "hf", seq_len: int | None = None,
                 **options: Any):
        self._build(method, seed, flops, seq_len, options, f"{method} method")
        self.total_steps: int | None = None
        self.total_flos = 0
        self._stepped: int | None = None  # global_step whose path is set
        self._pending: dict | None = None  # method state from a checkpoint, loaded at on_fit_start

    @property
    def state_key(self) -> str:
        return f"raptr.MethodCallback[{self.method_name}]"

    # ---- checkpoints (Lightning keeps them under checkpoint["callbacks"][state_key]) ---------

    def state_dict(self) -> dict:
        return {"args": {"method": self.method_name, "seed": self.seed, "seq_len": self.seq_len,
                         "options": options_dict(self.options)},
                "total_steps": self.total_steps, "total_flos": self.total_flos,
                "method_state": self.method.state_dict() if self.method is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    # ---- fit ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before Lightning restores a checkpoint (no hook tells us one is coming, so prepare for it)."""
        if self.method_cls.changes_model:
            if trainer.world_size > 1:
                self._refuse_changing_model("run it on several devices")
            # A checkpoint of a grown-but-not-full model would fail Lightning's strict load with a
            # long key list before any callback could speak; load it loosely, then refuse it below.
            pl_module.strict_loading = False

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.method_cls.changes_model:
            self._refuse_changing_model("resume it")

    def _refuse_changing_model(self, why: str) -> None:
        raise RaptrError(f"{self.method_name} changes the model during training, and Lightning cannot {why} (it "
                         "loads checkpoints strictly into the full-depth model and wraps DDP once): train it in one "
                         "process from a fresh start, or use `raptr train`")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model, layers = find_model(pl_module)
        host = Host(self.method_cls(self.options), seed=self.seed)
        method = host.method
        if method.changes_model and (trainer.world_size > 1 or self._pending is not None):
            self._refuse_changing_model("resume it" if self._pending is not None else "run it on several devices")
        saved_steps = (self._pending or {}).get("total_steps")
        if saved_steps is not None:
            self.total_steps = int(saved_steps)  # the schedule the checkpoint was trained with
        elif trainer.max_steps and trainer.max_steps > 0:
            self.total_steps = int(trainer.max_steps)
        else:
            self.total_steps = int(trainer.estimated_stepping_batches)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        host.attach(model, self.total_steps, seq_len=self.seq_len, optimizer=optimizer, layers=layers)
        if self._pending is not None and self._pending.get("method_state") is not None:
            try:
                host.load_state_dict(self._pending["method_state"])  # one rule: a mismatch is refused
            except RaptrError:
                host.detach()
                raise
            self.total_flos = int(self._pending.get("total_flos") or 0)
        self._pending = None
        self.host, self.model, self._stepped = host, model, None
        self._flops = PathFlops(model, self.flops)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.host is None:
            return
        step = trainer.global_step
        if step != self._stepped:  # first micro-batch of this optimizer step
            self._stepped = step
            info = self.host.step(step, trainer.optimizers[0] if trainer.optimizers else None)
            if info.model_changed:
                self._flops.recount()
        ids = _input_ids(batch)
        if ids is not None:
            self.total_flos += self._flops(ids, self.last)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.host is None or self.last is None:
            return
        if trainer.global_step != self._stepped:  # the optimizer stepped: undo the lr factor
            self.host.after_optimizer_step(trainer.optimizers[0] if trainer.optimizers else None)
        name = self.method_name
        pl_module.log_dict({f"{name}/stage": float(self.last.stage), f"{name}/path_length": float(self.last.layers_run),
                            f"{name}/flops": float(self.total_flos)}, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        if self.host is not None:
            self.host.detach()
        self.host = None
