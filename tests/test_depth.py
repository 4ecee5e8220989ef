"""Serving at reduced depth (`raptr depth`): a trained run evaluated with k of its L layers."""

import copy
import json

import pytest
import torch
from torch import nn

from raptr.experiments.depth import depth_losses, evenly_kept
from raptr.experiments.probes.runs import load_run
from raptr.ranks import EVAL_STREAM, step_generator
from raptr.training.build import build_objective
from test_training import TINY, raptr_cli
from conftest import AUSTEN_DATA


def test_kept_layers_spread_evenly_from_first_to_last():
    assert evenly_kept(12, 4) == [0, 4, 7, 11] and evenly_kept(12, 6) == [0, 2, 4, 7, 9, 11]
    assert evenly_kept(12, 12) == list(range(12)) and evenly_kept(12, 2) == [0, 11]
    for k in range(2, 13):
        kept = evenly_kept(12, k)
        assert len(set(kept)) == k and kept[0] == 0 and kept[-1] == 11


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("depth")
    args = ["train", "--config", "clm-tiny-baseline", "-q", *TINY, "model.n_layers=6", f"data.cache_dir={data_cache}",
            *AUSTEN_DATA, f"train.out_dir={tmp}/run", "train.steps=6", "train.eval_every=6", "train.checkpoint_every=6",
            "method.name=raptr", "method.raptr.schedule=3-4-6"]
    done = raptr_cli(*args)
    assert done.returncode == 0, done.stderr
    return tmp / "run"


def _loss_without(run_dir, kept):
    """The reference: the same checkpoint with the dropped blocks removed from the model."""
    run = load_run(run_dir, device="cpu")
    model = copy.deepcopy(run.model)
    model.blocks = nn.ModuleList(model.blocks[i] for i in kept)
    cfg = run.cfg
    objective = build_objective(cfg, run.data.ids, run.data.tokenizer.get_vocab_size())
    losses = []
    with torch.no_grad():
        for i, tokens in enumerate(run.data.val.eval_batches(cfg.train.batch_size, cfg.train.eval_batches)):
            batch = objective(tokens, step_generator(cfg.train.seed, i, EVAL_STREAM))
            losses.append(model(input_ids=batch["input_ids"], labels=batch["labels"]).item())
    return sum(losses) / len(losses)


def test_full_depth_reproduces_the_logged_loss_and_partial_depth_equals_the_shallower_model(trained):
    res = depth_losses(trained, layers=[2, 4, 6], keep=["0,1,5"], device="cpu", progress=False)
    by_k = {tuple(r["kept"]): r["val_loss"] for r in res["rows"]}
    logged = json.loads((trained / "summary.json").read_text())["final_val_loss"]
    assert by_k[tuple(range(6))] == logged  # same batches, same objective draws, every layer: bitwise
    for kept in ([0, 5], [0, 2, 3, 5], [0, 1, 5]):
        assert by_k[tuple(kept)] == pytest.approx(_loss_without(trained, kept), abs=1e-6)
    assert by_k[(0, 5)] != logged  # dropping layers does change the model


def test_depth_command_writes_table_json_and_plot(trained, tmp_path):
    out = tmp_path / "depth"
    done = raptr_cli("depth", str(trained), "--layers", "2,6", "--out", str(out), "-q", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    table = (out / "depth.md").read_text()
    assert "| run | method | logged | k=2 | k=6 |" in table and "raptr depth" in table
    assert (out / "depth.png").stat().st_size > 0
    data = json.loads((out / "depth.json").read_text())
    assert [r["layers"] for r in data["runs"][0]["rows"]] == [2, 6]
    bad = raptr_cli("depth", str(trained), "--layers", "9", "--out", str(out), "-q")
    assert bad.returncode == 2 and "between 2 (first and last) and 6 layers" in bad.stderr and "Traceback" not in bad.stderr
    missing = raptr_cli("depth", str(tmp_path / "nope"), "--out", str(out), "-q")
    assert missing.returncode == 2 and "has no config.json" in missing.stderr
