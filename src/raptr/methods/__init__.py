from raptr.methods.base import Method, Standard, StepInfo, TrainingContext
from raptr.methods.layerdrop import LayerDrop, keep_prob_for_flops
from raptr.methods.pld import ProgressiveLayerDrop
from raptr.methods.raptr import RaPTrMethod, RaPTrOptions
from raptr.methods.registry import METHODS, build_method, method_class, register_method
from raptr.methods.stacking import GradualStacking
from raptr.methods.host import Host, init_optimizer_state, make_method, wrap

__all__ = ["Method", "Standard", "StepInfo", "TrainingContext", "RaPTrMethod", "RaPTrOptions", "Host", "init_optimizer_state", "make_method", "wrap",
           "GradualStacking", "ProgressiveLayerDrop", "LayerDrop", "keep_prob_for_flops",
           "METHODS", "build_method", "method_class", "register_method"]
