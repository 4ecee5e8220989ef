"""raptr's Lightning callback with a real ``lightning.Trainer`` on a tiny GPT-2 and the shipped Austen text.

Each method: layers really skipped (forward-hook counts, no gradient), FLOPs counted from what ran,
and a resume from a Lightning checkpoint continues the method's schedule exactly.
"""

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="install raptr[lightning]")

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from conftest import AUSTEN_DATA  # noqa: E402
from raptr.core import LayerGate  # noqa: E402
from raptr.errors import RaptrError  # noqa: E402
from raptr.integrations.lightning import MethodCallback  # noqa: E402
from raptr.methods import TrainingContext, build_method  # noqa: E402
from raptr.methods.registry import method_class  # noqa: E402
from raptr.models.registry import find_layer_stack  # noqa: E402
from raptr.training.build import prepare_data  # noqa: E402
from raptr.training.config import load_config  # noqa: E402

L, T, B, STEPS = 6, 32, 4, 12
CASES = {
    "raptr": {"schedule": "3-4-5-6"},
    "pld": {"theta": 0.5, "gamma": 0.3},
    "layerdrop": {"keep_prob": 0.5},
}


@pytest.fixture(scope="module")
def sequences(data_cache):
    cfg = load_config(None, [f"data.cache_dir={data_cache}", *AUSTEN_DATA, "data.vocab_size=1024", "data.tokenizer=bpe",
                             "objective.name=causal", "data.seq_len=32"])
    data = prepare_data(cfg, progress=False)
    return data.train.batch(0, B * STEPS * 2, 0)


class LM(pl.LightningModule):
    """A LightningModule that holds an HF model (the callback finds its layers inside)."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=T, n_embd=32, n_layer=L, n_head=2))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Probe(pl.Callback):
    """From outside: which layers' forward ran per optimizer step, and which got gradients."""

    def __init__(self):
        self.ran: dict[int, list[int]] = {}
        self.grad: dict[int, tuple[bool, ...]] = {}

    def on_fit_start(self, trainer, pl_module):
        self.layers = find_layer_stack(pl_module.model)
        # Counted only with grad on: a gate learns a skipped layer's output structure from one no-grad
        # call when no layer of the stack has run yet (raptr.core.LayerGate); that call trains nothing.
        for i, layer in enumerate(self.layers):
            layer.register_forward_hook(lambda m, a, o, i=i: torch.is_grad_enabled() and self.ran.setdefault(
                trainer.global_step, []).append(i))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grad[trainer.global_step] = tuple(any(p.grad is not None for p in layer.parameters()) for layer in self.layers)

    def paths(self, steps):
        return [tuple(i in self.ran.get(s, []) for i in range(L)) for s in steps]


def fit(sequences, tmp_path, callback, ckpt=None, max_steps=STEPS, accumulate=1):
    module = LM(int(sequences.max()) + 1)
    probe = Probe()
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback, probe, saver], default_root_dir=tmp_path,
                         accumulate_grad_batches=accumulate)
    loader = torch.utils.data.DataLoader(list(sequences), batch_size=B, shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt)
    return trainer, module, probe


def planned(name, seed, steps):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=T, n_embd=32, n_layer=L, n_head=2))
    method = build_method(name, method_class(name).Options(**CASES[name]))
    method.attach(TrainingContext(model, find_layer_stack(model), STEPS, seed))
    return [method.begin_step(s).path for s in steps]


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_skips_counts_flops_and_resumes(name, sequences, tmp_path):
    cb = MethodCallback(name, seed=5, **CASES[name])
    trainer, module, probe = fit(sequences, tmp_path / "full", cb)
    plan = planned(name, 5, range(STEPS))
    assert probe.paths(range(STEPS)) == plan and any(not all(p) for p in plan)
    assert [probe.grad[s] for s in range(STEPS)] == plan  # skipped layers: grad None
    per_layer = sum(p.numel() for p in find_layer_stack(module.model)[0].parameters())
    n_params = module.model.num_parameters(exclude_embeddings=True)
    assert cb.total_flos == sum(6 * B * T * (n_params - (L - sum(p)) * per_layer) for p in plan)
    assert trainer.callback_metrics[f"{name}/path_length"] == sum(plan[-1])
    assert not any(isinstance(layer, LayerGate) for layer in find_layer_stack(module.model))  # detached
    # resume from the step-6 checkpoint: the schedule continues exactly, the FLOPs count too
    ckpt = tmp_path / "full" / "ckpt" / "epoch=0-step=6.ckpt"
    again = MethodCallback(name, seed=5, **CASES[name])
    _, _, probe2 = fit(sequences, tmp_path / "again", again, ckpt=str(ckpt))
    assert probe2.paths(range(6, STEPS)) == plan[6:] and 5 not in probe2.ran
    assert again.total_flos == cb.total_flos
    with pytest.raises(RaptrError, match="seed: 5 -> 6"):
        fit(sequences, tmp_path / "other", MethodCallback(name, seed=6, **CASES[name]), ckpt=str(ckpt))


def test_gradient_accumulation_shares_one_path_per_optimizer_step(sequences, tmp_path):
    cb = MethodCallback("raptr", seed=2, schedule="3-4-5-6")
    _, _, probe = fit(sequences, tmp_path, cb, max_steps=6, accumulate=2)
    for step in range(6):
        ran = probe.ran[step]
        assert all(ran.count(i) in (0, 2) for i in range(L))  # both micro-batches or neither
    assert any(len(set(probe.ran[s])) < L for s in range(6))


def test_stacking_grows_in_one_process_and_refuses_resume(sequences, tmp_path):
    cb = MethodCallback("stacking", schedule="2-4-6")
    trainer, module, probe = fit(sequences, tmp_path / "grow", cb)
    assert len(find_layer_stack(module.model)) == L and module.model.config.num_hidden_layers == L
    opt = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.parameters()} == opt  # the grown layers are trained
    with pytest.raises(RaptrError, match="Lightning cannot resume it"):
        fit(sequences, tmp_path / "again", MethodCallback("stacking", schedule="2-4-6"),
            ckpt=str(tmp_path / "grow" / "ckpt" / "epoch=0-step=6.ckpt"))


def test_unknown_options_and_models_without_layers():
    with pytest.raises(RaptrError, match="unknown pld method option"):
        MethodCallback("pld", theta=0.5, gama=0.1)
    with pytest.raises(RaptrError, match="'method.name' is 'magic'"):
        MethodCallback("magic")
    from raptr.integrations.lightning import find_model

    with pytest.raises(RaptrError, match="no transformer layer stack"):
        find_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.dist
def test_fsdp2_under_lightning_two_ranks_match_one_process(sequences, tmp_path):
    """Lightning's ModelParallelStrategy (FSDP2, fully_shard per block in configure_model) on 2 CPU ranks
    with the raptr callback: each rank holds half of every block, both draw the same paths, skipped
    blocks get no gradient, and the losses are one process's (every rank is fed the same batches)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "data.pt"
    torch.save(sequences, data)
    script = Path(__file__).resolve().parent / "lightning_fsdp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher, extra in (("one", [sys.executable], []),
                                 ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"],
                                  ["--fsdp"])):
        (tmp_path / out).mkdir()
        done = subprocess.run(launcher + [str(script), str(tmp_path / out), str(data), *extra], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["strategy"] for r in ranks] == ["ModelParallelStrategy"] * 2 and [r["held"] for r in ranks] == [0.5, 0.5]
    assert ranks[0]["ran"] == ranks[1]["ran"] == one["ran"] and any(len(r) < L for r in one["ran"])
    for r in ranks:
        assert r["grads"] == [[i in ran for i in range(L)] for ran in one["ran"]]  # skipped: no gradient
        assert r["losses"] == pytest.approx(one["losses"], rel=1e-5)
