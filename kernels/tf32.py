"""TF32 tensor-core matmuls for fp32 operands that hold 16-bit values (exact products, fp32 sums)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """Allow TF32 tensor-core matmuls inside the block (CUDA), restoring the previous setting after.

    Used where the fp32 operands hold bf16/fp16 values (exactly representable in TF32's 10-bit
    mantissa, products exact, fp32 accumulation), e.g. the attention scores of a bf16 model; an fp32
    operand such as softmax probabilities is rounded to 11 significant bits, far below the bf16
    rounding of the result. No-op when ``enabled`` is False.
    """
    if not enabled:
        yield
        return
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "tf32"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:  # older torch
        old = m.allow_tf32
        m.allow_tf32 = True
        try:
            yield
        finally:
            m.allow_tf32 = old
