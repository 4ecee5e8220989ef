"""Tokens/s of `raptr train` (full model, standard method) vs the HF `Trainer`, same HF model, one run.

Both train the same `BertForMaskedLM` (built from a config, same init), with the same MLM batches
(batch x seq from the real corpus), AdamW, for the same number of steps; the first steps are
warm-up and not timed. Prints both throughputs and their ratio (goal >= 1.0).

    python benchmarks/trainer_throughput.py [--steps 30] [--hf-type bert] [--d-model 128] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from raptr.ranks import step_generator
from raptr.training.build import build_model, build_objective, build_trainer, prepare_data
from raptr.training.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hf-type", default="bert", choices=["bert", "roberta"])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sources", default="austen")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="raptr-throughput-")
    cfg = load_config("bert-tiny-baseline", [
        "model.family=hf", f"model.hf_type={args.hf_type}", f"model.d_model={args.d_model}",
        f"model.n_layers={args.layers}", f"model.n_heads={max(1, args.d_model // 64)}", f"model.d_ff={4 * args.d_model}",
        f"data.sources={args.sources}", f"data.seq_len={args.seq}", f"train.batch_size={args.batch}",
        f"train.steps={args.steps}", f"train.eval_every={10 * args.steps}", "train.eval_batches=1",
        f"train.checkpoint_every={10 * args.steps}", f"train.out_dir={out}/raptr", "optim.warmup_steps=5"])
    data = prepare_data(cfg, progress=False)

    # raptr's trainer: per-step times from its own log
    build_trainer(cfg, progress=False, data=data).fit()
    rows = [json.loads(line) for line in open(f"{out}/raptr/metrics.jsonl") if '"train"' in line]
    seconds = [b["train_seconds"] - a["train_seconds"] for a, b in zip(rows, rows[1:])][args.warmup:]
    raptr_step = statistics.median(seconds)

    # HF Trainer on the same model, the same batches (precomputed with the same objective)
    from transformers import Trainer, TrainerCallback, TrainingArguments

    objective = build_objective(cfg, data.ids, data.tokenizer.get_vocab_size())
    examples = []
    for step in range(args.steps):
        batch = objective(data.train.batch(step, args.batch, cfg.train.seed), step_generator(cfg.train.seed, step, 1))
        examples += [{"input_ids": i, "labels": lab} for i, lab in zip(batch["input_ids"], batch["labels"])]
    hf_model = build_model(cfg, data.tokenizer.get_vocab_size()).hf  # same seed -> same init as raptr's

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    targs = TrainingArguments(output_dir=f"{out}/hf", per_device_train_batch_size=args.batch, max_steps=args.steps,
                              learning_rate=cfg.optim.lr, warmup_steps=5, weight_decay=cfg.optim.weight_decay,
                              max_grad_norm=cfg.optim.grad_clip, use_cpu=True, report_to=[], save_strategy="no",
                              logging_strategy="no", dataloader_num_workers=0, seed=cfg.train.seed)
    Trainer(model=hf_model, args=targs, train_dataset=examples, callbacks=[timer],
            data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}).train()
    hf_step = statistics.median(timer.times[args.warmup:])

    tokens = args.batch * args.seq
    print(f"\nHF {args.hf_type} d={args.d_model} L={args.layers}, batch {args.batch} x seq {args.seq}, "
          f"{torch.get_num_threads()} threads, median of {args.steps - args.warmup} steps")
    print(f"raptr train : {tokens / raptr_step:9.0f} tokens/s")
    print(f"HF Trainer  : {tokens / hf_step:9.0f} tokens/s")
    print(f"ratio raptr / HF Trainer: {hf_step / raptr_step:.2f}x (goal >= 1.0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raptr_tokens_per_s": tokens / raptr_step, "hf_tokens_per_s": tokens / hf_step,
                       "ratio": hf_step / raptr_step, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
