"""Does training a fraction f of the heads and FFN units cost f of the time?

For a 12-layer reference model, prints the training-step time at width fractions 0.5 / 0.75 / 1
(heads and FFN units together, a fresh random subset per layer and step) divided by the step time
of the *unwrapped* full model, next to the analytic FLOPs ratios (layers only, and the whole
model with embeddings and the MLM head on 15% of positions). "wrapped, f=1" is the wrapper's
overhead at full width (nothing is sliced there, so it should be ~1.00). All variants are timed
interleaved in one run (the order rotates every round), so machine noise hits them alike; the
table shows medians, and minima (the least disturbed step) on a shared machine.

    python benchmarks/width_speed.py [--reps 10] [--warmup 2] [--device cuda] [--freeze-idle] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from raptr.models import TransformerConfig, TransformerLM
from raptr.width import WidthRaPTr, WidthSchedule

FRACTIONS = (0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--freeze-idle", action="store_true", help="wrap optimizer.step() in WidthRaPTr.freeze_idle")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                            d_ff=args.d_ff, max_seq_len=args.seq)
    plain = TransformerLM(cfg).to(device).train()
    wrapped = copy.deepcopy(plain)
    warmup, n = args.warmup, args.reps + args.warmup
    # One controller, one stage per fraction: variant f at rep r trains step (stage start + r), so
    # every rep draws new heads/units and all variants share one model and optimizer.
    schedule = WidthSchedule(FRACTIONS, total_steps=n * len(FRACTIONS))
    wr = WidthRaPTr(wrapped, schedule, seed=0, seq_len=args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    labels = torch.where(torch.rand(ids.shape, device=device) < 0.15, ids, torch.full_like(ids, -100))
    labelled = int((labels != -100).sum())
    opts = {"plain": torch.optim.AdamW(plain.parameters(), lr=1e-4), "wrapped": torch.optim.AdamW(wrapped.parameters(), lr=1e-4)}

    def train_step(model, opt, freeze):
        loss = model(ids, labels)
        loss.backward()
        if freeze:
            with wr.freeze_idle(opt):
                opt.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    names = ["unwrapped, full"] + [f"wrapped, f={f:g}" for f in FRACTIONS]
    times: dict[str, list[float]] = {name: [] for name in names}
    plans = {}
    for rep in range(n):
        for name in names[rep % len(names):] + names[: rep % len(names)]:  # rotate the order: no position bias
            sync()
            t0 = time.perf_counter()
            if name == "unwrapped, full":
                train_step(plain, opts["plain"], False)
            else:
                stage = schedule.stages[names.index(name) - 1]
                plans[name] = wr.step(stage.start + rep)  # sampling and index upload are part of the step
                train_step(wrapped, opts["wrapped"], args.freeze_idle)
            sync()
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    full = med["unwrapped, full"]
    mf = plain.flops(args.seq)
    head = labelled * mf.head_forward_per_position()
    full_layers = args.batch * wr.full_layer_flops()
    print(f"\n{args.layers}-layer width benchmark: d_model={args.d_model}, {args.heads} heads, d_ff={args.d_ff}, "
          f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}, device {device}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}{', freeze_idle' if args.freeze_idle else ''}; unwrapped full step {full * 1e3:.0f} ms")
    header = (f"{'variant':>16} | {'step time / full':>16} | {'min / min':>9} | {'FLOPs / full (layers)':>21} | "
              f"{'FLOPs / full (model)':>20}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in names:
        if name == "unwrapped, full":
            layer_ratio = model_ratio = 1.0
        else:
            plan = plans[name]
            layer_ratio = wr.relative_flops(plan)
            model_ratio = (args.batch * wr.layer_flops(plan) + head) / (full_layers + head)
        ratio = med[name] / full
        min_ratio = min(times[name]) / min(times["unwrapped, full"])
        rows.append({"variant": name, "time_ratio": ratio, "min_time_ratio": min_ratio, "layer_flops_ratio": layer_ratio,
                     "model_flops_ratio": model_ratio, "median_s": med[name], "times_s": times[name]})
        print(f"{name:>16} | {ratio:16.3f} | {min_ratio:9.3f} | {layer_ratio:21.3f} | {model_ratio:20.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
