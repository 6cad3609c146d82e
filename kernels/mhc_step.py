"""mHC pre and post for a few tokens (decode), two launches per block site instead of ~20 torch ops
(v4_arch.md section 2.2; the math of ``dsv4lib.model.mhc.hc_pre`` / ``hc_post``).

Pre, for X ``[T, hc, D]`` (the hc residual streams of T tokens) and ``fn [(2+hc)*hc, hc*D]`` fp32:

One launch, ``_hc_pre_kernel``, grid ``(T, slices)`` (``pre_launch``: slices, K step and warps by token count):

1. each program takes a K slice of the flattened streams ``v = X.flatten()`` and writes its partial
   dots ``fn[:, slice] . v[slice]`` plus the partial sum of squares to ``part [T, slices, NMP]``, then
   counts itself in the token's arrival counter (acq_rel atomic, kernels/workspace.py);
2. the last program of a token to arrive finishes it: sums the partials; the RMS normalisation is a
   scalar per token, so ``mix = rsqrt(mean(v^2) + eps) * (fn . v)`` equals the reference's
   ``(v * rsqrt(...)) @ fn^T`` up to rounding; then ``pre = sigmoid(.) + eps``, ``post = 2 sigmoid(.)``,
   ``comb = sinkhorn(.)`` (the hc x hc matrix in registers, as ``kernels/mhc_sinkhorn.py``), and the
   sublayer input ``y = sum_k pre_k X_k`` over D in chunks, stored in X's dtype -- optionally followed
   by the sublayer's RMSNorm (``out_norm``: the attention / FFN input norm, one launch fewer), and
   resets the counter. (Two launches before: the finish waited a full launch gap for the partials.)
   With ``defer_comb`` the finish stores the normalised mixing logits instead of post and comb, and
   ``hc_comb`` (the sigmoid and Sinkhorn of ``kernels/mhc_sinkhorn.py``) computes them in a launch of
   its own -- the fused decode step runs it on its side stream, since only the sublayer's input y is
   on the critical path and post / comb are first read by the mHC post after the sublayer (H200, one
   token: 7.97 us per call, 5.87 with 1 Sinkhorn iteration instead of 20).

Post, ``_hc_post_kernel`` grid ``(T, cdiv(D, BLOCK_D))``: ``out_k = post_k f + sum_j comb[j, k] res_j``
in fp32, stored in the streams' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_args, pdl_wait, prefetch_l2

from .mhc_sinkhorn import hc_split, sinkhorn_tile
from .workspace import split_workspace

# Pre launch (K slices of the mixing GEMV per token, channels per K step, warps per program), by token count.
# H200, V4 shapes (hc*D = 16384), bench/bench_decode_launches.py --what mhc (session 8): one token 8.0 us per call at
# (128, 128, 8) (next best 8.7); eight tokens 16.2 us at that config, 11.1-11.2 us at (32-128, 512, 4) -- 128
# slices of 128 channels per token make 1024 programs of 8 warps at T=8, more than one wave; at BK 512 the
# slices cap at K / 512 = 32 per token.
PRE_ONE = (128, 128, 8)
PRE_MANY = (32, 512, 4)


def pre_launch(T: int) -> tuple[int, int, int]:
    """(K slices per token, channels per K step, warps) of the pre launch for T tokens."""
    return PRE_ONE if T == 1 else PRE_MANY


SINGLE_MAX_D = 4096  # up to this D the finishing program keeps the row in registers (one load per stream)


@triton.jit
def _hc_pre_kernel(x_ptr, fn_ptr, part_ptr, cnt_ptr, scale_ptr, base_ptr, nw_ptr, y_ptr, post_ptr, comb_ptr,
                   mix_ptr, f_ptr, f2_ptr, res_ptr, pin_ptr, cin_ptr,
                   K, D, NM, per, norm_eps, hc_eps, out_eps,
                   NMP: tl.constexpr, SB: tl.constexpr, HC: tl.constexpr, ITERS: tl.constexpr,
                   BD: tl.constexpr, BK: tl.constexpr, HAS_NORM: tl.constexpr, SINGLE: tl.constexpr,
                   POST: tl.constexpr, HAS_F2: tl.constexpr, DEFER: tl.constexpr, PDL: tl.constexpr):
    # x [T, K] (streams flattened, any float dtype), fn [NM, K] fp32, part [T, slices, NMP] fp32,
    # cnt [T] int32 arrival counters (zero on entry, reset by the finishing program).
    # POST: the previous sublayer's mHC post first -- x = post_in_k f + sum_j comb_in[j, k] res_j is
    # computed slice by slice from f [T, D] (+ f2), res [T, K], pin [T, HC], cin [T, HC, HC] and
    # stored to x_ptr (the new streams), then mixed as usual.
    # DEFER: post and comb are not computed; the normalised mixing logits go to mix [T, NM] instead (for
    # ``hc_comb`` -- the Sinkhorn -- in a launch off the critical path).
    t = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    ns = tl.num_programs(1)
    r = tl.arange(0, NMP)
    if PDL:   # fn (read-only) to L2 before the wait: one address per 128-byte line of the first K step
        kl = sp * per + tl.arange(0, BK // 32) * 32
        prefetch_l2(fn_ptr + tl.where(r < NM, r, 0)[:, None] * K + tl.where(kl < K, kl, 0)[None, :])
    pdl_wait(PDL)
    # ---- partial: this program's K slice of the mixing GEMV and of the sum of squares
    acc = tl.zeros([NMP], tl.float32)
    ssq = tl.zeros([BK], tl.float32)
    for k0 in range(sp * per, tl.minimum(sp * per + per, K), BK):
        k = k0 + tl.arange(0, BK)
        km = k < tl.minimum(sp * per + per, K)
        if POST:
            sk = k // D                                                                    # stream of each channel
            dd = k % D
            fv = tl.load(f_ptr + t * D + dd, mask=km, other=0.0).to(tl.float32)
            if HAS_F2:   # sublayer output f + f2, rounded to the streams' dtype (as MoE's .to(x.dtype))
                fv = (fv + tl.load(f2_ptr + t * D + dd, mask=km, other=0.0).to(tl.float32))
                fv = fv.to(x_ptr.dtype.element_ty).to(tl.float32)
            xn = tl.load(pin_ptr + t * HC + sk, mask=km, other=0.0) * fv
            for j in tl.static_range(HC):
                cj = tl.load(cin_ptr + t * HC * HC + j * HC + sk, mask=km, other=0.0)       # comb_in[j, stream]
                xn += cj * tl.load(res_ptr + t * K + j * D + dd, mask=km, other=0.0).to(tl.float32)
            xr = xn.to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + t * K + k, xr, mask=km)
            v = xr.to(tl.float32)                                                          # [BK]
        else:
            v = tl.load(x_ptr + t * K + k, mask=km, other=0.0).to(tl.float32)              # [BK]
        w = tl.load(fn_ptr + r[:, None] * K + k[None, :], mask=(r < NM)[:, None] & km[None, :], other=0.0)
        acc += tl.sum(w * v[None, :], axis=1)                                              # [NMP]
        ssq += v * v
    acc = tl.where(r == NM, tl.sum(ssq, axis=0), acc)      # slot NM carries the sum of squares (NMP > NM)
    tl.store(part_ptr + (t * ns + sp) * NMP + r, acc)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel")
    if arrived == ns - 1:   # every slice is written: this program finishes the token
        s = tl.arange(0, SB)
        p = tl.load(part_ptr + (t * ns + s[:, None]) * NMP + r[None, :], mask=(s < ns)[:, None], other=0.0,
                    cache_modifier=".cg")
        tot = tl.sum(p, axis=0)                                                            # [NMP]
        rs = 1.0 / tl.sqrt(tl.sum(tl.where(r == NM, tot, 0.0), axis=0) / K + norm_eps)
        i = tl.arange(0, HC)
        rc = i[:, None] * HC + i[None, :]                                                  # [HC, HC]
        # gather mix entries from the [NMP] vector (no dynamic indexing of registers in Triton)
        mpre = tl.sum(tl.where(r[None, :] == i[:, None], tot[None, :], 0.0), axis=1) * rs  # [HC]
        pre = tl.sigmoid(mpre * tl.load(scale_ptr) + tl.load(base_ptr + i)) + hc_eps
        if DEFER:
            tl.store(mix_ptr + t * NM + r, tot * rs, mask=r < NM)
        else:
            mpost = tl.sum(tl.where(r[None, :] == (HC + i)[:, None], tot[None, :], 0.0), axis=1) * rs
            mc = tl.sum(tl.where(r[None, None, :] == (2 * HC + rc)[:, :, None], tot[None, None, :], 0.0), axis=2) * rs
            post = 2.0 * tl.sigmoid(mpost * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + i))
            m = sinkhorn_tile(mc * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * HC + rc), hc_eps, ITERS)
            tl.store(post_ptr + t * HC + i, post)
            tl.store(comb_ptr + t * HC * HC + rc, m)
        # sublayer input y = sum_k pre_k X_k, rounded to y's dtype; then (HAS_NORM) its RMSNorm
        if SINGLE:   # D <= BD: the whole row in registers, the hc stream rows loaded independently
            d = tl.arange(0, BD)
            dm = d < D
            yacc = tl.zeros([BD], tl.float32)
            for k in tl.static_range(HC):
                pk = tl.sum(tl.where(i == k, pre, 0.0), axis=0)
                yacc += pk * tl.load(x_ptr + t * K + k * D + d, mask=dm, other=0.0, cache_modifier=".cg").to(tl.float32)
            y = yacc.to(y_ptr.dtype.element_ty)
            if HAS_NORM:
                y = norm_row(y, nw_ptr, d, dm, D, out_eps)
            tl.store(y_ptr + t * D + d, y, mask=dm)
        else:
            yss = tl.zeros([BD], tl.float32)
            for d0 in range(0, D, BD):
                d = d0 + tl.arange(0, BD)
                dm = d < D
                xs = tl.load(x_ptr + t * K + i[:, None] * D + d[None, :], mask=dm[None, :], other=0.0,
                             cache_modifier=".cg").to(tl.float32)
                y = tl.sum(pre[:, None] * xs, axis=0).to(y_ptr.dtype.element_ty)            # [BD]
                tl.store(y_ptr + t * D + d, y, mask=dm)
                yf = y.to(tl.float32)
                yss += yf * yf
            if HAS_NORM:
                renorm_row(y_ptr + t * D, nw_ptr, yss, D, out_eps, BD)
        tl.atomic_xchg(cnt_ptr + t, 0)                                                     # ready for the next call


@triton.jit
def norm_row(y, nw_ptr, d, dm, D, out_eps):
    """RMSNorm of a whole row ``y`` held in registers (channels ``d``, mask ``dm``), in y's dtype."""
    yf = y.to(tl.float32)
    ry = 1.0 / tl.sqrt(tl.sum(yf * yf, axis=0) / D + out_eps)
    g = tl.load(nw_ptr + d, mask=dm, other=0.0)
    return (g * (yf * ry)).to(y.dtype)


@triton.jit
def renorm_row(yrow, nw_ptr, yss, D, out_eps, BD: tl.constexpr):
    """Second pass of a row RMSNorm over what the program stored at ``yrow`` (its own writes: a CTA
    barrier suffices): ``y = nw * y * rsqrt(sum(yss) / D + eps)`` in place, rounded to y's dtype."""
    tl.debug_barrier()
    ry = 1.0 / tl.sqrt(tl.sum(yss, axis=0) / D + out_eps)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dm = d < D
        y = tl.load(yrow + d, mask=dm, other=0.0).to(tl.float32)
        g = tl.load(nw_ptr + d, mask=dm, other=0.0)
        tl.store(yrow + d, (g * (y * ry)).to(yrow.dtype.element_ty), mask=dm)


@triton.jit
def _hc_post_kernel(f_ptr, f2_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, D,
                    HC: tl.constexpr, BD: tl.constexpr, HAS_F2: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
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


def check_pre(X: torch.Tensor, fn: torch.Tensor, out_norm: torch.Tensor | None, name: str):
    """Arguments of an mHC pre launcher -> (tokens T, hc, D, mixing rows NM, K = hc*D)."""
    T, hc, D = _check(X, name)
    NM, K = (2 + hc) * hc, hc * D
    if tuple(fn.shape) != (NM, K) or fn.dtype != torch.float32:
        raise ValueError(f"kernels.mhc_step.{name}: fn must be fp32 [{NM}, {K}], got {fn.dtype} {tuple(fn.shape)}")
    if out_norm is not None and out_norm.numel() != D:
        raise ValueError(f"kernels.mhc_step.{name}: out_norm must have {D} entries, got {tuple(out_norm.shape)}")
    return T, hc, D, NM, K


def hc_pre_fused(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
                 hc_eps: float, norm_eps: float, out_norm: torch.Tensor | None = None,
                 out_eps: float = 1e-6, defer_comb: bool = False) -> tuple[torch.Tensor, ...]:
    """X [..., hc, D] -> (y [..., D] in X's dtype, post [..., hc] fp32, comb [..., hc, hc] fp32).
    ``out_norm`` [D] (an RMSNorm weight, eps ``out_eps``): y comes back normalised, ``norm(y)``.
    ``defer_comb``: -> (y, mix [..., (2+hc)*hc] fp32) instead -- the launch skips post and the Sinkhorn
    (~2 of 8 us at V4 shapes) and ``hc_comb(mix, ...)`` computes them later, e.g. on a side stream."""
    return _pre(X, None, fn, scale, base, iters, hc_eps, norm_eps, out_norm, out_eps, defer=defer_comb)[1:]


def hc_post_pre_fused(f: torch.Tensor, res: torch.Tensor, post_in: torch.Tensor, comb_in: torch.Tensor,
                      f2: torch.Tensor | None, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
                      hc_eps: float, norm_eps: float, out_norm: torch.Tensor | None = None, out_eps: float = 1e-6,
                      defer_comb: bool = False):
    """``hc_post_fused(f, res, post_in, comb_in, f2)`` followed by ``hc_pre_fused`` of its result, in one
    launch -> (new streams [..., hc, D], y, post, comb): the mixing programs compute their slice of the
    new streams themselves (one launch and one round trip of the streams fewer per block site).
    ``defer_comb``: (new streams, y, mix) as in ``hc_pre_fused``."""
    T, hc, D = _check(res, "hc_post_pre_fused")
    bad = f.shape[-1] != D or f.numel() != T * D or post_in.numel() != T * hc or comb_in.numel() != T * hc * hc
    if bad or (f2 is not None and f2.numel() != T * D):
        raise ValueError(f"kernels.mhc_step.hc_post_pre_fused: shapes f {tuple(f.shape)}, res {tuple(res.shape)}, "
                         f"post {tuple(post_in.shape)}, comb {tuple(comb_in.shape)} do not agree")
    post_args = (f.contiguous(), (f2 if f2 is not None else f).contiguous(), res.contiguous(),
                 post_in.float().contiguous(), comb_in.float().contiguous())
    return _pre(res, post_args, fn, scale, base, iters, hc_eps, norm_eps, out_norm, out_eps, f2 is not None,
                defer_comb)


def hc_comb(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
            hc_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The deferred part of a ``defer_comb`` pre: mix [..., (2+hc)*hc] -> (post [..., hc], comb [..., hc, hc])
    fp32, one small launch (``kernels/mhc_sinkhorn.py``, the same sigmoid and Sinkhorn code)."""
    return hc_split(mix, scale, base, hc, iters, hc_eps, want_pre=False)[1:]


def _pre(X, post_args, fn, scale, base, iters, hc_eps, norm_eps, out_norm, out_eps, has_f2=False, defer=False):
    T, hc, D, NM, K = check_pre(X, fn, out_norm, "hc_pre_fused")
    lead = X.shape[:-2]
    fuse_post = post_args is not None
    if not fuse_post:
        x = X.reshape(T, K).contiguous()
        post_args = (x,) * 5                                           # unused
    else:
        x = torch.empty(T, K, dtype=X.dtype, device=X.device)          # the new streams, written by the kernel
    nsplit, bk, warps = pre_launch(T)
    ns = max(1, min(nsplit, triton.cdiv(K, bk)))
    per = triton.cdiv(triton.cdiv(K, ns), bk) * bk
    ns = triton.cdiv(K, per)
    NMP = triton.next_power_of_2(NM + 1)
    part = torch.empty(T, ns, NMP, dtype=torch.float32, device=X.device)
    _, cnt = split_workspace(X.device, 0, T)
    y = torch.empty(T, D, dtype=X.dtype, device=X.device)
    if defer:   # the finish stores the mixing logits only
        mix = torch.empty(T, NM, dtype=torch.float32, device=X.device)
        post = comb = mix                                              # not written (DEFER)
    else:
        post = torch.empty(T, hc, dtype=torch.float32, device=X.device)
        comb = torch.empty(T, hc, hc, dtype=torch.float32, device=X.device)
        mix = comb                                                     # not written
    nw = out_norm.float().contiguous() if out_norm is not None else post
    _hc_pre_kernel[(T, ns)](x, fn.contiguous(), part, cnt, scale.float().contiguous(), base.float().contiguous(),
                            nw, y, post, comb, mix, *post_args, K, D, NM, per, float(norm_eps), float(hc_eps),
                            float(out_eps), NMP=NMP, SB=triton.next_power_of_2(ns), HC=hc, ITERS=iters,
                            BD=triton.next_power_of_2(D) if D <= SINGLE_MAX_D else 1024, BK=bk,
                            HAS_NORM=out_norm is not None, SINGLE=D <= SINGLE_MAX_D,
                            POST=fuse_post, HAS_F2=has_f2, DEFER=defer, num_warps=warps, **launch_args(X.device))
    if defer:
        return x.view(X.shape), y.reshape(*lead, D), mix.reshape(*lead, NM)
    return (x.view(X.shape), y.reshape(*lead, D), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc))


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
                                              HC=hc, BD=BD, HAS_F2=f2 is not None, num_warps=4, **launch_args(res.device))
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
