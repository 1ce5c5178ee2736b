from .digpt import DiGPT, DiGPTConfig, DiGPTOutput, random_segment_order
from .layers import set_fused_attention
from .registry import MODEL_SIZES, create_digpt, digpt_config

__all__ = [
    "MODEL_SIZES",
    "DiGPT",
    "DiGPTConfig",
    "DiGPTOutput",
    "create_digpt",
    "digpt_config",
    "random_segment_order",
    "set_fused_attention",
]
