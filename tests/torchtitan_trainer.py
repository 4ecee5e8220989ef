"""torchtitan's own Trainer with raptr's section (``raptr.integrations.torchtitan``) on CPU, under torchrun.

    torchrun --nproc_per_node=N tests/torchtitan_trainer.py OUT STEPS [torchtitan flags ...]

Run by tests/test_torchtitan.py. torchtitan's command line, config registry (``--module
raptr.integrations.torchtitan --config raptr_llama3_debugmodel``), data loader, checkpointer and
metrics all run as they are; what a CPU needs is set up here, not in raptr:

- assets: a byte-level BPE tokenizer and a JSON-lines dataset made from the shipped Austen chapters;
- torchtitan picks "cuda" when no accelerator is found, so it is told "cpu", and the CPU device
  module gets the memory-statistics calls torchtitan makes for its logs (answering "nothing
  measured"); the shortening of process-group timeouts after step 1 (an API this torch lacks on
  CPU) is skipped;
- FlexAttention has no backward on CPU, so each block gets torchtitan's ScaledDotProductAttention,
  causal, ignoring the document masks (a test-side choice, made before raptr wraps the model).

Rank 0 writes OUT/record.json: per step the loss, the FLOPs per token torchtitan's metrics used,
the blocks whose forward ran (with grad on), the blocks with gradients at the optimizer step, and
raptr's path; and torchtitan's own full-model FLOPs per token.
"""

import dataclasses
import json
import sys
import types
from pathlib import Path

import torch
import torch._utils

HERE = Path(__file__).resolve().parent


def assets(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [p.read_text() for p in sorted((HERE / "fixtures" / "austen").rglob("*.txt"))]
    docs = [t[i:i + 2000] for t in texts for i in range(0, len(t), 2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"]),
                            length=len(docs))
    (out / "tok").mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tok" / "tokenizer.json"))
    (out / "tok" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    (out / "data").mkdir(exist_ok=True)
    (out / "data" / "train.json").write_text("\n".join(json.dumps({"text": d}) for d in docs))


def cpu_for_torchtitan() -> None:
    torch._utils._get_available_device_type = lambda: "cpu"
    stubs = {"get_device_name": lambda *a: "cpu", "get_device_properties": lambda *a: types.SimpleNamespace(total_memory=1 << 34),
             "reset_peak_memory_stats": lambda *a: None, "empty_cache": lambda *a: None, "memory_stats": lambda *a: {}}
    for name, fn in stubs.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, fn)
    torch.cpu.current_device = lambda: 0  # an index: barrier(device_ids=[...]) wants an int
    import torchtitan.distributed.utils as dist_utils

    dist_utils.set_pg_timeouts = lambda **kwargs: None


def main() -> None:
    out, steps, flags = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    if not (out / "tok").is_dir():
        assets(out)
    cpu_for_torchtitan()
    from torchtitan.config import ConfigManager
    from torchtitan.models.common.attention import ScaledDotProductAttention

    class CausalSDPA(ScaledDotProductAttention):
        def forward(self, *args, attention_masks=None, **kwargs):
            return super().forward(*args, **kwargs)

    config = ConfigManager().parse_args([
        "--module", "raptr.integrations.torchtitan", "--config", "raptr_llama3_debugmodel",
        "--training.steps", str(steps), "--training.seq_len", "64", "--training.local_batch_size", "2",
        "--hf_assets_path", str(out / "tok"), "--dataloader.dataset_path", str(out / "data"),
        "--dump_folder", str(out / "dump"), "--validator.no-enable", *flags])  # (raptr turns CUDA graphs off itself)
    spec, parallelize = config.model_spec, config.model_spec.parallelize_fn

    def cpu_attention(model, **kwargs):
        for block in model.layers.values():
            block.attention.inner_attention = CausalSDPA(None)
        return parallelize(model, **kwargs)

    config.model_spec = dataclasses.replace(spec, parallelize_fn=cpu_attention)
    trainer = config.build()
    blocks = list(trainer.raptr.context.layers)  # the gated blocks (inside torchtitan's activation-checkpoint wrappers)
    record = {"full_flops_per_token": trainer._full_flops_per_token, "steps": {}}

    def row():
        return record["steps"].setdefault(trainer.step, {"ran": []})

    for i, block in enumerate(blocks):  # (kept out of compiled graphs: a per-block constant would recompile per block)
        block.register_forward_hook(torch.compiler.disable(lambda m, a, o, i=i: torch.is_grad_enabled() and row()["ran"].append(i)))
    step_optimizer, log = trainer.optimizers.step, trainer.metrics_processor.log

    def optimizer_step(*args, **kwargs):
        row().update(grads=[any(p.grad is not None for p in b.parameters()) for b in blocks],
                     path=list(trainer.raptr.last.path), flops_per_token=trainer.metrics_processor.num_flops_per_token)
        return step_optimizer(*args, **kwargs)

    def logged(step, global_avg_loss, *args, **kwargs):
        record["steps"][step]["loss"] = global_avg_loss
        return log(step, global_avg_loss, *args, **kwargs)

    trainer.optimizers.step, trainer.metrics_processor.log = optimizer_step, logged
    trainer.train()
    trainer.close()
    if torch.distributed.get_rank() == 0:
        name = "record-resumed.json" if (out / "record.json").exists() else "record.json"
        (out / name).write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
