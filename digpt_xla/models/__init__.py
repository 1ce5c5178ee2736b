from .digpt import DiGPT, DiGPTConfig, DiGPTOutput, random_segment_order
from .layers import ATTENTION_MODES, set_attention
from .registry import MODEL_SIZES, create_digpt, digpt_config

__all__ = [
    "ATTENTION_MODES",
    "MODEL_SIZES",
    "DiGPT",
    "DiGPTConfig",
    "DiGPTOutput",
    "create_digpt",
    "digpt_config",
    "random_segment_order",
    "set_attention",
]
