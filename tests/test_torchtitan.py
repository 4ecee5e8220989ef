"""torchtitan's Llama-3 debug model under raptr (CPU): its blocks live in an ``nn.ModuleDict``.

FlexAttention (torchtitan's default for language models) has no backward on CPU, so the training
checks give each block torchtitan's own ``ScaledDotProductAttention`` (causal), as a CPU user would;
the forward checks also run with FlexAttention itself under ``no_grad``.
"""

import copy

import pytest
import torch

torchtitan = pytest.importorskip("torchtitan")  # `make test` installs it (Makefile: TORCHTITAN)

import raptr  # noqa: E402
from raptr.models.registry import find_layer_stack  # noqa: E402


def debug_model(attention: str = "sdpa"):
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import llama3_configs

    torch.manual_seed(0)
    model = llama3_configs["debugmodel"]("flex").build()
    model.init_weights()
    model.init_states()
    if attention == "sdpa":
        for block in model.layers.values():
            block.attention.inner_attention = ScaledDotProductAttention(None)
    return model


def _ids(model, seed=1, batch=2, seq=32):
    vocab = model.tok_embeddings.weight.shape[0]
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids, masks=None):
    logits = model(ids, attention_masks=masks)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _without(model, keep):
    ref = copy.deepcopy(model)
    for key, run in zip(list(ref.layers.keys()), keep):
        if not run:
            del ref.layers[key]
    return ref


def test_blocks_in_a_module_dict_are_found_and_wrapped():
    model = debug_model()
    stack = find_layer_stack(model)
    assert [id(b) for b in stack] == [id(b) for b in model.layers.values()] and len(stack) == 6
    rp = raptr.wrap(model, schedule="3-6", total_steps=10)
    assert len(rp.gates) == 6 and rp.step(0).layers_run <= 6
    rp.detach()
    assert type(model.layers["0"]).__name__ == "Llama3TransformerBlock"


@pytest.mark.parametrize("attention", ["flex", "sdpa"])
def test_full_path_is_the_model_and_a_partial_path_is_the_model_without_those_blocks(attention):
    model = debug_model(attention)
    ids = _ids(model)
    masks = None
    if attention == "flex":
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        masks = model.get_attention_masks(positions)
    plain = copy.deepcopy(model)
    rp = raptr.wrap(model.train(), schedule="p:0.5-1", total_steps=10, fixed="none")
    keep = [True, False, True, True, False, True]
    with torch.no_grad():
        rp.gates.set_path([True] * 6)
        assert torch.equal(model(ids, attention_masks=masks), plain.train()(ids, attention_masks=masks))
        rp.gates.set_path(keep)
        got = model(ids, attention_masks=masks)
        assert torch.equal(got, _without(plain, keep)(ids, attention_masks=masks))


def test_training_steps_skip_blocks_exactly_and_leave_their_grads_none():
    model = debug_model("sdpa").train()
    ids = _ids(model)
    rp = raptr.wrap(model, schedule="3-4-6", total_steps=9, seed=3)
    for step in range(3):
        info = rp.step(step)
        model.zero_grad(set_to_none=True)
        loss = _loss(model, ids)
        loss.backward()
        ref = _without(model, info.path)  # same weights, skipped blocks removed
        ref.zero_grad(set_to_none=True)
        ref_loss = _loss(ref, ids)
        ref_loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
        for run, block in zip(info.path, model.layers.values()):
            assert all((p.grad is None) != run for p in block.parameters())
        kept = [b for run, b in zip(info.path, model.layers.values()) if run]
        for a, b in zip(kept, ref.layers.values()):
            for pa, pb in zip(a.parameters(), b.parameters()):
                torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5)


def _torchrun(out, *args, nproc=2, check=True):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "torchtitan_fsdp.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] if nproc > 1 \
        else [sys.executable]
    done = subprocess.run(launcher + [str(script), str(out), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.dist
def test_fsdp2_per_block_two_ranks_match_one_process_and_dcp_resumes_bitwise(tmp_path):
    """torchtitan's sharding (fully_shard per block, then the root) with RaPTr paths: 2 ranks give one
    process's losses; a DCP checkpoint (model + raptr host as a Stateful) resumes the same paths and
    losses bitwise; a checkpoint of another seed is refused."""
    import json

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    for d in (one, two, resumed):
        d.mkdir()
    _torchrun(one, 4, nproc=1)
    _torchrun(two, 4)
    l1, l2 = json.loads((one / "losses.json").read_text()), json.loads((two / "losses.json").read_text())
    assert len(l1) == 4 and l1 == pytest.approx(l2, rel=1e-5)
    _torchrun(resumed, 4, "--save-at", 2)
    _torchrun(resumed, 4, "--save-at", 2, "--resume")
    straight = json.loads((resumed / "losses.json").read_text())
    assert json.loads((resumed / "losses-resumed.json").read_text()) == straight[2:]  # bitwise
    other = _torchrun(resumed, 4, "--save-at", 2, "--resume", "--seed", 5, check=False)
    assert other.returncode != 0 and "written by another method configuration (seed: 3 -> 5)" in other.stderr


@pytest.mark.dist
def test_ranks_with_different_seeds_stop_with_one_error_not_a_hang(tmp_path):
    done = _torchrun(tmp_path, 4, "--seed-per-rank", check=False)
    assert done.returncode != 0 and "ranks drew different layer paths at step 0" in done.stderr


@pytest.mark.dist
def test_tensor_parallel_two_ranks_match_one_process_and_skip_blocks_alike(tmp_path):
    """Tensor parallel inside every block (each rank holds half of every block's heads and FFN units):
    a skipped block runs none of its collectives on any rank (the paths agree, so nothing waits), the
    losses equal one process's, and skipped blocks' (sharded) parameters get no gradient."""
    import json

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _torchrun(one, 4, "--tp", nproc=1)
    _torchrun(two, 4, "--tp")
    layout = json.loads((two / "layout.json").read_text())
    assert layout["wqkv_local"][0] * 2 == layout["wqkv"][0]  # really sharded: half the fused QKV rows per rank
    l1, l2 = json.loads((one / "losses.json").read_text()), json.loads((two / "losses.json").read_text())
    assert len(l2) == 4 and l1 == pytest.approx(l2, rel=1e-5)
    paths = json.loads((two / "paths.json").read_text())
    assert paths == json.loads((one / "paths.json").read_text())
    assert any(not all(p["path"]) for p in paths)  # some steps skip blocks
    assert all(p["grads"] == p["path"] for p in paths)


# ------------------------------------------------------------------------------------------------
# torchtitan's own Trainer with raptr's config section (raptr.integrations.torchtitan)
# ------------------------------------------------------------------------------------------------
TT_FLAGS = ["--raptr.schedule", "3-4-6", "--raptr.stage_lengths", "equal", "--raptr.check_every", "1",
            "--metrics.log_freq", "1", "--checkpoint.enable", "--checkpoint.interval", "3", "--debug.seed", "0"]


def _trainer(out, steps, *flags, nproc=1, check=True):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "torchtitan_trainer.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
                           str(script), str(out), str(steps), *TT_FLAGS, *map(str, flags)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _planned(steps, seed=0):
    model = debug_model("sdpa").train()
    host = raptr.wrap(model, schedule="3-4-6", stage_lengths="equal", total_steps=steps, seed=seed)
    return [list(host.step(s).path) for s in range(steps)]


@pytest.mark.dist
def test_torchtitan_trainer_skips_blocks_counts_their_flops_and_resumes_from_its_checkpoint(tmp_path):
    """`--module raptr.integrations.torchtitan --config raptr_llama3_debugmodel`: torchtitan's own loop, data,
    metrics and DCP checkpointer. The planned path runs (and only its blocks get gradients); the FLOPs per
    token torchtitan's metrics use count only the blocks that ran; a resume from the step-3 checkpoint
    (taken before some blocks had ever trained: their AdamW state exists all the same) continues the
    same paths and losses bitwise; a checkpoint of another seed is refused; with torchtitan's per-block
    compile the same paths give eager's losses."""
    import json
    import shutil

    _trainer(tmp_path, 6)
    record = json.loads((tmp_path / "record.json").read_text())
    steps = [record["steps"][str(s)] for s in range(1, 7)]  # torchtitan counts from 1
    plan = _planned(6)
    assert [r["path"] for r in steps] == plan and any(not all(p) for p in plan)
    for r in steps:
        assert sorted(set(r["ran"])) == [i for i, run in enumerate(r["path"]) if run]  # forward (and AC recompute)
        assert r["grads"] == r["path"]
    full = record["full_flops_per_token"]
    per_block = {(full - r["flops_per_token"]) / (6 - sum(r["path"])) for r in steps if not all(r["path"])}
    assert len(per_block) == 1 and 0 < per_block.pop() < full / 6  # each skipped block: one block's share
    assert all(r["flops_per_token"] == full for r in steps if all(r["path"]))
    assert not all(any(p[i] for p in plan[:3]) for i in range(6))  # some block had never trained by the step-3 checkpoint
    shutil.rmtree(tmp_path / "dump" / "checkpoint" / "step-6")
    _trainer(tmp_path, 6)  # loads step 3
    resumed = json.loads((tmp_path / "record-resumed.json").read_text())["steps"]
    assert sorted(resumed, key=int) == ["4", "5", "6"]
    for s in ("4", "5", "6"):
        assert resumed[s]["loss"] == record["steps"][s]["loss"] and resumed[s]["path"] == record["steps"][s]["path"]
    shutil.rmtree(tmp_path / "dump" / "checkpoint" / "step-6")
    other = _trainer(tmp_path, 6, "--raptr.seed", "1", check=False)
    assert other.returncode != 0 and "written by another method configuration (seed: 0 -> 1)" in other.stderr
    # torchtitan's per-block compile (block.compile(fullgraph=True), around its activation-checkpoint wrapper):
    # the gate sits outside each compiled block, so no graph holds the path (fullgraph would fail on a break,
    # and a graph per path would hit the recompile limit); the same paths and eager's losses.
    (tmp_path / "compiled").mkdir()
    _trainer(tmp_path / "compiled", 6, "--checkpoint.no-enable", "--compile.enable", "--compile.backend", "aot_eager")
    compiled = json.loads((tmp_path / "compiled" / "record.json").read_text())["steps"]
    assert [compiled[str(s)]["path"] for s in range(1, 7)] == plan
    assert [compiled[str(s)]["loss"] for s in range(1, 7)] == pytest.approx([r["loss"] for r in steps], rel=1e-5)


def test_torchtitan_config_section_parses_and_refuses_what_it_cannot_do():
    from torchtitan.config import ConfigManager
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    from raptr.errors import RaptrError
    from raptr.integrations.torchtitan import RaptrConfig, RaptrTrainer, to_raptr

    config = ConfigManager().parse_args(["--module", "raptr.integrations.torchtitan", "--config", "raptr_llama3_debugmodel",
                                         "--raptr.method", "pld", "--raptr.options", "theta=0.5,gamma=0.01"])
    assert isinstance(config, RaptrTrainer.Config) and config.raptr.method == "pld"
    host = config.raptr.host()
    assert host.name == "pld" and (host.method.options.theta, host.method.options.gamma) == (0.5, 0.01)
    assert RaptrConfig(options=["fixed=0", "3", "11", "sampling=uniform"]).host().method.options.fixed == "0,3,11"
    with pytest.raises(RaptrError, match="'sampling' is 'random'"):
        RaptrConfig(options=["sampling=random"]).host()
    with pytest.raises(RaptrError, match="write key=value"):
        RaptrConfig(options=["fixed"]).host()
    with pytest.raises(RaptrError, match="stacking changes the model"):
        RaptrConfig(method="stacking").host()
    piped = to_raptr(llama3_debugmodel())
    piped.parallelism.pipeline_parallel_degree = 2
    with pytest.raises(RaptrError, match="pipeline parallel is not supported"):
        RaptrTrainer(piped)


OPTIMIZERS = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
              "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1),
              "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1)}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_init_optimizer_state_leaves_training_unchanged(name):
    """Every parameter gets its optimizer state up front; training with skipped layers is then bitwise
    what it is with state created lazily at each parameter's first update (weight decay included)."""
    losses = []
    for eager in (False, True):
        model = debug_model("sdpa").train()
        host = raptr.wrap(model, schedule="3-4-6", stage_lengths="equal", total_steps=6, seed=2)
        opt = OPTIMIZERS[name](model.parameters())
        if eager:
            raptr.init_optimizer_state(opt)
            assert len(opt.state) == len(list(model.parameters()))
        ids, trace = _ids(model), []
        for step in range(6):
            host.step(step)
            loss = _loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            trace.append(loss.item())
        losses.append((trace, [p.detach().clone() for p in model.parameters()]))
    assert losses[0][0] == losses[1][0]
    assert all(torch.equal(a, b) for a, b in zip(losses[0][1], losses[1][1]))
