"""Realised wall-clock of each method vs standard training, next to its FLOPs ratio, in one run.

Each method is stepped through its whole schedule (sampled at ``--points`` evenly spaced steps, so
every stage is represented in proportion to its length); at each point every method does one real
training step (forward, backward, AdamW) on the same MLM batch, in rotating order so machine noise
hits all methods alike. The wall-clock ratio is the method's mean step time over the baseline's.

    python benchmarks/wallclock.py [--preset bert-tiny-baseline] [--points 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from raptr.methods.base import TrainingContext
from raptr.models.registry import find_layer_stack
from raptr.training.build import build_method, build_model
from raptr.training.config import load_config
from raptr.training.trainer import make_optimizer

METHODS = {
    "standard": ["method.name=standard"],
    "raptr 6-8-10-12": ["method.name=raptr", "method.raptr.schedule=6-8-10-12", "method.raptr.stage_lengths=equal"],
    "raptr 3-6-9-12 prop:1 (default)": ["method.name=raptr"],
    "stacking 6-9-12": ["method.name=stacking", "method.stacking.schedule=6-9-12"],
    "pld (theta 0.5)": ["method.name=pld", "method.pld.theta=0.5", "method.pld.gamma=0.01"],
    "layerdrop 0.75": ["method.name=layerdrop", "method.layerdrop.keep_prob=0.75"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bert-tiny-baseline")
    parser.add_argument("--steps", type=int, default=600, help="schedule length the methods are planned for")
    parser.add_argument("--points", type=int, default=24, help="steps sampled across the schedule")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per point and method")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = {}
    for label, overrides in METHODS.items():
        cfg = load_config(args.preset, overrides + [f"train.steps={args.steps}"])
        model = build_model(cfg, cfg.data.vocab_size).train()
        full = model.flops(cfg.data.seq_len, cfg.objective.mask_rate)  # before stacking shrinks the model
        method = build_method(cfg)
        context = TrainingContext(model, find_layer_stack(model), args.steps, cfg.train.seed)
        method.attach(context)
        context.optimizer = make_optimizer(model, cfg.optim)
        runs[label] = {"model": model, "method": method, "context": context, "times": [], "flops": [],
                       "full": full}
    cfg = load_config(args.preset)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.data.vocab_size, (cfg.train.batch_size, cfg.data.seq_len), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < cfg.objective.mask_rate, ids, torch.full_like(ids, -100))

    points = [round(i * (args.steps - 1) / (args.points - 1)) for i in range(args.points)]
    labels_order = list(runs)
    for i, step in enumerate(points):
        order = labels_order[i % len(labels_order):] + labels_order[: i % len(labels_order)]
        for label in order:
            r = runs[label]
            info = r["method"].begin_step(step)
            opt = r["context"].optimizer
            for rep in range(args.repeats + (1 if i == 0 else 0)):  # one warm-up step at the first point
                t0 = time.perf_counter()
                loss = r["model"](ids, labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i > 0 or rep > 0:
                    r["times"].append(time.perf_counter() - t0)
            r["flops"].append(r["full"].train_step(info.layers_run, 1) / r["full"].full_step(1))

    base = sum(runs["standard"]["times"]) / len(runs["standard"]["times"])
    rows = []
    print(f"\nwall-clock vs FLOPs, {args.preset} ({cfg.model.n_layers} layers, d={cfg.model.d_model}), "
          f"{args.points} points x {args.repeats} steps, {torch.get_num_threads()} threads")
    print(f"{'method':>18} | {'FLOPs / standard':>16} | {'wall-clock / standard':>21}")
    print("-" * 62)
    for label, r in runs.items():
        mean = sum(r["times"]) / len(r["times"])
        flops = sum(r["flops"]) / len(r["flops"])
        rows.append({"method": label, "flops_ratio": flops, "time_ratio": mean / base})
        print(f"{label:>18} | {flops:16.3f} | {mean / base:21.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
