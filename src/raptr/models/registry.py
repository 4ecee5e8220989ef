"""Where each architecture keeps its layer stack, and the shape of one layer (for FLOPs).

Hugging Face models are found by ``config.model_type``; models of our own (or yours) can
instead define ``layer_stack() -> nn.ModuleList``. To add an architecture::

    raptr.register_layer_stack("mymodel", "model.blocks", shape=lambda cfg: LayerShape(...))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from raptr.errors import RaptrError
from raptr.flops import LayerShape, ModelFlops


@dataclass(frozen=True)
class StackSpec:
    paths: tuple[str, ...]  # attribute paths tried in order (task model, then base model)
    shape: Callable[[object], LayerShape] | None = None
    head_transform: bool = False  # BERT-style d×d transform before the vocabulary projection
    # Layers that return tuples and thread values through the stack: output index -> the argument
    # a skipped layer passes on in its place (T5: the position biases block 0 computes for all).
    passthrough: tuple[tuple[int, str], ...] = ()
    must_run: tuple[int, ...] = ()  # layers that compute state the others need: never skipped


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
    # T5: the encoder's blocks (the decoder runs in full). Block 0 computes the relative position
    # bias that every later block is given, so it always runs and skipped blocks pass it on.
    "t5": StackSpec(("encoder.block",), passthrough=((1, "position_bias"), (2, "encoder_decoder_position_bias")),
                    must_run=(0,)),
}


def register_layer_stack(model_type: str, path: str | tuple[str, ...], shape: Callable[[object], LayerShape] | None = None,
                         passthrough: dict[int, str] | None = None, must_run: tuple[int, ...] = ()) -> None:
    """Teach raptr where ``config.model_type == model_type`` keeps its ``nn.ModuleList`` of layers.

    ``passthrough``: for layers returning tuples whose entries later layers consume, output index ->
    forward argument a skipped layer returns in its place; ``must_run``: layers never to skip."""
    REGISTRY[model_type] = StackSpec((path,) if isinstance(path, str) else tuple(path), shape,
                                     passthrough=tuple(sorted((passthrough or {}).items())), must_run=tuple(must_run))


def layer_contract(model: nn.Module) -> tuple[dict[int, str], tuple[int, ...]]:
    """(passthrough, must_run) of the model's layer stack (empty for most architectures)."""
    spec = _spec(model)
    return (dict(spec.passthrough), spec.must_run) if spec else ({}, ())


def check_must_run(model: nn.Module, always_run: tuple[int, ...] | list[int], option: str) -> None:
    """Refuse a configuration that could skip a layer the architecture needs every step."""
    _, must = layer_contract(model)
    missing = [i for i in must if i not in always_run]
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise RaptrError(f"{model_type} layer(s) {missing} compute state every other layer uses (e.g. T5's position "
                         f"bias in block 0), so they must always run: set {option} to include {missing} "
                         "(e.g. 'first,last')")


def _get(obj: object, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _spec(model: nn.Module) -> StackSpec | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return REGISTRY.get(model_type) if model_type else None


def find_layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer layers (the thing RaPTr samples paths through)."""
    if hasattr(model, "layer_stack"):
        return model.layer_stack()
    spec = _spec(model)
    if spec is not None:
        for path in spec.paths:
            layers = _get(model, path)
            if isinstance(layers, nn.ModuleList):
                return layers
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    raise RaptrError(
        f"don't know where {name} (model_type={model_type!r}) keeps its layers: call "
        f"raptr.register_layer_stack({model_type!r}, 'path.to.layers') or give the model a layer_stack() method"
    )


def layer_shape(model: nn.Module) -> LayerShape:
    if hasattr(model, "flops"):
        return model.flops(1).layer
    spec = _spec(model)
    if spec is None or spec.shape is None:
        raise RaptrError(f"no FLOPs shape known for {type(model).__name__}: pass shape= to raptr.register_layer_stack")
    return spec.shape(model.config)


def model_flops(model: nn.Module, seq_len: int, head_positions: float = 1.0) -> ModelFlops:
    """FLOPs model of a whole network (layers + LM head) for one sequence length."""
    if hasattr(model, "flops"):
        return model.flops(seq_len, head_positions)
    spec = _spec(model)
    cfg = model.config
    return ModelFlops(layer_shape(model), len(find_layer_stack(model)), seq_len, cfg.vocab_size, head_positions,
                      head_transform=bool(spec and spec.head_transform))
