"""dsv4lib: DeepSeek-V4-Flash with INT2 g64 experts on one GPU (see docs/CONTRACTS.md)."""
from __future__ import annotations

from .config import ModelConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "DeepseekV4", "from_hf_transformers", "__version__"]


def __getattr__(name: str):
    # torch-heavy parts load lazily so `import dsv4lib` (CLI --help) stays fast
    if name == "DeepseekV4":
        from .model.transformer import DeepseekV4
        return DeepseekV4
    if name == "from_hf_transformers":
        from .model.hf_port import from_hf_transformers
        return from_hf_transformers
    raise AttributeError(f"module 'dsv4lib' has no attribute {name!r}")
