"""Survey: RaPTr on every transformers architecture in tests/arch_zoo.py, *without registration*.

Per architecture (tiny config, CPU): the layer stack(s) are found by ``raptr.wrap`` itself; the full
path (train and eval mode) is bitwise the unwrapped model; a partial path gives the loss and
gradients of the same weights with the skipped layers removed, and skipped parameters keep
``grad is None``; ``hidden_states`` keep L+1 entries; cached generation after a partial-path step
is refused while eval-mode generation is exact; gradient checkpointing and a
``save_pretrained``/``from_pretrained`` round trip work; the FLOPs model is within 2% of
``FlopCounterMode`` (eager attention).
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import raptr
from arch_zoo import ZOO, build
from raptr.errors import RaptrError
from raptr.models.registry import REGISTRY, discover_stacks, find_layer_stack, model_flops

SURVEYED = sorted(n for n in ZOO if n != "albert")
B, T = 2, 16


def _inputs(arch, model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (B, T), generator=gen)
    out = {"input_ids": ids, "labels": ids}
    if arch.task == "seq2seq":
        out["decoder_input_ids"] = ids
    if "use_cache" in model.forward.__code__.co_varnames or arch.task != "mlm":
        out["use_cache"] = False
    return out


def _stacks(model, arch):
    return [(path, model.get_submodule(path)) for path in arch.layers]


def _path(model, arch):
    """Per stack: its first and last layers run, its second is skipped (and every other odd one)."""
    active = []
    for _, stack in _stacks(model, arch):
        n = len(stack)
        active += [i in (0, n - 1) or i % 2 == 0 for i in range(n)]
    return active


class _Identity(nn.Module):
    """A skipped layer in the reference: returns its input (models that read per-position layer metadata,
    e.g. Gemma2's ``config.layer_types[i]``, see the same positions as in the wrapped model)."""

    def __init__(self, layer):
        super().__init__()
        for key in ("attention_type", "layer_idx", "is_sliding", "sliding_window"):  # metadata models read
            if hasattr(layer, key) and not isinstance(getattr(layer, key), nn.Module):
                setattr(self, key, getattr(layer, key))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _returns_tuples(model, arch, inputs):
    seen = []
    first = model.get_submodule(arch.layers[0])[0]
    handle = first.register_forward_hook(lambda m, a, o: seen.append(isinstance(o, tuple)))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen[0]


def _reference(model, arch, active, inputs):
    """Layers that return a bare tensor: skipped ones replaced by the identity. Tuple-returning layers
    (their identity would need the architecture's tuple): skipped ones removed from the stack."""
    if _returns_tuples(model, arch, inputs):
        return _without_skipped(model, arch, active)
    ref = copy.deepcopy(model)
    start = 0
    for _, stack in _stacks(ref, arch):
        for i in range(len(stack)):
            if not active[start + i]:
                stack[i] = _Identity(stack[i])
        start += len(stack)
    return ref


def _without_skipped(model, arch, active):
    ref = copy.deepcopy(model)
    start = 0
    for path, stack in _stacks(ref, arch):
        keep = active[start:start + len(stack)]
        start += len(stack)
        parent, _, attr = path.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, attr, nn.ModuleList([m for m, k in zip(stack, keep) if k]))
    return ref


def test_zoo_is_big_enough():
    assert len(SURVEYED) >= 30
    for name in ("bert", "roberta", "distilbert", "electra", "modernbert", "deberta-v2", "xlm-roberta", "gpt2", "gptj",
                 "gpt_neo", "gpt_neox", "opt", "bloom", "falcon", "mpt", "llama", "mistral", "mixtral", "qwen2", "qwen3",
                 "qwen2_moe", "phi", "phi3", "gemma", "gemma2", "olmo2", "starcoder2", "t5", "bart"):
        assert name in ZOO, name


@pytest.mark.parametrize("name", SURVEYED)
def test_raptr_on_an_unregistered_architecture(name, tmp_path):
    arch = ZOO[name]
    model, cfg = build(name)
    model.train()
    plain = copy.deepcopy(model)
    spec = REGISTRY.get(cfg.model_type)
    layers = find_layer_stack(model)
    want = [m for _, stack in _stacks(model, arch) for m in stack]
    assert [id(m) for m in layers] == [id(m) for m in want], "found the wrong layers"
    if spec is None or not spec.paths:  # found by discovery, not by a registry path
        assert [p for p, _ in discover_stacks(model)] == list(arch.layers)
    active = _path(model, arch)
    fixed = ",".join(str(i) for i, run in enumerate(active) if run)
    rp = raptr.wrap(model, schedule=f"p:0.5-1", total_steps=10, fixed=fixed)
    inputs = _inputs(arch, model)

    # full path, train mode: bitwise the unwrapped model
    rp.gates.run_all()
    assert torch.equal(model(**inputs).loss, plain(**inputs).loss)

    # partial path: the loss and gradients of the model without the skipped layers
    ref = _reference(plain, arch, active, inputs)
    rp.gates.set_path(active)
    loss, want_loss = model(**inputs).loss, ref(**inputs).loss
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    want_loss.backward()
    for layer, run in zip(layers, active):
        assert all((p.grad is None) != run for p in layer.parameters())
    in_layers = {id(p) for p in layers.parameters()}
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if id(p) not in in_layers and p.grad is not None and n in ref_params:
            torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-5, msg=n)

    # hidden states stay aligned with the layers: L+1 per stack
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    sizes = [len(stack) for _, stack in _stacks(model, arch)]
    if arch.task == "seq2seq":
        assert [len(out.encoder_hidden_states), len(out.decoder_hidden_states)] == [n + 1 for n in sizes]
    else:
        assert len(out.hidden_states) == sizes[0] + 1

    # generation: with a KV cache refused in train mode with a partial path (models that decode without
    # a cache, e.g. MPT, recompute every position with the same path: exactly the reference's tokens);
    # exact in eval mode
    if arch.task != "mlm":
        prompt = inputs["input_ids"][:1, :5]
        kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        try:
            tokens = model.generate(prompt, **kw)
        except RaptrError as e:
            assert "cached decoding" in str(e)
        else:
            assert torch.equal(tokens, ref.generate(prompt, **kw)), "generate with a partial path was silently wrong"
        model.eval()
        plain.eval()
        assert torch.equal(model.generate(prompt, **kw), plain.generate(prompt, **kw))
        model.train()
        plain.train()

    # eval mode: every layer, unscaled, whatever the path
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).loss, plain(**inputs).loss)
    model.train()

    # gradient checkpointing keeps the skipping
    if getattr(model, "supports_gradient_checkpointing", False):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        gc_loss = model(**inputs).loss
        gc_loss.backward()
        torch.testing.assert_close(gc_loss, want_loss, rtol=1e-5, atol=1e-6)
        for layer, run in zip(layers, active):
            assert all((p.grad is None) != run for p in layer.parameters())
        model.gradient_checkpointing_disable()

    # save_pretrained / from_pretrained while wrapped: the plain class, the same weights
    model.save_pretrained(tmp_path / "m")
    again = type(plain).from_pretrained(tmp_path / "m")
    assert type(find_layer_stack(again)[0]) is type(find_layer_stack(plain)[0])
    mine = model.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in again.state_dict().items())
    rp.gates.unwrap()


@pytest.mark.parametrize("name", SURVEYED)
def test_flops_model_matches_flop_counter(name):
    arch = ZOO[name]
    model, cfg = build(name)
    model.eval()
    ids = torch.randint(3, 100, (1, T), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, **({"decoder_input_ids": ids} if arch.task == "seq2seq" else {})}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    counted = counter.get_total_flops()
    predicted = model_flops(model, T).full_step(1) / 3  # training = 3x forward
    assert predicted == pytest.approx(counted, rel=0.02), (predicted, counted)


def test_albert_shared_layer_is_refused_with_one_line():
    model, _ = build("albert")
    with pytest.raises(RaptrError, match="ALBERT shares one layer"):
        raptr.wrap(model, schedule="p:0.5-1", total_steps=10)


def test_wrapping_twice_is_refused():
    model, _ = build("llama")
    raptr.wrap(model, schedule="p:0.5-1", total_steps=10)
    with pytest.raises(RaptrError, match="already wrapped"):
        raptr.wrap(model, schedule="p:0.5-1", total_steps=10)


WIDTH_FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                  "gemma3", "phi3", "gpt2", "opt", "gpt_neox", "olmo2", "falcon"]


@pytest.mark.parametrize("name", WIDTH_FAMILIES)
def test_width_subnetworks_on_each_supported_family(name):
    """Width (registry data, raptr.models.registry.WIDTH_LAYERS): bitwise at full width and in eval
    mode; at half width the heads/units really shrink, idle slices get exactly zero gradient, and the
    FLOPs share matches FlopCounterMode on the same forward."""
    from raptr.width import WidthRaPTr

    arch = ZOO[name]
    model, _ = build(name)
    model.train()
    plain = copy.deepcopy(model)
    inputs = _inputs(arch, model)
    wr = WidthRaPTr(model, "0.5-1", total_steps=2, seed=0)
    wr.step(1)  # fraction 1: nothing sliced
    assert torch.equal(model(**inputs).loss, plain(**inputs).loss)
    plan = wr.step(0)  # fraction 0.5
    assert all(n < wl.n_heads for n, wl in zip(plan.num_heads, wr.layers))
    first = wr.layers[0]
    widths = []
    handle = first.head_out[0].register_forward_hook(lambda m, a, o: widths.append(o.shape[-1]))
    loss = model(**inputs).loss
    handle.remove()
    kv = plan.num_kv_heads[0] if first.fused_heads else 0  # a fused q|k|v projection also yields the kept k, v
    assert widths == [(plan.num_heads[0] + 2 * kv) * first.head_dim] and torch.isfinite(loss)
    # The sliced forward is the full model with the dropped heads' and units' consumer columns zeroed
    # (not where a norm spans all heads, OLMo2's q/k norms: tests/test_width.py checks it against a
    # hand-built layer with only the kept heads).
    zeroed = copy.deepcopy(plain)
    names = {m: n for n, m in model.named_modules()}
    with torch.no_grad():
        for wl in wr.layers:
            for lin in (wl.head_in, wl.unit_in):
                (param, dim), = lin.width_params()
                drop = torch.ones(param.shape[dim], dtype=torch.bool)
                drop[lin._width_idx] = False
                zeroed.get_submodule(names[lin]).weight.index_fill_(dim, drop.nonzero().squeeze(1), 0.0)
    if not first.norms:
        torch.testing.assert_close(loss, zeroed(**inputs).loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    for lin in (first.head_out[0], first.unit_out[0]):  # idle rows: exactly zero gradient
        (param, dim), *_ = lin.width_params()
        grad = param.grad.movedim(dim, 0)
        idle = torch.ones(grad.shape[0], dtype=torch.bool)
        idle[lin._width_idx] = False
        assert torch.count_nonzero(grad[idle]) == 0 and torch.count_nonzero(grad[~idle]) > 0
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    counts = counter.get_flop_counts()
    layer_name = next(k for k in counts if k.endswith(arch.layers[0] + ".0"))
    assert sum(counts[layer_name].values()) == pytest.approx(
        B * first.sub_shape(first.head_count(plan, 0), plan.num_units[0]).forward_flops(T), rel=0.02)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).loss, plain(**inputs).loss)
    wr.unwrap()
