"""Mixture-of-experts decoders on a partial path: the router logits, the load-balancing loss and the
gradients are those of the model with the skipped layers removed (transformers' own MoE models)."""

import copy

import pytest
import torch
from torch import nn

import raptr
from raptr.models.registry import find_layer_stack

tf = pytest.importorskip("transformers")

BASE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=128,
            num_hidden_layers=4, max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.1,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                                shared_expert_intermediate_size=32)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                                head_dim=8)),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
}
ACTIVE = [True, False, True, True]  # the second of four layers skipped


def build(name):
    cls, config, extra = FAMILIES[name]
    if not hasattr(tf, cls):
        pytest.skip(f"this transformers has no {cls}")
    cfg = getattr(tf, config)(**BASE, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(tf, cls)(cfg).train()


def without_skipped(model, active):
    ref = copy.deepcopy(model)
    ref.model.layers = nn.ModuleList([layer for layer, run in zip(ref.model.layers, active) if run])
    return ref


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_moe_partial_path_equals_the_model_without_the_skipped_layers(name):
    model = build(name)
    ref = without_skipped(model, ACTIVE)
    rp = raptr.wrap(model, schedule="p:0.5-1", total_steps=10)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))

    rp.gates.set_path(ACTIVE)
    out, want = model(input_ids=ids, labels=ids, use_cache=False), ref(input_ids=ids, labels=ids, use_cache=False)
    assert len(out.router_logits) == sum(ACTIVE) == len(want.router_logits)  # one per layer that ran
    for got, exp in zip(out.router_logits, want.router_logits):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)  # load balancing over the layers that ran
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)  # LM loss + coef * aux loss
    out.loss.backward()
    want.loss.backward()
    layers = find_layer_stack(model)
    ref_params = dict(ref.named_parameters())
    kept = {old: new for new, old in enumerate(i for i, run in enumerate(ACTIVE) if run)}
    for n, p in model.named_parameters():
        if ".layers." in n:
            index = int(n.split(".layers.")[1].split(".")[0])
            if index not in kept:
                assert p.grad is None, n  # a skipped layer, experts and router included, gets no gradient
                continue
            n = n.replace(f".layers.{index}.", f".layers.{kept[index]}.")
        if ref_params[n].grad is None:
            assert p.grad is None or not p.grad.any(), n  # e.g. an expert no token was routed to
        else:
            torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-6, msg=n)
    assert all(any(p.grad is not None for p in layer.parameters()) == run for layer, run in zip(layers, ACTIVE))

    # the full path is exactly the unwrapped model, router logits and aux loss included
    model.zero_grad(set_to_none=True)
    plain = build(name)
    rp.gates.run_all()
    out, want = model(input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
    assert torch.equal(out.loss, want.loss) and torch.equal(out.aux_loss, want.aux_loss)
    assert len(out.router_logits) == 4
