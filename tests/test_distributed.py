"""Real 2-process torchrun runs on CPU (gloo): same paths, same weights, same loss as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raptr.training.checkpoint import checkpoint_dirs, load_weights
from conftest import AUSTEN_DATA, tiny

pytestmark = pytest.mark.dist

TINY = tiny("method.raptr.schedule=3-4-6", *AUSTEN_DATA, "train.path_check_every=1", layers=6, batch=8)


def run(args, nproc=1, env=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
                "-m", "raptr"] if nproc > 1 else [sys.executable, "-m", "raptr"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def final_weights(run_dir: Path) -> dict:
    weights = load_weights(checkpoint_dirs(run_dir / "checkpoints")[-1])
    if "head.weight" in weights:  # tied to tok.weight: safetensors stores one of the two names
        weights["tok.weight"] = weights.pop("head.weight")
    return weights


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, data_cache, parallel):
    common = ["train", "--config", "bert-tiny-raptr-paper", "-q", *TINY, f"data.cache_dir={data_cache}", "train.steps=12",
              "train.eval_every=6", "train.checkpoint_every=6", f"train.parallel={parallel}"]
    run(common + [f"train.out_dir={tmp_path}/one"])
    run(common + [f"train.out_dir={tmp_path}/two"], nproc=2)  # path and replica checks every step
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 12
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)  # summation order differs across ranks
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s1["flops"] == s2["flops"] and s1["relative_flops"] < 1


def test_resume_under_torchrun(tmp_path, data_cache):
    common = ["train", "--config", "bert-tiny-raptr-paper", "-q", *TINY, f"data.cache_dir={data_cache}", "train.steps=10",
              "train.eval_every=5", "train.checkpoint_every=4"]
    run(common + [f"train.out_dir={tmp_path}/straight"], nproc=2)
    run(common + [f"train.out_dir={tmp_path}/resumed", "--stop-after", "4"], nproc=2)
    assert len(losses(tmp_path / "resumed")) == 4
    run(common + [f"train.out_dir={tmp_path}/resumed"], nproc=2)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


DDP_GRADS = """
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import raptr
from raptr.models import TransformerConfig, TransformerLM
dist.init_process_group("gloo")
rank = dist.get_rank()
log = open(f"{sys.argv[1]}/rank{rank}.txt", "w")  # one file per rank: stdout of two ranks interleaves
torch.manual_seed(0)
model = TransformerLM(TransformerConfig(vocab_size=64, d_model=16, n_layers=6, n_heads=2, d_ff=32, max_seq_len=8))
rp = raptr.wrap(model, schedule="3-6", total_steps=100, seed=7)
ddp = DDP(model, find_unused_parameters=True)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
for step in range(6):
    plan = rp.step(step)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(100 * step + rank))
    ddp(ids, ids).backward()
    grads_none = [all(p.grad is None for p in layer.parameters()) for layer in model.blocks]
    print(rank, step, "".join("1" if r else "0" for r in plan.path), "".join("1" if g else "0" for g in grads_none), file=log, flush=True)
    opt.step(); opt.zero_grad(set_to_none=True)
print(rank, "checksum", sum(float(p.double().sum()) for p in model.parameters()), file=log, flush=True)
del ddp, model, opt, rp  # DDP holds the gloo group: free it before the teardown (see tests/torchtitan_fsdp.py)
import gc; gc.collect()
dist.destroy_process_group()
"""


def test_ddp_keeps_skipped_grads_none_on_every_rank(tmp_path):
    script = tmp_path / "ddp_grads.py"
    script.write_text(DDP_GRADS)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split() for r in (0, 1) for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()]
    steps = {}
    for rank, step, *rest in lines:
        if step == "checksum":
            steps.setdefault("checksum", set()).add(rest[0])
            continue
        active, grads_none = rest
        steps.setdefault(step, set()).add(active)
        assert all((a == "1") != (g == "1") for a, g in zip(active, grads_none)), (rank, step, active, grads_none)
    assert all(len(v) == 1 for v in steps.values())  # same path and same final weights on both ranks
    assert any("0" in next(iter(v)) for k, v in steps.items() if k != "checksum")  # some layers were skipped


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_library_api_catches_rank_seed_mismatch_without_hanging(mode):
    script = Path(__file__).parent / "scripts" / "library_ranks.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(launcher + [mode, "per-rank"], capture_output=True, text=True, env=env, timeout=180)
    assert bad.returncode != 0
    assert "ranks drew different layer paths at step 0" in bad.stdout, bad.stdout[-2000:] + bad.stderr[-2000:]
    good = subprocess.run(launcher + [mode, "same"], capture_output=True, text=True, env=env, timeout=180)
    assert good.returncode == 0 and good.stdout.count("ok") == 2, good.stdout[-2000:] + good.stderr[-2000:]


def test_sigterm_under_torchrun_stops_every_rank_with_a_checkpoint(tmp_path, data_cache):
    import signal
    import time

    common = ["train", "--config", "bert-tiny-raptr-paper", "-q", *TINY, f"data.cache_dir={data_cache}", "train.steps=400",
              "train.eval_every=1000", "train.checkpoint_every=1000", "train.path_check_every=50"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "raptr"]
    proc = subprocess.Popen(launcher + common + [f"train.out_dir={tmp_path}/run"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.is_file() and log.read_text().count('"train"') >= 10):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert err.count("stopped by SIGTERM at step") == 2, err[-3000:]  # both ranks, at one step
    stopped = checkpoint_dirs(tmp_path / "run" / "checkpoints")
    assert stopped and 10 <= int(stopped[-1].name.split("_")[1]) < 400
    steps = {line.split("stopped by SIGTERM at step ")[1].split("/")[0] for line in err.splitlines() if "stopped by" in line}
    assert steps == {str(int(stopped[-1].name.split("_")[1]))}


def test_stacking_grows_under_ddp_like_one_process(tmp_path, data_cache):
    common = ["train", "--config", "bert-tiny-raptr-paper", "-q", *TINY, f"data.cache_dir={data_cache}", "train.steps=12",
              "train.eval_every=6", "train.checkpoint_every=6", "method.name=stacking", "method.stacking.schedule=3-6"]
    run(common + [f"train.out_dir={tmp_path}/one"])
    run(common + [f"train.out_dir={tmp_path}/two"], nproc=2)  # DDP is re-wrapped when the model grows
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 12
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert {r["layers_run"] for r in rows if r["kind"] == "train"} == {3, 6}  # it really grew
