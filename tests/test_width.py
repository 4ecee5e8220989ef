"""Width subnetworks: exactness against the unwrapped and hand-built smaller layers, gradients,
FLOPs against torch's counter, determinism, optimizer freezing and errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from raptr.core import RaPTr, Schedule
from raptr.ranks import step_generator
from raptr.errors import RaptrError
from raptr.models import TransformerConfig, TransformerLM
from raptr.models.reference import Block
from raptr.width import HEADS_STREAM, UNITS_STREAM, WidthRaPTr, WidthSchedule

tf = pytest.importorskip("transformers")

D, H, HD, FF, T, B = 32, 4, 8, 64, 12, 2


def bert_layer():
    from transformers.models.bert.modeling_bert import BertLayer

    cfg = tf.BertConfig(hidden_size=D, num_attention_heads=H, intermediate_size=FF, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertLayer(cfg, layer_idx=0), cfg


def llama_cfg(kind="llama", **kw):
    base = dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=2, head_dim=HD, intermediate_size=FF,
                num_hidden_layers=1, vocab_size=50, attn_implementation="eager")
    base.update(kw)
    return (tf.LlamaConfig if kind == "llama" else tf.Qwen2Config)(**base)


def llama_layer(kind="llama", **kw):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    cfg = llama_cfg(kind, **kw)
    layer_cls, rot_cls = (LlamaDecoderLayer, LlamaRotaryEmbedding) if kind == "llama" else (Qwen2DecoderLayer, Qwen2RotaryEmbedding)
    layer = layer_cls(cfg, layer_idx=0)
    for p in layer.parameters():  # non-trivial norms and biases
        nn.init.normal_(p, std=0.3)
    pos = torch.arange(T)[None].expand(B, T)
    rope = rot_cls(cfg)(torch.zeros(B, T, D), pos)
    return layer, cfg, rope, layer_cls


def ref_block():
    torch.manual_seed(0)
    block = Block(TransformerConfig(d_model=D, n_heads=H, d_ff=FF))
    for p in block.parameters():
        nn.init.normal_(p, std=0.3)
    return block


def call(kind, layer, x, rope=None):
    if kind == "reference":
        return layer(x)
    if kind == "bert":
        return layer(x)
    return layer(x, attention_mask=None, position_embeddings=rope)


def make(kind):
    """(layer, rope) of each supported kind, seeded."""
    torch.manual_seed(1)
    if kind == "reference":
        return ref_block(), None
    if kind == "bert":
        layer, _ = bert_layer()
        for p in layer.parameters():
            nn.init.normal_(p, std=0.3)
        return layer, None
    layer, _, rope, _ = llama_layer(kind)
    return layer, rope


KINDS = ["reference", "bert", "llama", "qwen2"]

# --------------------------------------------------------------------------------------------
# Full fraction: bit-identical
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_full_fraction_and_eval_are_bit_identical_to_the_unwrapped_layer(kind):
    layer, rope = make(kind)
    plain = copy.deepcopy(layer)
    x = torch.randn(B, T, D)
    keys = list(layer.state_dict())
    wr = WidthRaPTr(nn.ModuleList([layer]), "0.5-1", total_steps=2, scaling="linear")
    assert list(layer.state_dict()) == keys  # state-dict keys unchanged
    wr.step(1)  # fraction 1
    assert torch.equal(call(kind, layer, x, rope), call(kind, plain, x, rope))
    wr.step(0)  # fraction 0.5, but eval mode runs the full model, unscaled
    layer.eval(), plain.eval()
    assert torch.equal(call(kind, layer, x, rope), call(kind, plain, x, rope))
    layer.train()
    assert not torch.allclose(call(kind, layer, x, rope), call(kind, plain, x, rope))
    wr.unwrap()
    assert type(layer) is type(plain) and torch.equal(call(kind, layer, x, rope), call(kind, plain, x, rope))


@pytest.mark.parametrize("hf_type", ["bert", "llama"])
def test_whole_hf_models_are_found_and_identical_at_full_width(hf_type):
    from raptr.models.hf import HFLanguageModel, build_hf_model

    torch.manual_seed(0)
    model = HFLanguageModel(build_hf_model(hf_type, 64, D, 2, H, FF, 16))
    plain = copy.deepcopy(model)
    wr = WidthRaPTr(model, "0.5-0.75-1", total_steps=3)
    assert len(wr) == 2
    ids = torch.randint(1, 64, (B, 16))
    wr.step(2)
    assert torch.equal(model(ids), plain(ids))
    wr.step(0)
    out = model(ids, labels=ids)  # a sliced step runs through the model's default attention (sdpa)
    out.backward()
    assert torch.isfinite(out)


# --------------------------------------------------------------------------------------------
# Fraction f: equal to a hand-built smaller layer, with the right gradients
# --------------------------------------------------------------------------------------------


def rows(heads, size):
    return (torch.as_tensor(heads)[:, None] * size + torch.arange(size)).reshape(-1)


def check_grads(pairs):
    """pairs: (full parameter or its gradient, small leaf, dim, kept index, scale on the slice)."""
    for full, small, dim, idx, scale in pairs:
        grad = full.grad if isinstance(full, nn.Parameter) else full
        torch.testing.assert_close(grad.index_select(dim, idx), small.grad * scale, rtol=1e-5, atol=1e-6)
        idle = torch.ones(grad.shape[dim], dtype=torch.bool)
        idle[idx] = False
        assert torch.count_nonzero(grad.index_select(dim, idle.nonzero().squeeze(1))) == 0  # exact zeros


def sliced_leaf(param, dim, idx, scale=1.0):
    return (param.detach().index_select(dim, idx) * scale).requires_grad_()


@pytest.mark.parametrize("scaling", ["none", "linear"])
def test_reference_block_equals_the_sliced_computation_with_its_gradients(scaling):
    block = ref_block()
    wr = WidthRaPTr(nn.ModuleList([block]), "0.5-1", total_steps=2, seed=3, scaling=scaling)
    plan = wr.step(0)
    heads, units = plan.heads[0], plan.units[0]
    assert len(heads) == 2 and len(units) == FF // 2
    sh, su = plan.head_scales[0], plan.unit_scales[0]
    assert sh == su == (2.0 if scaling == "linear" else 1.0)
    x = torch.randn(B, T, D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(B, T, D)
    (block(x) * g).sum().backward()

    q = rows(heads, HD)
    qkv_rows = torch.cat([q, q + D, q + 2 * D])
    Wqkv, bqkv = sliced_leaf(block.qkv.weight, 0, qkv_rows), sliced_leaf(block.qkv.bias, 0, qkv_rows)
    Wp = sliced_leaf(block.proj.weight, 1, q, sh)
    W1, b1 = sliced_leaf(block.fc1.weight, 0, units), sliced_leaf(block.fc1.bias, 0, units)
    W2 = sliced_leaf(block.fc2.weight, 1, units, su)
    h = F.layer_norm(x2, (D,), block.ln1.weight, block.ln1.bias)
    qq, kk, vv = F.linear(h, Wqkv, bqkv).view(B, T, 3, 2, HD).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(qq, kk, vv).transpose(1, 2).reshape(B, T, 2 * HD)
    x3 = x2 + F.linear(y, Wp, block.proj.bias)
    out = x3 + F.linear(F.gelu(F.linear(F.layer_norm(x3, (D,), block.ln2.weight, block.ln2.bias), W1, b1)), W2, block.fc2.bias)
    torch.testing.assert_close(block(x), out)
    wg = {name: p.grad.clone() for name, p in block.named_parameters()}
    block.zero_grad()
    (out * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    check_grads([(wg["qkv.weight"], Wqkv, 0, qkv_rows, 1.0), (wg["qkv.bias"], bqkv, 0, qkv_rows, 1.0),
                 (wg["proj.weight"], Wp, 1, q, sh), (wg["fc1.weight"], W1, 0, units, 1.0),
                 (wg["fc1.bias"], b1, 0, units, 1.0), (wg["fc2.weight"], W2, 1, units, su)])
    bias_grads = [wg["proj.bias"], wg["fc2.bias"], wg["ln1.weight"]]
    # Shared (unsliced) parameters get their full gradient: compare with the manual graph's
    torch.testing.assert_close(bias_grads, [block.proj.bias.grad, block.fc2.bias.grad, block.ln1.weight.grad])


def test_bert_layer_equals_a_hand_built_smaller_bert_layer():
    layer, _ = bert_layer()
    torch.manual_seed(2)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    small = copy.deepcopy(layer)
    wr = WidthRaPTr(nn.ModuleList([layer]), "0.75-1", total_steps=2, seed=5, scaling="sqrt")
    plan = wr.step(0)
    heads, units = plan.heads[0], plan.units[0]
    assert len(heads) == 3 and len(units) == 48
    sh, su = plan.head_scales[0], plan.unit_scales[0]
    assert sh == pytest.approx(0.75 ** -0.5)
    q = rows(heads, HD)

    def shrink(lin, dim, idx, scale=1.0):
        new = nn.Linear(lin.in_features if dim == 0 else len(idx), len(idx) if dim == 0 else lin.out_features)
        new.weight = nn.Parameter(sliced_leaf(lin.weight, dim, idx, scale).detach())
        new.bias = nn.Parameter(lin.bias.detach().index_select(0, idx) if dim == 0 else lin.bias.detach().clone())
        return new

    att = small.attention.self
    att.query, att.key, att.value = (shrink(getattr(att, n), 0, q) for n in ("query", "key", "value"))
    small.attention.output.dense = shrink(small.attention.output.dense, 1, q, sh)
    small.intermediate.dense = shrink(small.intermediate.dense, 0, units)
    small.output.dense = shrink(small.output.dense, 1, units, su)
    x = torch.randn(B, T, D)
    g = torch.randn(B, T, D)
    out, ref = layer(x), small(x)
    torch.testing.assert_close(out, ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    la, sa = layer.attention, small.attention
    check_grads([(la.self.query.weight, sa.self.query.weight, 0, q, 1.0), (la.self.value.bias, sa.self.value.bias, 0, q, 1.0),
                 (la.output.dense.weight, sa.output.dense.weight, 1, q, sh),
                 (layer.intermediate.dense.weight, small.intermediate.dense.weight, 0, units, 1.0),
                 (layer.output.dense.weight, small.output.dense.weight, 1, units, su)])
    torch.testing.assert_close(la.output.dense.bias.grad, sa.output.dense.bias.grad)
    torch.testing.assert_close(layer.output.LayerNorm.weight.grad, small.output.LayerNorm.weight.grad)


def copy_kept(layer, small, q, kv, units, sh, su, norms, head_norms=()):
    """Give a Llama-style ``small`` layer the kept slice of ``layer``: q/k/v rows (and biases), o_proj and
    down_proj columns times their scales, FFN rows, the named norms whole and ``head_norms`` sliced."""
    a, sa = layer.self_attn, small.self_attn
    with torch.no_grad():
        for name, idx in (("q_proj", q), ("k_proj", kv), ("v_proj", kv), *head_norms):
            getattr(sa, name).weight.copy_(getattr(a, name).weight[idx])
            if getattr(getattr(a, name), "bias", None) is not None:
                getattr(sa, name).bias.copy_(getattr(a, name).bias[idx])
        sa.o_proj.weight.copy_(a.o_proj.weight[:, q] * sh)
        for name in ("gate_proj", "up_proj"):
            getattr(small.mlp, name).weight.copy_(getattr(layer.mlp, name).weight[units])
        small.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight[:, units] * su)
        for name in norms:
            getattr(small, name).weight.copy_(getattr(layer, name).weight)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gqa_layer_equals_a_hand_built_smaller_layer(kind):
    """4 query heads in 2 KV groups: a kept group brings its 2 query heads; Qwen2 adds q/k/v biases."""
    layer, cfg, rope, layer_cls = llama_layer(kind)
    wr = WidthRaPTr(nn.ModuleList([layer]), "0.5-1", total_steps=2, seed=1, scaling="linear")
    plan = wr.step(0)
    groups, heads, units = plan.kv_heads[0], plan.heads[0], plan.units[0]
    assert len(groups) == 1 and heads.tolist() == [2 * groups.item(), 2 * groups.item() + 1]
    sh, su = plan.head_scales[0], plan.unit_scales[0]
    assert sh == su == 2.0
    small = layer_cls(llama_cfg(kind, num_attention_heads=2, num_key_value_heads=1, intermediate_size=len(units)), 0)
    a, sa = layer.self_attn, small.self_attn
    q, kv = rows(heads, HD), rows(groups, HD)
    copy_kept(layer, small, q, kv, units, sh, su, ("input_layernorm", "post_attention_layernorm"))
    x = torch.randn(B, T, D)
    g = torch.randn(B, T, D)
    out, ref = call(kind, layer, x, rope), call(kind, small, x, rope)
    torch.testing.assert_close(out, ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    pairs = [(a.q_proj.weight, sa.q_proj.weight, 0, q, 1.0), (a.k_proj.weight, sa.k_proj.weight, 0, kv, 1.0),
             (a.v_proj.weight, sa.v_proj.weight, 0, kv, 1.0), (a.o_proj.weight, sa.o_proj.weight, 1, q, sh),
             (layer.mlp.gate_proj.weight, small.mlp.gate_proj.weight, 0, units, 1.0),
             (layer.mlp.down_proj.weight, small.mlp.down_proj.weight, 1, units, su)]
    if a.q_proj.bias is not None:
        pairs.append((a.k_proj.bias, sa.k_proj.bias, 0, kv, 1.0))
    check_grads(pairs)


def test_olmo2_layer_with_head_norms_equals_a_hand_built_smaller_layer():
    """OLMo2 normalises q and k over all heads at once (RMSNorm over the whole projection): the sliced
    layer equals an OLMo2 layer that has only the kept heads (its q/k norms the kept slice of the weight,
    their statistic over the kept heads), in output and in every gradient, with GQA and 1/p scaling."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2DecoderLayer, Olmo2RotaryEmbedding

    def cfg(**kw):
        return tf.Olmo2Config(**{**dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=2, head_dim=HD, intermediate_size=FF,
                                         num_hidden_layers=1, vocab_size=50, attn_implementation="eager"), **kw})

    torch.manual_seed(3)
    layer = Olmo2DecoderLayer(cfg(), layer_idx=0)
    for p in layer.parameters():  # non-trivial norms
        nn.init.normal_(p, std=0.3)
    rope = Olmo2RotaryEmbedding(cfg())(torch.zeros(B, T, D), torch.arange(T)[None].expand(B, T))
    wr = WidthRaPTr(nn.ModuleList([layer]), "0.5-1", total_steps=2, seed=1, scaling="linear")
    plan = wr.step(0)
    groups, heads, units = plan.kv_heads[0], plan.heads[0], plan.units[0]
    sh, su = plan.head_scales[0], plan.unit_scales[0]
    small = Olmo2DecoderLayer(cfg(num_attention_heads=2, num_key_value_heads=1, intermediate_size=len(units)), 0)
    a, sa = layer.self_attn, small.self_attn
    q, kv = rows(heads, HD), rows(groups, HD)
    copy_kept(layer, small, q, kv, units, sh, su, ("post_attention_layernorm", "post_feedforward_layernorm"),
              head_norms=(("q_norm", q), ("k_norm", kv)))
    x, g = torch.randn(B, T, D), torch.randn(B, T, D)
    out, ref = call("olmo2", layer, x, rope), call("olmo2", small, x, rope)
    torch.testing.assert_close(out, ref)
    unsliced = Olmo2DecoderLayer(cfg(), 0)  # the same layer with o_proj/down_proj columns zeroed is NOT it:
    unsliced.load_state_dict({k.replace("._orig", ""): v for k, v in layer.state_dict().items()})
    with torch.no_grad():
        drop = torch.ones(H * HD, dtype=torch.bool)
        drop[q] = False
        unsliced.self_attn.o_proj.weight[:, drop] = 0.0
    assert not torch.allclose(call("olmo2", unsliced, x, rope), out)  # the norms' statistic spans kept heads only
    (out * g).sum().backward()
    (ref * g).sum().backward()
    check_grads([(a.q_proj.weight, sa.q_proj.weight, 0, q, 1.0), (a.k_proj.weight, sa.k_proj.weight, 0, kv, 1.0),
                 (a.q_norm.weight, sa.q_norm.weight, 0, q, 1.0), (a.k_norm.weight, sa.k_norm.weight, 0, kv, 1.0),
                 (a.o_proj.weight, sa.o_proj.weight, 1, q, sh), (layer.mlp.down_proj.weight, small.mlp.down_proj.weight, 1, units, su)])
    wr.unwrap()
    assert type(a.q_norm).__name__ == "Olmo2RMSNorm" and "_width_idx" not in vars(a.q_norm)


def test_sdpa_attention_with_gqa_matches_eager_on_the_same_subnetwork():
    layer, cfg, rope, _ = llama_layer("llama")
    other = copy.deepcopy(layer)
    other.self_attn.config = copy.deepcopy(cfg)
    other.self_attn.config._attn_implementation = "sdpa"
    plans = [WidthRaPTr(nn.ModuleList([m]), "0.5-1", total_steps=2, seed=4).step(0) for m in (layer, other)]
    assert torch.equal(plans[0].kv_heads[0], plans[1].kv_heads[0])
    x = torch.randn(B, T, D)
    causal = torch.full((T, T), float("-inf")).triu(1).expand(B, 1, T, T)  # both get the same mask
    outs = [m(x, attention_mask=causal, position_embeddings=rope) for m in (layer, other)]
    torch.testing.assert_close(outs[0], outs[1])


# --------------------------------------------------------------------------------------------
# FLOPs: analytic vs torch.utils.flop_counter
# --------------------------------------------------------------------------------------------


def counted_flops(layers, kind, rope, x):
    x = x.clone().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        h = x
        for layer in layers:
            h = call(kind, layer, h, rope)
        h.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind, fraction, heads, ffn", [
    ("reference", 0.5, True, True), ("reference", 0.75, True, False), ("reference", 0.25, False, True),
    ("bert", 0.5, True, True), ("bert", 0.75, False, True),
    ("llama", 0.5, True, True), ("llama", 0.5, True, False),
])
def test_analytic_relative_flops_match_the_flop_counter(kind, fraction, heads, ffn):
    stack = nn.ModuleList(make(kind)[0] for _ in range(3))
    rope = make(kind)[1]
    x = torch.randn(B, T, D)
    full = counted_flops(stack, kind, rope, x)
    wr = WidthRaPTr(stack, [fraction, 1.0], total_steps=2, seed=7, heads=heads, ffn=ffn, seq_len=T)
    plan = wr.step(0)
    sub = counted_flops(stack, kind, rope, x)
    assert sub / full == pytest.approx(wr.relative_flops(plan), rel=0.02)
    assert wr.relative_flops(0) == wr.relative_flops(plan)
    assert wr.full_layer_flops() * 3 * B == pytest.approx(full, rel=0.02)  # training = 3x forward


def test_expected_relative_flops_over_the_schedule():
    stack = nn.ModuleList(ref_block() for _ in range(4))
    wr = WidthRaPTr(stack, "0.5-0.75-1", total_steps=300, seq_len=T)
    assert wr.relative_flops() == pytest.approx(0.75)  # heads and units scale alike: mean of the fractions
    heads_only = WidthRaPTr(nn.ModuleList(ref_block() for _ in range(4)), "0.5-1", total_steps=2, ffn=False, seq_len=T)
    shape = heads_only.layers[0].shape
    att = shape.forward_flops(T) - 2 * T * 2 * D * FF  # everything but the FFN scales with heads
    assert heads_only.relative_flops(0) == pytest.approx((0.5 * att + 2 * T * 2 * D * FF) / shape.forward_flops(T))
    # A fraction that rounds stochastically (0.3 of 4 heads = 1.2) is exact in expectation.
    odd = WidthRaPTr(nn.ModuleList([ref_block()]), "0.3-1", total_steps=2000, ffn=False, seq_len=T)
    mean = sum(odd.relative_flops(s) for s in range(1000)) / 1000
    assert mean == pytest.approx(odd.expected_layer_flops(0.3) / odd.full_layer_flops(), rel=0.01)
    assert {odd.plan(s).num_heads[0] for s in range(1000)} == {1, 2}


# --------------------------------------------------------------------------------------------
# Sampling: deterministic, per layer, its own streams
# --------------------------------------------------------------------------------------------


def test_plans_depend_only_on_seed_and_step_and_use_their_own_streams():
    def controller(seed, **kw):
        return WidthRaPTr(nn.ModuleList(ref_block() for _ in range(3)), "0.5-1", total_steps=100, seed=seed, **kw)

    a, b, c = controller(0), controller(0), controller(1)
    for step in (0, 7, 42):
        pa, pb = a.plan(step), b.plan(step)
        assert all(torch.equal(x, y) for x, y in zip(pa.units, pb.units))
        assert all(torch.equal(x, y) for x, y in zip(pa.heads, pb.heads))
    assert any(not torch.equal(x, y) for s in range(5) for x, y in zip(a.plan(s).units, c.plan(s).units))
    # each layer draws its own subset; the same plan for a step however often it is asked for
    assert any(not torch.equal(a.plan(0).units[0], a.plan(0).units[i]) for i in (1, 2))
    # heads and units come from separate streams: switching off one leaves the other's draws
    heads_only, units_only = controller(0, ffn=False), controller(0, heads=False)
    assert all(torch.equal(x, y) for x, y in zip(heads_only.plan(3).heads, a.plan(3).heads))
    assert all(torch.equal(x, y) for x, y in zip(units_only.plan(3).units, a.plan(3).units))
    assert heads_only.plan(3).units == (None, None, None)
    # and none of them is the depth sampler's (stream 0) or the trainer's (1, 2) stream
    assert len({HEADS_STREAM, UNITS_STREAM, 0, 1, 2}) == 5
    draws = [torch.randperm(FF, generator=step_generator(0, 3, s)) for s in (0, HEADS_STREAM, UNITS_STREAM)]
    assert not torch.equal(draws[0], draws[2])


def test_uniform_subsets():
    wr = WidthRaPTr(nn.ModuleList([ref_block()]), "0.25-1", total_steps=10_000, heads=False)
    counts = torch.zeros(FF)
    for s in range(400):
        counts[wr.plan(s).units[0]] += 1
    assert counts.sum() == 400 * 16
    assert counts.min() > 60 and counts.max() < 145  # each unit kept ~100 times (binomial sd ~8.7)


def test_fixed_layers_stay_full_and_the_last_stage_slices_nothing():
    stack = nn.ModuleList(ref_block() for _ in range(3))
    wr = WidthRaPTr(stack, "0.5-1", total_steps=10, fixed="first,last")
    plan = wr.step(0)
    assert plan.heads[0] is None and plan.units[2] is None and plan.heads[1] is not None
    assert plan.num_heads == (4, 2, 4) and plan.num_units == (64, 32, 64)
    assert stack[1].qkv._width_idx is not None and stack[0].qkv._width_idx is None
    last = wr.step(9)
    assert last.fraction == 1.0 and all(lin._width_idx is None for lw in wr.layers for lin in lw.linears())


def test_state_dict_round_trip_and_mismatch():
    wr = WidthRaPTr(nn.ModuleList([ref_block()]), "0.5-1", total_steps=100, seed=9, scaling="sqrt")
    other = WidthRaPTr(nn.ModuleList([ref_block()]), "0.5-1", total_steps=100, seed=9, scaling="sqrt")
    other.load_state_dict(wr.state_dict())
    assert torch.equal(other.plan(5).units[0], wr.plan(5).units[0])
    # one resume rule: another seed or scaling is refused, never adopted
    with pytest.raises(RaptrError, match="seed 9 and scaling='sqrt'; this run seed 0"):
        WidthRaPTr(nn.ModuleList([ref_block()]), "0.5-1", total_steps=100).load_state_dict(wr.state_dict())
    longer = WidthRaPTr(nn.ModuleList([ref_block()]), "0.5-1", total_steps=200)
    with pytest.raises(RaptrError, match="different width schedule"):
        longer.load_state_dict(wr.state_dict())
    heads_only = WidthRaPTr(nn.ModuleList([ref_block()]), "0.5-1", total_steps=100, ffn=False)
    with pytest.raises(RaptrError, match="same options"):
        heads_only.load_state_dict(wr.state_dict())


# --------------------------------------------------------------------------------------------
# Optimizer, depth + width, training
# --------------------------------------------------------------------------------------------


def test_freeze_idle_keeps_idle_slices_and_their_adamw_moments():
    block = ref_block()
    opt = torch.optim.AdamW(block.parameters(), lr=0.1, weight_decay=0.1)
    wr = WidthRaPTr(nn.ModuleList([block]), "0.5-1", total_steps=10)
    x = torch.randn(B, T, D)
    for step in range(2):
        plan = wr.step(step)
        before_w = block.fc1.weight.detach().clone()
        before_m = opt.state[block.fc1.weight]["exp_avg"].clone() if opt.state else None
        block(x).square().mean().backward()
        with wr.freeze_idle(opt):
            opt.step()
        opt.zero_grad(set_to_none=True)
        idle = torch.ones(FF, dtype=torch.bool)
        idle[plan.units[0]] = False
        assert torch.equal(block.fc1.weight[idle], before_w[idle])
        assert not torch.equal(block.fc1.weight[~idle], before_w[~idle])
        exp_avg = opt.state[block.fc1.weight]["exp_avg"]
        assert torch.equal(exp_avg[idle], torch.zeros_like(exp_avg[idle]) if before_m is None else before_m[idle])
    # Without the guard AdamW moves idle rows along their momentum and by weight decay
    plan = wr.step(2)
    before = block.fc1.weight.detach().clone()
    block(x).square().mean().backward()
    opt.step()
    idle = torch.ones(FF, dtype=torch.bool)
    idle[plan.units[0]] = False
    assert torch.count_nonzero(block.fc1.weight.grad[idle]) == 0
    assert not torch.equal(block.fc1.weight[idle], before[idle])


def test_depth_and_width_combine_on_the_reference_model():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=D, n_layers=4, n_heads=H, d_ff=FF, max_seq_len=16)
    model = TransformerLM(cfg)
    keys = list(model.state_dict())
    depth = RaPTr(model.blocks, Schedule.parse("3-4", 4, 10), seed=0)
    width = WidthRaPTr(model, "0.5-1", total_steps=10, seed=0, scaling="sqrt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (B, 16))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    losses = []
    for step in range(10):
        depth.step(step)
        width.step(step)
        loss = model(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert list(model.state_dict()) == keys
    assert losses[-1] < losses[0]
    width.unwrap()
    depth.gates.unwrap()
    assert all(type(b) is Block for b in model.blocks)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, kwargs, message", [
    ("0.75-0.5-1", {}, "decreases"),
    ("0-1", {}, r"outside \(0, 1\]"),
    ("0.5-1.5", {}, r"outside \(0, 1\]"),
    ("0.5-0.75", {}, "keeps the fraction 0.75, not the full model: end the width schedule at 1"),
    ("0.5-x-1", {}, "cannot read width schedule"),
    ("", {}, "empty width schedule"),
    ("0.5-1", {"stage_lengths": "1,2,3"}, "3 stage lengths given for 2 stages"),
])
def test_schedule_errors_are_one_clear_line(spec, kwargs, message):
    with pytest.raises(RaptrError, match=message) as err:
        WidthSchedule.parse(spec, 100, **kwargs)
    assert "\n" not in str(err.value)


def test_schedule_stages():
    s = WidthSchedule.parse("0.5-0.75-1", 300)
    assert [st.fraction for st in s.stages] == [0.5, 0.75, 1.0] and s.boundaries == [100, 200]
    assert s.fraction(99) == 0.5 and s.fraction(250) == 1.0 and s.fraction(10_000) == 1.0
    warm = WidthSchedule.parse("0.5-1", 100, full_warmup=0.2)
    assert [(st.steps, st.fraction) for st in warm.stages] == [(20, 1.0), (40, 0.5), (40, 1.0)]
    assert WidthSchedule.parse("0.5-0.75", 10, require_full_final=False).stages[-1].fraction == 0.75
    assert not hasattr(s, "num_layers")  # width stages need no layer count


def test_width_and_depth_schedules_share_stage_machinery():
    """Same lengths spec, warm-up and steps: a width schedule's stage spans are the depth schedule's."""
    from raptr.core import Schedule

    for lengths, warm in [("equal", 0), ("prop:1", 0.1), ("1,2,1", 25)]:
        depth = Schedule.parse("8-10-12", 12, 997, fixed="none", stage_lengths=lengths, full_warmup=warm)
        width = WidthSchedule.parse("0.5-0.75-1", 997, stage_lengths=lengths, full_warmup=warm)
        assert [(d.start, d.end) for d in depth.stages] == [(w.start, w.end) for w in width.stages]
        assert depth.boundaries == width.boundaries and depth.full_warmup_steps == width.full_warmup_steps


def test_freeze_idle_on_transposed_conv1d_weights():
    """GPT-2's Conv1D stores weights (in, out): idle output units are columns of c_fc, idle input units rows of c_proj."""
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=D, n_layer=1, n_head=H, vocab_size=50, n_positions=16, n_inner=FF,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    mlp = gpt2.transformer.h[0].mlp
    opt = torch.optim.AdamW(gpt2.parameters(), lr=0.1, weight_decay=0.1)
    wr = WidthRaPTr(gpt2, "0.5-1", total_steps=10)
    ids = torch.randint(0, 50, (B, 16))
    for step in range(2):
        plan = wr.step(step)
        fc, proj = mlp.c_fc.weight.detach().clone(), mlp.c_proj.weight.detach().clone()
        m = opt.state[mlp.c_fc.weight]["exp_avg"].clone() if opt.state else torch.zeros_like(fc)
        gpt2(input_ids=ids, labels=ids).loss.backward()
        with wr.freeze_idle(opt):
            opt.step()
        opt.zero_grad(set_to_none=True)
        idle = torch.ones(FF, dtype=torch.bool)
        idle[plan.units[0]] = False
        assert torch.equal(mlp.c_fc.weight[:, idle], fc[:, idle]) and torch.equal(mlp.c_proj.weight[idle], proj[idle])
        assert not torch.equal(mlp.c_fc.weight[:, ~idle], fc[:, ~idle])
        assert torch.equal(opt.state[mlp.c_fc.weight]["exp_avg"][:, idle], m[:, idle])  # moments too


def test_unsupported_layers_and_options_are_one_clear_line():
    bloom = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=D, n_layer=1, n_head=H, vocab_size=50))
    with pytest.raises(RaptrError, match="don't support BloomBlock layers: supported are raptr's reference Block and BertLayer"):
        WidthRaPTr(bloom, "0.5-1", total_steps=10)
    falcon = tf.FalconForCausalLM(tf.FalconConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=H, num_kv_heads=2,
                                                  new_decoder_architecture=True, vocab_size=50))
    with pytest.raises(RaptrError, match="FalconDecoderLayer with new_decoder_architecture=True is not supported by width "
                                         "subnetworks: they support the multi-query layout"):
        WidthRaPTr(falcon, "0.5-1", total_steps=10)
    assert not any(type(m).__name__.startswith("Width") for m in falcon.modules())
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=D, n_layer=1, n_head=H, vocab_size=50, n_positions=16, add_cross_attention=True))
    with pytest.raises(RaptrError, match="GPT2Block with crossattention is not supported"):
        WidthRaPTr(gpt2, "0.5-1", total_steps=10)
    with pytest.raises(RaptrError, match="don't support Linear"):
        WidthRaPTr(nn.ModuleList([nn.Linear(4, 4)]), "0.5-1", total_steps=10)
    block = ref_block()
    with pytest.raises(RaptrError, match="unknown scaling 'cube'"):
        WidthRaPTr(nn.ModuleList([block]), "0.5-1", total_steps=10, scaling="cube")
    with pytest.raises(RaptrError, match="sample nothing"):
        WidthRaPTr(nn.ModuleList([block]), "0.5-1", total_steps=10, heads=False, ffn=False)
    with pytest.raises(RaptrError, match="needs total_steps"):
        WidthRaPTr(nn.ModuleList([block]), "0.5-1")
    with pytest.raises(RaptrError, match=r"keeps 0.8 of layer 0's 4 heads, less than one: use fractions >= 0.25"):
        WidthRaPTr(nn.ModuleList([block]), "0.2-1", total_steps=10)
    assert type(block) is Block and type(block.qkv) is nn.Linear  # a failed wrap leaves the layers alone
    WidthRaPTr(nn.ModuleList([block]), "0.2-1", total_steps=10, heads=False)  # units only: fine


def test_refused_fused_layer_leaves_the_model_as_it_was():
    """Phi3 layer 1's o_proj is not a plain nn.Linear: the wrap is refused and nothing stays behind
    (no hooks, no config views, no swapped classes), so the model trains as before."""
    class Quantized(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    model = tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=D, num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=2,
                                             intermediate_size=FF, vocab_size=50, max_position_embeddings=16, pad_token_id=0))
    attn = model.model.layers[1].self_attn
    quant = Quantized(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
    quant.weight = attn.o_proj.weight
    attn.o_proj = quant
    ids = torch.randint(0, 50, (B, 16))
    before = model(input_ids=ids, labels=ids).loss
    with pytest.raises(RaptrError, match="Quantized is not a plain nn.Linear"):
        WidthRaPTr(model, "0.5-1", total_steps=4)
    assert all(not layer.self_attn._forward_pre_hooks and layer.self_attn.config is model.config for layer in model.model.layers)
    assert not any(type(m).__name__.startswith("Width") for m in model.modules())
    assert torch.equal(model(input_ids=ids, labels=ids).loss, before)
