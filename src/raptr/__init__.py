"""raptr: progressive subnetwork pretraining (RaPTr, arXiv 2402.05913) for transformer LMs.

Own training loop::

    import raptr
    rp = raptr.wrap(model, total_steps=10_000)   # 3-6-9-12 Prop-1 on 12 layers; or method="pld", "stacking", ...
    for step, batch in enumerate(loader):
        rp.step(step)                       # sample this step's path of layers
        model(**batch).loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)

The names below are imported on first use, so ``import raptr`` (and the ``raptr`` command's start,
where Ctrl-C must stay one line) does not import torch until something needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "raptr.core": ("GatedLayers", "PathSampler", "RaPTr", "Schedule", "StepPlan"),
    "raptr.errors": ("RaptrError",),
    "raptr.flops": ("LayerShape", "ModelFlops", "schedule_relative_flops"),
    "raptr.methods": ("Host", "RaPTrMethod", "RaPTrOptions", "init_optimizer_state", "wrap"),
    "raptr.models.registry": ("find_layer_stack", "register_layer_stack"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    else:
        try:  # a subpackage or module: raptr.models, raptr.core, ...
            value = importlib.import_module(f"raptr.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"raptr.{name}":
                raise
            raise AttributeError(f"module 'raptr' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
