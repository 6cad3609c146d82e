"""Routed-expert backends (CONTRACTS "Experts"; spec §2.7).

``ExpertBackend.forward(x, idx, weight, limit)`` returns fp32 [T, D] =
Σ_j W2_e(weight_j · swiglu(W1_e x, W3_e x, limit)). The shared helper ``grouped_forward``
groups the (token, slot) pairs by expert with one sort and loops only over experts that got
tokens, asking the backend for ``expert_weights(e)`` (default: ``dequantize_expert(e)``), so a
quantized backend only implements dequantisation and ``resident_bytes``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lowp import act_quant_fp8, hp


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(g.clamp(max=limit)) * u.clamp(-limit, limit) in fp32."""
    g, u = hp(g), hp(u)
    if limit and limit > 0:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return F.silu(g) * u


def grouped_forward(backend: "ExpertBackend", x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                    limit: float) -> torch.Tensor:
    """Reference MoE expert computation through ``backend.expert_weights(e)`` (fp32 math)."""
    T, k = idx.shape
    flat = idx.reshape(-1)                                                  # [T*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=backend.num_experts)            # [E]
    tok = order // k                                                        # [T*k] token of each sorted slot
    wsort = hp(weight.reshape(-1)[order])
    xs = hp(x)
    if backend.lowp:
        xs = act_quant_fp8(xs)
    out = torch.zeros(T, x.shape[-1], dtype=xs.dtype, device=x.device)
    ends = torch.cumsum(counts, 0).tolist()
    for e in torch.nonzero(counts).flatten().tolist():
        hi = ends[e]
        lo = hi - int(counts[e])
        t = tok[lo:hi]
        w1, w3, w2 = backend.expert_weights(e)
        xe = xs[t]                                                          # [n, D]
        h = swiglu(xe @ hp(w1).t(), xe @ hp(w3).t(), limit) * wsort[lo:hi, None]   # [n, I]
        if backend.lowp:
            h = act_quant_fp8(h)
        out.index_add_(0, t, h @ hp(w2).t())
    return out


class ExpertBackend(nn.Module):
    """Base class: stacked routed experts of one MoE layer (lives at ``layers.{i}.ffn.experts``)."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.lowp = False    # demo FP8 activation sim on the expert inputs (set by the model)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, limit: float) -> torch.Tensor:
        return grouped_forward(self, x, idx, weight, limit)

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1 [I,D], w3 [I,D], w2 [D,I]) used by ``grouped_forward``; override to avoid copies."""
        return self.dequantize_expert(e)

    def dequantize_expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def resident_bytes(self) -> int:
        raise NotImplementedError


class DenseExperts(ExpertBackend):
    """Float stacked experts: ``w1 [E,I,D]``, ``w3 [E,I,D]``, ``w2 [E,D,I]``."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype=torch.float32, device=None) -> None:
        super().__init__(num_experts, hidden, inter)
        self.w1 = nn.Parameter(torch.empty(num_experts, inter, hidden, dtype=dtype, device=device))
        self.w3 = nn.Parameter(torch.empty(num_experts, inter, hidden, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype, device=device))

    def expert_weights(self, e: int):
        return self.w1[e], self.w3[e], self.w2[e]

    def dequantize_expert(self, e: int):
        return hp(self.w1[e]), hp(self.w3[e]), hp(self.w2[e])

    def resident_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.w1, self.w3, self.w2))
