from raptr.methods.base import Method, Standard, StepInfo, TrainingContext
from raptr.methods.raptr import RaPTrMethod, RaPTrOptions, wrap

__all__ = ["Method", "Standard", "StepInfo", "TrainingContext", "RaPTrMethod", "RaPTrOptions", "wrap"]
