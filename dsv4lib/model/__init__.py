"""DeepSeek-V4 model in plain PyTorch (spec §2); see docs/CONTRACTS.md "Model"."""
from .cache import Cache
from .experts import DenseExperts, ExpertBackend, grouped_forward, swiglu
from .linear import Linear, RMSNorm
from .moe import MoEEvent
from .transformer import DeepseekV4

__all__ = ["Cache", "DeepseekV4", "DenseExperts", "ExpertBackend", "Linear", "MoEEvent", "RMSNorm",
           "grouped_forward", "swiglu"]
