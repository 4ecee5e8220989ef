"""Does skipping k of 12 layers cost k/12 of the time? And what does the wrapper itself cost?

Prints, for a 12-layer model on this machine, the training-step time with k layers run divided by
the full step time, next to the analytic FLOPs ratio, and the overhead of the RaPTr wrapper when
it runs every layer (goal <= 1.02x). Ratios come from one run: models are timed interleaved, so
machine noise hits all of them alike.

    python benchmarks/skip_speed.py [--d-model 128] [--reps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import raptr
from raptr.models import TransformerConfig, TransformerLM


def make_step(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    L = args.layers
    cfg = TransformerConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=L, n_heads=max(1, args.d_model // 64),
                            d_ff=4 * args.d_model, max_seq_len=args.seq)
    plain = TransformerLM(cfg).to(device).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    labels = torch.where(torch.rand(ids.shape, device=device) < 0.15, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "labels": labels}
    flops = plain.flops(args.seq, head_positions=0.15)

    wrapped = copy.deepcopy(plain)
    rp = raptr.wrap(wrapped, schedule=f"p:{1.0}", total_steps=1)
    ks = [k for k in (2, 3, 6, 9, L) if k <= L]
    variants = {"plain": (plain, None), "wrapped, full path": (wrapped, L)}
    for k in ks[:-1]:
        variants[f"{k} of {L}"] = (wrapped, k)
    steps = {name: make_step(model, batch) for name, (model, _) in variants.items()}
    gen = torch.Generator().manual_seed(0)

    def set_path(k):
        if k is None:
            return
        inner = torch.randperm(L - 2, generator=gen)[: k - 2] + 1  # first and last always run, as RaPTr's default
        active = [i in (0, L - 1) or i in inner.tolist() for i in range(L)]
        rp.gates.set_path(active)

    times = {name: [] for name in variants}
    for rep in range(args.reps + 3):
        for name, (_, k) in variants.items():
            set_path(k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= 3:  # warm-up
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    full = med["wrapped, full path"]
    rows = []
    print(f"\n12-layer skip benchmark: d_model={args.d_model}, batch {args.batch} x seq {args.seq}, vocab {args.vocab}, "
          f"device {device}, {torch.get_num_threads()} threads, median of {args.reps}")
    print(f"{'layers run':>20} | {'step time / full':>16} | {'FLOPs / full':>12}")
    print("-" * 56)
    for k in ks:
        name = "wrapped, full path" if k == L else f"{k} of {L}"
        time_ratio = med[name] / full
        flop_ratio = flops.train_step(k, 1) / flops.full_step(1)
        rows.append({"layers_run": k, "time_ratio": time_ratio, "flops_ratio": flop_ratio})
        print(f"{name:>20} | {time_ratio:16.3f} | {flop_ratio:12.3f}")
    overhead = med["wrapped, full path"] / med["plain"]
    print(f"\nwrapper overhead, full path vs unwrapped model: {overhead:.3f}x (goal <= 1.02x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "overhead": overhead, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
