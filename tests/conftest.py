"""Shared pytest setup: offline hubs, Triton interpreter without CUDA, a tiny config fixture."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
try:  # must happen before anything imports triton
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
    from dsv4lib.config import ModelConfig
    return ModelConfig.tiny()
