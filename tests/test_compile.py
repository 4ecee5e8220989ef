"""torch.compile per block: paths stay random per step and compilation stays bounded."""

import json

import torch
from torch._dynamo.utils import counters

from raptr.training.build import build_trainer
from raptr.training.config import load_config
from conftest import AUSTEN_DATA


def test_compiled_blocks_keep_random_paths_and_bounded_recompiles(tmp_path, data_cache):
    torch._dynamo.reset()
    counters.clear()
    cfg = load_config("bert-tiny-raptr", [
        "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_layers=6", "data.vocab_size=1024",
        "data.seq_len=32", "train.batch_size=4", "train.eval_batches=1", "train.threads=1", "train.steps=16",
        "train.eval_every=8", "method.raptr.schedule=3-6", "method.raptr.stage_lengths=0.75,0.25",
        f"data.cache_dir={data_cache}", *AUSTEN_DATA, f"train.out_dir={tmp_path}/run", "train.compile=true"])
    trainer = build_trainer(cfg, progress=False)
    paths = []
    original = trainer.method.begin_step

    def record(step):  # the path actually set on the compiled blocks at each step
        info = original(step)
        paths.append(tuple(layer._gate_run for layer in trainer.context.layers))
        return info

    trainer.method.begin_step = record
    trainer.fit()
    stage0 = paths[:12]
    assert len(set(stage0)) >= 4, stage0  # fresh randomness every step: nothing frozen into a trace
    assert all(p == (True,) * 6 for p in paths[12:])  # last stage: full model
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    runs = [r["layers_run"] for r in rows if r["kind"] == "train"]
    assert runs[:12] == [sum(p) for p in stage0]
    graphs = counters["stats"]["unique_graphs"]
    print(f"compiled graphs for 16 steps over {len(set(paths))} distinct paths (train + eval): {graphs}")
    assert 1 <= graphs <= 4  # one block graph (train and eval variants), not one per path
