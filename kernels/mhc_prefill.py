"""mHC pre for many tokens (prefill, scoring) in one launch (v4_arch.md section 2.2; the math of
``dsv4lib.model.mhc.hc_pre``, optionally followed by the sublayer's RMSNorm).

The decode kernel (``mhc_step.py``) splits one token's mixing GEMV over 128 programs; for thousands of
tokens that re-reads ``fn`` per token. Here one program owns ``BM`` tokens:

1. ``mix = X fn^T`` over K = hc*D in BK steps: the streams read once in their own dtype (no fp32 copy of
   X), ``fn`` fp32, an fp32 ``tl.dot`` (``input_precision="ieee"``: the reference's fp32 products, no TF32),
   plus the per-token sum of squares; ``mix *= rsqrt(mean(x^2) + eps)`` (a scalar per token);
2. ``pre``, ``post`` and ``comb = sinkhorn(.)`` for the BM tokens at once ([BM, hc, hc] tiles);
3. ``y = sum_k pre_k X_k`` over D in BD chunks, rounded to X's dtype, then (``out_norm``) its RMSNorm in a
   second pass over what the program stored.

The torch path it replaces is ~100 kernels per site at prefill sizes (fp32 copies of the streams, the
mixing GEMM on SIMT cores, ~80 Sinkhorn launches, the collapse). Not the default yet: opt in with
``dsv4lib.model.transformer.FUSED_MHC_PREFILL`` (timed side by side by ``python -m dsv4lib bench``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mhc_step import check_pre


@triton.jit
def _hc_pre_prefill_kernel(x_ptr, fn_ptr, scale_ptr, base_ptr, nw_ptr, y_ptr, post_ptr, comb_ptr,
                           T, K, D, NM, norm_eps, hc_eps, out_eps,
                           BM: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr, HC: tl.constexpr,
                           ITERS: tl.constexpr, BD: tl.constexpr, HAS_NORM: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BM + tl.arange(0, BM)
    tm = t < T
    t64 = t.to(tl.int64)
    n = tl.arange(0, NP)
    acc = tl.zeros([BM, NP], tl.float32)
    ssq = tl.zeros([BM], tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        km = k < K
        xv = tl.load(x_ptr + t64[:, None] * K + k[None, :], mask=tm[:, None] & km[None, :], other=0.0).to(tl.float32)
        w = tl.load(fn_ptr + n[:, None] * K + k[None, :], mask=(n < NM)[:, None] & km[None, :], other=0.0)
        ssq += tl.sum(xv * xv, axis=1)
        acc += tl.dot(xv, tl.trans(w), input_precision="ieee")                                 # [BM, NP]
    mix = acc * (1.0 / tl.sqrt(ssq / K + norm_eps))[:, None]
    i = tl.arange(0, HC)
    rc = i[:, None] * HC + i[None, :]                                                          # [HC, HC]
    # columns of mix by masked sums (no register gather in Triton)
    mpre = tl.sum(tl.where(n[None, None, :] == i[None, :, None], mix[:, None, :], 0.0), axis=2)          # [BM, HC]
    mpost = tl.sum(tl.where(n[None, None, :] == (HC + i)[None, :, None], mix[:, None, :], 0.0), axis=2)
    pre = tl.sigmoid(mpre * tl.load(scale_ptr) + tl.load(base_ptr + i)[None, :]) + hc_eps
    post = 2.0 * tl.sigmoid(mpost * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + i)[None, :])
    s2 = tl.load(scale_ptr + 2)
    b2 = tl.load(base_ptr + 2 * HC + rc)                                                       # [HC, HC]
    m = tl.zeros([BM, HC, HC], tl.float32)
    for a in tl.static_range(HC):      # comb logits row by row: [BM, HC] at a time
        ca = tl.sum(tl.where(n[None, None, :] == (2 * HC + a * HC + i)[None, :, None], mix[:, None, :], 0.0), axis=2)
        m = tl.where(i[None, :, None] == a, ca[:, None, :], m)
    m = m * s2 + b2[None, :, :]
    # Sinkhorn per token (dsv4lib.model.mhc.sinkhorn): row softmax + eps, column norm, ITERS-1 x (row, column)
    m = tl.exp(m - tl.max(m, axis=2)[:, :, None])
    m = m / tl.sum(m, axis=2)[:, :, None] + hc_eps
    m = m / (tl.sum(m, axis=1)[:, None, :] + hc_eps)
    for _ in tl.static_range(ITERS - 1):
        m = m / (tl.sum(m, axis=2)[:, :, None] + hc_eps)
        m = m / (tl.sum(m, axis=1)[:, None, :] + hc_eps)
    tl.store(post_ptr + t64[:, None] * HC + i[None, :], post, mask=tm[:, None])
    tl.store(comb_ptr + t64[:, None, None] * (HC * HC) + rc[None, :, :], m, mask=tm[:, None, None])
    # collapse y = sum_k pre_k X_k (rounded to y's dtype), then the optional RMSNorm
    yss = tl.zeros([BM], tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dm = d < D
        ya = tl.zeros([BM, BD], tl.float32)
        for kk in tl.static_range(HC):
            pk = tl.sum(tl.where(i[None, :] == kk, pre, 0.0), axis=1)                           # [BM]
            xs = tl.load(x_ptr + t64[:, None] * K + kk * D + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
            ya += pk[:, None] * xs.to(tl.float32)
        y = ya.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + t64[:, None] * D + d[None, :], y, mask=tm[:, None] & dm[None, :])
        yf = y.to(tl.float32)
        yss += tl.sum(yf * yf, axis=1)
    if HAS_NORM:
        tl.debug_barrier()
        ry = 1.0 / tl.sqrt(yss / D + out_eps)                                                  # [BM]
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            dm = d < D
            om = tm[:, None] & dm[None, :]
            y = tl.load(y_ptr + t64[:, None] * D + d[None, :], mask=om, other=0.0).to(tl.float32)
            g = tl.load(nw_ptr + d, mask=dm, other=0.0)
            tl.store(y_ptr + t64[:, None] * D + d[None, :], (g[None, :] * (y * ry[:, None])).to(y_ptr.dtype.element_ty),
                     mask=om)


def hc_pre_prefill(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
                   hc_eps: float, norm_eps: float, out_norm: torch.Tensor | None = None,
                   out_eps: float = 1e-6, block_m: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [..., hc, D] (any number of tokens) -> (y [..., D] in X's dtype, post [..., hc], comb [..., hc, hc]
    fp32); ``out_norm`` [D]: y comes back RMS-normalised with that weight (eps ``out_eps``)."""
    T, hc, D, NM, K = check_pre(X, fn, out_norm, "hc_pre_prefill")
    lead = X.shape[:-2]
    x = X.reshape(T, K).contiguous()
    y = torch.empty(T, D, dtype=X.dtype, device=X.device)
    post = torch.empty(T, hc, dtype=torch.float32, device=X.device)
    comb = torch.empty(T, hc, hc, dtype=torch.float32, device=X.device)
    nw = out_norm.float().contiguous() if out_norm is not None else post
    _hc_pre_prefill_kernel[(triton.cdiv(T, block_m),)](
        x, fn.contiguous(), scale.float().contiguous(), base.float().contiguous(), nw, y, post, comb,
        T, K, D, NM, float(norm_eps), float(hc_eps), float(out_eps),
        BM=block_m, NP=max(16, triton.next_power_of_2(NM)), BK=64, HC=hc, ITERS=iters,
        BD=min(256, triton.next_power_of_2(D)), HAS_NORM=out_norm is not None,
        num_warps=8)   # offline SASS (sm_90): BM 16 / 8 warps is the first tile without spills (255 registers)
    return y.reshape(*lead, D), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)
