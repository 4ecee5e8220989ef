"""What a gated layer call must honour in the libraries models come from (mostly transformers).

``raptr.core.LayerGate`` decides whether a layer runs; this module makes a skipped or a run layer
look, to the rest of the model, exactly as it would without raptr:

- **Output structure.** A skipped layer returns what a run one would: its input as the hidden state
  and, for a layer that returns a tuple (Falcon, Bloom, T5, every layer of transformers 4.x), the
  same tuple, whose other entries are None or, where the architecture threads values through its
  layers (T5's position biases), the value the layer was given (``passthrough``: output index ->
  argument name, from the model registry). Each layer learns its output structure from its own
  calls (any mode, any path); one skipped before it ever ran takes that of a layer of the same
  class in its stack that has, and only if none has, runs once without gradients to learn it.
- **Collected outputs.** transformers 5 gathers hidden states, attentions and MoE router logits with
  forward hooks, which a skipped layer never fires (``record_skipped``).
- **KV caches.** A fresh cache made for a training forward is not handed to the layers; cached
  decoding on a partial path in train mode is refused, whether the cache is an argument
  (``train_mode_cache``) or kept inside the layer, as litgpt does (``refuse_inner_cache``).

Every function takes the layer and keeps its bookkeeping in the layer's ``__dict__``
(``_gate_out_len``, ``_gate_stack``, ``_gate_passthrough``), never in its parameters or state dict.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from raptr.errors import RaptrError


def seen(layer: nn.Module, out: Any) -> Any:
    """Record what ``layer`` returned (a tuple's length, or 0 for a tensor) for it and its stack."""
    n = len(out) if isinstance(out, tuple) else 0
    layer.__dict__["_gate_out_len"] = n  # this instance's contract
    stack = layer.__dict__.get("_gate_stack")
    if stack is not None:
        stack[type(layer)] = n  # ... and its stack's, for siblings that have not run yet
    return out


def identity(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    """What a skipped ``layer`` returns: ``hidden``, in the structure the layer's own output has."""
    n = layer.__dict__.get("_gate_out_len")
    if n is None:
        n = (layer.__dict__.get("_gate_stack") or {}).get(type(layer))
    if n is None:  # neither it nor a sibling ever ran: learn what this layer returns from one real call
        with torch.no_grad():  # forward, not __call__: no hooks fire (no one sees a layer that "ran")
            seen(layer, layer.forward(*args, **kwargs))
        n = layer.__dict__["_gate_out_len"]
    if not n:
        return hidden
    passthrough = layer.__dict__.get("_gate_passthrough") or {}
    given = inspect.signature(layer.forward).bind_partial(*args, **kwargs).arguments if passthrough else {}
    return (hidden,) + tuple(given.get(passthrough[i]) if i in passthrough else None for i in range(1, n))


def record_skipped(layer: nn.Module, args: tuple, out: Any) -> None:
    """Keep outputs that transformers collects per layer aligned with the layers.

    transformers 5 gathers ``output_hidden_states`` / ``output_attentions`` / router logits with
    forward hooks (``transformers.utils.output_capturing``), which a skipped layer never fires.
    Fire the hidden-state and attention ones: the layer's own with its (identity) output, so
    ``hidden_states`` keeps L+1 entries (a skipped layer's output is its input), and its
    submodules' with None, so ``attentions`` has None where a layer was skipped. Everything else
    (MoE router logits, and with them the load-balancing loss) is gathered from the layers that
    ran only, as in the model without the skipped layers. No other hook sees a skipped layer.
    """
    for module in layer.modules():
        for hook in list(module._forward_hooks.values()):
            if getattr(hook, "__name__", "") != "output_capturing_hook":
                continue
            key = _captured_key(hook)
            if key == "hidden_states" and module is layer:
                hook(module, args, out)
            elif key is not None and key.endswith("attentions"):
                hook(module, args, out if module is layer else None)


def _captured_key(hook: Any) -> str | None:
    """Which output a transformers output-capturing hook collects (its closure's ``key``)."""
    code, cells = getattr(hook, "__code__", None), getattr(hook, "__closure__", None)
    if code is None or not cells or "key" not in code.co_freevars:
        return None
    value = cells[code.co_freevars.index("key")].cell_contents
    return value if isinstance(value, str) else None


CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # transformers 5.2x names it `cache`


@functools.lru_cache(maxsize=None)
def _cache_position(cls: type) -> int | None:
    """Index in ``forward``'s positional arguments (after self) of its KV-cache parameter, if it has one."""
    try:
        names = list(inspect.signature(cls.forward).parameters)[1:]
    except (TypeError, ValueError):
        return None
    return next((names.index(k) for k in CACHE_KWARGS if k in names), None)


def train_mode_cache(layer: nn.Module, args: tuple, kwargs: dict, hidden: Any, run: bool) -> tuple[tuple, dict]:
    """The KV cache a train-mode layer call gets: none, if the model made a fresh one for training.

    A training forward of an HF decoder builds an empty cache (``use_cache`` defaults to true) and
    each layer fills its entry; nothing reads it, a partial path leaves it incomplete, and a
    compiled layer would guard on which entries are filled (a graph per layer). So with gradients
    on, a fresh cache is not passed to the layers (``outputs.past_key_values`` stays empty). A
    cache that already holds positions means cached decoding (``generate``, which runs without
    gradients) in train mode: fine for a layer that runs, refused with one line for a skipped one
    (its entries would be missing or stale).
    """
    key = next((k for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    position = None
    if key is None:  # some layers take the cache positionally (GPT-2, BART, MPT)
        position = _cache_position(type(layer))
        if position is None or position >= len(args) or args[position] is None:
            return args, kwargs
    cache = kwargs[key] if key is not None else args[position]
    if not hasattr(cache, "get_seq_length") or not torch.is_tensor(hidden) or hidden.dim() != 3:
        return args, kwargs
    inner = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder's: its decoder self-attention part
    layers = getattr(inner, "layers", None)
    cached = max([entry.get_seq_length() for entry in layers], default=0) if layers else inner.get_seq_length()
    if cached == 0 and torch.is_grad_enabled():
        if key is not None:
            return args, {**kwargs, key: None}
        return args[:position] + (None,) + args[position + 1:], kwargs
    if not run and cached > hidden.shape[1]:
        raise RaptrError("cached decoding (generate / past_key_values) with a partial RaPTr path in train mode would "
                         "give wrong logits: call model.eval() before generating (eval runs every layer), or "
                         "pass use_cache=False")
    return args, kwargs


def refuse_inner_cache(layer: nn.Module) -> None:
    """A layer that keeps its KV cache inside it (litgpt's ``attn.kv_cache``, set for decoding) gets no
    cache argument to look at: on a partial path in train mode its cached keys/values would go stale
    or be read by a different path than wrote them. Refused with one line, whatever keeps them."""
    for module in layer.modules():  # every partial-path training call: no names until one is found
        for key, child in module._modules.items():
            if child is not None and "cache" in key.lower():
                name = next(n for n, m in layer.named_modules() if m is module)
                where = f"{name}.{key}" if name else key
                raise RaptrError(f"a wrapped layer keeps a KV cache inside it ({type(layer).__name__}.{where}), which a "
                                 "partial RaPTr path in train mode would leave stale: decode in eval mode (every layer "
                                 "runs), or clear the cache before training (litgpt: model.clear_kv_cache())")
