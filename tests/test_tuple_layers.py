"""Architectures whose layers return tuples (hidden, attention weights / position biases, ...):
a skipped layer must return the same structure and pass on what later layers need, so a partial
path gives exactly the loss and gradients of the model with the skipped layers removed."""

import copy

import pytest
import torch
from torch import nn

import raptr
from raptr.errors import RaptrError
from raptr.models.registry import find_layer_stack

tf = pytest.importorskip("transformers")

ACTIVE = [True, False, True, False, False, True]  # first and last fixed, 2 of 4 free layers run


def build(name):
    torch.manual_seed(0)
    if name == "falcon":
        return tf.FalconForCausalLM(tf.FalconConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, vocab_size=100))
    if name == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(hidden_size=64, n_layer=6, n_head=4, vocab_size=100))
    if name == "gpt_neo":
        return tf.GPTNeoForCausalLM(tf.GPTNeoConfig(hidden_size=64, num_layers=6, num_heads=4, vocab_size=100,
                                                    attention_types=[[["global", "local"], 3]], max_position_embeddings=64,
                                                    bos_token_id=0, eos_token_id=0))
    if name == "mpt":
        return tf.MptForCausalLM(tf.MptConfig(d_model=64, n_layers=6, n_heads=4, vocab_size=100))
    if name == "deberta-v2":
        return tf.DebertaV2ForMaskedLM(tf.DebertaV2Config(hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                                          intermediate_size=128, vocab_size=100, hidden_dropout_prob=0.0,
                                                          attention_probs_dropout_prob=0.0))
    if name == "t5":
        # 3 encoder + 3 decoder blocks: one path over both stacks (blocks 0 and 3 each compute a position bias)
        return tf.T5ForConditionalGeneration(tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=3,
                                                         num_heads=4, vocab_size=100, dropout_rate=0.0))
    raise KeyError(name)


def loss_of(model, name, **extra):
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    if name == "t5":
        extra["decoder_input_ids"] = ids
    return model(input_ids=ids, labels=ids, **extra).loss


def without_skipped(model, active):
    """The reference: the same weights with the skipped layers removed from their stack(s)."""
    ref = copy.deepcopy(model)
    start = 0
    for path, stack in raptr.models.registry.discover_stacks(ref):
        run = active[start:start + len(stack)]
        start += len(stack)
        parent_path, _, attr = path.rpartition(".")
        setattr(ref.get_submodule(parent_path) if parent_path else ref, attr,
                nn.ModuleList([layer for layer, keep in zip(stack, run) if keep]))
    assert start == len(active)
    return ref


@pytest.mark.parametrize("name", ["falcon", "bloom", "gpt_neo", "mpt", "deberta-v2", "t5"])
def test_partial_path_equals_the_model_without_the_skipped_layers(name):
    model = build(name).train()
    plain = copy.deepcopy(model)
    # T5: both stacks' first blocks stay (each computes its stack's position bias)
    fixed, active = ("0,3", [True, False, True, True, False, True]) if name == "t5" else ("first,last", ACTIVE)
    rp = raptr.wrap(model, schedule="3-6", total_steps=10, fixed=fixed)
    rp.gates.run_all()
    # full path: bitwise the unwrapped model; in train mode a wrapped layer is given no fresh KV cache
    # (raptr.layer_calls.train_mode_cache), which for T5 changes the last bit of the loss, so compare with the
    # model not building one
    no_cache = {} if name == "deberta-v2" else {"use_cache": False}
    assert torch.equal(loss_of(model, name), loss_of(plain, name, **no_cache))
    torch.testing.assert_close(loss_of(model, name), loss_of(plain, name), rtol=1e-6, atol=1e-6)
    ref = without_skipped(plain, active)
    rp.gates.set_path(active)
    loss, want = loss_of(model, name), loss_of(ref, name)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    loss.backward()
    want.backward()
    layers = find_layer_stack(model)
    for i, (layer, run) in enumerate(zip(layers, active)):
        if not run:
            assert all(p.grad is None for p in layer.parameters()), (name, i)
    kept = [layer for layer, run in zip(layers, active) if run]
    ref_layers = [m for path, _ in raptr.models.registry.discover_stacks(plain) for m in ref.get_submodule(path)]
    assert len(ref_layers) == len(kept)
    for mine, theirs in zip(kept, ref_layers):  # the kept layers' gradients match the reference's
        for (n, p), (_, q) in zip(mine.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"{name} {n}")
    in_layers = {id(p) for p in layers.parameters()}
    outside = [(n, p) for n, p in model.named_parameters() if id(p) not in in_layers]
    ref_outside = dict((n, p) for n, p in ref.named_parameters())
    for n, p in outside:  # embeddings, norms, heads
        torch.testing.assert_close(p.grad, ref_outside[n].grad, rtol=1e-5, atol=1e-6, msg=f"{name} {n}")
    model.eval()
    plain.eval()
    with torch.no_grad():  # eval runs the full model whatever the path
        assert torch.equal(loss_of(model, name), loss_of(plain, name))


def test_skipped_before_ever_running_learns_its_own_output_structure():
    model = build("falcon").train()
    rp = raptr.wrap(model, schedule="p:0.5-1", total_steps=10, fixed="none")
    rp.gates.set_path([False, True, False, True, False, True])  # layer 0 skipped at the very first call
    ref = without_skipped(copy.deepcopy(model), [False, True, False, True, False, True])
    torch.testing.assert_close(loss_of(model, "falcon"), loss_of(ref, "falcon"), rtol=1e-6, atol=1e-6)


def test_t5_block_zero_must_stay_fixed():
    with pytest.raises(RaptrError, match=r"t5 layer\(s\) \[0, 3\] compute state every other layer uses"):
        raptr.wrap(build("t5"), schedule="p:0.5-1", total_steps=10, fixed="none")
    with pytest.raises(RaptrError, match=r"t5 layer\(s\) \[3\]"):  # the decoder's first block too
        raptr.wrap(build("t5"), schedule="p:0.5-1", total_steps=10, fixed="first,last")
    raptr.wrap(build("t5"), schedule="p:0.5-1", total_steps=10, fixed="0,3")


def test_t5_must_run_hint_names_indices_that_work():
    model = build("t5").train()  # 3 encoder + 3 decoder blocks: blocks 0 and 3 compute position biases
    with pytest.raises(RaptrError) as e:
        raptr.wrap(model, schedule="3-6", total_steps=10)  # default fixed: first,last = [0, 5]
    assert "fixed='0,3,5'" in str(e.value)
    rp = raptr.wrap(model, schedule="4-6", total_steps=10, fixed="0,3,5")  # the advice, followed
    assert rp.method.raptr.schedule.fixed == (0, 3, 5)


def test_a_user_registration_keeps_what_raptr_knows_of_t5():
    from raptr.models.registry import REGISTRY

    saved = REGISTRY["t5"]
    raptr.register_layer_stack("t5", "encoder.block")  # a path only: passthrough and must-run must survive
    try:
        spec = REGISTRY["t5"]
        assert spec.paths == ("encoder.block",) and spec.passthrough == saved.passthrough and spec.first_of_each_must_run
        model = build("t5").train()
        plain = copy.deepcopy(model)
        active = [True, False, True]  # encoder block 1 skipped: block 2 must get block 0's position bias
        rp = raptr.wrap(model, schedule="p:0.5-1", total_steps=10)
        assert len(rp.gates) == 3 and rp.method.raptr.schedule.fixed == (0, 2)
        rp.gates.set_path(active)
        ref = copy.deepcopy(plain)
        ref.encoder.block = nn.ModuleList([b for b, run in zip(ref.encoder.block, active) if run])
        torch.testing.assert_close(loss_of(model, "t5"), loss_of(ref, "t5"), rtol=1e-6, atol=1e-6)
    finally:
        REGISTRY["t5"] = saved


def test_a_kv_cache_kept_inside_the_layers_is_refused_on_a_partial_path():
    """litgpt keeps its KV cache in the attention modules (``attn.kv_cache``, set for decoding): no cache
    object reaches the layer call, so the gate looks inside the layer."""

    class KVCache(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.register_buffer("k", torch.zeros(1, 16, d))

    class Attention(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.qkv = nn.Linear(d, d)
            self.kv_cache = None  # litgpt: set by model.set_kv_cache(), cleared by model.clear_kv_cache()

        def forward(self, x, input_pos=None):
            k = self.qkv(x)
            if input_pos is not None and self.kv_cache is not None:
                self.kv_cache.k[:, input_pos] = k[:, -len(input_pos):].detach()
            return k

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.attn = Attention(d)

        def forward(self, x, input_pos=None):
            return x + self.attn(x, input_pos)

    class TinyGPT(nn.Module):
        def __init__(self, d=8, n=4):
            super().__init__()
            self.transformer = nn.ModuleDict({"h": nn.ModuleList(Block(d) for _ in range(n))})

        def forward(self, x, input_pos=None):
            for block in self.transformer.h:
                x = block(x, input_pos)
            return x

        def set_kv_cache(self):
            for block in self.transformer.h:
                block.attn.kv_cache = KVCache(8)

        def clear_kv_cache(self):
            for block in self.transformer.h:
                block.attn.kv_cache = None

    model = TinyGPT().train()
    rp = raptr.wrap(model, schedule="3-4", total_steps=10)
    rp.gates.set_path([True, False, True, True])
    x = torch.randn(1, 4, 8)
    model(x)  # no cache: a partial path trains
    model.set_kv_cache()
    with pytest.raises(RaptrError, match=r"keeps a KV cache inside it \(GatedBlock.attn.kv_cache\).*clear_kv_cache"):
        model(x, input_pos=torch.arange(4))
    model.eval()
    model(x, input_pos=torch.arange(4))  # decoding in eval mode: every layer runs
    model.train()
    rp.gates.run_all()
    model(x, input_pos=torch.arange(4))  # the full path in train mode: every layer's cache stays consistent
    model.clear_kv_cache()
    rp.gates.set_path([True, False, True, True])
    model(x)
