"""One torchtitan training run with RaPTr, run by tests/test_torchtitan.py in 1 or 2 processes (gloo).

    python tests/torchtitan_fsdp.py OUT STEPS [--tp] [--save-at K] [--resume] [--seed S] [--seed-per-rank]

torchtitan's Llama-3 debug model (CPU attention: its ScaledDotProductAttention), RaPTr through
``raptr.wrap`` with the path drawn once per optimizer step before the forward, AdamW. Under torchrun:
FSDP2 ``fully_shard`` per block and at the root as torchtitan's parallelize does, each rank on its
share of the batch; or with ``--tp`` tensor parallel inside every block (the fused QKV and FFN
up-projections column-wise, ``wo`` and ``w2`` row-wise: each rank holds half the heads and FFN units),
every rank on the whole batch. Rank 0 writes the global-batch loss of every step to
OUT/losses.json and the layers run / the layers with gradients per step to OUT/paths.json;
``--save-at K`` writes a DCP checkpoint (the model, AdamW's state and the raptr host, a ``Stateful``) after step K;
``--resume`` loads it first.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import raptr  # noqa: E402
from test_torchtitan import _ids, _loss, debug_model  # noqa: E402


class Training:
    """The checkpointed state: the model and AdamW's state (sharded DTensors under FSDP2) and the raptr
    host. DCP loads into a template, so the optimizer's state must exist before loading: see
    ``raptr.init_optimizer_state`` below."""

    def __init__(self, model, optimizer, host):
        self.model, self.optimizer, self.host = model, optimizer, host

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "raptr": self.host.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.host.load_state_dict(state["raptr"])


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    args = sys.argv[3:]
    save_at = int(args[args.index("--save-at") + 1]) if "--save-at" in args else None
    seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 3
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if "--seed-per-rank" in args:  # a mis-launched job: the ranks would draw different paths
        seed += rank
    torch.manual_seed(0)
    model = debug_model("sdpa").train()
    tp = "--tp" in args
    if distributed and tp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        plan = {"attention.qkv_linear.wqkv": ColwiseParallel(), "attention.wo": RowwiseParallel(),  # QKV fused per head
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
        for block in model.layers.values():
            parallelize_module(block, mesh, plan)
    elif distributed:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():  # torchtitan's order: each block, then the root
            fully_shard(block)
        fully_shard(model)
    # after parallelizing, as raptr.integrations.torchtitan does: each block is gated as it was parallelized
    host = raptr.wrap(model, schedule="3-4-6", total_steps=steps, seed=seed, check_every=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A checkpoint taken before a skipped block first trained would lack its AdamW state, which a fresh
    # optimizer's load template has: create every parameter's state now (training is unchanged).
    raptr.init_optimizer_state(optimizer)
    state = {"training": Training(model, optimizer, host)}
    start = 0
    if "--resume" in args:
        dcp.load(state, checkpoint_id=str(out / "ckpt"))
        start = save_at
    ids = _ids(model, seed=1, batch=4)
    mine = ids if tp else ids.chunk(world)[rank]
    losses, paths = [], []
    for step in range(start, steps):
        info = host.step(step, optimizer)
        loss = _loss(model, mine)
        loss.backward()
        paths.append({"path": list(info.path),
                      "grads": [any(p.grad is not None for p in block.parameters()) for block in model.layers.values()]})
        optimizer.step()
        host.after_optimizer_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        if distributed and not tp:  # under TP every rank computed the same whole-batch loss
            dist.all_reduce(total)
            total /= world
        losses.append(total.item())
        if save_at is not None and step + 1 == save_at and "--resume" not in args:
            dcp.save(state, checkpoint_id=str(out / "ckpt"))
    if rank == 0:
        name = "losses-resumed.json" if "--resume" in args else "losses.json"
        (out / name).write_text(json.dumps(losses))
        (out / "paths.json").write_text(json.dumps(paths))
        weight = next(iter(model.layers.values())).attention.qkv_linear.wqkv.weight  # what this rank holds of it
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        (out / "layout.json").write_text(json.dumps({"wqkv": list(weight.shape), "wqkv_local": list(local.shape)}))
    return distributed


if __name__ == "__main__":
    if main():
        # FSDP2's device mesh and its last collectives hold the gloo group alive past destroy_process_group;
        # left to interpreter finalization, its worker threads abort the process now and then ("terminate
        # called without an active exception"). Free them first (main's frame is gone), then tear down.
        import gc

        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
