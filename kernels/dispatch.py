"""Kernel dispatch for the expert backends and FP8 linears (docs/CONTRACTS.md "Experts").

The backends call these on CUDA tensors (elsewhere they keep their torch paths):

* ``int2_moe`` -> fp32 ``[T, D]``: for ``T <= DECODE_MAX_TOKENS`` the integer-dot-product decode kernel
  ``int2_moe_idp`` when ``DECODE_IDP`` and the activations are bf16/fp16 (16-bit activation groups), else
  ``int2_moe_decode`` (fp32 models keep its exact fp32 loop); ``int2_moe_prefill`` (grouped GEMM over
  expert-sorted tokens) above.
* ``fp8_linear`` -> ``x @ dequant(w, scale)^T`` in x's dtype (Triton kernel for every M; see
  kernels/BENCHMARKS.md for the measured comparison with the torch dequant-then-matmul path).
* ``mxfp4_moe`` -> fp32 ``[T, D]``: dequantise the routed MXFP4 experts (Triton) + torch matmuls.
"""
from __future__ import annotations

import torch

from .fp8_linear import fp8_linear as _fp8_linear
from .int2_moe_decode import int2_moe_decode
from .int2_moe_idp import int2_moe_idp
from .int2_moe_prefill import int2_moe_prefill
from .mxfp4 import mxfp4_moe as _mxfp4_moe

DECODE_MAX_TOKENS = 16
DECODE_IDP = True
"""Decode on ``int2_moe_idp`` (dp2a, 16-bit activation groups) instead of the fp16 loop (bf16/fp16 inputs):
H200, 43 distinct layers, us/layer T=1 30.2 -> 23.9, T=8 180 -> 113, T=16 346 -> 209 (kernels/BENCHMARKS.md)."""


def int2_moe(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
             w1_packed: torch.Tensor, w1_scale: torch.Tensor, w1_zero_packed: torch.Tensor,
             w3_packed: torch.Tensor, w3_scale: torch.Tensor, w3_zero_packed: torch.Tensor,
             w2_packed: torch.Tensor, w2_scale: torch.Tensor, w2_zero_packed: torch.Tensor,
             limit: float) -> torch.Tensor:
    """Routed INT2 experts: ``sum_j W2_e(weight_j * swiglu(W1_e x, W3_e x, limit))`` -> fp32 ``[T, D]``."""
    args = (x, idx, weight, w1_packed, w1_scale, w1_zero_packed, w3_packed, w3_scale, w3_zero_packed,
            w2_packed, w2_scale, w2_zero_packed, limit)
    if x.shape[0] <= DECODE_MAX_TOKENS:
        if DECODE_IDP and x.dtype in (torch.bfloat16, torch.float16):
            return int2_moe_idp(*args)
        return int2_moe_decode(*args)
    return int2_moe_prefill(*args)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, groups: int = 1,
               norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """FP8 e4m3 weight with 128x128 block scales (fp32 multiplier or E8M0) -> x's dtype; ``groups`` > 1:
    x [..., G, K], block-diagonal (grouped) projection; ``norm`` = (weight, eps): RMSNorm of x's rows on load."""
    return _fp8_linear(x, w, scale, groups=groups, norm=norm)


def mxfp4_moe(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
              w1: torch.Tensor, w1_scale: torch.Tensor, w3: torch.Tensor, w3_scale: torch.Tensor,
              w2: torch.Tensor, w2_scale: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed MXFP4 experts (packed ``[E, out, in/2]`` + E8M0 ``[E, out, in/32]``) -> fp32 ``[T, D]``."""
    return _mxfp4_moe(x, idx, weight, w1, w1_scale, w3, w3_scale, w2, w2_scale, limit)
