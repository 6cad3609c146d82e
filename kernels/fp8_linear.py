"""FP8 (e4m3) block-scaled linear: ``y = x @ (W * S)^T`` with one fp32 multiplier per 128x128 block.

Layout (v4_arch.md section 3.3): ``w`` ``torch.float8_e4m3fn [N, K]``; ``scale [ceil(N/128), ceil(K/128)]``
fp32 multiplier (E8M0 bytes / ``torch.float8_e8m0fnu`` are decoded to fp32 ``2^(e-127)`` by the
launcher; the caller should keep them fp32 to save that launch). ``W[n, k] = e4m3(w[n, k]) * S[n//128, k//128]``.

Kernel: one program per ``[BLOCK_M, BLOCK_N]`` output tile and K-split; the K loop steps one
128-wide scale block at a time: e4m3 -> fp16 in registers (exact), ``tl.dot`` with the fp16
activation tile (fp32 accumulation), times the block's scale column; fp32 activations go in as two
fp16 terms (``hi + lo``, ~22 mantissa bits, two dots) so an fp32 model keeps fp32-accurate products (one
fp16 rounding cost 5e-4 relative: tests/test_fullscale_static.py on the H200). Split-K gives
the small layers (wq_a 1024 rows, wkv 512 rows) enough programs for 132 SMs. Activations must stay
below 65504 in magnitude (fp16 operands; the CPU interpreter's bf16 dot is broken).

Split-K epilogues (``FP8Config.epilogue``): ``"atomic"`` adds fp32 partials into a zeroed
output and casts it afterwards (three graph nodes: memset, kernel, cast); ``"last"`` (default) writes each split's
partial tile to a workspace and the last program of a tile to arrive (per-tile counter, acq_rel atomic)
sums the splits in a fixed order, stores the output in x's dtype and resets its counter to zero -- one
node, deterministic sums. Its workspace and counters are cached per (device, stream) and never freed
(the CUDA graphs that captured them keep using the same memory). Measured on the H200 (bench/sweep_fp8.py):
"last" beats "atomic" at every split shape of the decode step, 1.6-2.4 us per call (the memset and the
cast were two more graph nodes).

For many tokens (prefill) ``fp8_linear`` uses the same kernel with larger M tiles; the torch path
(``fp8_linear_reference``: dequantise then matmul) is what the benchmark compares against.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import pdl
from .fp8_gemv import GemvConfig, fp8_gemv
from .pdl import launch_args, pdl_wait, prefetch_l2

from .workspace import split_workspace, weight_workspace

BLOCK = 128
# Decode GEMVs (<= 64 rows) under PDL: L2 prefetch of each program's first PREFETCH_STEPS 128-wide K blocks
# before ``griddepcontrol.wait`` (bounded: the whole-slice prefetch measured slower, kernels/pdl.py). Measured on the
# H200 (2026-11-29, session 7, bench columns "FP8 prefetch 1 / 2"): b1 +0.06 / +0.24 ms, b8 -0.06 / -0.01 ms -- off.
PREFETCH_STEPS = 0
SPLIT_K_EPILOGUE = "last"     # split-K epilogue of pick_config (bench/sweep_fp8.py: "last" won every split shape)


@dataclass(frozen=True)
class FP8Config:
    block_m: int = 16
    block_n: int = 64
    split_k: int = 1
    warps: int = 4
    stages: int = 4
    epilogue: str = "atomic"       # split-K: "atomic" (zeroed fp32 output + cast) or "last" (see module doc)


def fp8_configs(m: int) -> list[FP8Config]:
    """Candidates swept by the benchmark for M rows of activations; the first is the default."""
    if m <= 16:
        return [FP8Config(), FP8Config(16, 32), FP8Config(16, 128, warps=8), FP8Config(16, 64, 2),
                FP8Config(16, 32, 4), FP8Config(16, 64, 4), FP8Config(16, 128, 2, warps=8)]
    return [FP8Config(128, 128, warps=8, stages=3), FP8Config(64, 128, warps=4, stages=4),
            FP8Config(128, 256, warps=8, stages=3)]


# Winners of ``bench/sweep_fp8.py`` on the H200 (Triton 3.6, 2026-11-29; kernels/BENCHMARKS.md "FP8 sweep"),
# keyed by (N, K, row bucket): the fused decode step's V4-Flash projections at batch 1 and 8.
TUNED = {
    (1536, 4096, 16): FP8Config(16, 64, 8, 4, 3, "last"),     # wq_a | wkv (stacked)
    (32768, 1024, 16): FP8Config(16, 128, 1, 4, 3),           # wq_b
    (8192, 4096, 16): FP8Config(16, 128, 4, 4, 3, "last"),    # wo_a, all 8 groups' rows (batch 1: 8 rows)
    (8192, 4096, 64): FP8Config(64, 64, 2, 4, 4, "last"),     # wo_a at batch 8 (64 rows)
    (4096, 8192, 16): FP8Config(16, 64, 8, 4, 3, "last"),     # wo_b
    (4096, 4096, 16): FP8Config(16, 64, 8, 4, 3, "last"),     # shared expert w1 | w3 (stacked)
    (4096, 2048, 16): FP8Config(16, 64, 4, 4, 3, "last"),     # shared expert w2
    (8192, 1024, 16): FP8Config(16, 64, 1, 4, 5),             # indexer wq_b
}


GEMV_MAX_M = 1
"""Calls with at most this many activation rows (M; a grouped call counts its tokens) run the CUDA-core GEMV
(``kernels/fp8_gemv.py``) instead of the tensor-core kernel; 0 switches it off (bench variant ``fp8_gemv``)."""
# Winners of ``bench/sweep_fp8.py --tokens 1 --gemv-only`` for the CUDA-core GEMV on the H200 (Triton 3.6, session 10,
# bench/results/h200_fp8_sweep_v13_gemv2.json), keyed by (N, K): the fused step's projections at batch 1; us per call
# (the tensor-core kernel's best config in the first sweep of the same session, h200_fp8_sweep_v13_gemv.json).
TUNED_GEMV = {
    (1536, 4096): GemvConfig(1, 16, 2),     # wq_a | wkv: 3.59 us (6.13)
    (32768, 1024): GemvConfig(4, 4, 1),     # wq_b: 11.86 (11.85)
    (8192, 4096): GemvConfig(2, 4, 1),      # wo_a, 8 groups: 11.24 (13.92)
    (4096, 8192): GemvConfig(1, 16, 4),     # wo_b: 11.16 (13.56)
    (4096, 4096): GemvConfig(2, 8, 4),      # shared expert w1 | w3: 6.11 (8.97)
    (4096, 2048): GemvConfig(2, 8, 4),      # shared expert w2: 4.07 (6.50)
    (8192, 1024): GemvConfig(4, 4, 4),      # indexer wq_b: 4.19 (5.70)
}


def _split(tiles: int, kb: int) -> int:
    """Split-K until >= ~2 programs per SM, keeping >= 4 K blocks per split."""
    split = 1
    while tiles * split < 264 and split < 8 and kb >= 4 * split * 2:
        split *= 2
    return split


def pick_config(m: int, n: int, k: int) -> FP8Config | GemvConfig:
    """Tile for M activation rows: the CUDA-core GEMV for M <= ``GEMV_MAX_M`` (the sweep's winner for a tuned
    shape, else its default); otherwise the tensor-core kernel: the sweep's winner for a tuned shape, else GEMV
    tiles (M <= 16) or 64-row tiles (M <= 64) with split-K, and 128x128 tiles for prefill."""
    if m <= GEMV_MAX_M:
        return TUNED_GEMV.get((n, k), GemvConfig())
    bucket = 16 if m <= 16 else 64 if m <= 64 else None
    if bucket is not None and (n, k, bucket) in TUNED:
        cfg = TUNED[(n, k, bucket)]
        return cfg if cfg.split_k == 1 else replace(cfg, epilogue=SPLIT_K_EPILOGUE)
    if m > 64:
        return fp8_configs(m)[0]
    bm, bn = (16, 64) if m <= 16 else (64, 64)
    split = _split(triton.cdiv(n, bn) * triton.cdiv(m, bm), triton.cdiv(k, BLOCK))
    return FP8Config(bm, bn, split, 4, 3 if m <= 16 else 4, epilogue=SPLIT_K_EPILOGUE)


@triton.jit
def _fp8_linear_kernel(
    # activations x [M, K] (fp32/bf16/fp16), weight [N, K] e4m3, scale [NB, KB] fp32
    x_ptr, w_ptr, s_ptr,
    # output y [M, N] (fp32 when SPLIT_K > 1 with atomics: adds into zeros)
    y_ptr,
    # LAST epilogue: partials ws [SPLIT_K, M, N] fp32, per-tile arrival counters cnt (int32, zero on entry)
    ws_ptr, cnt_ptr,
    # sizes; G > 1 (GROUPED): x is [M, G, K] and output rows [g*N/G, (g+1)*N/G) read x[:, g] only
    M, N, K, KB, G,
    # NORM: x rows RMS-normalised on load, ``(nw * (x * rsqrt(mean(x^2) + eps))).to(x dtype)`` (nw fp32 [K])
    nw_ptr, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, LAST: tl.constexpr,
    GROUPED: tl.constexpr, PDL: tl.constexpr, NORM: tl.constexpr = False, X32: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    nm = rn < N
    kk = tl.arange(0, 128)
    per = tl.cdiv(KB, SPLIT_K)
    kb_lo = pid_k * per
    kb_hi = tl.minimum(kb_lo + per, KB)
    if PDL and PREFETCH > 0:   # the first K blocks of this program's weight tile to L2 before the wait:
        wrow = w_ptr + tl.where(nm, rn, 0).to(tl.int64) * K             # one address per 128-byte line
        for i in tl.static_range(PREFETCH):
            prefetch_l2(wrow + tl.minimum(kb_lo + i, KB - 1) * 128)
    pdl_wait(PDL)
    if GROUPED:   # the launcher keeps each N tile inside one group
        xrow = rm.to(tl.int64) * G + (pid_n * BLOCK_N) // (N // G)
    else:
        xrow = rm.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if NORM:   # the row's RMS over all of K (every program; K is a q_lora-sized row)
        ss = tl.zeros([BLOCK_M], tl.float32)
        for kb in range(0, KB):
            k = kb * 128 + kk
            xa = tl.load(x_ptr + xrow[:, None] * K + k[None, :], mask=mm[:, None] & (k < K)[None, :],
                         other=0.0).to(tl.float32)
            ss += tl.sum(xa * xa, axis=1)
        rs = tl.rsqrt(ss / K + eps)                                      # [BM]
    for kb in range(kb_lo, kb_hi):
        k = kb * 128 + kk
        km = k < K
        a = tl.load(x_ptr + xrow[:, None] * K + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        if NORM:
            nw = tl.load(nw_ptr + k, mask=km, other=0.0)
            a = (nw[None, :] * (a.to(tl.float32) * rs[:, None])).to(a.dtype)   # RMSNorm's rounding
        b = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + k[None, :], mask=nm[:, None] & km[None, :],
                    other=0.0).to(tl.float16)                            # [BN, 128]
        sc = tl.load(s_ptr + (rn // 128) * KB + kb, mask=nm, other=0.0)  # [BN]
        if X32:   # fp32 activations as two fp16 terms (hi + lo, ~22 bits): fp32 models keep fp32 products
            ah = a.to(tl.float16)
            al = (a - ah.to(tl.float32)).to(tl.float16)
            d = tl.dot(al, tl.trans(b), tl.dot(ah, tl.trans(b)))
        else:
            d = tl.dot(a.to(tl.float16), tl.trans(b))                    # [BM, BN]
        acc += d * sc[None, :]
    ptrs = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    om = mm[:, None] & nm[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=om)
    elif LAST:
        wofs = rm[:, None].to(tl.int64) * N + rn[None, :]                # [BM, BN]
        # (M may arrive as a constexpr: Triton specialises integer arguments equal to 1)
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + wofs, acc, mask=om)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:                                       # every split's partial is written
            tot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for sk in range(SPLIT_K):
                tot += tl.load(ws_ptr + (sk * M).to(tl.int64) * N + wofs, mask=om, other=0.0, cache_modifier=".cg")
            tl.store(ptrs, tot.to(y_ptr.dtype.element_ty), mask=om)
            tl.atomic_xchg(cnt_ptr + tile, 0)                            # ready for the next call
    else:
        tl.atomic_add(ptrs, acc, mask=om)


@triton.jit
def _fp8_gemm_chained_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, KB, G,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                             DOT16: tl.constexpr):
    """Prefill GEMM for power-of-two block scales: each 128-wide K block of W is dequantised to bf16 with its
    scale folded in (e4m3 times 2^k is exact in bf16) and the dots chain in one accumulator, so the MMA never
    waits for a per-block rescale. ``DOT16``: bf16 operands (GPU); else the same values in fp32 (the CPU
    interpreter's bf16 dot is broken). ``G`` > 1: x is [M, G, K] and output rows [g N/G, (g+1) N/G) read
    x[:, g] only (V4's grouped ``wo_a``; the launcher keeps each N tile inside one group)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n                   # GROUP_M row tiles walk the N tiles together (L2 reuse of W)
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    nm = rn < N
    kk = tl.arange(0, 128)
    xrow = rm.to(tl.int64) * G + (pid_n * BLOCK_N) // (N // G)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, KB):
        k = kb * 128 + kk
        km = k < K
        a = tl.load(x_ptr + xrow[:, None] * K + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        b = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        sc = tl.load(s_ptr + (rn // 128) * KB + kb, mask=nm, other=0.0)                 # [BN]
        if DOT16:
            wb = (b.to(tl.float32) * sc[:, None]).to(tl.bfloat16)                     # exact: sc = 2^k
            acc = tl.dot(a, tl.trans(wb), acc)
        else:
            wb = b.to(tl.float32) * sc[:, None]
            acc = tl.dot(a.to(tl.float32), tl.trans(wb), acc, input_precision="ieee")
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


CHAINED_PREFILL = True
"""Prefill (M > 64) of bf16 activations with power-of-two block scales through ``_fp8_gemm_chained_kernel``.
H200 (bench/bench_fp8_prefill.py, 2048 rows): 1.2-1.4x the per-block kernel at the six prefill projections with
128 x 256 tiles (wq_b 583 -> 463 us, wo_b 528 -> 393, shared w1|w3 296 -> 225), bit-identical to cuBLAS bf16 on
the dequantised weights; the whole 2K prefill with the 128 x 128 tile: 5,409 -> 5,525 tok/s (bench A/B)."""
CHAINED_GROUPED = True
"""The chained GEMM for grouped projections too (V4's ``wo_a`` at prefill, ~19 ms of a 2K prefill with the per-block
kernel). Full-scale bench, same run (bench/results/h200_fullscale_v8_start.json): 2K prefill 5,611 tok/s off,
5,644 on (+0.6 %, inside the ~1.5 % run-to-run spread; predicted -5 ms = +1.4 %). On: exact like the ungrouped
chained GEMM and never slower."""
CHAINED_CONFIG = (128, 256, 8, 3, 8)     # BLOCK_M, BLOCK_N, warps, stages, GROUP_M
DEQUANT_PREFILL = True
"""Many-token calls (M >= ``DEQUANT_PREFILL_MIN_M``) of bf16 activations with power-of-two block scales (the
release's E8M0 scales): dequantise W to bf16 once per call (``dequantize_fp8_bf16``; exact, e4m3 x 2^k is a bf16
value) into a per-device workspace and run cuBLAS -- the same GEMM as the chained kernel (whose output equals
cuBLAS on the dequantised weights) at 1.3-1.8x its speed per call including the dequant pass (1 byte read, 2
written per weight). H200, whole 2K prefill, interleaved A/B (bench/prefill_ab.py): 351 -> 322 ms."""
DEQUANT_PREFILL_MIN_M = 512


@triton.jit
def _fp8_dequant_kernel(w_ptr, s_ptr, o_ptr, N, K, KB, BN: tl.constexpr, BK: tl.constexpr):
    """One ``[BN, BK]`` tile of ``o = e4m3(w) * S[n // 128, k // 128]`` in o's dtype."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    m = (rn < N)[:, None] & (rk < K)[None, :]
    ofs = rn[:, None].to(tl.int64) * K + rk[None, :]
    w = tl.load(w_ptr + ofs, mask=m, other=0.0).to(tl.float32)
    sc = tl.load(s_ptr + (rn // 128)[:, None] * KB + (rk // 128)[None, :], mask=m, other=0.0)
    tl.store(o_ptr + ofs, (w * sc).to(o_ptr.dtype.element_ty), mask=m)


def dequantize_fp8_bf16(w: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, K]`` bf16 of ``e4m3(w) * S`` (fp32 block multipliers ``s``); exact when every multiplier is a power
    of two (``scales_are_pow2``), otherwise each weight is rounded to bf16 once."""
    N, K = w.shape
    out = torch.empty((N, K), dtype=torch.bfloat16, device=w.device) if out is None else out
    bn, bk = 64, 128
    _fp8_dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](w, s, out, N, K, triton.cdiv(K, BLOCK),
                                                                 BN=bn, BK=bk, num_warps=4)
    return out


def fp8_gemm_dequant(x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """As ``fp8_gemm_chained`` (same arguments and result layout) by dequantising W into the device's weight
    workspace and calling torch's matmul (cuBLAS on the GPU); grouped: one batched matmul over the groups."""
    N, K = w.shape
    wb = dequantize_fp8_bf16(w, s, out=weight_workspace(w.device, N * K, torch.bfloat16)[:N * K].view(N, K))
    if groups == 1:
        return x2 @ wb.t()
    M, R = x2.shape[0] // groups, N // groups
    y = torch.bmm(x2.view(M, groups, K).transpose(0, 1), wb.view(groups, R, K).transpose(1, 2))    # [G, M, R]
    return y.transpose(0, 1).reshape(M, N)


def scales_are_pow2(scale: torch.Tensor) -> bool:
    """Every block multiplier is a power of two (E8M0 scales always are); remembered on the tensor for its
    current version (one host sync per weight, not per call)."""
    memo = getattr(scale, "_dsv4_pow2", None)
    if memo is not None and memo[0] == scale._version:
        return memo[1]
    m, _ = torch.frexp(scale.float())
    flag = bool(((m == 0.5) & torch.isfinite(scale)).all())
    scale._dsv4_pow2 = (scale._version, flag)
    return flag


def fp8_gemm_chained(x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor, config: tuple | None = None,
                     groups: int = 1) -> torch.Tensor:
    """x2 [M*groups, K] bf16 @ dequant(w, s)^T -> bf16 [M, N] with the scales folded into bf16 weight tiles (the
    caller checks ``scales_are_pow2``: only then is the fold exact); ``groups`` > 1: rows of x2 are (m, g) pairs
    and output rows of group g read x2[m * groups + g] (block-diagonal, as ``fp8_linear(groups=)``)."""
    if x2.dtype != torch.bfloat16:
        raise ValueError(f"kernels.fp8_gemm_chained: x must be bf16, got {x2.dtype}")
    K = x2.shape[1]
    M = x2.shape[0] // groups
    N = w.shape[0]
    bm, bn, warps, stages, group_m = config or CHAINED_CONFIG
    if not x2.is_cuda:
        bm, bn = min(bm, 16), min(bn, 32)
    while groups > 1 and (N // groups) % bn and bn > 16:   # an N tile must not straddle two groups
        bn //= 2
    if groups > 1 and (N // groups) % bn:
        raise ValueError(f"kernels.fp8_gemm_chained: N/groups={N // groups} is not a multiple of 16")
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fp8_gemm_chained_kernel[grid](x2, w, s, y, M, N, K, triton.cdiv(K, BLOCK), groups, BLOCK_M=bm, BLOCK_N=bn,
                                   GROUP_M=group_m, DOT16=x2.is_cuda, num_warps=warps, num_stages=stages)
    return y


def decode_scale(scale: torch.Tensor) -> torch.Tensor:
    """fp32 multiplier from fp32 / ``float8_e8m0fnu`` / uint8 (E8M0 bytes) block scales."""
    if scale.dtype == torch.float32:
        return scale
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - 127.0)
    if str(scale.dtype) == "torch.float8_e8m0fnu" or scale.dtype in (torch.float64, torch.float16, torch.bfloat16):
        return scale.float()
    raise ValueError(f"kernels.fp8_linear: scale must be fp32 or e8m0, got {scale.dtype}")


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, *,
               config: FP8Config | GemvConfig | None = None, groups: int = 1,
               norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(w [N, K], scale)^T -> [..., N]`` in x's dtype.

    ``groups`` G > 1: a grouped projection (V4's ``wo_a``): x ``[..., G, K]``, output ``[..., N]`` whose
    rows ``[g N/G, (g+1) N/G)`` are ``x[..., g, :] @ W[rows]^T`` -- each weight byte read once, only the
    diagonal blocks computed. ``norm`` = (weight fp32 [K], eps): x's rows go through RMSNorm on load (with
    its rounding to x's dtype), e.g. V4's ``wq_b(q_norm(qa))`` in one launch."""
    if w.dtype != torch.float8_e4m3fn or w.dim() != 2:
        raise ValueError(f"kernels.fp8_linear: w must be float8_e4m3fn [N, K], got {w.dtype} {tuple(w.shape)}")
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"kernels.fp8_linear: x has K={x.shape[-1]}, w has K={K}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"kernels.fp8_linear: x must be fp32/bf16/fp16, got {x.dtype}")
    NB, KB = triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK)
    if tuple(scale.shape) != (NB, KB):
        raise ValueError(f"kernels.fp8_linear: scale shape {tuple(scale.shape)} != {(NB, KB)}")
    if not w.is_contiguous():
        raise ValueError("kernels.fp8_linear: w must be contiguous")
    if w.device != x.device or scale.device != x.device:
        raise ValueError(f"kernels.fp8_linear: x on {x.device}, w on {w.device}, scale on {scale.device}")
    if norm is not None and (groups > 1 or norm[0].numel() != K or norm[0].dtype != torch.float32):
        raise ValueError(f"kernels.fp8_linear: norm needs groups=1 and an fp32 weight of {K}, got groups={groups}, "
                         f"{norm[0].dtype} {tuple(norm[0].shape)}")
    if groups > 1 and (x.dim() < 2 or x.shape[-2] != groups or N % groups):
        raise ValueError(f"kernels.fp8_linear: groups={groups} needs x [..., {groups}, K] and N % groups == 0, "
                         f"got x {tuple(x.shape)}, N={N}")
    s = decode_scale(scale).contiguous()
    lead = x.shape[:-2] if groups > 1 else x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0] // groups
    e8m0 = scale.dtype == torch.uint8 or str(scale.dtype) == "torch.float8_e8m0fnu"     # powers of two by format
    if (DEQUANT_PREFILL and config is None and norm is None and M >= DEQUANT_PREFILL_MIN_M
            and x.dtype == torch.bfloat16 and not (x.is_cuda and torch.cuda.is_current_stream_capturing())
            and (e8m0 or scales_are_pow2(s))):
        return fp8_gemm_dequant(x2, w, s, groups=groups).reshape(*lead, N)
    if (CHAINED_PREFILL and config is None and norm is None and M > 64 and x.dtype == torch.bfloat16
            and (groups == 1 or (CHAINED_GROUPED and (N // groups) % 16 == 0)) and (e8m0 or scales_are_pow2(s))):
        return fp8_gemm_chained(x2, w, s, groups=groups).reshape(*lead, N)
    cfg = config or pick_config(M, N, K)
    if isinstance(cfg, GemvConfig):
        return fp8_gemv(x2, w, s, cfg, groups=groups, norm=norm).reshape(*lead, N)
    if groups > 1:
        bn = cfg.block_n
        while (N // groups) % bn and bn > 16:   # an N tile must not straddle two groups
            bn //= 2
        if (N // groups) % bn:
            raise ValueError(f"kernels.fp8_linear: N/groups={N // groups} is not a multiple of 16")
        cfg = replace(cfg, block_n=bn)
    if cfg.epilogue not in ("atomic", "last"):
        raise ValueError(f"kernels.fp8_linear: epilogue must be 'atomic' or 'last', got {cfg.epilogue!r}")
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), cfg.split_k)
    last = cfg.split_k > 1 and cfg.epilogue == "last"
    if last:
        ws, cnt = split_workspace(x.device, cfg.split_k * M * N, grid[0] * grid[1])
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        ws = cnt = scale                                                 # unused
        y = (torch.zeros((M, N), dtype=torch.float32, device=x.device) if cfg.split_k > 1
             else torch.empty((M, N), dtype=x.dtype, device=x.device))
    nw, eps = (norm[0].contiguous(), float(norm[1])) if norm is not None else (s, 0.0)
    _fp8_linear_kernel[grid](x2, w, s, y, ws, cnt, M, N, K, KB, groups, nw, eps,
                             BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, LAST=last,
                             GROUPED=groups > 1, NORM=norm is not None, X32=x.dtype == torch.float32,
                             PREFETCH=PREFETCH_STEPS if M <= 64 else 0,
                             num_warps=cfg.warps,
                             num_stages=cfg.stages, **launch_args(x.device))
    return y.to(x.dtype).reshape(*lead, N)


# ----------------------------------------------------------------------------- torch reference
def dequantize_fp8_reference(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``W = e4m3(w) * S[n//128, k//128]``."""
    N, K = w.shape
    s = decode_scale(scale).repeat_interleave(BLOCK, 0)[:N].repeat_interleave(BLOCK, 1)[:, :K]
    return w.float() * s


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Torch path: dequantise to x's dtype, then matmul (``groups``: x [..., G, K], block-diagonal)."""
    W = dequantize_fp8_reference(w, scale).to(x.dtype)
    if groups == 1:
        return x @ W.T
    return torch.einsum("...gk,gok->...go", x, W.view(groups, -1, W.shape[1])).flatten(-2)


def random_fp8(n: int, k: int, device="cpu", generator: torch.Generator | None = None):
    """Synthetic FP8 weight (e4m3 of N(0,1)) with random fp32 power-of-two block scales ~1e-2."""
    w = torch.randn((n, k), device=device, generator=generator).to(torch.float8_e4m3fn)
    e = torch.randint(-9, -5, (triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK)), device=device, generator=generator)
    return w, torch.exp2(e.float())
