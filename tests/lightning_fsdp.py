"""Lightning with the raptr callback under FSDP on CPU (gloo), run by tests/test_lightning.py in 1 or 2 processes.

    python tests/lightning_fsdp.py OUT DATA.pt [--fsdp]

A tiny GPT-2 in a LightningModule, ``MethodCallback("raptr")``, SGD. With ``--fsdp`` under torchrun:
Lightning's ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` per GPT-2 block, then the root, in
``configure_model``; Lightning's FSDP1 ``FSDPStrategy`` refuses CPU), every rank fed the same batches (``use_distributed_sampler=False``), so the averaged gradient is one process's
and so are the losses. Each rank writes OUT/rank{R}.json: the loss, the blocks whose forward ran
(with grad on) and the blocks with a gradient, per optimizer step.
"""

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from raptr.integrations.lightning import MethodCallback

L, T, B, STEPS = 6, 32, 4, 8


class LM(pl.LightningModule):
    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=T, n_embd=32, n_layer=L, n_head=2,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_model(self):
        if self.device_mesh is None:  # one process: nothing to shard
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:  # one FSDP2 unit per block, then the root (as torchtitan does)
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Probe(pl.Callback):
    """Which blocks ran (forward hooks on GPT-2's own block modules, inside any FSDP unit) and got gradients."""

    def on_fit_start(self, trainer, pl_module):
        self.blocks = [m for m in pl_module.modules() if isinstance(m, GPT2Block)]
        assert len(self.blocks) == L
        self.ran, self.grads = {}, {}
        for i, block in enumerate(self.blocks):
            block.register_forward_hook(lambda m, a, o, i=i: torch.is_grad_enabled() and self.ran.setdefault(
                trainer.global_step, set()).add(i))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step] = [any(p.grad is not None and p.grad.numel() > 0 for p in b.parameters())
                                           for b in self.blocks]


def main() -> None:
    out, data = Path(sys.argv[1]), torch.load(sys.argv[2])
    fsdp = "--fsdp" in sys.argv
    kw = {"accelerator": "cpu", "devices": 1}
    if fsdp:
        from lightning.pytorch.strategies import ModelParallelStrategy

        world = int(os.environ["WORLD_SIZE"])
        kw = {"accelerator": "cpu", "devices": world, "use_distributed_sampler": False,
              "strategy": ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)}
    module, probe = LM(int(data.max()) + 1), Probe()
    module.losses = []
    callback = MethodCallback("raptr", seed=4, schedule="3-4-6", stage_lengths="equal")
    trainer = pl.Trainer(max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[callback, probe], **kw)
    loader = torch.utils.data.DataLoader(list(data[: B * STEPS]), batch_size=B, shuffle=False)
    trainer.fit(module, loader)
    rank = trainer.global_rank
    weight = module.model.transformer.h[0].attn.c_attn.weight  # what this rank holds of it
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    (out / f"rank{rank}.json").write_text(json.dumps({
        "held": local.numel() / weight.numel(),
        "losses": module.losses, "ran": [sorted(probe.ran.get(s, ())) for s in range(STEPS)],
        "grads": [probe.grads[s] for s in range(STEPS)], "strategy": type(trainer.strategy).__name__}))


if __name__ == "__main__":
    main()
