"""Small MoE pieces of the decode step, one launch each (v4_arch.md section 2.7; the math of
``dsv4lib.model.moe.Gate`` and ``SharedExpert``) -- at decode sizes each replaces 5-10 torch kernels.

* ``router_topk``: from router logits ``[T, E]`` fp32: ``s = sqrt(softplus(logit))``; experts = the
  top-k of ``s + bias`` (bias selects only; ties go to the lower expert id) or, for hash layers, the
  given ``tid2eid`` rows; ``w = s[idx]``, renormalised to sum 1 if asked, times the routing scale.
  One program per token, the E scores in registers, k passes of an arg-max.
* ``router_fused``: the router's logits GEMV (bf16 weight, fp32 sums) and ``router_topk`` in one launch:
  E/2 programs each load 2 whole weight rows at once and compute their logits for all T <= 16 tokens;
  the last one to arrive (per-call counter, kernels/workspace.py) routes every token at once ([T, E]
  tile, k arg-max passes). (First version, H200: 8 experts per program in a 32-step K loop and the
  tokens routed one after another -- 29.6 us at batch 1, 50 us at batch 8: a chain of memory latencies.) Replaces a cuBLAS split-K GEMM + its reduce + the
  top-k launch (three nodes on the decode step's critical path per layer).
* ``swiglu_rows``: ``h = silu(min(g, L)) * clamp(u, -L, L)`` from the stacked shared-expert
  projection ``gu [T, 2I]`` (g = first I columns), fp32 math, stored in ``gu``'s dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_args, pdl_wait

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
                   RENORM: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, EP)
    lg = tl.load(logit_ptr + t * E + e, mask=e < E, other=0.0)
    _route_token(lg, t, bias_ptr, hidx_ptr, idx_ptr, w_ptr, s_ptr, E, route_scale, EP, K, KP, HASH, RENORM, True)


@triton.jit
def _router_fused_kernel(x_ptr, gw_ptr, lg_ptr, cnt_ptr, bias_ptr, hidx_ptr, idx_ptr, w_ptr, T, E, D, route_scale,
                         TP: tl.constexpr, TB: tl.constexpr, BE: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
                         K: tl.constexpr, KP: tl.constexpr, HASH: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr):
    # x [T, D], router weight gw [E, D] (bf16/fp16: products exact in fp32), logits scratch lg [T, E] fp32,
    # cnt[0] arrival counter (zero on entry, reset by the last program)
    pid = tl.program_id(0)
    er = pid * BE + tl.arange(0, BE)
    d = tl.arange(0, DP)
    dm = d < D
    em_r = er < E
    # the program's BE weight rows, whole, in one load (no dependent loop: one memory latency)
    wv = tl.load(gw_ptr + er[:, None].to(tl.int64) * D + d[None, :], mask=em_r[:, None] & dm[None, :],
                 other=0.0).to(tl.float32)                                             # [BE, DP]
    pdl_wait(PDL)   # after the weight load (read-only, no predecessor writes it): it overlaps the wait
    for j in tl.static_range(TB):   # this program's TB tokens: masked, not branched (the loads can overlap)
        t = tl.program_id(1) * TB + j
        xv = tl.load(x_ptr + t * D + d, mask=dm & (t < T), other=0.0).to(tl.float32)  # [DP]
        tl.store(lg_ptr + t * E + er, tl.sum(wv * xv[None, :], axis=1), mask=em_r & (t < T))
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:   # every logit is written: route all tokens at once
        tt = tl.arange(0, TP)
        e = tl.arange(0, EP)
        kk = tl.arange(0, KP)
        tm = tt < T
        em = e < E
        lg = tl.load(lg_ptr + tt[:, None] * E + e[None, :], mask=tm[:, None] & em[None, :], other=0.0,
                     cache_modifier=".cg")                                             # [TP, EP]
        z = tl.exp(-tl.abs(lg))
        sp = tl.maximum(lg, 0.0) + tl.where(z < 1e-4, z - 0.5 * z * z, tl.log(1.0 + z))   # softplus, log1p-accurate
        sc = tl.sqrt(sp)                                                               # [TP, EP]
        if HASH:
            hsel = tl.load(hidx_ptr + tt[:, None] * K + kk[None, :], mask=tm[:, None] & (kk < K)[None, :],
                           other=0).to(tl.int32)                                       # [TP, KP]
        else:
            score = tl.where(em[None, :], sc + tl.load(bias_ptr + e, mask=em, other=0.0)[None, :], float("-inf"))
        sel = tl.zeros([TP, KP], tl.int32)
        wsel = tl.zeros([TP, KP], tl.float32)
        for j in tl.static_range(K):
            if HASH:
                i = tl.sum(tl.where(kk[None, :] == j, hsel, 0), axis=1)                # [TP]
            else:
                m = tl.max(score, axis=1)                                              # [TP]
                i = tl.min(tl.where(score == m[:, None], e[None, :], EP), axis=1)      # lowest id among ties
                score = tl.where(e[None, :] == i[:, None], float("-inf"), score)
            sv = tl.max(tl.where(e[None, :] == i[:, None], sc, float("-inf")), axis=1)  # s at the chosen expert
            sel = tl.where(kk[None, :] == j, i[:, None], sel)
            wsel = tl.where(kk[None, :] == j, sv[:, None], wsel)
        if RENORM:
            wsel = wsel / tl.sum(wsel, axis=1)[:, None]
        om = tm[:, None] & (kk < K)[None, :]
        tl.store(idx_ptr + tt[:, None] * K + kk[None, :], sel.to(tl.int64), mask=om)
        tl.store(w_ptr + tt[:, None] * K + kk[None, :], wsel * route_scale, mask=om)
        tl.atomic_xchg(cnt_ptr, 0)


def _check_route_args(name: str, T: int, E: int, k: int, bias, hash_idx) -> None:
    if (bias is None) == (hash_idx is None):
        raise ValueError(f"kernels.{name}: give exactly one of bias (score routing) or hash_idx (hash routing)")
    if hash_idx is not None and tuple(hash_idx.shape) != (T, k):
        raise ValueError(f"kernels.{name}: hash_idx must be [T, k] = {(T, k)}, got {tuple(hash_idx.shape)}")
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"kernels.{name}: bias must be [{E}], got {tuple(bias.shape)}")
    if not 1 <= k <= E:
        raise ValueError(f"kernels.{name}: k={k} must be in [1, {E}]")


def router_topk(logits: torch.Tensor, bias: torch.Tensor | None, k: int, route_scale: float, renorm: bool,
                hash_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 -> (scores [T, E] fp32, idx [T, k] int64, weight [T, k] fp32)."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"kernels.router_topk: logits must be fp32 [T, E], got {logits.dtype} {tuple(logits.shape)}")
    T, E = logits.shape
    _check_route_args("router_topk", T, E, k, bias, hash_idx)
    dev = logits.device
    s = torch.empty(T, E, dtype=torch.float32, device=dev)
    idx = torch.empty(T, k, dtype=torch.int64, device=dev)
    w = torch.empty(T, k, dtype=torch.float32, device=dev)
    lg = logits.contiguous()
    _router_kernel[(T,)](lg, bias.float().contiguous() if bias is not None else lg,
                         hash_idx.contiguous() if hash_idx is not None else lg, idx, w, s, E, float(route_scale),
                         EP=triton.next_power_of_2(E), K=k, KP=triton.next_power_of_2(k),
                         HASH=hash_idx is not None, RENORM=renorm, num_warps=4, **launch_args(logits.device))
    return s, idx, w


# Tokens per program of router_fused's logits (more tokens: a second grid axis). H200,
# bench/bench_decode_launches.py --what router (session 8): b8 15.1 us per call with all 8 tokens in each
# program, 9.65 us at 2 (4: 11.2, 1: 11.0); b1 5.4-5.6. Rows per program swept with it (session 9,
# bench/results/h200_router_v12.json): b8 (2 tokens) 10.5 / 9.6 / 8.6 us at 1 / 2 / 4 rows, b1 5.7 / 5.4 / 5.2.
ROUTER_TOKENS = 2
ROUTER_ROWS = 4      # router weight rows (experts) per program, loaded whole (hidden sizes <= 4096; 1 above)


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
    _check_route_args("router_fused", T, E, k, bias, hash_idx)
    dev = x.device
    TP = max(2, triton.next_power_of_2(T))
    DP = triton.next_power_of_2(D)
    BE = ROUTER_ROWS if DP <= 4096 else 1
    lg, cnt = split_workspace(dev, T * E, 1)
    idx = torch.empty(T, k, dtype=torch.int64, device=dev)
    w = torch.empty(T, k, dtype=torch.float32, device=dev)
    xc = x.contiguous()
    TB = min(ROUTER_TOKENS, TP)
    _router_fused_kernel[(triton.cdiv(E, BE), triton.cdiv(T, TB))](
        xc, weight.contiguous(), lg, cnt, bias.float().contiguous() if bias is not None else lg,
        hash_idx.contiguous() if hash_idx is not None else idx, idx, w, T, E, D, float(route_scale),
        TP=TP, TB=TB, BE=BE, DP=DP, EP=triton.next_power_of_2(E), K=k, KP=triton.next_power_of_2(k),
        HASH=hash_idx is not None, RENORM=renorm, num_warps=4, **launch_args(x.device))
    return idx, w


@triton.jit
def _swiglu_kernel(gu_ptr, h_ptr, I, limit, BI: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
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
    _swiglu_kernel[(g2.shape[0], triton.cdiv(I, BI))](g2, h, I, float(limit), BI=BI, num_warps=4, **launch_args(gu.device))
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
