"""mHC pre and post for a few tokens (decode), three launches per block site instead of ~20 torch ops
(v4_arch.md section 2.2; the math of ``dsv4lib.model.mhc.hc_pre`` / ``hc_post``).

Pre, for X ``[T, hc, D]`` (the hc residual streams of T tokens) and ``fn [(2+hc)*hc, hc*D]`` fp32:

1. ``_mix_partial_kernel``, grid ``(T, NSPLIT)``: each program takes a K slice of the flattened
   streams ``v = X.flatten()`` and writes its partial dots ``fn[:, slice] . v[slice]`` plus the partial
   sum of squares to ``part [T, NSPLIT, NMP]`` (no atomics, no zeroing).
2. ``_mix_finish_kernel``, one program per token: sums the partials; the RMS normalisation is a
   scalar per token, so ``mix = rsqrt(mean(v^2) + eps) * (fn . v)`` equals the reference's
   ``(v * rsqrt(...)) @ fn^T`` up to rounding; then ``pre = sigmoid(.) + eps``, ``post = 2 sigmoid(.)``,
   ``comb = sinkhorn(.)`` (the hc x hc matrix in registers, as ``kernels/mhc_sinkhorn.py``), and the
   sublayer input ``y = sum_k pre_k X_k`` over D in chunks, stored in X's dtype.

Post, ``_hc_post_kernel`` grid ``(T, cdiv(D, BLOCK_D))``: ``out_k = post_k f + sum_j comb[j, k] res_j``
in fp32, stored in the streams' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mhc_sinkhorn import sinkhorn_tile

NSPLIT = 64          # K slices of the mixing GEMV per token (hc*D = 16384 at V4 shapes -> 256 each)


@triton.jit
def _mix_partial_kernel(x_ptr, fn_ptr, part_ptr, K, NM, per,
                        NMP: tl.constexpr, BK: tl.constexpr):
    # x [T, K] (streams flattened, any float dtype), fn [NM, K] fp32, part [T, NSPLIT, NMP] fp32
    t = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    ns = tl.num_programs(1)
    r = tl.arange(0, NMP)
    acc = tl.zeros([NMP], tl.float32)
    ssq = tl.zeros([BK], tl.float32)
    for k0 in range(sp * per, tl.minimum(sp * per + per, K), BK):
        k = k0 + tl.arange(0, BK)
        km = k < tl.minimum(sp * per + per, K)
        v = tl.load(x_ptr + t * K + k, mask=km, other=0.0).to(tl.float32)                  # [BK]
        w = tl.load(fn_ptr + r[:, None] * K + k[None, :], mask=(r < NM)[:, None] & km[None, :], other=0.0)
        acc += tl.sum(w * v[None, :], axis=1)                                              # [NMP]
        ssq += v * v
    # slot NM of the row carries the sum of squares (NMP > NM)
    acc = tl.where(r == NM, tl.sum(ssq, axis=0), acc)
    tl.store(part_ptr + (t * ns + sp) * NMP + r, acc)


@triton.jit
def _mix_finish_kernel(part_ptr, x_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr,
                       K, D, norm_eps, hc_eps, ns,
                       NMP: tl.constexpr, SB: tl.constexpr, HC: tl.constexpr, ITERS: tl.constexpr,
                       BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    NM: tl.constexpr = (2 + HC) * HC
    s = tl.arange(0, SB)
    r = tl.arange(0, NMP)
    p = tl.load(part_ptr + (t * ns + s[:, None]) * NMP + r[None, :], mask=(s < ns)[:, None], other=0.0)
    tot = tl.sum(p, axis=0)                                                                # [NMP]
    ssq = tl.sum(tl.where(r == NM, tot, 0.0), axis=0)
    rs = 1.0 / tl.sqrt(ssq / K + norm_eps)
    i = tl.arange(0, HC)
    rc = i[:, None] * HC + i[None, :]                                                      # [HC, HC]
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    # gather mix entries from the [NMP] vector (no dynamic indexing of registers in Triton)
    mpre = tl.sum(tl.where(r[None, :] == i[:, None], tot[None, :], 0.0), axis=1) * rs      # [HC]
    mpost = tl.sum(tl.where(r[None, :] == (HC + i)[:, None], tot[None, :], 0.0), axis=1) * rs
    mc = tl.sum(tl.where(r[None, None, :] == (2 * HC + rc)[:, :, None], tot[None, None, :], 0.0), axis=2) * rs
    pre = tl.sigmoid(mpre * s0 + tl.load(base_ptr + i)) + hc_eps
    post = 2.0 * tl.sigmoid(mpost * s1 + tl.load(base_ptr + HC + i))
    m = sinkhorn_tile(mc * s2 + tl.load(base_ptr + 2 * HC + rc), hc_eps, ITERS)
    tl.store(post_ptr + t * HC + i, post)
    tl.store(comb_ptr + t * HC * HC + rc, m)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dm = d < D
        xs = tl.load(x_ptr + t * K + i[:, None] * D + d[None, :], mask=dm[None, :], other=0.0).to(tl.float32)
        y = tl.sum(pre[:, None] * xs, axis=0)                                             # [BD]
        tl.store(y_ptr + t * D + d, y.to(y_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _hc_post_kernel(f_ptr, f2_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, D,
                    HC: tl.constexpr, BD: tl.constexpr, HAS_F2: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = d < D
    i = tl.arange(0, HC)
    f = tl.load(f_ptr + t * D + d, mask=dm, other=0.0).to(tl.float32)                      # [BD]
    if HAS_F2:   # sublayer output = f + f2, rounded to the streams' dtype (as the MoE's .to(x.dtype))
        f = (f + tl.load(f2_ptr + t * D + d, mask=dm, other=0.0).to(tl.float32)).to(out_ptr.dtype.element_ty)
        f = f.to(tl.float32)
    res = tl.load(res_ptr + t * HC * D + i[:, None] * D + d[None, :], mask=dm[None, :], other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t * HC + i)                                                  # [HC]
    out = post[:, None] * f[None, :]                                                       # [HC(k), BD]
    for j in tl.static_range(HC):
        cj = tl.load(comb_ptr + t * HC * HC + j * HC + i)                                 # comb[j, :] [HC]
        rj = tl.sum(tl.where(i[:, None] == j, res, 0.0), axis=0)                           # res_j [BD]
        out += cj[:, None] * rj[None, :]
    tl.store(out_ptr + t * HC * D + i[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=dm[None, :])


def _check(X: torch.Tensor, name: str) -> tuple[int, int, int]:
    if X.dim() < 2 or X.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"kernels.mhc_step.{name}: streams must be fp32/bf16/fp16 [..., hc, D], got "
                         f"{X.dtype} {tuple(X.shape)}")
    hc, D = X.shape[-2], X.shape[-1]
    if hc < 1 or hc & (hc - 1):
        raise ValueError(f"kernels.mhc_step.{name}: hc={hc} must be a power of two")
    return X.numel() // (hc * D), hc, D


def hc_pre_fused(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
                 hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [..., hc, D] -> (y [..., D] in X's dtype, post [..., hc] fp32, comb [..., hc, hc] fp32)."""
    T, hc, D = _check(X, "hc_pre_fused")
    NM, K = (2 + hc) * hc, hc * D
    if tuple(fn.shape) != (NM, K) or fn.dtype != torch.float32:
        raise ValueError(f"kernels.mhc_step.hc_pre_fused: fn must be fp32 [{NM}, {K}], got {fn.dtype} {tuple(fn.shape)}")
    lead = X.shape[:-2]
    x = X.reshape(T, K).contiguous()
    ns = max(1, min(NSPLIT, triton.cdiv(K, 128)))
    per = triton.cdiv(triton.cdiv(K, ns), 128) * 128
    ns = triton.cdiv(K, per)
    NMP = triton.next_power_of_2(NM + 1)
    part = torch.empty(T, ns, NMP, dtype=torch.float32, device=X.device)
    _mix_partial_kernel[(T, ns)](x, fn.contiguous(), part, K, NM, per, NMP=NMP, BK=128, num_warps=4)
    y = torch.empty(T, D, dtype=X.dtype, device=X.device)
    post = torch.empty(T, hc, dtype=torch.float32, device=X.device)
    comb = torch.empty(T, hc, hc, dtype=torch.float32, device=X.device)
    _mix_finish_kernel[(T,)](part, x, scale.float().contiguous(), base.float().contiguous(), y, post, comb,
                             K, D, float(norm_eps), float(hc_eps), ns,
                             NMP=NMP, SB=triton.next_power_of_2(ns), HC=hc, ITERS=iters,
                             BD=min(1024, triton.next_power_of_2(D)), num_warps=4)
    return y.reshape(*lead, D), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)


def hc_post_fused(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                  f2: torch.Tensor | None = None) -> torch.Tensor:
    """f [..., D], res [..., hc, D], post [..., hc], comb [..., hc, hc] -> [..., hc, D] in res's dtype.
    ``f2`` [..., D]: the sublayer output is ``(f + f2)`` rounded to res's dtype (routed + shared expert)."""
    T, hc, D = _check(res, "hc_post_fused")
    bad = f.shape[-1] != D or f.numel() != T * D or post.numel() != T * hc or comb.numel() != T * hc * hc
    if bad or (f2 is not None and f2.numel() != T * D):
        raise ValueError(f"kernels.mhc_step.hc_post_fused: shapes f {tuple(f.shape)}, res {tuple(res.shape)}, "
                         f"post {tuple(post.shape)}, comb {tuple(comb.shape)}"
                         f"{'' if f2 is None else f', f2 {tuple(f2.shape)}'} do not agree")
    out = torch.empty_like(res, memory_format=torch.contiguous_format)
    BD = min(1024, triton.next_power_of_2(D))
    fc = f.contiguous()
    _hc_post_kernel[(T, triton.cdiv(D, BD))](fc, f2.contiguous() if f2 is not None else fc, res.contiguous(),
                                              post.float().contiguous(), comb.float().contiguous(), out, D,
                                              HC=hc, BD=BD, HAS_F2=f2 is not None, num_warps=4)
    return out


# ----------------------------------------------------------------------------- torch references
def hc_pre_reference(X, fn, scale, base, iters: int, hc_eps: float, norm_eps: float):
    """``dsv4lib.model.mhc.hc_pre`` (the eager model's math)."""
    from dsv4lib.model.mhc import hc_pre
    return hc_pre(X, fn, scale, base, X.shape[-2], iters, hc_eps, norm_eps)


def hc_post_reference(f, res, post, comb, f2=None):
    from dsv4lib.model.mhc import hc_post
    if f2 is not None:
        f = (f.float() + f2.float()).to(res.dtype)
    return hc_post(f, res, post, comb)
