"""raptr: progressive subnetwork pretraining (RaPTr, arXiv 2402.05913) for transformer LMs.

Own training loop::

    import raptr
    rp = raptr.wrap(model, schedule="6-8-10-12", total_steps=10_000)
    for step, batch in enumerate(loader):
        rp.step(step)                       # sample this step's path of layers
        model(**batch).loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
"""

from raptr.core import GatedLayers, PathSampler, RaPTr, Schedule, StepPlan
from raptr.errors import RaptrError
from raptr.flops import LayerShape, ModelFlops, schedule_relative_flops
from raptr.methods import RaPTrMethod, RaPTrOptions, wrap
from raptr.models.registry import find_layer_stack, register_layer_stack

__version__ = "0.1.0"
__all__ = [
    "GatedLayers", "PathSampler", "RaPTr", "Schedule", "StepPlan", "RaptrError", "LayerShape", "ModelFlops",
    "schedule_relative_flops", "RaPTrMethod", "RaPTrOptions", "wrap", "find_layer_stack", "register_layer_stack",
]
