"""What every host integration shares: finding the model, building a method's options, counting FLOPs."""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from raptr.errors import RaptrError
from raptr.methods.base import Method, StepInfo
from raptr.methods.host import Host, make_method
from raptr.models.registry import find_layer_stack, model_flops

FLOPS_MODES = ("hf", "analytic", "off")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP(1) (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None) if not hasattr(model, "config") else None
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # DeepSpeed ZeRO-3 keeps the true size in ds_numel


def non_embedding_params(model: nn.Module, exclude_embeddings: bool) -> int:
    if hasattr(model, "num_parameters"):
        return int(model.num_parameters(exclude_embeddings=exclude_embeddings))
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                params.pop(id(module.weight), None)
    return sum(_numel(p) for p in params.values())


class PathFlops:
    """FLOPs of one forward+backward, counting only the layers that ran.

    ``"hf"``: the HF Trainer's convention, ``6 · tokens · (non-embedding params − params of skipped
    layers)``, equal to the Trainer's own count when every layer runs. ``"analytic"``:
    ``raptr.flops.ModelFlops`` (matmuls incl. attention scores and the LM head, 3× forward).
    """

    def __init__(self, model: nn.Module, mode: str):
        if mode not in FLOPS_MODES:
            raise RaptrError(f"unknown flops={mode!r}: use one of {', '.join(FLOPS_MODES)}")
        self.model, self.mode = model, mode
        if mode == "analytic":
            model_flops(model, 1)  # raises a RaptrError naming the fix if the shape is unknown
        self.recount()

    def recount(self) -> None:
        """Parameter counts of the model as it is now (call again after it grew)."""
        self.params = {flag: non_embedding_params(self.model, flag) for flag in (True, False)}
        self.layer_params = [sum(_numel(p) for p in layer.parameters()) for layer in find_layer_stack(self.model)]

    def __call__(self, ids, info: "StepInfo | None", exclude_embeddings: bool = True) -> int:
        """FLOPs for the token tensor ``ids`` (batch × seq) with this step's ``info`` (None or eval mode:
        the full model). Each layer counts with the share of it that ran (``StepInfo.fractions``)."""
        if self.mode == "off":
            return 0
        n = len(self.layer_params)
        shares = (1.0,) * n if info is None or not self.model.training else info.fractions(n)
        if self.mode == "analytic":
            batch = ids.numel() // ids.shape[-1] if ids.dim() > 1 else 1
            return int(model_flops(self.model, ids.shape[-1]).train_step(sum(shares), batch))
        idle = sum(params * (1.0 - share) for params, share in zip(self.layer_params, shares))
        return int(round(6 * ids.numel() * (self.params[bool(exclude_embeddings)] - idle)))


class Hosted:
    """What the HF and Lightning callbacks share: the method built (and its options checked) at
    construction, and the ``raptr.Host`` that runs it while training."""

    host: Host | None = None

    def _build(self, method: str, seed: int, flops: str, seq_len: int | None, options: dict, who: str) -> None:
        if flops not in FLOPS_MODES:
            raise RaptrError(f"unknown flops={flops!r}: use one of {', '.join(FLOPS_MODES)}")
        built = make_method(method, options, who)  # options checks that need no model fail here
        if type(built).needs_seq_len and seq_len is None:
            raise RaptrError(f"the {method} method prices attention by the sequence length: pass seq_len= (the tokens "
                             "per training sequence, e.g. your tokenizer's max_length)")
        self.method_cls, self.options = type(built), built.options
        self.method_name, self.seed, self.flops, self.seq_len = method, int(seed), flops, seq_len
        self.host = None

    @property
    def method(self) -> Method | None:
        """The attached method while training (None before and after)."""
        return self.host.method if self.host is not None else None

    @property
    def last(self) -> StepInfo | None:
        """The ``StepInfo`` of the latest step."""
        return self.host.last if self.host is not None else None
