"""Whole-model torch.compile and the wrapper's own cost, on a Hugging Face GPT-2.

1. ``torch.compile(model)`` of a wrapped model: compiled step time with k of L layers over the
   compiled full step, beside the FLOPs ratio, and the graphs compiled for all of it.
2. What the wrapper costs when every layer runs: eager step time of the wrapped model (full path)
   over the unwrapped one, at L and 4L layers, timed in both orders (unwrapped first in even
   rounds, wrapped first in odd rounds), so an order effect shows instead of passing for overhead.

    python benchmarks/compile_speed.py [--layers 12] [--backend inductor] [--reps 20] [--json out.json]

Ratios come from one run with the variants interleaved; run it on a quiet machine (one thread by
default), never beside another timing job.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import transformers as tf
from torch._dynamo.utils import counters

import raptr
from raptr.models.registry import model_flops


def gpt2(layers: int, d_model: int, seq: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=layers, n_embd=d_model, n_head=max(1, d_model // 32), n_positions=seq, vocab_size=vocab,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).train()


def stepper(model: torch.nn.Module, ids: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def path(k: int, L: int) -> list[bool]:
    return [True] * L if k >= L else [i in (0, L - 1) or i < k - 1 for i in range(L)]


def compiled_rows(args, ids) -> dict:
    L = args.layers
    torch._dynamo.reset()
    counters.clear()
    model = gpt2(L, args.d_model, args.seq, args.vocab)
    flops = model_flops(model, args.seq)
    rp = raptr.wrap(model, schedule="p:1", total_steps=1)
    step = stepper(torch.compile(model, backend=args.backend), ids)
    ks = sorted({max(2, L // 4), L // 2, 3 * L // 4, L})
    times = {k: [] for k in ks}
    for rep in range(args.reps + 2):  # two warm-up rounds (the first compiles)
        for k in ks[rep % len(ks):] + ks[: rep % len(ks)]:
            rp.gates.set_path(path(k, L))
            t = step()
            if rep >= 2:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"layers_run": k, "time_ratio": med[k] / med[L], "flops_ratio": flops.train_step(k, 1) / flops.full_step(1)} for k in ks]
    return {"rows": rows, "graphs": int(counters["stats"].get("unique_graphs", 0))}


def overhead(layers: int, args, ids) -> dict:
    plain = gpt2(layers, args.d_model, args.seq, args.vocab)
    wrapped = copy.deepcopy(plain)
    raptr.wrap(wrapped, schedule="p:1", total_steps=1).step(0)  # p = 1: every layer runs
    steps = {"unwrapped": stepper(plain, ids), "wrapped": stepper(wrapped, ids)}
    ratios = {"unwrapped first": [], "wrapped first": []}
    for rep in range(args.reps + 2):
        order = ["unwrapped", "wrapped"] if rep % 2 == 0 else ["wrapped", "unwrapped"]
        t = {name: steps[name]() for name in order}
        if rep >= 2:
            ratios[f"{order[0]} first"].append(t["wrapped"] / t["unwrapped"])
    out = {order: statistics.median(r) for order, r in ratios.items()}
    out["both orders"] = statistics.median(ratios["unwrapped first"] + ratios["wrapped first"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    L = args.layers
    print(f"GPT-2 d={args.d_model}, batch {args.batch} x seq {args.seq}, vocab {args.vocab}, {args.threads} thread(s), "
          f"median of {args.reps} rounds")

    compiled = compiled_rows(args, ids)
    print(f"\n1. torch.compile(model) ({args.backend}) of the wrapped {L}-layer model: {compiled['graphs']} graphs")
    print(f"{'layers run':>10} | {'compiled step / full':>20} | {'FLOPs / full':>12}")
    for row in compiled["rows"]:
        print(f"{row['layers_run']:>10} | {row['time_ratio']:20.3f} | {row['flops_ratio']:12.3f}")

    costs = {n: overhead(n, args, ids) for n in (L, 4 * L)}
    print("\n2. wrapper overhead, eager, full path: wrapped step / unwrapped step (goal <= 1.02x)")
    print(f"{'layers':>6} | {'unwrapped first':>15} | {'wrapped first':>13} | {'both orders':>11}")
    for n, c in costs.items():
        print(f"{n:>6} | {c['unwrapped first']:15.3f} | {c['wrapped first']:13.3f} | {c['both orders']:11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"compiled": compiled, "overhead": {str(n): c for n, c in costs.items()}, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
