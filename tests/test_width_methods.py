"""Width and depth×width as methods: in our trainer, the HF Trainer and Lightning, with real models and text.

Each host: heads/FFN units really sliced (forward hooks see the smaller projections), layers really
skipped (depth×width), FLOPs counted from what ran, and resume continues the plans exactly.
"""

import json

import pytest
import torch

from conftest import AUSTEN_DATA, tiny
from raptr.errors import RaptrError
from raptr.methods import TrainingContext, build_method
from raptr.methods.registry import method_class
from raptr.models.registry import find_layer_stack
from raptr.training.build import build_trainer, prepare_data
from raptr.training.config import load_config

L, T, B, STEPS = 4, 32, 4, 12
CASES = {
    "width": {"schedule": "0.5-0.75-1"},
    "depthwidth": {"schedule": "3-4-4", "width_schedule": "0.5-0.75-1", "fixed": "first"},
}
TINY = tiny("train.steps=12", "train.eval_every=6", "train.checkpoint_every=6", "objective.name=causal",
            "data.tokenizer=bpe", heads=4)


def _overrides(name):
    return [f"method.name={name}"] + [f"method.{name}.{k}={v}" for k, v in CASES[name].items()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_trainer_runs_width_methods_with_exact_flops_and_resume(name, data_cache, tmp_path):
    common = TINY + _overrides(name) + [*AUSTEN_DATA, f"data.cache_dir={data_cache}"]
    full = build_trainer(load_config("bert-tiny-raptr", common + [f"train.out_dir={tmp_path}/full"]), progress=False)
    summary = full.fit()
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["fraction"] for r in train] == [0.5] * 4 + [0.75] * 4 + [1.0] * 4
    assert summary["relative_flops"] < 0.95 and summary["expected_relative_layer_flops"] < 0.95
    fm = full.flops_model
    # exact: the FLOPs saved are the layer FLOPs not computed, step by step (training = 3x forward)
    saved = sum(3 * B * (L - full.method.begin_step(s).layer_units) * fm.layer_forward() for s in range(STEPS))
    assert train[-1]["full_flops"] - train[-1]["flops"] == pytest.approx(saved, rel=1e-9)
    if name == "depthwidth":
        assert any(r["layers_run"] < L for r in train[:8])
    # stopped at step 6 and resumed: the same losses, bitwise
    half = build_trainer(load_config("bert-tiny-raptr", common + [f"train.out_dir={tmp_path}/half"]), progress=False)
    half.fit(stop_after=6)
    build_trainer(load_config("bert-tiny-raptr", common + [f"train.out_dir={tmp_path}/half"]), progress=False).fit()
    again = [json.loads(x) for x in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again if r["kind"] == "train"] == [r["loss"] for r in train]


def test_width_options_are_checked():
    with pytest.raises(RaptrError, match="both false"):
        load_config("bert-tiny-raptr", TINY + ["method.name=width", "method.width.heads=false", "method.width.ffn=false"])
    with pytest.raises(RaptrError, match="same number of stages"):
        load_config("bert-tiny-raptr", TINY + ["method.name=depthwidth", "method.depthwidth.schedule=3-4",
                                               "method.depthwidth.width_schedule=0.5-0.75-1"])


# ---------------------------------------------------------------------------------- other hosts


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, vocab_size=1024, max_position_embeddings=T))


def _widths(model, clock):
    """Per step and layer, the (query width, FFN width) the projections really computed (grad on only)."""
    seen: dict[int, dict[int, list[int]]] = {}
    for i, layer in enumerate(find_layer_stack(model)):
        for which, lin in ((0, layer.self_attn.q_proj), (1, layer.mlp.up_proj)):
            lin.register_forward_hook(lambda m, a, o, i=i, which=which: torch.is_grad_enabled() and seen.setdefault(
                clock(), {}).setdefault(i, [0, 0]).__setitem__(which, o.shape[-1]))
    return seen


def _planned(name, seed):
    model = _llama()
    method = build_method(name, method_class(name).Options(**CASES[name]))
    method.attach(TrainingContext(model, find_layer_stack(model), STEPS, seed, seq_len=T))
    out, infos = [], []
    for s in range(STEPS):
        info = method.begin_step(s)
        plan = method.width.last_plan
        active = info.path or (True,) * L
        out.append({i: [plan.num_heads[i] * 8, plan.num_units[i]] for i in range(L) if active[i]})
        infos.append(info)
    return out, infos


def _hf_flops(model, infos):
    n = model.num_parameters(exclude_embeddings=True)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in find_layer_stack(model)]
    return sum(round(6 * B * T * (n - sum(pl * (1 - f) for pl, f in zip(per_layer, info.fractions(L))))) for info in infos)


@pytest.fixture(scope="module")
def sequences(data_cache):
    cfg = load_config(None, [f"data.cache_dir={data_cache}", *AUSTEN_DATA, "data.vocab_size=1024", "data.tokenizer=bpe",
                             "objective.name=causal", "data.seq_len=32"])
    return prepare_data(cfg, progress=False).train.batch(0, B * STEPS, 0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_width_methods_under_the_hf_trainer(name, sequences, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainerCallback, TrainingArguments

    from raptr.integrations import MethodCallback, RaptrTrainer

    planned, infos = _planned(name, 3)

    def run(out, resume=None, seed=3):
        model = _llama()
        clock = {"step": 0}

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock["step"] = state.global_step

        seen = _widths(model, lambda: clock["step"])
        args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=B, use_cpu=True,
                                 report_to=[], save_strategy="steps", save_steps=6, logging_steps=1, disable_tqdm=True)
        data = [{"input_ids": s, "labels": s.clone()} for s in sequences]
        trainer = RaptrTrainer(model=model, args=args, train_dataset=data,
                               callbacks=[Clock(), MethodCallback(name, seed=seed, seq_len=T, **CASES[name])])
        trainer.train(resume_from_checkpoint=resume)
        return trainer, seen

    trainer, seen = run(tmp_path / "full")
    assert [seen[s] for s in range(STEPS)] == planned  # sliced for real: the projections' output widths
    assert any(w[0] < 32 for w in seen[0].values())
    assert trainer.state.total_flos == _hf_flops(trainer.model, infos)
    _, again = run(tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-6"))
    assert [again[s] for s in range(6, STEPS)] == planned[6:] and 5 not in again
    with pytest.raises(RaptrError, match="seed: 3 -> 4"):
        run(tmp_path / "other", resume=str(tmp_path / "full" / "checkpoint-6"), seed=4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_width_methods_under_lightning(name, sequences, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from raptr.integrations.lightning import MethodCallback

    planned, infos = _planned(name, 3)

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _llama()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def run(out, ckpt=None):
        module = LM()
        cb = MethodCallback(name, seed=3, seq_len=T, **CASES[name])
        saver = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=6, save_top_k=-1)
        trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[cb, saver], default_root_dir=out)
        seen = _widths(module.model, lambda: trainer.global_step)
        trainer.fit(module, torch.utils.data.DataLoader(list(sequences), batch_size=B), ckpt_path=ckpt)
        return cb, module, seen

    cb, module, seen = run(tmp_path / "full")
    assert [seen[s] for s in range(STEPS)] == planned
    assert cb.total_flos == _hf_flops(module.model, infos)
    cb2, _, again = run(tmp_path / "again", ckpt=str(tmp_path / "full" / "ckpt" / "epoch=0-step=6.ckpt"))
    assert [again[s] for s in range(6, STEPS)] == planned[6:]
    assert cb2.total_flos == cb.total_flos


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_width_under_the_hf_trainer_on_fused_projections(family, sequences, tmp_path):
    """GPT-2 (Conv1D, fused c_attn) and Phi3 (fused qkv_proj, gate_up_proj) under the HF Trainer: the
    fused projections really compute the kept rows only, the loss falls, FLOPs follow what ran."""
    pytest.importorskip("accelerate")
    import transformers as tf
    from transformers import TrainingArguments

    from raptr.integrations import MethodCallback, RaptrTrainer

    torch.manual_seed(0)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=L, n_head=4, n_inner=64, vocab_size=1024, n_positions=T))
        qkv = [layer.attn.c_attn for layer in model.transformer.h]
    else:
        model = tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=64, vocab_size=1024,
                                                 max_position_embeddings=T, pad_token_id=0))
        qkv = [layer.self_attn.qkv_proj for layer in model.model.layers]
    widths = []
    qkv[0].register_forward_hook(lambda m, a, o: torch.is_grad_enabled() and widths.append(o.shape[-1]))
    callback = MethodCallback("width", seed=1, seq_len=T, schedule="0.5-1")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=B, use_cpu=True,
                             report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, learning_rate=3e-3)
    data = [{"input_ids": s, "labels": s.clone()} for s in sequences]
    trainer = RaptrTrainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    full = qkv[0].weight.shape[1 if family == "gpt2" else 0]
    assert all(w < full for w in widths[: STEPS // 2]) and all(w == full for w in widths[STEPS // 2:])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert trainer.state.total_flos < 6 * B * T * model.num_parameters(exclude_embeddings=True) * STEPS
