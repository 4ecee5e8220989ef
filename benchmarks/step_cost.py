"""Step time by number of layers run, for a comparison's model: the table that turns logged paths
into calibrated wall-clock.

Comparison runs share a loaded machine, so their logged seconds are noisy. This measures, in one
quiet run, a real training step (forward, backward, AdamW) of the comparison's model with k of L
layers run, for every k, interleaved (every k timed in each round, rotating order) so machine
noise hits all k alike, and writes the median seconds per k. ``raptr report`` then prices each
logged step by its layers run. Run it on an otherwise idle machine with the threads the runs used:

    python benchmarks/step_cost.py --config compare/clm-tiny --out docs/results/clm-tiny/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch

from raptr.core import GatedLayers
from raptr.experiments.compare import load_compare_config
from raptr.models.registry import find_layer_stack
from raptr.training.build import build_model
from raptr.training.config import load_config
from raptr.training.trainer import make_optimizer


def spread_path(k: int, n: int) -> list[bool]:
    """k of n layers, first and last included when k >= 2, the rest evenly spaced."""
    if k >= n:
        return [True] * n
    picks = {round(i * (n - 1) / (k - 1)) for i in range(k)} if k > 1 else {0}
    return [i in picks for i in range(n)]


def measure(config: str, rounds: int, warmup: int, threads: int) -> dict:
    cfg = load_compare_config(config)
    run = load_config(cfg.base, cfg.overrides)
    torch.set_num_threads(threads)
    model = build_model(run, run.data.vocab_size).train()
    gates = GatedLayers(find_layer_stack(model))
    opt = make_optimizer(model, run.optim)
    gen = torch.Generator().manual_seed(0)
    shape = (run.train.batch_size, run.data.seq_len)
    ids = torch.randint(10, run.data.vocab_size, shape, generator=gen)
    labels = ids.clone()
    if run.objective.name == "mlm":
        labels[torch.rand(shape, generator=gen) >= run.objective.mask_rate] = -100
    n = len(gates)
    ks = list(range(1, n + 1))
    times: dict[int, list[float]] = {k: [] for k in ks}

    def step(k: int) -> float:
        gates.set_path(spread_path(k, n))
        t0 = time.perf_counter()
        model(input_ids=ids, labels=labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for k in ks[-warmup:] if warmup else []:
        step(k)
    for r in range(rounds):
        for k in ks[r % n:] + ks[: r % n]:
            times[k].append(step(k))
    seconds = [statistics.median(times[k]) for k in ks]
    return {"config": config, "layers": ks, "seconds": seconds, "threads": threads, "rounds": rounds,
            "relative_to_full": [s / seconds[-1] for s in seconds],
            "note": f"median of {rounds} interleaved steps per k, {threads} thread(s), {platform.processor() or platform.machine()}, "
                    f"{date.today().isoformat()}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="compare/clm-tiny", help="comparison config whose model is timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per run (the comparison's train.threads)")
    parser.add_argument("--out", default=None, help="write the table here (e.g. docs/results/<suite>/step_cost.json)")
    args = parser.parse_args()
    table = measure(args.config, args.rounds, args.warmup, args.threads)
    print(f"step time by layers run, {args.config}, {args.threads} thread(s), median of {args.rounds}")
    for k, s, r in zip(table["layers"], table["seconds"], table["relative_to_full"]):
        print(f"{k:3d} layers: {r:.3f} x full")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
