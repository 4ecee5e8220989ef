"""RaPTr (or any raptr method) inside torchtitan's own Trainer: one config section, ``--raptr.*`` flags.

    torchrun --nproc_per_node=8 -m torchtitan.train --module raptr.integrations.torchtitan \\
        --config raptr_llama3_8b --raptr.schedule f:0.25-0.5-0.75-1 --raptr.stage_lengths prop:1

``RaptrTrainer`` is torchtitan's ``Trainer`` with a ``raptr`` config section (``RaptrConfig``). It
gates each block as torchtitan's parallelize leaves it (FSDP2 unit, tensor-parallel plan, activation
checkpoint wrapper, per-block ``compile(fullgraph=True)``), so a skipped block skips all of that and a
compiled block's graph never contains the path decision; draws the path
once per optimizer step, before the forward (every rank draws the same, checked every
``check_every`` steps); reports the FLOPs per token of what ran to torchtitan's metrics, so its
TFLOPS and MFU count only the blocks that ran; and keeps the method's state in the ``train_state``
of torchtitan's DCP checkpoint, so a resume continues the same paths and refuses another
configuration. Pipeline parallel and methods that change the model (stacking) are refused in one
line; CUDA graphs are turned off (a captured graph would replay one path). Every parameter's optimizer state is created before training (``raptr.init_optimizer_state``),
so a checkpoint taken before a skipped block first trained still resumes. The config registry at the bottom (``raptr_llama3_debugmodel``, ``raptr_llama3_8b``, ...) is
torchtitan's own for each model, plus the section. Tested with torchtitan 0.3.0 (``raptr[torchtitan]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from raptr.errors import RaptrError
from raptr.methods.host import Host, init_optimizer_state


@dataclass(kw_only=True, slots=True)
class RaptrConfig:
    method: str = "raptr"
    """A registered raptr method: raptr, pld, layerdrop, width, depthwidth, or one of your own."""
    schedule: str = ""
    """The method's schedule ("" = its default; RaPTr: f:0.25-0.5-0.75-1, i.e. 3-6-9-12 of 12 layers)."""
    stage_lengths: str = ""
    """equal | prop:ALPHA | relative lengths ("" = the method's default; RaPTr: prop:1)."""
    seed: int = 0
    """Seed of the paths: a step's path depends only on (seed, step), the same on every rank."""
    check_every: int = 50
    """Every this many steps (and at the first) one all-reduce checks that all ranks drew the same path; 0 = never."""
    options: list[str] = field(default_factory=list)
    """Other options of the method as key=value, comma-separated: --raptr.options theta=0.5,gamma=0.01 (fixed=0,3,11 works too)."""

    def host(self) -> Host:
        """The raptr host, options checked now (a wrong name or value is one error line, before any model is built)."""
        from raptr.typed import _scalar

        pairs: list[list[str]] = []
        for item in self.options:  # torchtitan splits lists at commas: "fixed=0,3,11" arrives as three items
            key, eq, value = item.partition("=")
            if eq and key:
                pairs.append([key.strip(), value.strip()])
            elif pairs:
                pairs[-1][1] += "," + item.strip()
            else:
                raise RaptrError(f"--raptr.options {item!r}: write key=value, e.g. --raptr.options fixed=none,sampling=uniform")
        options = {key: value if "," in value else _scalar(value) for key, value in pairs}
        for key in ("schedule", "stage_lengths"):
            if getattr(self, key):
                options[key] = getattr(self, key)
        host = Host(self.method, seed=self.seed, check_every=self.check_every, **options)
        if host.method.changes_model:
            raise RaptrError(f"{self.method} changes the model during training, which torchtitan's parallelized model "
                             "cannot follow: use a method that keeps the model (raptr, pld, layerdrop, width)")
        return host


STATE_KEY = "raptr_host"  # the method's state inside torchtitan's train_state


class RaptrTrainer(Trainer):
    """torchtitan's ``Trainer`` with a raptr method (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        raptr: RaptrConfig = field(default_factory=RaptrConfig)

    def __init__(self, config: Config):
        if config.parallelism.pipeline_parallel_degree > 1:
            raise RaptrError("pipeline parallel is not supported with raptr: a stage whose blocks are skipped would "
                             "idle while the others run; set --parallelism.pipeline_parallel_degree 1 (FSDP and TP work)")
        self.raptr = config.raptr.host()
        if not config.training.disable_cuda_graphs:
            # A captured CUDA graph replays the blocks it captured whatever path is drawn later (and zeroes
            # gradients instead of dropping them, so AdamW would move skipped blocks): paths need eager steps.
            logger.info("raptr: CUDA graphs off (--training.disable_cuda_graphs): each step runs its own path")
            config.training.disable_cuda_graphs = True
        spec = config.model_spec
        parallelize = spec.parallelize_fn

        def parallelize_then_wrap(model: nn.Module, **kwargs):
            # Gate what torchtitan made of each block (activation-checkpoint wrapper, per-block compile, FSDP2
            # unit): a skipped block then skips all of it, and a compiled block never sees the path decision.
            model = parallelize(model, **kwargs)
            self.raptr.attach(model, config.training.steps, seq_len=config.training.seq_len)
            return model

        config.model_spec = dataclasses.replace(spec, parallelize_fn=parallelize_then_wrap)
        super().__init__(config)
        if self.raptr.context is None:  # --checkpoint.create_seed_checkpoint: torchtitan builds no parallel model
            return
        self._full_flops_per_token = self.metrics_processor.num_flops_per_token  # torchtitan's count, every block
        self._window: list[float] = []
        # A checkpoint taken before a skipped block first trained would lack its optimizer state, which the
        # load template of a fresh optimizer has: create every parameter's state now (training unchanged).
        init_optimizer_state(self.optimizers)
        self._outside_flops_per_token = 6 * _params_outside_blocks(self.model_parts[0], self.raptr.context.layers)

    def flops_per_token(self) -> float:
        """torchtitan's per-token training FLOPs of the last step: what lies outside the blocks (LM head), plus
        each block's share of the full count for every block (or block fraction, for width methods) that ran.
        Exact for models whose blocks are all alike (Llama-3, tested); not for mixed stacks (DeepSeek-V3's
        dense first layers, hybrid attention) or models with parts torchtitan does not count (vision encoders)."""
        blocks = len(self.raptr.context.layers)
        per_block = (self._full_flops_per_token - self._outside_flops_per_token) / blocks
        units = self.raptr.last.layer_units if self.raptr.last is not None else blocks
        return self._outside_flops_per_token + per_block * units

    def train_step(self, data_iterator):
        info = self.raptr.step(self.step - 1)  # torchtitan counts steps from 1; raptr from 0
        metrics = self.metrics_processor
        if metrics.ntokens_since_last_log == 0:  # a new logging window: its FLOPs per token start afresh
            self._window = []
        self._window.append(self.flops_per_token())
        # torchtitan's TFLOPS and MFU multiply this by the window's tokens: the mean over its steps (equal tokens each)
        metrics.num_flops_per_token = sum(self._window) / len(self._window)
        out = super().train_step(data_iterator)
        if metrics.ntokens_since_last_log == 0:  # torchtitan just logged this window: add the method's own keys
            metrics.logger.log({f"{self.raptr.name}/stage": info.stage, f"{self.raptr.name}/layers_run": info.layers_run,
                                f"{self.raptr.name}/flops_per_token": metrics.num_flops_per_token}, self.step)
        return out

    def state_dict(self) -> dict:
        if self.raptr.context is None:  # a seed checkpoint: no method state yet
            return super().state_dict()
        return {**super().state_dict(), STATE_KEY: self.raptr.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        # (DCP loads into the template above, so a checkpoint without raptr's state fails there, in DCP's words)
        if STATE_KEY in state_dict:
            self.raptr.load_state_dict(state_dict[STATE_KEY])  # another method, options or seed: refused
        super().load_state_dict({k: v for k, v in state_dict.items() if k != STATE_KEY})


def _params_outside_blocks(model: nn.Module, blocks) -> int:
    """Parameters that torchtitan counts as matmul FLOPs outside the blocks: all but the blocks' and the
    input embeddings' (an embedding weight tied to the LM head counts, as torchtitan counts it)."""
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    counted = {id(p): p for module in model.modules() if not isinstance(module, nn.Embedding)
               for p in module.parameters(recurse=False) if id(p) not in in_blocks}  # a tied weight: via the LM head
    return sum(p.numel() for p in counted.values())


def to_raptr(base: Trainer.Config, **raptr) -> RaptrTrainer.Config:
    """A torchtitan config with a raptr section (``raptr``: fields of ``RaptrConfig``)."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return RaptrTrainer.Config(**values, raptr=RaptrConfig(**raptr))


# ------------------------------------------------------------------ config registry (--config NAME)
def raptr_llama3_debugmodel() -> RaptrTrainer.Config:
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    return to_raptr(llama3_debugmodel())


def raptr_llama3_8b() -> RaptrTrainer.Config:
    from torchtitan.models.llama3.config_registry import llama3_8b

    return to_raptr(llama3_8b())


def raptr_llama3_70b() -> RaptrTrainer.Config:
    from torchtitan.models.llama3.config_registry import llama3_70b

    return to_raptr(llama3_70b())
