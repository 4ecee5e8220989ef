"""Width subnetworks (RaPTr v2, "Random Part Training"): random heads and FFN units per step.

At every optimizer step each layer trains a random subset of its attention heads and a random
subset of its FFN hidden units; the kept fraction grows stage by stage (``"0.5-0.75-1"``) until
the last stage trains the full model. The full model is kept throughout (principle P1).

    wr = WidthRaPTr(model, "0.5-0.75-1", total_steps=10_000, seed=0, scaling="none")
    for step in range(10_000):
        plan = wr.step(step)          # this step's heads/units per layer; smaller matmuls
        model(batch).loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)

How (see docs/width.md for the choices and why):

* **Real savings, no masks.** The projections that *produce* heads/units (q, k, v / fused qkv;
  fc1, gate, up) compute only the kept output rows, ``F.linear(x, W.index_select(0, idx), b[idx])``;
  the projections that *consume* them (attention output, fc2, down) use only the kept input
  columns, ``F.linear(h, s * W.index_select(1, idx), b)``. Attention runs on the kept heads only.
  The matmuls and the attention scores shrink with the kept fraction.
* **In place, keys unchanged.** The ``nn.Linear`` modules get a subclass of their own class
  (``WidthLinear``) whose ``forward`` slices; the reference ``Block`` gets one whose ``attention``
  reads the head count from the sliced tensor. Names, parameters and state-dict keys are untouched;
  ``unwrap()`` gives the classes back. HF attention code is not replaced: BERT and Llama reshape
  with ``view(..., -1, head_dim)``, so fewer heads pass through their own forward (eager, sdpa or
  flash) unchanged.
* **Gradients.** Autograd of ``index_select`` scatters the slice's gradient back into a
  full-size zero tensor: kept rows/columns get exactly the gradient of the small layer, the others
  get **zero** (not ``None``; one tensor per parameter cannot be partly ``None``). AdamW then still
  decays their moments and moves them along their old momentum and by weight decay; ``freeze_idle``
  (opt-in) undoes that for the idle slices, which is what depth skipping gets for free.
* **Sampling.** One subset per layer per optimizer step, from ``core.step_generator(seed, step,
  stream)`` with streams of their own (``HEADS_STREAM``, ``UNITS_STREAM``), apart from depth
  sampling (stream 0) and the trainer's (1, 2): depth and width combine, every rank draws the same
  subsets, resume needs no RNG state. Subsets have a fixed size ``k = f·n``; a fractional ``f·n``
  is rounded up with probability ``frac(f·n)``, so expected FLOPs are exactly the schedule's.
  With grouped-query attention the unit of sampling is a KV group (one KV head and its
  ``n_heads / n_kv_heads`` query heads), so queries always keep their own keys and values.
* **Scaling** (``none | sqrt | linear``): the kept heads'/units' contribution to the sub-block
  output (the attention output projection / the FFN output projection, *not* its bias) is
  multiplied by ``1/f`` or ``1/sqrt(f)``, ``f = k/n`` the realised kept fraction of that layer.
  Linear makes the sub-block output an unbiased estimate of the full one over random subsets.
* ``model.eval()`` runs the full model, unscaled; at fraction 1 nothing is sliced, so the outputs
  are bit-identical to the unwrapped model.

Supported layers: raptr's reference ``Block`` and the HF layer classes listed as data in
``raptr.models.registry.WIDTH_LAYERS`` (BERT, RoBERTa, XLM-R, ELECTRA self-attention; Llama, Mistral,
Qwen2, Qwen3, Gemma, Gemma2, Gemma3; OPT; Phi3 and GPT-2 with fused projections, GPT-2's as ``Conv1D``;
GPT-NeoX's fused projection grouped per head).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raptr.core import SCALINGS, Stage, Stages, branch_scale, parse_fixed, parse_numbers
from raptr.errors import RaptrError
from raptr.flops import LayerShape
from raptr.ranks import HEADS_STREAM, UNITS_STREAM, RankAgreement, step_generator


def _supported() -> str:
    from raptr.models.registry import WIDTH_LAYERS

    return "raptr's reference Block and " + ", ".join(WIDTH_LAYERS)

# --------------------------------------------------------------------------------------------
# 1. Schedule of kept fractions
# --------------------------------------------------------------------------------------------


class WidthSchedule:
    """Stages of kept width fractions, e.g. ``"0.5-0.75-1"``: the stage machinery of RaPTr's depth
    schedule (``core.Stages``: lengths, full-model warm-up, growth to the full model) with the kept
    fraction of heads and FFN units as each stage's value. Needs no layer count."""

    def __init__(self, fractions: Sequence[float], total_steps: int, stage_lengths: str | Sequence[float] = "equal",
                 full_warmup: float = 0, require_full_final: bool = True):
        self.spans = Stages(fractions, total_steps, stage_lengths, full_warmup, require_full_final, what="the fraction",
                            full_hint="end the width schedule at 1 (e.g. '0.5-0.75-1'), or pass "
                                      "WidthRaPTr(require_full_final=False) if that is intended", example="0.5-0.75-1")
        self.stages: tuple[Stage, ...] = self.spans.spans
        self.total_steps, self.full_warmup_steps = total_steps, self.spans.full_warmup_steps

    @classmethod
    def parse(cls, spec: str | Sequence[float], total_steps: int, **kwargs: Any) -> "WidthSchedule":
        if not isinstance(spec, str):
            return cls(list(spec), total_steps, **kwargs)
        body = spec.strip().replace(" ", "")
        return cls(parse_numbers(body, spec, "write kept fractions per stage like '0.5-0.75-1'", "width schedule"), total_steps, **kwargs)

    def stage_at(self, step: int) -> Stage:
        return self.stages[self.spans.index_at(step)]

    def fraction(self, step: int) -> float:
        return self.stage_at(step).fraction

    @property
    def boundaries(self) -> list[int]:
        return self.spans.boundaries

    def __repr__(self) -> str:
        return "WidthSchedule(" + ", ".join(f"[{s.start},{s.end}) f={s.fraction:g}" for s in self.stages) + ")"


# --------------------------------------------------------------------------------------------
# 2. Sliced linears and layer adapters
# --------------------------------------------------------------------------------------------


class WidthLinear:
    """Mixin put in front of an ``nn.Linear``'s (or transformers ``Conv1D``'s) class: computes with a
    slice of its weight.

    ``_width_dim`` 0: only the output features ``_width_idx`` (rows of W and bias entries);
    ``_width_dim`` 1: only the input features ``_width_idx`` (columns of W), the kept
    contribution scaled by ``_width_scale``, the bias added in full. ``None`` or eval mode: the
    module's own forward. ``_transposed``: the weight is stored (in, out), as ``Conv1D`` does; the
    slice is taken from its transposed view, so both compute ``F.linear`` on the kept part only.
    """

    _width_idx: torch.Tensor | None = None
    _width_dim: int = 0
    _width_scale: float = 1.0
    _transposed: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self._width_idx
        if idx is None or not self.training:
            return super().forward(x)
        w = self.weight.t() if self._transposed else self.weight  # (out, in)
        if self._width_dim == 0:
            bias = None if self.bias is None else self.bias.index_select(0, idx)
            return F.linear(x, w.index_select(0, idx), bias)
        weight = w.index_select(1, idx)
        if self._width_scale != 1.0:
            weight = weight * self._width_scale  # a d×k tensor: cheaper than scaling activations
        return F.linear(x, weight, self.bias)

    def width_params(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, sliced dim) pairs: what ``_width_idx`` indexes."""
        out = [(self.weight, 1 - self._width_dim if self._transposed else self._width_dim)]
        if self._width_dim == 0 and self.bias is not None:
            out.append((self.bias, 0))
        return out


class WidthNorm:
    """Mixin put in front of a norm over all heads' outputs at once (OLMo2's q/k RMSNorm): with
    ``_width_idx`` set, in training, the module's own forward runs on the kept heads' outputs with the
    kept slice of its weight, so its statistic spans the kept heads, as in a model with only those."""

    _width_idx: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self._width_idx
        if idx is None or not self.training:
            return super().forward(x)
        weight = self.weight.index_select(0, idx)
        self._width_idx = None  # functional_call runs this forward again, now as the plain norm
        try:
            return torch.func.functional_call(self, {"weight": weight}, (x,))
        finally:
            self._width_idx = idx

    def width_params(self) -> list[tuple[nn.Parameter, int]]:
        return [(self.weight, 0)]


def _features(lin: nn.Module) -> tuple[int, int]:
    """(in, out) features of an nn.Linear or a transformers Conv1D (weight stored (in, out))."""
    if isinstance(lin, nn.Linear):
        return lin.in_features, lin.out_features
    return lin.nx, lin.nf


def _plain(lin: nn.Module, conv1d: bool, classes: tuple[str, ...] = ()) -> bool:
    """Is ``lin`` a plain linear of the kind the spec names (not quantized, not LoRA-wrapped)? ``classes``:
    nn.Linear subclasses whose own forward computes x W^T + b as nn.Linear does (e.g. FalconLinear)."""
    forward = type(lin).forward
    if forward is WidthLinear.forward:
        forward = next(c.forward for c in type(lin).__mro__[1:] if c is not WidthLinear and "forward" in c.__dict__)
    if conv1d:
        return any(c.__name__ == "Conv1D" and c.__dict__.get("forward") is forward for c in type(lin).__mro__)
    own = any(c.__name__ in classes and c.__dict__.get("forward") is forward for c in type(lin).__mro__)
    return isinstance(lin, nn.Linear) and (forward is nn.Linear.forward or own)


class WidthBlock:
    """Mixin for raptr's reference ``Block``: attention with as many heads as the qkv slice has."""

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        if self.qkv._width_idx is None or not self.training:
            return super().attention(x, mask, causal)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, -1, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


_CLASSES: dict[tuple[type, type], type] = {}


def _swapped(cls: type, mixin: type) -> type:
    if issubclass(cls, mixin):
        return cls
    key = (mixin, cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Width{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _CLASSES[key]


def _resolve(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _expand(groups: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the ``size`` consecutive entries of each group: [g*size, (g+1)*size)."""
    return (groups[:, None] * size + torch.arange(size)).reshape(-1)


class _ConfigView:
    """A per-module stand-in for a shared (HF) config: reads go to the shared config, except the
    attributes set on the view itself (the head counts a width-sliced attention must see)."""

    def __init__(self, base: Any):
        object.__setattr__(self, "_base", base)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_base"), name)


class WidthLayer:
    """One layer's sliceable parts: which linears produce/consume heads and units, and its shape."""

    def __init__(self, layer: nn.Module):
        from raptr.models.reference import Block

        self.layer = layer
        name = type(layer).__name__
        self.original_classes: dict[nn.Module, type] = {}
        self.follow: list[tuple[Any, str, str, Any]] = []  # (owner, attribute, what it counts, full value)
        self.restore: list[tuple[Any, str, Any]] = []  # config views to take off again on unwrap
        self.hooks: list = []
        conv1d, spec = False, None
        if isinstance(layer, Block):
            self.kind = "reference"
            self.head_out, self.head_in = [layer.qkv], layer.proj
            self.unit_out, self.unit_in = [layer.fc1], layer.fc2
            self.gated, self.fused_heads, self.fused_units = False, True, False
            self.interleaved, self.norms = False, []
        else:  # per-architecture knowledge is data: raptr.models.registry.WIDTH_LAYERS
            from raptr.models.registry import width_spec

            spec = width_spec(layer)
            if spec is None:
                raise RaptrError(f"width subnetworks don't support {name} layers: supported are {_supported()}")
            for attr in spec.absent:
                if getattr(layer, attr, None) is not None:
                    raise RaptrError(f"{name} with {attr} is not supported by width subnetworks: "
                                     "use an encoder (add_cross_attention=False)")
            for path, value, meaning in spec.requires:
                if _resolve(layer, path) != value:
                    raise RaptrError(f"{name} with {path.rsplit('.', 1)[-1]}={_resolve(layer, path)!r} is not supported by "
                                     f"width subnetworks: they support {meaning} only")
            get = layer.get_submodule
            self.kind, conv1d, self.gated = "hf", spec.conv1d, spec.gated
            self.head_out, self.head_in = [get(p) for p in spec.head_out], get(spec.head_in)
            self.unit_out, self.unit_in = [get(p) for p in spec.unit_out], get(spec.unit_in)
            self.fused_heads, self.fused_units = len(self.head_out) == 1, spec.fused_units
            self.interleaved = spec.interleaved
            self.norms = [(get(path), rows) for path, rows in spec.norms]
        # Everything is checked before anything is changed: a refused layer is left as it was.
        for lin in self.linears():
            if not _plain(lin, conv1d, spec.linear_classes if spec is not None else ()):
                kind = "transformers Conv1D" if conv1d else "nn.Linear"
                raise RaptrError(f"{name}.{type(lin).__name__} is not a plain {kind} (quantized, LoRA?): "
                                 f"width subnetworks slice plain {kind} weights only")
        if spec is None:
            self.n_heads = self.n_kv = layer.n_heads
            self.head_dim = layer.qkv.in_features // layer.n_heads
        else:
            self.head_dim = int(_resolve(layer, spec.head_dim))
            if self.fused_heads:  # one projection, rows [q | k | v]: head counts from the layer
                self.n_heads = int(_resolve(layer, spec.n_heads))
                self.n_kv = int(_resolve(layer, spec.n_kv_heads or spec.n_heads))
            else:
                self.n_heads = _features(self.head_out[0])[1] // self.head_dim
                self.n_kv = _features(self.head_out[1])[1] // self.head_dim
        self.d_model = _features(self.head_in)[1]
        self.d_ff = _features(self.unit_in)[0]
        self.n_rep = self.n_heads // self.n_kv  # query heads per KV group (1 without GQA)
        # One KV head shared by all (multi-query): the query heads are the unit of sampling, K and V always
        # kept, where the layer's attention follows the kept heads per KV group ("rep"); else KV groups are.
        follows = [what for _, what in (spec.follow if spec is not None else ())]
        self.mqa = self.n_kv == 1 and self.n_heads > 1 and "rep" in follows
        self.head_units = self.n_heads if self.mqa else self.n_kv
        fused = _features(self.head_out[0])[1]
        if self.interleaved and self.n_rep != 1:
            raise RaptrError(f"{name}: a fused projection grouped per head is supported without grouped-query attention only")
        if self.fused_heads and fused != (self.n_heads + 2 * self.n_kv) * self.head_dim:
            raise RaptrError(f"{name}: the fused q|k|v projection has {fused} outputs, not (heads {self.n_heads} + 2 x kv "
                             f"{self.n_kv}) x head_dim {self.head_dim}: its config and weights disagree")
        if self.fused_units and _features(self.unit_out[0])[1] != 2 * self.d_ff:
            raise RaptrError(f"{name}: the fused gate|up projection does not have 2 x {self.d_ff} outputs")
        if self.norms and self.fused_heads:
            raise RaptrError(f"{name}: norms over the heads are sliced with separate q and k projections only")
        for norm, which in self.norms:
            width = (self.n_heads if which == "q" else self.n_kv) * self.head_dim
            weight = getattr(norm, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.shape != (width,) or getattr(norm, "bias", None) is not None:
                raise RaptrError(f"{name}.{type(norm).__name__}: width subnetworks slice norms with one weight of the "
                                 f"projection's width ({width}) and no bias")
        self._kept = {"heads": self.n_heads, "kv_heads": self.n_kv, "q_width": self.n_heads * self.head_dim, "rep": self.n_rep}
        try:
            for path, what in (spec.follow if spec is not None else ()):
                self._follow(layer, path, what)
            for lin in self.head_out + self.unit_out:
                self._swap(lin, WidthLinear)._set(lin, dim=0, transposed=conv1d)
            for lin in (self.head_in, self.unit_in):
                self._swap(lin, WidthLinear)._set(lin, dim=1, transposed=conv1d)
            for norm, _ in self.norms:
                self._swap(norm, WidthNorm)
                norm._width_idx = None
            if self.kind == "reference":
                self._swap(layer, WidthBlock)
        except BaseException:
            self.unwrap()
            raise

    def _follow(self, layer: nn.Module, path: str, what: str) -> None:
        """Attribute ``path`` (e.g. ``self_attn.num_key_value_heads``) counts ``what`` of the kept
        heads during sliced forwards: hooks on the module owning it set it to the kept count before
        each sliced forward and back to the full count after it (and in eval mode). A config on the
        way is replaced, for this module only, by a ``_ConfigView`` that reads through to the shared
        config for everything else, so other layers and later config changes are unaffected."""
        *parts, attr = path.split(".")
        obj, module = layer, layer
        for part in parts:
            child = getattr(obj, part)
            if not isinstance(child, nn.Module):
                if not isinstance(child, _ConfigView):
                    view = _ConfigView(child)
                    self.restore.append((obj, part, child))
                    setattr(obj, part, view)
                    child = view
            else:
                module = child
            obj = child
        self.follow.append((obj, attr, what, getattr(obj, attr)))
        if not any(h[0] is module for h in self.hooks):
            self.hooks.append((module, module.register_forward_pre_hook(self._set_counts)))
            self.hooks.append((module, module.register_forward_hook(self._reset_counts)))

    def _set_counts(self, module: nn.Module, args: Any) -> None:
        sliced = module.training and self.head_in._width_idx is not None
        for owner, attr, what, full in self.follow:
            setattr(owner, attr, self._kept[what] if sliced else full)

    def _reset_counts(self, module: nn.Module, args: Any, output: Any) -> None:
        for owner, attr, _, full in self.follow:
            setattr(owner, attr, full)

    def _swap(self, module: nn.Module, mixin: type) -> "WidthLayer":
        self.original_classes.setdefault(module, type(module))
        module.__class__ = _swapped(type(module), mixin)
        return self

    @staticmethod
    def _set(lin: nn.Module, dim: int, transposed: bool) -> None:
        lin._width_dim, lin._width_idx, lin._width_scale, lin._transposed = dim, None, 1.0, transposed

    @property
    def shape(self) -> LayerShape:
        return LayerShape(self.d_model, self.n_heads, self.d_ff, n_kv_heads=self.n_kv, head_dim=self.head_dim,
                          gated_ffn=self.gated)

    def sub_shape(self, groups: float, units: float) -> LayerShape:
        """Shape of the subnetwork with ``groups`` head units (KV groups; query heads under multi-query) and
        ``units`` FFN units (may be expected values)."""
        heads, kv = (groups, 1) if self.mqa else (groups * self.n_rep, groups)
        return LayerShape(self.d_model, heads, units, n_kv_heads=kv, head_dim=self.head_dim, gated_ffn=self.gated)

    def linears(self) -> list[nn.Module]:
        return self.head_out + [self.head_in] + self.unit_out + [self.unit_in]

    def head_count(self, plan: "WidthPlan", i: int) -> int:
        """Layer ``i``'s kept head units in ``plan`` (what ``sub_shape`` takes)."""
        return plan.num_heads[i] if self.mqa else plan.num_kv_heads[i]

    def sliced(self) -> list[nn.Module]:
        """Every module computing with a slice: the linears and the norms over all heads."""
        return self.linears() + [norm for norm, _ in self.norms]

    def set_heads(self, groups: torch.Tensor | None, scale: float = 1.0) -> None:
        """Keep KV groups ``groups`` (sorted; = heads without GQA), or all heads if ``None``."""
        if groups is None:
            for lin in self.head_out + [self.head_in]:
                lin._width_idx, lin._width_scale = None, 1.0
            for norm, _ in self.norms:
                norm._width_idx = None
            return
        hd, device = self.head_dim, self.head_in.weight.device
        if self.mqa:  # ``groups`` are query heads; the one K and V head stays
            q_rows, kv_rows = _expand(groups, hd), torch.arange(hd)
            heads, kv = len(groups), 1
        else:
            q_rows = _expand(_expand(groups, self.n_rep), hd)  # query heads of the kept groups, then their rows
            kv_rows = _expand(groups, hd)
            heads, kv = len(groups) * self.n_rep, len(groups)
        if self.fused_heads and self.interleaved:  # rows [q_h | k_h | v_h] per head (no GQA)
            out = [_expand(groups, 3 * hd)]
        elif self.fused_heads:  # rows [q | k | v] of one projection
            q_end, k_end = self.n_heads * hd, (self.n_heads + self.n_kv) * hd
            out = [torch.cat([q_rows, kv_rows + q_end, kv_rows + k_end])]
        else:
            out = [q_rows, kv_rows, kv_rows]
        self._kept = {"heads": heads, "kv_heads": kv, "q_width": heads * hd, "rep": heads // kv}
        pieces = torch.cat(out + [q_rows]).to(device).split([len(t) for t in out] + [len(q_rows)])
        for lin, idx in zip(self.head_out, pieces[:-1]):
            lin._width_idx = idx
        self.head_in._width_idx, self.head_in._width_scale = pieces[-1], float(scale)
        for norm, which in self.norms:  # separate q and k projections (checked): their own row indices
            norm._width_idx = (q_rows if which == "q" else kv_rows).to(device)

    def set_units(self, units: torch.Tensor | None, scale: float = 1.0) -> None:
        """Keep FFN hidden units ``units`` (sorted), or all if ``None``."""
        idx = None if units is None else units.to(self.unit_in.weight.device)
        rows = idx if idx is None or not self.fused_units else torch.cat([idx, idx + self.d_ff])  # [gate | up]
        for lin in self.unit_out:
            lin._width_idx = rows
        self.unit_in._width_idx, self.unit_in._width_scale = idx, (1.0 if units is None else float(scale))

    def unwrap(self) -> None:
        for module, cls in self.original_classes.items():
            for attr in ("_width_idx", "_width_dim", "_width_scale", "_transposed"):
                module.__dict__.pop(attr, None)
            module.__class__ = cls
        for owner, attr, _, full in self.follow:
            setattr(owner, attr, full)
        for _, handle in self.hooks:
            handle.remove()
        for obj, part, original in reversed(self.restore):
            setattr(obj, part, original)
        self.original_classes, self.follow, self.hooks, self.restore = {}, [], [], []


# --------------------------------------------------------------------------------------------
# 3. Controller
# --------------------------------------------------------------------------------------------


def plan_hash(plan) -> int:
    h = plan.step
    for group in (plan.heads, plan.kv_heads, plan.units):
        for kept in group:
            for i in ([] if kept is None else kept.tolist()):
                h = (h * 1_000_003 + i + 1) % (2**61 - 1)
            h = (h * 31 + 7) % (2**61 - 1)
    return h


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields, not plans
class WidthPlan:
    """One step's subnetwork. Per layer: kept query heads / KV heads / FFN units (sorted
    LongTensors; ``None`` = all of them, nothing sliced), their counts, and the scales."""

    step: int
    stage: int
    fraction: float
    heads: tuple[torch.Tensor | None, ...]
    kv_heads: tuple[torch.Tensor | None, ...]
    units: tuple[torch.Tensor | None, ...]
    num_heads: tuple[int, ...]
    num_kv_heads: tuple[int, ...]
    num_units: tuple[int, ...]
    head_scales: tuple[float, ...]
    unit_scales: tuple[float, ...]


def _draw(n: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """A uniform random subset of range(n) of size f·n (stochastically rounded), sorted."""
    target = fraction * n
    k = int(target)
    if target - k > 1e-9:
        k += int(torch.rand((), generator=gen).item() < target - k)
    return torch.randperm(n, generator=gen)[:k].sort().values


class WidthRaPTr:
    """Random heads and FFN units per layer and step, kept fractions growing by stage.

    ``model_or_layers``: a model (its layer stack is found as in ``raptr.find_layer_stack``) or
    the ``nn.ModuleList`` of layers. ``schedule``: kept fraction per stage (``"0.5-0.75-1"``, a
    list, or a ``WidthSchedule``). ``fixed``: layers that always run at full width (default none).
    ``seq_len``: default sequence length for ``relative_flops`` (attention scores depend on it).
    Call ``step(step)`` once per optimizer step, before its forward passes. Under torch.distributed,
    every ``check_every`` steps (and at the first) one all-reduce checks that all ranks drew the same
    heads and units (0: never; a ``raptr.Host`` checks instead).
    """

    def __init__(self, model_or_layers: nn.Module | Sequence[nn.Module], schedule: str | Sequence[float] | WidthSchedule = "0.5-0.75-1",
                 total_steps: int | None = None, seed: int = 0, scaling: str = "none", heads: bool = True,
                 ffn: bool = True, *, fixed: str | Sequence[int] | None = "none", stage_lengths: str | Sequence[float] = "equal",
                 full_warmup: float = 0, require_full_final: bool = True, seq_len: int = 128, check_every: int = 50):
        if scaling not in SCALINGS:
            raise RaptrError(f"unknown scaling {scaling!r}: use one of {', '.join(SCALINGS)}")
        if not (heads or ffn):
            raise RaptrError("width subnetworks with heads=False and ffn=False sample nothing: enable heads and/or ffn")
        if isinstance(schedule, WidthSchedule):
            self.schedule = schedule
        else:
            if total_steps is None:
                raise RaptrError("a width schedule needs total_steps: WidthRaPTr(model, '0.5-0.75-1', total_steps=...)")
            self.schedule = WidthSchedule.parse(schedule, total_steps, stage_lengths=stage_lengths,
                                                full_warmup=full_warmup, require_full_final=require_full_final)
        layers = self._layer_list(model_or_layers)
        self.fixed = parse_fixed(fixed, len(layers))
        self.seed, self.scaling, self.heads, self.ffn, self.seq_len = int(seed), scaling, bool(heads), bool(ffn), seq_len
        self.agreement = RankAgreement(check_every)  # under torch.distributed: all ranks, same heads and units
        self.layers: list[WidthLayer] = []
        try:
            for layer in layers:
                self.layers.append(WidthLayer(layer))
            self._check_fractions()
        except BaseException:
            self.unwrap()  # a failed wrap leaves the layers as they were
            raise
        self.last_plan: WidthPlan | None = None

    @staticmethod
    def _layer_list(obj: Any) -> list[nn.Module]:
        if isinstance(obj, (nn.ModuleList, nn.Sequential, list, tuple)):
            layers = list(obj)
        elif isinstance(obj, nn.Module):
            try:
                from raptr.models.registry import find_layer_stack

                layers = list(find_layer_stack(obj))
            except RaptrError:
                layers = [obj]  # a single layer (reported below if unsupported)
        else:
            raise RaptrError(f"expected a model or its nn.ModuleList of layers, got {type(obj).__name__}")
        if not layers:
            raise RaptrError("no layers to wrap: give a model or a non-empty nn.ModuleList of layers")
        return layers

    def _check_fractions(self) -> None:
        for stage in self.schedule.stages:
            f = stage.fraction
            if f >= 1.0:
                continue
            for i, wl in enumerate(self.layers):
                if i in self.fixed:
                    continue
                if self.heads and f * wl.head_units < 1:
                    unit = "KV groups" if wl.n_rep > 1 and not wl.mqa else "heads"
                    raise RaptrError(f"kept fraction {f:g} keeps {f * wl.head_units:g} of layer {i}'s {wl.head_units} {unit}, less "
                                     f"than one: use fractions >= {1 / wl.head_units:g}, or heads=False")
                if self.ffn and f * wl.d_ff < 1:
                    raise RaptrError(f"kept fraction {f:g} keeps less than one of layer {i}'s {wl.d_ff} FFN units: use a larger fraction")

    def __len__(self) -> int:
        return len(self.layers)

    # ---- sampling -------------------------------------------------------------------------

    def plan(self, step: int) -> WidthPlan:
        """The subnetwork of ``step`` (pure: depends on seed and step only; touches nothing)."""
        stage = self.schedule.stage_at(step)
        f = stage.fraction
        gen_h = step_generator(self.seed, step, HEADS_STREAM)
        gen_u = step_generator(self.seed, step, UNITS_STREAM)
        heads, kv, units, nh, nkv, nu, hs, us = [], [], [], [], [], [], [], []
        for i, wl in enumerate(self.layers):
            sampled = f < 1.0 and i not in self.fixed
            groups = _draw(wl.head_units, f, gen_h) if (sampled and self.heads) else None  # KV groups, or MQA's query heads
            u = _draw(wl.d_ff, f, gen_u) if (sampled and self.ffn) else None
            if wl.mqa:
                heads.append(groups)
                kv.append(None if groups is None else torch.zeros(1, dtype=torch.long))
            else:
                kv.append(groups)
                heads.append(None if groups is None else _expand(groups, wl.n_rep))
            units.append(u)
            nkv.append(wl.n_kv if kv[-1] is None else len(kv[-1]))
            nh.append(wl.n_heads if heads[-1] is None else len(heads[-1]))
            nu.append(wl.d_ff if u is None else len(u))
            hs.append(branch_scale((wl.head_units if groups is None else len(groups)) / wl.head_units, self.scaling))
            us.append(branch_scale(nu[-1] / wl.d_ff, self.scaling))
        return WidthPlan(step, stage.index, f, tuple(heads), tuple(kv), tuple(units), tuple(nh), tuple(nkv), tuple(nu),
                         tuple(hs), tuple(us))

    def apply(self, plan: WidthPlan) -> None:
        """Make the layers compute ``plan``'s subnetwork (train mode) until the next call."""
        if len(plan.kv_heads) != len(self.layers):
            raise RaptrError(f"plan has {len(plan.kv_heads)} layers, the model {len(self.layers)}")
        for wl, heads, groups, units, hs, us in zip(self.layers, plan.heads, plan.kv_heads, plan.units, plan.head_scales,
                                                    plan.unit_scales):
            wl.set_heads(heads if wl.mqa else groups, hs)
            wl.set_units(units, us)
        self.last_plan = plan

    def step(self, step: int) -> WidthPlan:
        plan = self.plan(step)
        self.agreement(step, plan_hash(plan), "heads/FFN units")
        self.apply(plan)
        return plan

    def full(self) -> None:
        """Full width, unscaled, also in train mode."""
        for wl in self.layers:
            wl.set_heads(None)
            wl.set_units(None)
        self.last_plan = None

    def unwrap(self) -> None:
        """Give the layers and linears their own classes back (undo depth wrapping after this)."""
        for wl in self.layers:
            wl.unwrap()

    # ---- FLOPs ----------------------------------------------------------------------------

    def full_layer_flops(self, seq_len: int | None = None) -> int:
        """Forward FLOPs of all layers at full width for one sequence (LayerShape convention)."""
        T = seq_len or self.seq_len
        return sum(wl.shape.forward_flops(T) for wl in self.layers)

    def layer_flops(self, plan: WidthPlan | int, seq_len: int | None = None) -> float:
        """Forward FLOPs of all layers of a step's subnetwork for one sequence."""
        plan = self.plan(plan) if isinstance(plan, int) else plan
        T = seq_len or self.seq_len
        return sum(wl.sub_shape(wl.head_count(plan, i), u).forward_flops(T)
                   for i, (wl, u) in enumerate(zip(self.layers, plan.num_units)))

    def relative_flops(self, step: int | WidthPlan | None = None, seq_len: int | None = None) -> float:
        """Layer FLOPs relative to the full model: of one step's subnetwork (``step`` given), or
        expected over the whole schedule (``step=None``). Training = 3× forward for both, so the
        ratio holds for training steps too. Embeddings and the LM head are not counted."""
        T = seq_len or self.seq_len
        full = self.full_layer_flops(T)
        if step is not None:
            return self.layer_flops(step, T) / full
        total = 0.0
        for stage in self.schedule.stages:
            total += stage.steps * self.expected_layer_flops(stage.fraction, T)
        return total / (self.schedule.total_steps * full)

    def expected_layer_flops(self, fraction: float, seq_len: int | None = None) -> float:
        """Expected forward FLOPs of all layers at kept ``fraction`` (exact: FLOPs are linear in
        the kept counts and the stochastic rounding keeps f·n in expectation)."""
        T = seq_len or self.seq_len
        out = 0.0
        for i, wl in enumerate(self.layers):
            sampled = fraction < 1.0 and i not in self.fixed
            g = fraction * wl.head_units if (sampled and self.heads) else wl.head_units
            u = fraction * wl.d_ff if (sampled and self.ffn) else wl.d_ff
            out += wl.sub_shape(g, u).forward_flops(T)
        return out

    # ---- optimizer -------------------------------------------------------------------------

    def _idle(self) -> Iterator[tuple[nn.Parameter, int, torch.Tensor]]:
        """(parameter, dim, idle indices) of every slice this step does not train."""
        for wl in self.layers:
            for lin in wl.sliced():
                idx = lin._width_idx
                if idx is None or not lin.training:
                    continue
                for param, dim in lin.width_params():
                    keep = torch.ones(param.shape[dim], dtype=torch.bool, device=idx.device)
                    keep[idx] = False
                    yield param, dim, keep.nonzero().squeeze(1)

    @contextmanager
    def freeze_idle(self, optimizer: torch.optim.Optimizer):
        """Around ``optimizer.step()``: idle heads/units keep their weights and optimizer moments.

        Opt-in. Without it AdamW sees zero gradients on idle slices: their moments decay and they
        move by their old momentum and weight decay. With it they are restored after the step
        (weights, and every state tensor of the parameter's shape, e.g. exp_avg, exp_avg_sq), as
        depth skipping leaves a skipped layer; only the per-tensor step count (bias correction)
        still advances. Costs a copy of the idle slices (~(1-f) of the layer weights, 3×).
        """
        saved = []
        with torch.no_grad():
            for param, dim, idle in self._idle():
                state = optimizer.state.get(param, {})
                moments = {k: v.index_select(dim, idle) for k, v in state.items()
                           if torch.is_tensor(v) and v.shape == param.shape}
                saved.append((param, dim, idle, param.index_select(dim, idle), moments))
        yield
        with torch.no_grad():
            for param, dim, idle, value, moments in saved:
                param.index_copy_(dim, idle, value)
                for k, v in optimizer.state.get(param, {}).items():
                    if torch.is_tensor(v) and v.shape == param.shape:
                        old = moments.get(k)
                        v.index_copy_(dim, idle, old if old is not None else torch.zeros_like(value))

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"seed": self.seed, "scaling": self.scaling, "heads": self.heads, "ffn": self.ffn,
                "fixed": list(self.fixed), "num_layers": len(self.layers),
                "stages": [(s.start, s.end, s.fraction) for s in self.schedule.stages]}

    def load_state_dict(self, state: dict) -> None:
        mine = [(s.start, s.end, s.fraction) for s in self.schedule.stages]
        if state["num_layers"] != len(self.layers) or [tuple(x) for x in state["stages"]] != mine:
            raise RaptrError("checkpoint was written with a different width schedule or model: resume with the same "
                             "schedule, total steps and number of layers")
        if (bool(state["heads"]), bool(state["ffn"]), tuple(state["fixed"])) != (self.heads, self.ffn, self.fixed):
            raise RaptrError(f"checkpoint samples heads={state['heads']}, ffn={state['ffn']}, fixed={state['fixed']}; this run "
                             f"heads={self.heads}, ffn={self.ffn}, fixed={list(self.fixed)}: resume with the same options")
        if (int(state["seed"]), state["scaling"]) != (self.seed, self.scaling):
            raise RaptrError(f"checkpoint samples with seed {state['seed']} and scaling={state['scaling']!r}; this run seed "
                             f"{self.seed}, scaling={self.scaling!r}: resume with the same seed and scaling (never adopted)")

    def __repr__(self) -> str:
        return (f"WidthRaPTr({len(self.layers)} layers, {self.schedule!r}, heads={self.heads}, ffn={self.ffn}, "
                f"scaling={self.scaling}, fixed={list(self.fixed)})")
