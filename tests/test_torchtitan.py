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
