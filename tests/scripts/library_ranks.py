"""torchrun worker: the library API (raptr.wrap) under DDP or FSDP2 with a seed per rank (a user
mistake). The rank-agreement check must stop it with one clear error, not hang or diverge."""

import gc
import sys

import torch
import torch.distributed as dist

import raptr
from raptr.errors import RaptrError
from raptr.models import TransformerConfig, TransformerLM

mode, seeds = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = TransformerLM(TransformerConfig(vocab_size=64, d_model=16, n_layers=8, n_heads=2, d_ff=32, max_seq_len=8))
rp = raptr.wrap(model, schedule="3-5-8", total_steps=30, seed=rank if seeds == "per-rank" else 0, check_every=5)
if mode == "ddp":
    from torch.nn.parallel import DistributedDataParallel

    net = DistributedDataParallel(model, find_unused_parameters=True)
else:
    from torch.distributed.fsdp import fully_shard

    for layer in model.blocks:
        fully_shard(layer)
    net = fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
try:
    for step in range(30):
        rp.step(step)
        net(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
except RaptrError as e:
    print(f"rank {rank} error: {e}", flush=True)
    sys.exit(2)
print(f"rank {rank} ok", flush=True)
del net, model, opt, rp  # FSDP2 holds the gloo group: free it before the teardown (see tests/torchtitan_fsdp.py)
gc.collect()
dist.destroy_process_group()
