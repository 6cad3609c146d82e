"""FP8 (e4m3) block-scaled GEMV for one or a few activation rows with the weight streamed by the Hopper bulk-copy
engine (TMA): ``y = x @ (W * S)^T``, same contract as ``fp8_gemv`` (``w`` e4m3 ``[N, K]``, ``scale [N/128, K/128]``
fp32 multipliers, grouped mode), for shapes that tile evenly (``N % bn == 0``, ``K % 128 == 0``).

Why: the CUDA-core GEMV of ``fp8_gemv.py`` loads weights into registers, so its bytes in flight per SM are bounded
by registers and by the 32 resident programs per SM; session 12 measured it the same speed from L2 as from HBM
(~3 TB/s, 70 % of copy at 32 MB) and slower on any smaller grid (``bench/results/h200_fp8_persist_v15.*``), i.e.
bound by loads in flight. Here a program's weight tiles ``[bn, 128]`` arrive by TMA into a ring of ``stages``
shared-memory buffers (Triton's pipeliner over ``tl.range(num_stages=...)``), so up to ``stages * bn * 128`` bytes
per program are in flight without holding registers.

Kernel: one program per ``bn`` output rows and activation row; a K step is one 128-wide block (one scale per
program and step: ``bn`` divides 128); products accumulate elementwise in fp32 ``[bn, 128]`` and are reduced once
at the end. x is addressed in the weights' shape (the zero-row trick, kernels/NOTES.md "CUDA-core GEMV layouts").
Results differ from ``fp8_gemv`` only by fp32 summation order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import launch_args, pdl_wait

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton without host tensor descriptors
    TensorDescriptor = None


@dataclass(frozen=True)
class GemvTmaConfig:
    bn: int = 32             # output rows per program (divides 128)
    stages: int = 8          # 128-wide K blocks in flight per program (the TMA ring)
    warps: int = 4


@triton.jit
def _fp8_gemv_tma_kernel(x_ptr, w_desc, s_ptr, y_ptr, M, N, K, KB, G,
                         BN: tl.constexpr, STAGES: tl.constexpr, GROUPED: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = pid // M                    # programs of the same rows are adjacent: their weight reads share L2
    m = pid % M
    n0 = pid_n * BN
    rn = n0 + tl.arange(0, BN)
    srow = s_ptr + (n0 // 128) * KB
    pdl_wait(PDL)
    if GROUPED:
        xrow = x_ptr + (m.to(tl.int64) * G + n0 // (N // G)) * K
    else:
        xrow = x_ptr + m.to(tl.int64) * K
    col = tl.arange(0, 128)
    xp = xrow + 0 * rn[:, None] + col[None, :]                          # [BN, 128], rows coincide
    acc = tl.zeros([BN, 128], tl.float32)
    for kb in tl.range(0, KB, num_stages=STAGES):
        w = w_desc.load([n0, kb * 128])                                 # [BN, 128] e4m3
        xa = tl.load(xp + kb * 128).to(tl.float32)
        acc += w.to(tl.float32) * (xa * tl.load(srow + kb))
    y = tl.sum(acc, axis=1)                                             # [BN]
    tl.store(y_ptr + m.to(tl.int64) * N + rn, y.to(y_ptr.dtype.element_ty))


def fits(n: int, k: int, cfg: GemvTmaConfig, groups: int = 1) -> bool:
    """Whether the TMA GEMV takes this shape (even tiles, whole groups per tile, a Triton with descriptors)."""
    return (TensorDescriptor is not None and 128 % cfg.bn == 0 and n % cfg.bn == 0 and k % 128 == 0
            and (n // groups) % cfg.bn == 0)


def fp8_gemv_tma(x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor, cfg: GemvTmaConfig,
                 groups: int = 1) -> torch.Tensor:
    """``x2 [M*groups, K]`` (contiguous; (m, g) rows when grouped) against e4m3 ``w [N, K]`` with fp32 block
    multipliers ``s`` -> ``[M, N]`` in x2's dtype. The caller (``fp8_linear``) validates dtypes and scales."""
    N, K = w.shape
    if not fits(N, K, cfg, groups):
        raise ValueError(f"kernels.fp8_gemv_tma: shape N={N}, K={K}, groups={groups} does not tile by {cfg}")
    M = x2.shape[0] // groups
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    desc = TensorDescriptor.from_tensor(w, [cfg.bn, 128])
    _fp8_gemv_tma_kernel[(N // cfg.bn * M,)](x2, desc, s, y, M, N, K, K // 128, groups, BN=cfg.bn,
                                             STAGES=cfg.stages, GROUPED=groups > 1, num_warps=cfg.warps,
                                             **launch_args(x2.device))
    return y
