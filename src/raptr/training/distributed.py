"""torchrun support: DDP or FSDP2 with one RaPTr path per step shared by every rank.

Every rank draws the same path with no communication (the sampler is seeded by (seed, step)),
so skipped layers are *globally* unused: DDP's ``find_unused_parameters`` leaves their ``.grad``
``None`` and FSDP2 issues no collectives for a skipped block on any rank. The host
(``raptr.methods.host.Host``) all-reduces a path hash every ``train.path_check_every`` steps, so a
broken assumption is a clear error instead of a hang.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn



@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def wrap_model(model: nn.Module, layers: nn.ModuleList, info: DistInfo, strategy: str, may_skip: bool) -> nn.Module:
    """The module the training forward goes through (``model`` itself on one process)."""
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in layers:  # one FSDP unit per block: a skipped block costs no all-gather
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    # Needed only when layers can be skipped: it costs a graph traversal per step.
    return DDP(model, device_ids=device_ids, find_unused_parameters=may_skip)


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Tear the process group down once the caller has dropped its model. FSDP2 keeps a reference to
    the group in every sharded module; a gloo group left to interpreter finalization aborts the
    process now and then ("terminate called without an active exception") after a finished run."""
    if info.enabled and dist.is_initialized():
        gc.collect()  # the dropped model's reference cycles, and with them its hold on the group
        dist.destroy_process_group()
