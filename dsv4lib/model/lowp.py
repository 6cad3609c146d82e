"""DeepSeek's low-precision simulation (spec §2.8): quantize-dequantize helpers.

* ``act_quant_fp8``: FP8 e4m3 activations, 1×``block`` per token, power-of-two scales
  ``2^ceil(log2(amax/448))`` (amax floored at 1e-4) — input of every FP8 linear.
* ``fake_quant_fp8``: same rounding on blocks of 64 (non-rope KV dims).
* ``hadamard``: natural-order Walsh–Hadamard rotation scaled by n^-1/2 (indexer q / keys).
* ``fake_quant_fp4``: e2m1 with one power-of-two scale per 32 values, ``2^ceil(log2(amax/6))``.
All return the input dtype; math in fp32.
"""
from __future__ import annotations

import contextlib
import math

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
_FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_FP4_TIE_UP = (False, True, False, True, False, True, False)  # round half to even code


def hp(x: torch.Tensor) -> torch.Tensor:
    """Upcast to the math precision: fp32, or fp64 for a float64 model (exact-reference tests)."""
    return x if x.dtype == torch.float64 else x.float()


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


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax / qmax)))


def fake_quant_fp8(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Quantize-dequantize ``x`` [..., K] to e4m3 per 1×block (K % block == 0)."""
    K = x.shape[-1]
    if K % block:
        raise ValueError(f"fake_quant_fp8: last dim {K} is not a multiple of the block {block}")
    xf = hp(x).reshape(*x.shape[:-1], K // block, block)               # [..., K/b, b]
    amax = xf.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = _pow2_scale(amax, FP8_MAX)
    q = (xf / s).to(torch.float8_e4m3fn).float() * s
    return q.reshape(x.shape).to(x.dtype)


def act_quant_fp8(x: torch.Tensor) -> torch.Tensor:
    """FP8 activation quantization of an FP8 linear's input (1×128 blocks)."""
    return fake_quant_fp8(x, 128)


def _round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Round non-negative ``a`` (≤ 6) to the e2m1 grid, ties to even code."""
    mids = torch.tensor(_FP4_MIDS, dtype=a.dtype, device=a.device)
    grid = torch.tensor(_FP4_GRID, dtype=a.dtype, device=a.device)
    up = torch.tensor(_FP4_TIE_UP, device=a.device)
    code = torch.bucketize(a, mids, right=False)                          # mids[i-1] < a <= mids[i] -> i
    at_mid = (code < len(_FP4_MIDS)) & (a == mids[code.clamp(max=len(_FP4_MIDS) - 1)])
    code = code + (at_mid & up[code.clamp(max=len(_FP4_MIDS) - 1)]).long()
    return grid[code]


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Quantize-dequantize ``x`` [..., K] to e2m1 with one pow2 scale per 1×block."""
    K = x.shape[-1]
    if K % block:
        raise ValueError(f"fake_quant_fp4: last dim {K} is not a multiple of the block {block}")
    xf = hp(x).reshape(*x.shape[:-1], K // block, block)
    amax = xf.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126)
    s = _pow2_scale(amax, FP4_MAX)
    a = (xf.abs() / s).clamp(max=FP4_MAX)
    q = torch.sign(xf) * _round_e2m1(a) * s
    return q.reshape(x.shape).to(x.dtype)


def hadamard_matrix(n: int, device=None) -> torch.Tensor:
    """Sylvester (natural-order) Hadamard matrix scaled by n^-1/2, fp32 [n, n]."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard size {n} is not a power of two")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of ``x`` by the scaled Hadamard matrix (symmetric, orthogonal)."""
    h = hadamard_matrix(x.shape[-1], x.device)
    xf = hp(x)
    return (xf @ h.to(xf.dtype)).to(x.dtype)
