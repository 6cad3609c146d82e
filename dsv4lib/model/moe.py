"""MoE layer (spec §2.7): sqrtsoftplus gate, bias-corrected top-k (bias selects only) or hash
routing via ``tid2eid``, renormalised weights × routed_scaling_factor, routed experts through a
pluggable backend, plus the clamped SwiGLU shared expert. Hooks observe each routing decision.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import join_side, on_side, side_stream
from .experts import DenseExperts, ExpertBackend, swiglu
from .linear import Linear
from .lowp import hp, tf32_matmuls


@dataclass(frozen=True)
class MoEEvent:
    """What a MoE hook sees (CONTRACTS "Hooks")."""
    x: torch.Tensor                       # [T, D] expert input (post ffn_norm)
    input_ids: torch.Tensor | None        # [T]
    scores: torch.Tensor                  # [T, E] fp32 unbiased affinities
    idx: torch.Tensor                     # [T, k]
    weight: torch.Tensor                  # [T, k] fp32 (renormalised, route-scaled)


MoEHook = Callable[[int, MoEEvent], None]

PREFILL_SHARED_SIDE = True
"""Prefill (more than one token): the shared expert is issued first -- on CUDA on the side stream
(``attention.side_stream``), concurrent with the router and the routed experts -- and joined before the sum.
Same operations on the same inputs: bit-identical. Predicted -2 to -4 ms per 2K prefill on the H200 (the
router's ~12 small launches per layer leave the GPU mostly idle); the full-scale bench times it toggled.
The fused decode step has its own concurrent shared-expert branch (model/graphed.py ``moe_step``)."""


class Gate(nn.Module):
    """Router: ``weight [E,D]`` and either ``bias [E]`` (fp32) or ``tid2eid [V,k]`` (hash layers)."""

    def __init__(self, cfg: ModelConfig, hash_layer: bool, dtype=torch.float32, device=None) -> None:
        super().__init__()
        self.k, self.scale, self.renorm = cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.hash = hash_layer
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype, device=device))
        if hash_layer:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.k, dtype=torch.long, device=device))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None):
        """x [T,D] -> (scores [T,E] fp32, idx [T,k], weight [T,k] fp32)."""
        # fp32 logits; bf16/fp16 operands on CUDA are exact in TF32 (tensor cores, fp32 accumulation)
        exact16 = x.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype in (torch.bfloat16, torch.float16)
        with tf32_matmuls(x.is_cuda and exact16):
            s = F.softplus(hp(x) @ hp(self.weight).t()).sqrt()      # [T, E]
        if self.hash:
            if input_ids is None:
                raise ValueError("hash-routed MoE layer needs input_ids")
            idx = self.tid2eid[input_ids]                                   # [T, k]
        else:
            idx = (s + hp(self.bias)).topk(self.k, -1).indices          # bias only selects
        w = s.gather(1, idx)                                                # [T, k]
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)
        return s, idx, w * self.scale


class SharedExpert(nn.Module):
    """SwiGLU expert with the same clamp as routed experts (current revision, spec §2.7)."""

    def __init__(self, dim: int, inter: int, limit: float, dtype=torch.float32, device=None) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, dtype, device, fp8_act=True)
        self.w2 = Linear(inter, dim, dtype, device, fp8_act=True)
        self.w3 = Linear(dim, inter, dtype, device, fp8_act=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = swiglu(self.w1(x), self.w3(x), self.limit).to(x.dtype)
        return self.w2(h)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, hooks: "OrderedDict[int, MoEHook]",
                 dtype=torch.float32, device=None, expert_device=None) -> None:
        super().__init__()
        self.layer_idx, self.limit = layer_idx, cfg.swiglu_limit
        self._hooks = hooks
        hash_layer = layer_idx < cfg.num_hidden_layers and cfg.is_hash_layer(layer_idx)
        self.gate = Gate(cfg, hash_layer, dtype, device)
        self.experts: ExpertBackend = DenseExperts(cfg.n_routed_experts, cfg.hidden_size,
                                                   cfg.moe_intermediate_size, dtype,
                                                   device if expert_device is None else expert_device)
        self.shared_experts = (SharedExpert(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size,
                                            cfg.swiglu_limit, dtype, device) if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])                                       # [T, D]
        ids = input_ids.reshape(-1) if input_ids is not None else None
        ys = side = None
        if self.shared_experts is not None and PREFILL_SHARED_SIDE and xf.shape[0] > 1:
            side = side_stream(xf.device) if xf.is_cuda and not torch.cuda.is_current_stream_capturing() else None
            with on_side(side):
                ys = hp(self.shared_experts(xf))                            # xf stays referenced until the join
        s, idx, w = self.gate(xf, ids)
        for fn in list(self._hooks.values()):
            fn(self.layer_idx, MoEEvent(xf, ids, s, idx, w))
        y = self.experts(xf, idx, w, self.limit)                            # [T, D] fp32
        if side is not None:                                                # join; ys is read on this stream
            join_side(side)
            ys.record_stream(torch.cuda.current_stream(xf.device))
        if self.shared_experts is not None:
            y = y + (ys if ys is not None else hp(self.shared_experts(xf)))
        return y.to(x.dtype).reshape(shape)
