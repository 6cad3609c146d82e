"""Small MoE pieces of the decode step, one launch each (v4_arch.md section 2.7; the math of
``dsv4lib.model.moe.Gate`` and ``SharedExpert``) -- at decode sizes each replaces 5-10 torch kernels.

* ``router_topk``: from router logits ``[T, E]`` fp32: ``s = sqrt(softplus(logit))``; experts = the
  top-k of ``s + bias`` (bias selects only; ties go to the lower expert id) or, for hash layers, the
  given ``tid2eid`` rows; ``w = s[idx]``, renormalised to sum 1 if asked, times the routing scale.
  One program per token, the E scores in registers, k passes of an arg-max.
* ``router_fused``: the router's logits GEMV (bf16 weight, fp32 sums) and ``router_topk`` in one launch:
  E/8 programs each compute 8 experts' logits for all T <= 16 tokens; the last one to arrive (per-call
  counter, kernels/workspace.py) routes the tokens. Replaces a cuBLAS split-K GEMM + its reduce + the
  top-k launch (three nodes on the decode step's critical path per layer).
* ``swiglu_rows``: ``h = silu(min(g, L)) * clamp(u, -L, L)`` from the stacked shared-expert
  projection ``gu [T, 2I]`` (g = first I columns), fp32 math, stored in ``gu``'s dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .workspace import split_workspace


@triton.jit
def _route_token(lg, t, bias_ptr, hidx_ptr, idx_ptr, w_ptr, s_ptr, E, route_scale,
                 EP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, HASH: tl.constexpr,
                 RENORM: tl.constexpr, STORE_S: tl.constexpr):
    """Token t's routing from its logits ``lg [EP]`` (fp32, masked past E)."""
    e = tl.arange(0, EP)
    em = e < E
    z = tl.exp(-tl.abs(lg))
    sp = tl.maximum(lg, 0.0) + tl.where(z < 1e-4, z - 0.5 * z * z, tl.log(1.0 + z))   # softplus, log1p-accurate
    s = tl.sqrt(sp)                                                                    # [EP]
    if STORE_S:
        tl.store(s_ptr + t * E + e, s, mask=em)
    kk = tl.arange(0, KP)
    km = kk < K
    if HASH:
        sel = tl.load(hidx_ptr + t * K + kk, mask=km, other=0).to(tl.int32)           # [KP]
    else:
        score = tl.where(em, s + tl.load(bias_ptr + e, mask=em, other=0.0), float("-inf"))
        sel = tl.zeros([KP], tl.int32)
        for j in tl.static_range(K):
            m = tl.max(score, axis=0)
            i = tl.min(tl.where(score == m, e, EP), axis=0)                           # lowest id among ties
            sel = tl.where(kk == j, i, sel)
            score = tl.where(e == i, float("-inf"), score)
    w = tl.sum(tl.where(sel[:, None] == e[None, :], s[None, :], 0.0), axis=1)          # [KP] = s[sel]
    w = tl.where(km, w, 0.0)
    if RENORM:
        w = w / tl.sum(w, axis=0)
    tl.store(idx_ptr + t * K + kk, sel.to(tl.int64), mask=km)
    tl.store(w_ptr + t * K + kk, w * route_scale, mask=km)


@triton.jit
def _router_kernel(logit_ptr, bias_ptr, hidx_ptr, idx_ptr, w_ptr, s_ptr, E, route_scale,
                   EP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, HASH: tl.constexpr,
                   RENORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, EP)
    lg = tl.load(logit_ptr + t * E + e, mask=e < E, other=0.0)
    _route_token(lg, t, bias_ptr, hidx_ptr, idx_ptr, w_ptr, s_ptr, E, route_scale, EP, K, KP, HASH, RENORM, True)


@triton.jit
def _router_fused_kernel(x_ptr, gw_ptr, lg_ptr, cnt_ptr, bias_ptr, hidx_ptr, idx_ptr, w_ptr, T, E, D, route_scale,
                         TP: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, EP: tl.constexpr,
                         K: tl.constexpr, KP: tl.constexpr, HASH: tl.constexpr, RENORM: tl.constexpr):
    # x [T, D], router weight gw [E, D] (bf16/fp16: products exact in fp32), logits scratch lg [T, E] fp32,
    # cnt[0] arrival counter (zero on entry, reset by the last program)
    pid = tl.program_id(0)
    tt = tl.arange(0, TP)
    ee = pid * BE + tl.arange(0, BE)
    kk = tl.arange(0, BK)
    tm = tt < T
    em = ee < E
    acc = tl.zeros([TP, BE, BK], tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + kk
        km = k < D
        xv = tl.load(x_ptr + tt[:, None].to(tl.int64) * D + k[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        wv = tl.load(gw_ptr + ee[:, None].to(tl.int64) * D + k[None, :], mask=em[:, None] & km[None, :], other=0.0)
        acc += xv.to(tl.float32)[:, None, :] * wv.to(tl.float32)[None, :, :]
    lgt = tl.sum(acc, axis=2)                                                          # [TP, BE]
    tl.store(lg_ptr + tt[:, None] * E + ee[None, :], lgt, mask=tm[:, None] & em[None, :])
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if arrived == tl.num_programs(0) - 1:   # every expert's logit is written: route the tokens
        e = tl.arange(0, EP)
        for t in range(0, T):
            lg = tl.load(lg_ptr + t * E + e, mask=e < E, other=0.0, cache_modifier=".cg")
            _route_token(lg, t, bias_ptr, hidx_ptr, idx_ptr, w_ptr, lg_ptr, E, route_scale, EP, K, KP, HASH,
                         RENORM, False)
        tl.atomic_xchg(cnt_ptr, 0)


def router_topk(logits: torch.Tensor, bias: torch.Tensor | None, k: int, route_scale: float, renorm: bool,
                hash_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 -> (scores [T, E] fp32, idx [T, k] int64, weight [T, k] fp32)."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"kernels.router_topk: logits must be fp32 [T, E], got {logits.dtype} {tuple(logits.shape)}")
    T, E = logits.shape
    if (bias is None) == (hash_idx is None):
        raise ValueError("kernels.router_topk: give exactly one of bias (score routing) or hash_idx (hash routing)")
    if hash_idx is not None and tuple(hash_idx.shape) != (T, k):
        raise ValueError(f"kernels.router_topk: hash_idx must be [T, k] = {(T, k)}, got {tuple(hash_idx.shape)}")
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"kernels.router_topk: bias must be [{E}], got {tuple(bias.shape)}")
    if not 1 <= k <= E:
        raise ValueError(f"kernels.router_topk: k={k} must be in [1, {E}]")
    dev = logits.device
    s = torch.empty(T, E, dtype=torch.float32, device=dev)
    idx = torch.empty(T, k, dtype=torch.int64, device=dev)
    w = torch.empty(T, k, dtype=torch.float32, device=dev)
    lg = logits.contiguous()
    _router_kernel[(T,)](lg, bias.float().contiguous() if bias is not None else lg,
                         hash_idx.contiguous() if hash_idx is not None else lg, idx, w, s, E, float(route_scale),
                         EP=triton.next_power_of_2(E), K=k, KP=triton.next_power_of_2(k),
                         HASH=hash_idx is not None, RENORM=renorm, num_warps=4)
    return s, idx, w


def router_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, route_scale: float,
                 renorm: bool, hash_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] and the router weight [E, D] (same 16-bit float dtype, T <= 16) -> (idx [T, k] int64,
    weight [T, k] fp32): the logits GEMV (fp32 sums of exact products) and ``router_topk`` in one launch
    -- the last program to finish its experts' logits routes every token."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"kernels.router_fused: x [T, D] and weight [E, D] expected, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"kernels.router_fused: x and weight must share a 16-bit float dtype, got {x.dtype}, {weight.dtype}")
    T, D = x.shape
    E = weight.shape[0]
    if not 1 <= T <= 16:
        raise ValueError(f"kernels.router_fused: T={T} tokens, at most 16 (decode)")
    if (bias is None) == (hash_idx is None):
        raise ValueError("kernels.router_fused: give exactly one of bias (score routing) or hash_idx (hash routing)")
    if hash_idx is not None and tuple(hash_idx.shape) != (T, k):
        raise ValueError(f"kernels.router_fused: hash_idx must be [T, k] = {(T, k)}, got {tuple(hash_idx.shape)}")
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"kernels.router_fused: bias must be [{E}], got {tuple(bias.shape)}")
    if not 1 <= k <= E:
        raise ValueError(f"kernels.router_fused: k={k} must be in [1, {E}]")
    dev = x.device
    TP = max(2, triton.next_power_of_2(T))
    BE, BK = 8, (128 if TP <= 8 else 64)
    lg, cnt = split_workspace(dev, T * E, 1)
    idx = torch.empty(T, k, dtype=torch.int64, device=dev)
    w = torch.empty(T, k, dtype=torch.float32, device=dev)
    xc = x.contiguous()
    _router_fused_kernel[(triton.cdiv(E, BE),)](
        xc, weight.contiguous(), lg, cnt, bias.float().contiguous() if bias is not None else lg,
        hash_idx.contiguous() if hash_idx is not None else idx, idx, w, T, E, D, float(route_scale),
        TP=TP, BE=BE, BK=BK, EP=triton.next_power_of_2(E), K=k, KP=triton.next_power_of_2(k),
        HASH=hash_idx is not None, RENORM=renorm, num_warps=4)
    return idx, w


@triton.jit
def _swiglu_kernel(gu_ptr, h_ptr, I, limit, BI: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BI + tl.arange(0, BI)
    m = c < I
    g = tl.load(gu_ptr + t * 2 * I + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * 2 * I + I + c, mask=m, other=0.0).to(tl.float32)
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    tl.store(h_ptr + t * I + c, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=m)


def swiglu_rows(gu: torch.Tensor, limit: float) -> torch.Tensor:
    """gu [..., 2I] (g ‖ u) -> h [..., I] in gu's dtype (fp32 math, the V4 clamp ``limit`` > 0)."""
    if gu.shape[-1] % 2 or gu.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not limit > 0:
        raise ValueError(f"kernels.swiglu_rows: gu must be fp32/bf16/fp16 [..., 2I] with limit > 0, got "
                         f"{gu.dtype} {tuple(gu.shape)}, limit {limit}")
    I = gu.shape[-1] // 2
    g2 = gu.reshape(-1, 2 * I).contiguous()
    h = torch.empty(g2.shape[0], I, dtype=gu.dtype, device=gu.device)
    BI = min(1024, triton.next_power_of_2(I))
    _swiglu_kernel[(g2.shape[0], triton.cdiv(I, BI))](g2, h, I, float(limit), BI=BI, num_warps=4)
    return h.reshape(*gu.shape[:-1], I)


# ----------------------------------------------------------------------------- torch references
def router_reference(logits, bias, k: int, route_scale: float, renorm: bool, hash_idx=None):
    """``dsv4lib.model.moe.Gate.forward`` after the logits matmul."""
    s = torch.nn.functional.softplus(logits).sqrt()
    idx = hash_idx if hash_idx is not None else (s + bias).topk(k, -1).indices
    w = s.gather(1, idx)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return s, idx, w * route_scale


def swiglu_reference(gu, limit: float):
    from dsv4lib.model.experts import swiglu
    I = gu.shape[-1] // 2
    return swiglu(gu[..., :I], gu[..., I:], limit).to(gu.dtype)
