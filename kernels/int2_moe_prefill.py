"""INT2 g64 MoE prefill: grouped GEMM over tokens sorted by expert, dequant fused into the dot loop.

Math as ``int2_moe_decode`` (v4_arch.md section 2.7): ``h = silu(min(W1 x, L)) * clamp(W3 x, +-L) * rw``,
``y_t = sum_experts W2 h`` (fp32). Weight layout: the INT2 g64 contract (``int2_dequant.py``).

Routing is turned into blocks with a sort (``align_pairs``, moe_align_block_size-style, torch ops
only, no host sync): the ``S = T*k`` (token, slot) pairs are sorted by expert and each expert's run
is padded to a multiple of BLOCK_M with the sentinel S; ``block_expert[b]`` is the expert of M-block
b, or -1 past the end. Grid ``(cdiv(N, BLOCK_N), max_blocks)``: every program loads one expert's
``[BLOCK_N, 16*W]`` packed tile once for BLOCK_M routed tokens, dequantises it in registers
(``_int2_tile``) and feeds ``tl.dot`` (fp16 operands, fp32 accumulation).

1. ``_grouped_gate_up_kernel``: w1 and w3 tiles in the same loop; SwiGLU, clamp and the routing
   weight in the epilogue; writes ``h [S, I]`` (fp16) by pair id.
2. ``_grouped_down_kernel``: ``h`` rows gathered by pair id; epilogue atomically adds into
   ``y [T, D]`` (fp32), which sums the k experts of each token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .int2_dequant import _int2_tile, as_int32, fit_w
from .int2_moe_decode import _check_routing, check_moe_weights


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 64
    block_n: int = 64
    w: int = 4          # packed words per K chunk (K chunk = 16 * w channels)
    warps: int = 4
    stages: int = 3


def prefill_configs() -> list[PrefillConfig]:
    """Candidates swept by bench/bench_kernels.py; the first is the default."""
    return [PrefillConfig(), PrefillConfig(128, 64, 4, 8), PrefillConfig(64, 128, 4, 8),
            PrefillConfig(64, 64, 8, 4), PrefillConfig(128, 128, 4, 8), PrefillConfig(64, 64, 4, 4, 4),
            PrefillConfig(128, 64, 8, 8, 3)]


@triton.jit
def _grouped_gate_up_kernel(
    # activations x [T, D] (fp32 / bf16 / fp16)
    x_ptr,
    # routing blocks: sorted pair ids [max_blocks*BLOCK_M] (S = padding), expert per M-block, S, k, rw [S]
    sorted_ptr, bexp_ptr, S, TOPK, rw_ptr,
    # gate / up INT2 weights [E, I, D/16] int32, [E, I, D/64] fp16, [E, I, D/128] int8
    w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr,
    # output h [S, I] fp16 (by pair id)
    h_ptr,
    # sizes (KW = D/16) and the clamp
    I, D, KW, limit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    valid = pair < S
    tok = (pair // TOPK).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < I
    w1_ptr += e * I * KW
    w3_ptr += e * I * KW
    s1_ptr += e * I * (KW // 4)
    s3_ptr += e * I * (KW // 4)
    z1_ptr += e * I * (KW // 8)
    z3_ptr += e * I * (KW // 8)
    kk = tl.arange(0, 16 * W)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kw0 in range(0, KW, W):
        a = tl.load(x_ptr + tok[:, None] * D + (kw0 * 16 + kk)[None, :], mask=valid[:, None],
                    other=0.0).to(tl.float16)                            # [BM, 16W]
        b1 = _int2_tile(w1_ptr, s1_ptr, z1_ptr, rows, rmask, kw0, KW, W).to(tl.float16)   # [BN, 16W]
        b3 = _int2_tile(w3_ptr, s3_ptr, z3_ptr, rows, rmask, kw0, KW, W).to(tl.float16)
        acc1 = tl.dot(a, tl.trans(b1), acc1)
        acc3 = tl.dot(a, tl.trans(b3), acc3)
    rw = tl.load(rw_ptr + pair, mask=valid, other=0.0)
    g = tl.minimum(acc1, limit)
    u = tl.minimum(tl.maximum(acc3, -limit), limit)
    h = g * tl.sigmoid(g) * u * rw[:, None]
    tl.store(h_ptr + pair[:, None].to(tl.int64) * I + rows[None, :], h.to(tl.float16),
             mask=valid[:, None] & rmask[None, :])


@triton.jit
def _grouped_down_kernel(
    # h [S, I] fp16 from _grouped_gate_up_kernel
    h_ptr,
    # routing blocks (as above)
    sorted_ptr, bexp_ptr, S, TOPK,
    # down INT2 weight [E, D, I/16] int32, [E, D, I/64] fp16, [E, D, I/128] int8
    w2_ptr, s2_ptr, z2_ptr,
    # output y [T, D] fp32, zero-initialised, atomic adds
    y_ptr,
    # sizes (KW = I/16)
    I, D, KW,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < S
    tok = (pair // TOPK).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < D
    w2_ptr += e * D * KW
    s2_ptr += e * D * (KW // 4)
    z2_ptr += e * D * (KW // 8)
    kk = tl.arange(0, 16 * W)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kw0 in range(0, KW, W):
        a = tl.load(h_ptr + pair[:, None].to(tl.int64) * I + (kw0 * 16 + kk)[None, :], mask=valid[:, None],
                    other=0.0)                                           # [BM, 16W] fp16
        b = _int2_tile(w2_ptr, s2_ptr, z2_ptr, rows, rmask, kw0, KW, W).to(tl.float16)
        acc = tl.dot(a, tl.trans(b), acc)
    tl.atomic_add(y_ptr + tok[:, None] * D + rows[None, :], acc, mask=valid[:, None] & rmask[None, :])


def align_pairs(idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert, pad each expert's run to ``block_m`` -> (sorted ids, block expert).

    ``sorted_ids [max_blocks*block_m]`` int32 holds pair ids ``t*k + j`` (S = padding);
    ``block_expert [max_blocks]`` int32 holds the expert of each M-block or -1 past the used blocks.
    Torch ops only and no host sync (graph-capturable).
    """
    flat = idx.reshape(-1).to(torch.int64)                               # [S]
    S = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat))                                   # [E] (bincount would sync)
    padded = (counts + block_m - 1) // block_m * block_m                 # [E]
    ends = torch.cumsum(padded, 0)                                       # [E]
    starts = ends - padded
    order = torch.argsort(flat, stable=True)                             # [S]
    sorted_e = flat[order]
    first = torch.cumsum(counts, 0) - counts                             # [E] first sorted position
    dest = starts[sorted_e] + torch.arange(S, device=dev) - first[sorted_e]
    max_blocks = triton.cdiv(S + min(num_experts, S) * (block_m - 1), block_m)
    sorted_ids = torch.full((max_blocks * block_m,), S, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    bstart = torch.arange(max_blocks, device=dev) * block_m              # [B]
    bexp = torch.searchsorted(ends, bstart, right=True)                  # [B]
    bexp = torch.where(bstart < ends[-1], bexp, torch.full_like(bexp, -1)).to(torch.int32)
    return sorted_ids, bexp


def int2_moe_prefill(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                     w1_packed: torch.Tensor, w1_scale: torch.Tensor, w1_zero_packed: torch.Tensor,
                     w3_packed: torch.Tensor, w3_scale: torch.Tensor, w3_zero_packed: torch.Tensor,
                     w2_packed: torch.Tensor, w2_scale: torch.Tensor, w2_zero_packed: torch.Tensor,
                     limit: float, *, config: PrefillConfig | None = None) -> torch.Tensor:
    """Routed-expert MoE for many tokens -> fp32 ``[T, D]`` (see module docstring)."""
    T, k = _check_routing(x, idx, weight)
    w1 = (w1_packed, w1_scale, w1_zero_packed)
    w3 = (w3_packed, w3_scale, w3_zero_packed)
    w2 = (w2_packed, w2_scale, w2_zero_packed)
    E, D, I = check_moe_weights(x, w1, w3, w2)
    cfg = config or prefill_configs()[0]
    S = T * k
    sorted_ids, bexp = align_pairs(idx, E, cfg.block_m)
    nb = bexp.numel()
    rw = weight.reshape(-1).to(torch.float32).contiguous()
    xin = x.contiguous()
    h = torch.empty((S, I), dtype=torch.float16, device=x.device)
    y = torch.zeros((T, D), dtype=torch.float32, device=x.device)
    _grouped_gate_up_kernel[(triton.cdiv(I, cfg.block_n), nb)](
        xin, sorted_ids, bexp, S, k, rw,
        as_int32(w1_packed), w1_scale, w1_zero_packed, as_int32(w3_packed), w3_scale, w3_zero_packed,
        h, I, D, D // 16, float(limit),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, W=fit_w(cfg.w, D // 16),
        num_warps=cfg.warps, num_stages=cfg.stages)
    _grouped_down_kernel[(triton.cdiv(D, cfg.block_n), nb)](
        h, sorted_ids, bexp, S, k, as_int32(w2_packed), w2_scale, w2_zero_packed, y, I, D, I // 16,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, W=fit_w(cfg.w, I // 16),
        num_warps=cfg.warps, num_stages=cfg.stages)
    return y
