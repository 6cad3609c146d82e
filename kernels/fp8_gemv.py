"""FP8 (e4m3) block-scaled GEMV on CUDA cores for one or a few activation rows: ``y = x @ (W * S)^T`` (and the
same kernel for bf16 weights without scales, ``bf16_gemv``).

Same layout and contract as ``fp8_linear`` (``w`` e4m3 ``[N, K]``, ``scale [ceil(N/128), ceil(K/128)]`` fp32
multipliers; grouped mode and the RMSNorm-on-load prologue). Why a second kernel: the tensor-core kernel pads one
token to a 16-row MMA and converts every dequantised weight tile to the MMA operand layout through shared memory,
and it needs split-K (a second pass over fp32 partials) to give the 0.5-4 MB projections enough programs; at batch 1
it streams 22-64 % of copy bandwidth with ~5 us of fixed cost per call (kernels/BENCHMARKS.md "FP8 block GEMV
sweep").

Kernel: one program per ``ROWS`` output rows and one activation row (programs of the same rows are adjacent in the
grid, so at M > 1 the repeated weight reads hit L2); no split-K, no workspace. A K step reads ``UNROLL`` 128-wide
blocks, one 16-byte piece of one row per thread and block; the piece's products (e4m3 -> f16x2 -> fp32) are summed
in registers and multiplied by the block's scale once, the pieces' sums accumulate in fp32 and are reduced over K at
the end (layout notes: kernels/NOTES.md "CUDA-core GEMV layouts"). fp32 activations keep fp32 products (no fp16
rounding of x at all); bf16/fp16 ones are exact in fp32. Results differ from the tensor-core kernel only by fp32
summation order. H200 (bench/sweep_fp8.py, kernels/BENCHMARKS.md "Tenth session"): 67-71 % of copy bandwidth at the
32 MB projections, 41-49 % at the 4-6 MB ones; the decode step at batch 1 5.58 -> 4.92 ms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import launch_args, pdl_wait


@dataclass(frozen=True)
class GemvConfig:
    rows: int = 4            # output rows per program (divides 128: a program's rows share one scale row)
    unroll: int = 4          # 128-wide K blocks per loop step (one load each for weights and activations)
    warps: int = 4
    stages: int = 1          # > 1: Triton's cp.async pipeline over the K loop (copies x once per row into smem)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr,
    # sizes; G > 1 (GROUPED): x is [M, G, K] and output rows [g*N/G, (g+1)*N/G) read x[:, g] only
    M, N, K, KB, G,
    # NORM: x rows RMS-normalised on load, ``(nw * (x * rsqrt(mean(x^2) + eps))).to(x dtype)`` (nw fp32 [K])
    nw_ptr, eps,
    ROWS: tl.constexpr, UNROLL: tl.constexpr, STAGES: tl.constexpr, GROUPED: tl.constexpr, NORM: tl.constexpr,
    EVEN: tl.constexpr, PDL: tl.constexpr, SCALED: tl.constexpr = True,
):
    pid = tl.program_id(0)
    pid_n = pid // M                    # programs of the same rows are adjacent: their weight reads share L2
    m = pid % M
    n0 = pid_n * ROWS
    rn = n0 + tl.arange(0, ROWS)
    nm = rn < N
    srow = s_ptr + (n0 // 128) * KB      # ROWS divides 128: one scale row per program
    pdl_wait(PDL)   # (the first K step's weights loaded before it: no gain on the H200, session 11, b1 4.70 vs 4.69 ms)
    if GROUPED:
        xrow = x_ptr + (m.to(tl.int64) * G + n0 // (N // G)) * K
    else:
        xrow = x_ptr + m.to(tl.int64) * K
    # A step covers UNROLL 128-wide blocks as [ROWS, CH UNROLL, IN] with IN 16-byte pieces (16 e4m3 or 8 bf16
    # weights): each thread's piece of one row is summed in registers and the block's scale multiplies that
    # partial once. x is addressed with the weights' shape (0 * rows): the compiler loads and converts it once per
    # thread for all its rows, where a broadcast 1-D load would go through shared memory every step. EVEN (no
    # masks) lets ptxas issue all of a step's loads first.
    IN: tl.constexpr = 16 if SCALED else 8
    CH: tl.constexpr = 128 // IN
    col = tl.arange(0, CH * UNROLL)[None, :, None] * IN + tl.arange(0, IN)[None, None, :]     # [1, CH U, IN]
    rmask = nm[:, None, None]
    wp = w_ptr + rn.to(tl.int64)[:, None, None] * K + col
    xp = xrow + 0 * rn[:, None, None] + col
    jb = tl.arange(0, CH * UNROLL) // CH                                                      # block of piece j
    if NORM:   # the row's RMS over all of K
        ss = tl.zeros([ROWS, CH * UNROLL], tl.float32)
        for kb0 in range(0, KB, UNROLL):
            xa = tl.load(xp + kb0 * 128, mask=rmask & (kb0 * 128 + col < K), other=0.0).to(tl.float32)
            ss += tl.sum(xa * xa, axis=2)
        rs = tl.rsqrt(tl.sum(ss, axis=1) / K + eps)[:, None, None]                          # [ROWS, 1, 1]
    acc = tl.zeros([ROWS, CH * UNROLL], tl.float32)
    for kb0 in tl.range(0, KB, UNROLL, num_stages=STAGES):
        if EVEN:
            w = tl.load(wp + kb0 * 128)                                                      # e4m3
            xa = tl.load(xp + kb0 * 128)
        else:
            km = rmask & (kb0 * 128 + col < K)
            w = tl.load(wp + kb0 * 128, mask=km, other=0.0)
            xa = tl.load(xp + kb0 * 128, mask=km, other=0.0)
        if NORM:
            nw = tl.load(nw_ptr + 0 * rn[:, None, None] + kb0 * 128 + col, mask=kb0 * 128 + col < K, other=0.0)
            xa = (nw * (xa.to(tl.float32) * rs)).to(xa.dtype)                                 # RMSNorm's rounding
        if SCALED:
            sc = tl.load(srow + 0 * rn[:, None] + tl.minimum(kb0 + jb, KB - 1)[None, :])        # [ROWS, CH U]
            acc += tl.sum(w.to(tl.float32) * xa.to(tl.float32), axis=2) * sc
        else:
            acc += tl.sum(w.to(tl.float32) * xa.to(tl.float32), axis=2)
    y = tl.sum(acc, axis=1)                                                                   # [ROWS]
    tl.store(y_ptr + m.to(tl.int64) * N + rn, y.to(y_ptr.dtype.element_ty), mask=nm)


def fp8_gemv(x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, cfg: GemvConfig, groups: int = 1,
             norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``x2 [M*groups, K]`` (contiguous; rows are (m, g) pairs when grouped) against e4m3 ``w [N, K]`` with fp32
    block multipliers ``s`` (or a bf16 ``w`` and ``s`` None) -> ``[M, N]`` in x2's dtype. The caller
    (``fp8_linear`` / ``bf16_gemv``) validates shapes and dtypes."""
    N, K = w.shape
    M = x2.shape[0] // groups
    rows, unroll = cfg.rows, cfg.unroll
    if 128 % rows or unroll not in (1, 2, 4, 8, 16):
        raise ValueError(f"kernels.fp8_gemv: rows must divide 128 and unroll be 1, 2, 4, 8 or 16, got {cfg}")
    if groups > 1 and (N // groups) % rows:
        raise ValueError(f"kernels.fp8_gemv: N/groups={N // groups} is not a multiple of rows={rows}")
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    scaled = s is not None
    s = s if scaled else w                                                # unused
    nw, eps = (norm[0].contiguous(), float(norm[1])) if norm is not None else (s, 0.0)
    grid = (triton.cdiv(N, rows) * M,)
    _fp8_gemv_kernel[grid](x2, w, s, y, M, N, K, triton.cdiv(K, 128), groups, nw, eps,
                           ROWS=rows, UNROLL=unroll, STAGES=cfg.stages, GROUPED=groups > 1, NORM=norm is not None,
                           EVEN=N % rows == 0 and K % (128 * unroll) == 0, SCALED=scaled,
                           num_warps=cfg.warps, num_stages=1, **launch_args(x2.device))
    return y


# Per-(N, K) configs of ``bf16_gemv``, H200 sweep (``bench/sweep_fp8.py --bf16``,
# bench/results/h200_bf16_gemv_sweep_v13.json): V4-Flash CSA layers' stacked compressor + indexer projections
# 8.30 -> 7.09 us against the default (2, 8, 4), HCA layers' 4.26 -> 3.68. Adopted in session 11, when the side
# branch that runs them also took the deferred mHC Sinkhorn (model.graphed.DEFER_COMB) and lost slack.
TUNED_BF16: dict = {(2624, 4096): GemvConfig(1, 16, 4), (1024, 4096): GemvConfig(1, 16, 4)}
BF16_DEFAULT = GemvConfig(2, 8, 4)   # other shapes


def bf16_gemv(x: torch.Tensor, w: torch.Tensor, cfg: GemvConfig | None = None) -> torch.Tensor:
    """``F.linear(x.to(bf16), w)`` for a bf16 ``w [N, K]`` and one or a few rows of x on the CUDA-core GEMV (fp32
    accumulation, bf16 result -- the same contract as cuBLAS, another summation order). The fused decode step's
    stacked compressor / indexer projections (21.5 MB per CSA layer at batch 1)."""
    if w.dtype != torch.bfloat16 or w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"kernels.bf16_gemv: w must be a contiguous bf16 [N, K], got {w.dtype} {tuple(w.shape)}")
    N, K = w.shape
    if x.shape[-1] != K or x.device != w.device:
        raise ValueError(f"kernels.bf16_gemv: x {tuple(x.shape)} on {x.device} against w {tuple(w.shape)} on {w.device}")
    x2 = x.reshape(-1, K).to(torch.bfloat16).contiguous()
    y = fp8_gemv(x2, w, None, cfg or TUNED_BF16.get((N, K), BF16_DEFAULT))
    return y.reshape(*x.shape[:-1], N)
