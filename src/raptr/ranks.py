"""What every rank of a distributed job must agree on, and the seeded streams that make it so.

A step's random choices (which layers run, which heads and units, the objective's masking) come
from a generator seeded by ``(seed, step, stream)``: every rank draws the same without talking to
the others, and a resumed run needs no RNG state. ``RankAgreement`` checks it now and then with one
small all-reduce, so a mismatch (a rank with another seed) is one error line, never a silent
divergence or an FSDP hang.
"""

from __future__ import annotations

from typing import Sequence

import torch

from raptr.errors import RaptrError


class RankAgreement:
    """Under torch.distributed, every ``every`` steps (and at the first), check with one small
    all-reduce that all ranks chose the same subnetwork; a mismatch (e.g. different seeds per
    rank) is one clear error naming the step, never a silent divergence or an FSDP hang."""

    def __init__(self, every: int = 50, timeout_s: float = 120.0):
        self.every, self.timeout_s, self.checked = every, timeout_s, False

    def __call__(self, step: int, fingerprint: int, what: str = "layer paths") -> None:
        import torch.distributed as dist

        if not self.every or not (dist.is_available() and dist.is_initialized()):
            return
        if self.checked and step % self.every:
            return
        self.checked = True
        if not ranks_agree([float(fingerprint % 2**52)], self.timeout_s, step)[0]:
            raise RaptrError(f"ranks drew different {what} at step {step}: give every rank the same seed and schedule "
                             "(the subnetwork is a function of seed and step only)")


def path_hash(path: Sequence[bool] | None, step: int) -> int:
    bits = 0 if path is None else sum(1 << i for i, run in enumerate(path) if run)
    return (bits * 1_000_003 + step) % (2**61 - 1)


def ranks_agree(values: list[float], timeout_s: float = 120.0, step: int | None = None) -> list[bool]:
    """For each value: is it the same on every rank? (one MAX all-reduce of the values and their negations)"""
    from datetime import timedelta

    import torch.distributed as dist

    t = torch.tensor(values + [-v for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError:
        raise RaptrError(f"ranks did not meet for the subnetwork check{'' if step is None else f' at step {step}'} within "
                         f"{timeout_s:.0f} s: a rank crashed or calls step() at other steps than the rest") from None
    n = len(values)
    t = t.cpu()
    return [t[i].item() == v and -t[n + i].item() == v for i, v in enumerate(values)]


# Every random stream raptr draws from ``step_generator``, in one place (a new stream takes a new
# number, so no two consumers ever see the same numbers):
PATH_STREAM = 0  # which layers run (RaPTr, LayerDrop, PLD, depth x width's path)
OBJECTIVE_STREAM = 1  # the trainer's masking / denoising of training batches
EVAL_STREAM = 2  # ... of validation batches (fixed across the run)
HEADS_STREAM = 11  # width subnetworks: kept heads (KV groups)
UNITS_STREAM = 12  # width subnetworks: kept FFN units


def step_generator(seed: int, step: int, stream: int = PATH_STREAM) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): identical on every rank."""
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)
