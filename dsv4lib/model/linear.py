"""Linear layer with optional FP8 block-scaled weights (spec §3.3) and FP8 activation sim (§2.8).

``.weight`` is float (fp32/bf16) or ``torch.float8_e4m3fn``; for FP8 weights ``.scale``
(fp32 multiplier, [ceil(out/128), ceil(in/128)]) holds the 128×128 block scales.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lowp import act_quant_fp8, hp

BLOCK = 128


def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """W[o,i] = float(w[o,i]) * scale[o//128, i//128]."""
    out, inp = w.shape
    s = scale.float().repeat_interleave(BLOCK, 0)[:out].repeat_interleave(BLOCK, 1)[:, :inp]
    return (w.float() * s).to(dtype)


class Linear(nn.Module):
    """y = x @ W^T (no bias). ``fp8_act`` marks a linear that is FP8 in the release: with the
    low-precision sim on, its input is FP8-quantized per 1×128 (spec §2.8)."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None,
                 fp8: bool = False, fp8_act: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fp8_act = fp8_act
        self.lowp = False
        wdtype = torch.float8_e4m3fn if fp8 else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype, device=device),
                                   requires_grad=not fp8)
        if fp8:
            shape = (-(-out_features // BLOCK), -(-in_features // BLOCK))
            self.register_buffer("scale", torch.ones(shape, dtype=torch.float32, device=device))
        else:
            self.scale = None

    def set_fp8(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        """Replace the weight by an FP8 e4m3 weight with its 128×128 block scales."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"set_fp8: weight shape {tuple(weight.shape)} != {(self.out_features, self.in_features)}")
        self.weight = nn.Parameter(weight.to(torch.float8_e4m3fn), requires_grad=False)
        if "scale" in self._buffers:
            self.scale = scale.float().to(weight.device)
        else:
            del self.scale
            self.register_buffer("scale", scale.float().to(weight.device))

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        if self.weight.dtype == torch.float8_e4m3fn:
            return dequant_fp8_block(self.weight, self.scale, dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lowp and self.fp8_act:
            x = act_quant_fp8(x)
        elif x.is_cuda and self.weight.dtype == torch.float8_e4m3fn:   # Triton FP8 block-scaled GEMV/GEMM
            from dsv4lib.kernels.dispatch import fp8_linear
            return fp8_linear(x, self.weight, self.scale)
        w = self.dequantized_weight(x.dtype) if self.weight.dtype == torch.float8_e4m3fn else self.weight
        return F.linear(x, w.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, weight={self.weight.dtype}, fp8_act={self.fp8_act}"


class RMSNorm(nn.Module):
    """y = w * x * rsqrt(mean(x^2) + eps) in fp32, cast back to the input dtype; w kept fp32."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = hp(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * y).to(x.dtype)
