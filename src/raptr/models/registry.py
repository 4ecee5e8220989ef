"""Where each architecture keeps its layer stack, and the shape of one layer (for FLOPs).

``find_layer_stack(model)``, in order: the model's own ``layer_stack()`` method; the registry entry
for ``config.model_type``; else **automatic discovery**: every ``nn.ModuleList`` whose children
share one (non-``torch.nn``) class and whose length is one of the config's layer counts
(``num_hidden_layers``, ``n_layer``, ``num_layers``, ``encoder_layers``, ...), outermost only. An
encoder-decoder (T5, BART) has two such stacks: they form **one path over both** (encoder layers
first, then decoder layers, in module order), so one schedule covers the whole model; the
registry says which layers must still always run (T5: the first block of each stack).

FLOPs: architectures with a registered ``shape`` are counted analytically (``raptr.flops``); any
other is measured once with ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy
(``measure_flops``: no memory, no compute), per layer and for the rest (embeddings, LM head).

The registry is data, one entry per architecture with special needs::

    raptr.register_layer_stack("mymodel", "model.blocks", shape=lambda cfg: LayerShape(...))
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from raptr.errors import RaptrError
from raptr.flops import LayerShape, MeasuredFlops, ModelFlops


@dataclass(frozen=True)
class StackSpec:
    paths: tuple[str, ...]  # attribute paths tried in order (task model, then base model)
    shape: Callable[[object], LayerShape] | None = None
    head_transform: bool = False  # BERT-style d×d transform before the vocabulary projection
    # Layers that return tuples and thread values through the stack: output index -> the argument
    # a skipped layer passes on in its place (T5: the position biases block 0 computes for all).
    passthrough: tuple[tuple[int, str], ...] = ()
    must_run: tuple[int, ...] = ()  # layers that compute state the others need: never skipped
    first_of_each_must_run: bool = False  # ... the first layer of every stack (T5's position bias)
    refuse: str = ""  # why this architecture's layers cannot be skipped (one error line), if so


def _bert_shape(c) -> LayerShape:
    return LayerShape(c.hidden_size, c.num_attention_heads, c.intermediate_size)


def _gpt2_shape(c) -> LayerShape:
    return LayerShape(c.n_embd, c.n_head, c.n_inner or 4 * c.n_embd)


def _llama_shape(c) -> LayerShape:
    return LayerShape(c.hidden_size, c.num_attention_heads, c.intermediate_size,
                      n_kv_heads=getattr(c, "num_key_value_heads", None),
                      head_dim=getattr(c, "head_dim", None), gated_ffn=True)


def _opt_shape(c) -> LayerShape:
    return LayerShape(c.hidden_size, c.num_attention_heads, c.ffn_dim)


def _neox_shape(c) -> LayerShape:
    return LayerShape(c.hidden_size, c.num_attention_heads, c.intermediate_size)


REGISTRY: dict[str, StackSpec] = {
    "bert": StackSpec(("bert.encoder.layer", "encoder.layer"), _bert_shape, head_transform=True),
    "roberta": StackSpec(("roberta.encoder.layer", "encoder.layer"), _bert_shape, head_transform=True),
    "gpt2": StackSpec(("transformer.h", "h"), _gpt2_shape),
    "llama": StackSpec(("model.layers", "layers"), _llama_shape),
    "mistral": StackSpec(("model.layers", "layers"), _llama_shape),
    "qwen2": StackSpec(("model.layers", "layers"), _llama_shape),
    "opt": StackSpec(("model.decoder.layers", "decoder.layers"), _opt_shape),
    "gpt_neox": StackSpec(("gpt_neox.layers", "layers"), _neox_shape),
    # Layers that return tuples (hidden, attention weights or None): skipped ones return the same tuple.
    "falcon": StackSpec(("transformer.h", "h")),
    "bloom": StackSpec(("transformer.h", "h")),
    "gpt_neo": StackSpec(("transformer.h", "h")),
    "mpt": StackSpec(("transformer.blocks", "blocks")),
    "deberta-v2": StackSpec(("deberta.encoder.layer", "encoder.layer")),
    # T5: encoder and decoder blocks, found by discovery (one path over both). Block 0 of each stack
    # computes the relative position bias every later block is given, so it always runs and skipped
    # blocks pass the biases on.
    "t5": StackSpec((), passthrough=((1, "position_bias"), (2, "encoder_decoder_position_bias")),
                    first_of_each_must_run=True),
    # ALBERT runs one shared layer (group) num_hidden_layers times: there is no stack of distinct layers.
    "albert": StackSpec((), refuse="ALBERT shares one layer across all its depth (config.num_hidden_groups=1), so "
                                   "there are no separate layers to skip: RaPTr needs a stack of distinct layers"),
}

@dataclass(frozen=True)
class WidthSpec:
    """Where a layer class keeps the linears width subnetworks slice (attribute paths inside the layer).

    ``head_out``: the projections producing heads (q, k, v; the first is the queries), or one fused
    projection with rows [q | k | v]; ``head_in`` the one consuming them; ``unit_out`` the FFN
    projections producing hidden units (``fused_units``: one projection with rows [gate | up]),
    ``unit_in`` the one consuming them; ``head_dim``: the attribute holding the head size;
    ``n_heads``/``n_kv_heads``: those holding the head counts (needed when q, k, v are fused);
    ``follow``: attributes the layer's own forward reads to split or reshape heads, with what they
    count of the kept heads (``heads``, ``kv_heads``, or ``q_width`` = heads × head_dim), set on
    every sliced forward; ``conv1d``: the linears are transformers ``Conv1D`` (weight stored
    (in, out)); ``absent``: attributes that must be None (e.g. cross-attention, which width does
    not slice)."""

    head_out: tuple[str, ...]
    head_in: str
    unit_out: tuple[str, ...]
    unit_in: str
    head_dim: str
    gated: bool = False
    absent: tuple[str, ...] = ()
    fused_units: bool = False
    n_heads: str | None = None
    n_kv_heads: str | None = None
    follow: tuple[tuple[str, str], ...] = ()
    conv1d: bool = False
    interleaved: bool = False  # fused rows per head, [q_h | k_h | v_h] for h = 0..n-1 (GPT-NeoX), not [q | k | v]
    norms: tuple[tuple[str, str], ...] = ()  # norms over all heads' outputs at once (path, "q" or "kv"): sliced too
    linear_classes: tuple[str, ...] = ()  # nn.Linear subclasses whose own forward is x W^T + b (e.g. FalconLinear)
    requires: tuple[tuple[str, object, str], ...] = ()  # (attribute, value it must have, what it means) or refused


_BERT_WIDTH = WidthSpec(("attention.self.query", "attention.self.key", "attention.self.value"), "attention.output.dense",
                        ("intermediate.dense",), "output.dense", "attention.self.attention_head_size",
                        absent=("crossattention",))
_LLAMA_WIDTH = WidthSpec(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
                         ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "self_attn.head_dim", gated=True)
# Phi3: fused qkv_proj and gate_up_proj; its attention splits q|k|v at config.num_attention_heads·head_dim.
_PHI3_WIDTH = WidthSpec(("self_attn.qkv_proj",), "self_attn.o_proj", ("mlp.gate_up_proj",), "mlp.down_proj",
                        "self_attn.head_dim", gated=True, fused_units=True, n_heads="self_attn.config.num_attention_heads",
                        n_kv_heads="self_attn.num_key_value_heads",
                        follow=(("self_attn.config.num_attention_heads", "heads"), ("self_attn.num_key_value_heads", "kv_heads")))
# GPT-2: Conv1D linears, fused c_attn split into q, k, v at split_size.
_GPT2_WIDTH = WidthSpec(("attn.c_attn",), "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj", "attn.head_dim",
                        n_heads="attn.num_heads", follow=(("attn.split_size", "q_width"),), conv1d=True,
                        absent=("crossattention",))

# OPT: separate q/k/v, fc1/fc2 on the layer; its attention reshapes with view(bsz, -1, num_heads, head_dim),
# so num_heads follows the kept heads during a sliced forward.
_OPT_WIDTH = WidthSpec(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.out_proj", ("fc1",), "fc2",
                       "self_attn.head_dim", n_heads="self_attn.num_heads", follow=(("self_attn.num_heads", "heads"),))

# GPT-NeoX: one fused query_key_value whose rows are grouped per head ([q_h | k_h | v_h]); its attention
# reshapes with view(..., -1, 3 * head_size), so fewer heads pass through.
_NEOX_WIDTH = WidthSpec(("attention.query_key_value",), "attention.dense", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h",
                        "attention.head_size", n_heads="attention.config.num_attention_heads", interleaved=True)

# OLMo2: Llama's layout, with RMSNorms over the whole q and k projections (all heads at once): they get the
# kept heads' slice of their weight, so their statistic runs over the kept heads, as in a model with only those.
_OLMO2_WIDTH = dataclasses.replace(_LLAMA_WIDTH, norms=(("self_attn.q_norm", "q"), ("self_attn.k_norm", "kv")))

# Falcon (multi-query, its default and Falcon-7B's): one fused query_key_value with rows [q | k | v] and a
# single KV head, so the query heads are sampled within it (K and V always kept); its attention splits
# at num_heads and repeats K and V num_key_value_groups times, both following the kept heads.
_FALCON_WIDTH = WidthSpec(("self_attention.query_key_value",), "self_attention.dense", ("mlp.dense_h_to_4h",),
                          "mlp.dense_4h_to_h", "self_attention.head_dim", n_heads="self_attention.num_heads",
                          n_kv_heads="self_attention.num_kv_heads",
                          follow=(("self_attention.num_heads", "heads"), ("self_attention.num_key_value_groups", "rep")),
                          linear_classes=("FalconLinear",),
                          requires=(("self_attention.multi_query", True, "multi-query attention"),
                                    ("self_attention.new_decoder_architecture", False, "the multi-query layout (not new_decoder_architecture)")))

# Width subnetworks, per layer class (by name, so no transformers import is needed here).
WIDTH_LAYERS: dict[str, WidthSpec] = {
    **{name: _BERT_WIDTH for name in ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer")},
    "OPTDecoderLayer": _OPT_WIDTH,
    "GPTNeoXLayer": _NEOX_WIDTH,
    **{name: _LLAMA_WIDTH for name in ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                                        "GemmaDecoderLayer", "Gemma2DecoderLayer", "Gemma3DecoderLayer")},
    "Phi3DecoderLayer": _PHI3_WIDTH,
    "GPT2Block": _GPT2_WIDTH,
    "Olmo2DecoderLayer": _OLMO2_WIDTH,
    "FalconDecoderLayer": _FALCON_WIDTH,
}


def width_spec(layer: nn.Module) -> WidthSpec | None:
    """The width data of ``layer``'s class (or a base class of it), or None if it is not supported."""
    for cls in type(layer).__mro__:
        if cls.__name__ in WIDTH_LAYERS:
            return WIDTH_LAYERS[cls.__name__]
    return None


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
                    "num_decoder_layers")


def register_layer_stack(model_type: str, path: str | tuple[str, ...], shape: Callable[[object], LayerShape] | None = None,
                         passthrough: dict[int, str] | None = None, must_run: tuple[int, ...] = ()) -> None:
    """Teach raptr where ``config.model_type == model_type`` keeps its ``nn.ModuleList`` of layers
    (for a model with no config, ``model_type`` is its class name).

    ``passthrough``: for layers returning tuples whose entries later layers consume, output index ->
    forward argument a skipped layer returns in its place; ``must_run``: layers never to skip."""
    paths = (path,) if isinstance(path, str) else tuple(path)
    given = tuple(sorted(passthrough.items())) if passthrough is not None else None
    known = REGISTRY.get(model_type)
    if known is None:
        REGISTRY[model_type] = StackSpec(paths, shape, passthrough=given or (), must_run=tuple(must_run))
        return
    if known.refuse:
        raise RaptrError(f"{model_type} cannot be registered: {known.refuse}")
    # What raptr already knows of the architecture (FLOPs shape, values threaded through the layers,
    # layers that must run) stays unless given anew: a new path alone must not lose it.
    REGISTRY[model_type] = dataclasses.replace(
        known, paths=paths, shape=shape or known.shape, passthrough=known.passthrough if given is None else given,
        must_run=tuple(must_run) or known.must_run)


def layer_contract(model: nn.Module) -> tuple[dict[int, str], tuple[int, ...]]:
    """(passthrough, must_run) of the model's layer stack (empty for most architectures)."""
    spec = _spec(model)
    if spec is None:
        return {}, ()
    must = set(spec.must_run)
    if spec.first_of_each_must_run:
        registered = [layers for path in spec.paths if isinstance(layers := _get(model, path), nn.ModuleList)][:1]
        start = 0
        for stack in registered or [stack for _, stack in discover_stacks(model)]:  # the stack(s) find_layer_stack uses
            must.add(start)
            start += len(stack)
    return dict(spec.passthrough), tuple(sorted(must))


def check_must_run(model: nn.Module, always_run: tuple[int, ...] | list[int], option: str) -> None:
    """Refuse a configuration that could skip a layer the architecture needs every step."""
    _, must = layer_contract(model)
    missing = [i for i in must if i not in always_run]
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        keep = ",".join(str(i) for i in sorted(set(always_run) | set(missing)))
        field = option.rsplit(".", 1)[-1]  # a method option: its keyword in Python and its config key
        fix = f"use {option}" if " " in option else f"set {field}='{keep}' ({option}={keep} in a config)"
        raise RaptrError(f"{model_type} layer(s) {missing} compute state every other layer uses (e.g. T5's position "
                         f"bias in each stack's first block), so they must always run: {fix}")


def _get(obj: object, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def registry_key(model: nn.Module) -> str:
    """What ``register_layer_stack`` is keyed by: the config's ``model_type``, else the model's class name."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _spec(model: nn.Module) -> StackSpec | None:
    return REGISTRY.get(registry_key(model))


def _layer_counts(model: nn.Module) -> set[int]:
    cfg = getattr(model, "config", None)
    return {v for k in LAYER_COUNT_KEYS if isinstance(v := getattr(cfg, k, None), int) and v > 0}


def discover_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every outermost ``nn.ModuleList`` (or ``nn.ModuleDict``, as a list view of its values) of
    same-class layers whose length is a config layer count.

    A model with no config layer count (plain PyTorch): its one outermost ``nn.ModuleList`` of two
    or more same-class layers, if there is exactly one (several would be a guess), and none if it
    holds a model with a config (a wrapper, e.g. a LightningModule: that inner model is the one to wrap)."""
    counts = _layer_counts(model)
    if not counts and any(_layer_counts(m) for m in model.modules() if m is not model):
        return []
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleDict):  # torchtitan keeps its blocks in a ModuleDict ("0", "1", ...)
            module = nn.ModuleList(module.values())  # a view: the layers stay where they are
        if not isinstance(module, nn.ModuleList) or (len(module) not in counts if counts else len(module) < 2):
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1 or next(iter(kinds)).__module__.startswith("torch.nn"):
            continue  # not a stack of transformer layers (a list of Linears, of experts' MLPs, ...)
        if any(name.startswith(f + ".") for f, _ in found):
            continue  # nested inside a stack already found (e.g. an MoE layer's experts)
        found.append((name, module))
    return found if counts or len(found) == 1 else []


def find_layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer layers (the thing RaPTr samples paths through).

    For an encoder-decoder it is one ``nn.ModuleList`` over the layers of both stacks (not a
    submodule of the model: the layers stay where they are, only the path spans both)."""
    if hasattr(model, "layer_stack"):
        return model.layer_stack()
    spec = _spec(model)
    if spec is not None and spec.refuse:
        raise RaptrError(spec.refuse)
    if spec is not None:
        for path in spec.paths:
            layers = _get(model, path)
            if isinstance(layers, nn.ModuleList):
                return layers
    stacks = discover_stacks(model)
    if len(stacks) == 1:
        return stacks[0][1]
    if stacks:
        return nn.ModuleList([layer for _, stack in stacks for layer in stack])
    name, key = type(model).__name__, registry_key(model)
    where = (f"{name} (model_type={key!r}) keeps its layers (no nn.ModuleList of same-class layers with the config's "
             "layer count)" if hasattr(model, "config") else f"{name} keeps its layers (not exactly one nn.ModuleList of "
             "same-class layers)")
    raise RaptrError(f"don't know where {where}: call raptr.register_layer_stack({key!r}, 'path.to.layers') or give "
                     "the model a layer_stack() method")


def is_joined_stack(model: nn.Module, layers: nn.ModuleList) -> bool:
    """Whether ``layers`` spans several stacks (encoder-decoder) rather than being one of the model's lists."""
    return not any(m is layers for m in model.modules())


def layer_shape(model: nn.Module) -> LayerShape:
    if hasattr(model, "flops"):
        return model.flops(1).layer
    spec = _spec(model)
    if spec is None or spec.shape is None:
        raise RaptrError(f"no analytic FLOPs shape for {type(model).__name__}: use model_flops (it measures one) or pass "
                         "shape= to raptr.register_layer_stack")
    return spec.shape(model.config)


_MEASURED: dict[tuple, MeasuredFlops] = {}


def measure_flops(model: nn.Module, seq_len: int, head_positions: float = 1.0) -> MeasuredFlops:
    """FLOPs of one forward, per layer and for the rest, counted by ``FlopCounterMode`` on a meta copy.

    The copy is built from ``model.config`` on the meta device (no memory, no compute) and run on a
    batch of one ``seq_len`` sequence with eager attention (whose matmuls the counter sees); the
    FLOPs outside the layers (the LM head on every position) are scaled by ``head_positions``."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = getattr(model, "config", None)
    if cfg is None:
        raise RaptrError(f"cannot measure the FLOPs of {type(model).__name__} (it has no config): pass shape= to "
                         "raptr.register_layer_stack")
    key = (type(model), cfg.to_json_string() if hasattr(cfg, "to_json_string") else repr(cfg), seq_len)
    if key not in _MEASURED:
        counts, total, twin = _count_forward(model, cfg, seq_len)
        where = {id(module): f"{type(twin).__name__}.{name}" for name, module in twin.named_modules()}
        names = [where[id(layer)] for layer in find_layer_stack(twin)]
        per_layer = [sum(counts.get(n, {}).values()) for n in names]
        _MEASURED[key] = MeasuredFlops(tuple(per_layer), total - sum(per_layer), seq_len)
    m = _MEASURED[key]
    return MeasuredFlops(m.layer_flops, m.rest_flops, seq_len, head_positions)


def _count_forward(model: nn.Module, cfg, seq_len: int):
    """(per-module counts, total, the module counted): a meta copy, or else the model itself once.

    The meta copy costs nothing; models whose kernels refuse meta tensors (e.g. MoE grouped
    matmuls) are run for real on one sequence of zeros, under no_grad, with eager attention."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.zeros(1, seq_len, dtype=torch.long)
    inputs = {"input_ids": ids}
    if getattr(cfg, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    meta_cfg = copy.deepcopy(cfg)
    if hasattr(meta_cfg, "_attn_implementation"):
        meta_cfg._attn_implementation = "eager"
    errors = []
    try:
        with torch.device("meta"):
            twin = type(model)(meta_cfg).eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            twin(**{k: v.to("meta") for k, v in inputs.items()})
        return counter.get_flop_counts(), counter.get_total_flops(), twin
    except Exception as e:
        errors.append(f"meta copy: {type(e).__name__}: {str(e)[:100]}")
    impl = getattr(cfg, "_attn_implementation", None)
    was_training = model.training
    try:
        if impl is not None:
            cfg._attn_implementation = "eager"
        device = next(model.parameters()).device
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.eval()(**{k: v.to(device) for k, v in inputs.items()})
        return counter.get_flop_counts(), counter.get_total_flops(), model
    except Exception as e:
        errors.append(f"the model itself: {type(e).__name__}: {str(e)[:100]}")
    finally:
        model.train(was_training)
        if impl is not None:
            cfg._attn_implementation = impl
    raise RaptrError(f"could not measure {type(model).__name__}'s FLOPs ({'; '.join(errors)}): pass shape= to "
                     "raptr.register_layer_stack")


def model_flops(model: nn.Module, seq_len: int, head_positions: float = 1.0) -> ModelFlops | MeasuredFlops:
    """FLOPs model of a whole network (layers + LM head) for one sequence length: analytic where the
    registry has the architecture's shape, measured (``measure_flops``) otherwise."""
    if hasattr(model, "flops"):
        return model.flops(seq_len, head_positions)
    spec = _spec(model)
    if spec is None or spec.shape is None:
        return measure_flops(model, seq_len, head_positions)
    cfg = model.config
    return ModelFlops(layer_shape(model), len(find_layer_stack(model)), seq_len, cfg.vocab_size, head_positions,
                      head_transform=bool(spec and spec.head_transform))
