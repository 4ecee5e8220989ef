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


# ------------------------------------------------------------------------------------------------
# Whole-model torch.compile(model) of a wrapped Hugging Face model (nanoGPT's default, and what
# TrainingArguments(torch_compile=True) does): the path decision stays out of dynamo's guards.
# ------------------------------------------------------------------------------------------------

import pytest  # noqa: E402
import transformers as tf  # noqa: E402

import raptr  # noqa: E402


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=12, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)).train()


def _sgd_step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_whole_model_compile_keeps_its_graphs_over_changing_paths(kind, backend):
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    plain = _hf_model(kind)
    _sgd_step(torch.compile(plain, backend=backend), torch.optim.SGD(plain.parameters(), lr=0.01), ids)
    unwrapped = counters["stats"]["unique_graphs"]

    torch._dynamo.reset()
    counters.clear()
    model, ref = _hf_model(kind), _hf_model(kind)  # same weights: compiled vs eager, same paths
    rp = raptr.wrap(model, schedule="4-8-12", total_steps=45, seed=0)
    ref_rp = raptr.wrap(ref, schedule="4-8-12", total_steps=45, seed=0)
    compiled = torch.compile(model, backend=backend)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.01), torch.optim.SGD(ref.parameters(), lr=0.01)
    paths, losses = set(), []
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # the limit would raise, not fall back to eager
        for step in range(36):
            paths.add(rp.step(step).path)
            ref_rp.step(step)
            losses.append((_sgd_step(compiled, opt, ids), _sgd_step(ref, ref_opt, ids)))
    graphs = counters["stats"]["unique_graphs"]
    print(f"{kind}/{backend}: {graphs} graphs over 36 steps and {len(paths)} distinct paths; unwrapped: {unwrapped}")
    assert len(paths) >= 20 and any(all(p) for p in paths)  # partial paths, then the full model
    assert graphs <= unwrapped + 3  # measured: gpt2 3 vs 2, llama 4 vs 1 (one graph per block class, not per path)
    got, want = zip(*losses)
    torch.testing.assert_close(got, want, rtol=0, atol=0 if backend == "aot_eager" else 2e-3)


def test_train_mode_layers_get_no_fresh_kv_cache():
    """With no fresh KV cache handed to layers in train mode, a partial path's loss does not depend on
    whether the model asked for a cache (use_cache) - the skipped layers' entries would be missing anyway."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    model = _hf_model("llama")
    rp = raptr.wrap(model, schedule="4-8-12", total_steps=10, seed=0)
    rp.gates.set_path([i in (0, 11) or i % 3 == 0 for i in range(12)])
    with_cache = model(input_ids=ids, labels=ids, use_cache=True)
    without = model(input_ids=ids, labels=ids, use_cache=False)
    assert torch.equal(with_cache.loss, without.loss)
    assert with_cache.past_key_values is None or with_cache.past_key_values.get_seq_length() == 0
