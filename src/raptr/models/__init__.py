from raptr.models.reference import TransformerConfig, TransformerLM
from raptr.models.registry import find_layer_stack, layer_shape, model_flops, register_layer_stack

__all__ = ["TransformerConfig", "TransformerLM", "find_layer_stack", "layer_shape", "model_flops", "register_layer_stack"]
