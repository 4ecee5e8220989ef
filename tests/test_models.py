"""Layer skipping on real transformers models, and analytic FLOPs vs torch's FlopCounterMode."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import raptr
from raptr.core import GatedLayers
from raptr.errors import RaptrError
from raptr.models import TransformerConfig, TransformerLM, find_layer_stack, model_flops
from raptr.models.hf import HFLanguageModel, build_hf_model

ARCHS = ["bert", "roberta", "gpt2", "llama", "opt", "gpt_neox"]
V, T = 211, 16


def hf(arch, layers=4):
    torch.manual_seed(0)
    return build_hf_model(arch, V, 32, layers, 2, 64, T)


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@pytest.mark.parametrize("arch", ARCHS)
def test_full_path_is_identical_and_skips_are_real(arch):
    model = hf(arch).train()
    plain = copy.deepcopy(model)
    ids = torch.randint(5, V, (2, T))
    keys = list(model.state_dict())
    gates = GatedLayers(find_layer_stack(model))
    assert list(model.state_dict()) == keys  # parameter names unchanged: HF save/load still works
    assert len(find_layer_stack(model)) == 4  # list keeps its length (models index layers by position)
    assert torch.equal(loss_of(model, ids), loss_of(plain, ids))

    gates.set_path([True, False, True, True])
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, ids)
    loss.backward()
    layers = find_layer_stack(model)
    assert all(p.grad is None for p in layers[1].parameters())
    assert all(p.grad is not None for i in (0, 2, 3) for p in layers[i].parameters() if p.requires_grad)
    # Skipping layer 1 is the same network as the model with layer 1 removed.
    shallow = copy.deepcopy(plain)
    stack = find_layer_stack(shallow)
    del stack[1]
    shallow.config.num_hidden_layers = 3
    torch.testing.assert_close(loss, loss_of(shallow, ids))
    # Eval mode always runs the full model.
    model.eval(), plain.eval()
    torch.testing.assert_close(loss_of(model, ids), loss_of(plain, ids))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_wrap_api_on_hf_models(arch):
    model = hf(arch, layers=6).train()
    rp = raptr.wrap(model, schedule="3-6", total_steps=20, seed=1)
    ids = torch.randint(5, V, (2, T))
    for step in range(3):
        plan = rp.step(step)
        model.zero_grad(set_to_none=True)
        loss_of(model, ids).backward()
        for run, layer in zip(plan.path, find_layer_stack(model)):
            assert all((p.grad is None) != run for p in layer.parameters())


def test_unsupported_model_error_names_the_fix():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(RaptrError, match=r"register_layer_stack"):
        raptr.wrap(Custom(), schedule="1", total_steps=10)
    raptr.register_layer_stack("custom-test", "stack")
    model = Custom()
    model.config = type("C", (), {"model_type": "custom-test"})()
    assert find_layer_stack(model) is model.stack


def _layer_flops_counted(model: nn.Module, layer_name: str, inputs: dict) -> tuple[float, float]:
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:  # CPU flash attention is invisible to the counter
        model(**inputs).backward()
    counts = counter.get_flop_counts()
    name = next(k for k in counts if k.endswith(layer_name))
    return sum(counts[name].values()), counter.get_total_flops()


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_flops_match_flop_counter_on_hf_models(arch):
    torch.manual_seed(0)
    core = build_hf_model(arch, V, 64, 3, 4, 256, 32)
    core.config._attn_implementation = "eager"  # matmul attention: counted by FlopCounterMode
    model = HFLanguageModel(core).train()
    ids = torch.randint(5, V, (2, 32))
    path = {"bert": "layer.0", "roberta": "layer.0", "gpt2": "h.0"}.get(arch, "layers.0")
    counted, total = _layer_flops_counted(model, path, {"input_ids": ids, "labels": ids})
    analytic = model_flops(model, 32)
    assert counted == pytest.approx(3 * 2 * analytic.layer_forward(), rel=0.02)
    assert total == pytest.approx(analytic.train_step(3, 2), rel=0.02)


def test_gqa_llama_layer_flops():
    torch.manual_seed(0)
    import transformers as tf

    core = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                               num_key_value_heads=2, intermediate_size=160, attn_implementation="eager"))
    model = HFLanguageModel(core).train()
    ids = torch.randint(5, V, (2, 32))
    counted, _ = _layer_flops_counted(model, "layers.0", {"input_ids": ids, "labels": ids})
    assert counted == pytest.approx(3 * 2 * model_flops(model, 32).layer_forward(), rel=0.02)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_model_flops_match_flop_counter(causal):
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=V, d_model=64, n_layers=3, n_heads=4, d_ff=256, max_seq_len=32, causal=causal))
    ids = torch.randint(0, V, (2, 32))
    counted, total = _layer_flops_counted(model, "blocks.0", {"input_ids": ids, "labels": ids})
    analytic = model.flops(32)
    assert counted == pytest.approx(3 * 2 * analytic.layer_forward(), rel=0.02)
    assert total == pytest.approx(analytic.train_step(3, 2), rel=0.02)
    # a step that runs 2 of 3 layers costs what the analytic count says
    raptr.wrap(model, schedule="p:0.5-1", total_steps=10, fixed="none").gates.set_path([True, False, True])
    _, skipped_total = _layer_flops_counted(model, "blocks.0", {"input_ids": ids, "labels": ids})
    assert skipped_total == pytest.approx(analytic.train_step(2, 2), rel=0.02)


def test_fixed_none_skips_first_and_last_layers_exactly():
    """With fixed='none' (the schedules suite's no-fixed-layers arm) the first and last blocks are
    drawn like any other, and skipping them is the reference model without them, gradients included."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=2, d_ff=64, max_seq_len=T, causal=True))
    plain = copy.deepcopy(model)
    rp = raptr.wrap(model, schedule="2-4", total_steps=10, fixed="none")
    runs = [sum(rp.method.raptr.sampler.sample(step, 0.5)[i] for step in range(2000)) / 2000 for i in (0, 3)]
    assert all(abs(f - 0.5) < 4 * (0.25 / 2000) ** 0.5 for f in runs), runs
    ids = torch.randint(0, V, (2, T))
    for active in ([False, True, True, True], [True, True, True, False], [False, True, False, False]):
        rp.gates.set_path(active)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids)
        loss.backward()
        shallow = copy.deepcopy(plain)
        shallow.blocks = nn.ModuleList(b for b, run in zip(shallow.blocks, active) if run)
        want = shallow(ids, labels=ids)
        want.backward()
        torch.testing.assert_close(loss, want)
        kept = iter(shallow.blocks)
        for block, run in zip(model.blocks, active):
            if not run:
                assert all(p.grad is None for p in block.parameters())
            else:
                for p, q in zip(block.parameters(), next(kept).parameters()):
                    torch.testing.assert_close(p.grad, q.grad)


def test_prefix_lm_mask_and_stability_switches():
    from raptr.models.reference import prefix_lm_mask

    mask = prefix_lm_mask(torch.tensor([3]), 5)[0, 0]
    assert mask[0, 2] and mask[2, 0]  # inside the prefix: bidirectional
    assert not mask[2, 3] and mask[4, 3] and not mask[3, 4]  # after it: causal
    for ln, res in [(False, True), (True, False)]:
        m = TransformerLM(TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=T,
                                            layer_norm=ln, residual=res))
        assert torch.isfinite(m(torch.randint(0, V, (1, T)))).all()
