"""mHC pre for many tokens (prefill, scoring): the math of ``dsv4lib.model.mhc.hc_pre`` (v4_arch.md
section 2.2), optionally followed by the sublayer's RMSNorm, in three launches. The default on CUDA
(``dsv4lib.model.transformer.FUSED_MHC_PREFILL``).

The decode kernel (``mhc_step.py``) splits one token's mixing GEMV over 128 programs; for thousands of
tokens that would re-read ``fn`` per token. Here, for X ``[T, hc, D]`` flattened to ``x [T, K = hc*D]``:

1. ``_mix_partial_kernel``, grid ``(cdiv(T, BM), SPLIT)``: program (b, s) multiplies BM tokens' K slice
   ``s`` (KS channels, a multiple of BK; the last slice may be shorter) by ``fn``'s: ``x fn^T`` as an fp32
   ``tl.dot`` with ``input_precision="ieee"`` (the reference's fp32 products, no TF32; X read once in its
   own dtype; the K loop software-pipelined), plus the tokens' partial sum of squares, carried in column NM
   of the fp32 partials ``part [T, SPLIT, NP]`` (NP > NM). ``fn`` comes transposed and zero-padded,
   ``fnt [K, NP]`` (made once per weight tensor, ``fn_transposed``), so that the dot's B tile sits in
   shared memory with NP contiguous. bf16 streams (``MIX_PLANES``): ``fn`` is kept as three bf16 planes
   with ``hi + mid + lo == fn`` exactly (``fp32_planes``) and the mixing is three bf16 tensor-core dots --
   bf16 x bf16 products are exact in fp32, so the products are the fp32 ones and the SIMT FMA work goes;
2. ``_mix_finish_kernel``, grid ``cdiv(T, BMF)``: sums each token's SPLIT partials with ``tl.sum`` (a fixed
   reduction tree: deterministic), ``mix *= rsqrt(mean(x^2) + eps)`` (a scalar per token), then ``pre``,
   ``post`` and ``comb = sinkhorn(.)`` for BMF tokens at once ([BMF, hc, hc] tiles, one warp: no
   barriers); stores post, comb and pre (fp32 scratch);
3. ``_collapse_kernel``, one program per token: ``y = sum_k pre_k X_k`` (fp32, rounded to X's dtype), and
   with ``out_norm`` its RMSNorm: the row in registers for D <= ``COLLAPSE_MAX_BD``, else two passes
   over D in chunks (the second re-reads what the program stored).

X is read twice (by 1 and by 3). H200, Triton 3.6, V4 shapes (hc=4, D=4096, bf16, with the RMSNorm), one
call as a CUDA-graph replay (bench/bench_mhc_prefill.py): T=512 48 us, T=2048 108 us, T=6144 295 us; the
first version (one launch, one program per 16 tokens walking all of K: 128 latency-bound programs at
T=2048) took 672 / 688 / 1963 us. The mixing is ~70 % of it: 1.07 G fp32 FMAs at T=2048 (24 rows padded
to 32) at ~40 % of the SIMT FMA peak; the collapse streams X at ~3 TB/s; the Sinkhorn
finish is ~10 us of dependent latency whatever T.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from .mhc_step import check_pre, norm_row, renorm_row

MIX_BM = 128           # tokens per mixing program (block_m)
MIX_BK = 32            # K step of the mixing loop
MIX_WARPS = 4
MIX_STAGES = 3
MIX_TARGET = 4 * 132   # aim for about this many mixing programs (H200: 132 SMs) ...
MIX_MIN_STEPS = 8      # ... but give each at least this many BK steps of its K slice ...
MIX_MAX_SPLIT = 64     # ... and at most this many (the finish loads a token's SPLIT x NP partials at once)
# bf16 streams on the GPU: the mixing as three bf16 tensor-core dots against fn split into exact bf16 planes
# (``fp32_planes``) instead of fp32 FMAs -- same fp32 products, the SIMT FMA work (~70 % of the pre) gone.
MIX_PLANES = True
# its launch (H200 sweep, bench/bench_mhc_prefill.py --sweep, 2026-11-29 session 7): 64 tokens x 64 channels, 4 stages,
# ~384 programs -- T=2048 29 us (split 8), T=6144 62 us (split 4); the fp32 mixing took 78 / 222 us
MIX_BM_PLANES, MIX_BK_PLANES, MIX_STAGES_PLANES, MIX_TARGET_PLANES = 64, 64, 4, 384


def mix_launch(X: torch.Tensor) -> tuple[bool, int, int, int, int]:
    """(planes, block_m, block_k, stages, target programs) of the mixing launch for streams X."""
    if MIX_PLANES and X.dtype == torch.bfloat16:
        return True, MIX_BM_PLANES, MIX_BK_PLANES, MIX_STAGES_PLANES, MIX_TARGET_PLANES
    return False, MIX_BM, MIX_BK, MIX_STAGES, MIX_TARGET
FINISH_BM = 8          # tokens per finishing (Sinkhorn) program
FINISH_WARPS = 1
COLLAPSE_WARPS = 8
COLLAPSE_MAX_BD = 8192  # D up to this (after rounding to a power of two): the collapse keeps the row in registers


@triton.jit
def _mix_partial_kernel(x_ptr, fnt_ptr, part_ptr, T, K, NM, KS,
                        BM: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                        PLANES: tl.constexpr = False, DOT16: tl.constexpr = False):
    # x [T, K] (any float dtype), fnt [K, NP] fp32 (fn transposed, columns >= NM zero) -> part [T, SPLIT, NP]
    # fp32: columns < NM the partial mixing dots of K slice program_id(1) (KS channels), column NM its partial
    # sum of squares. fn comes transposed so that the dot's B tile sits in shared memory with NP contiguous:
    # read k-contiguous (fn's own layout) the tile's 128-bit shared loads hit one bank group from 8 addresses
    # (SASS), and the kernel took 331 us instead of 78 at T = 2048 on the H200.
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    t = pid * BM + tl.arange(0, BM)
    tm = t < T
    t64 = t.to(tl.int64)
    n = tl.arange(0, NP)
    k_lo = sp * KS
    k_hi = tl.minimum(k_lo + KS, K)
    acc = tl.zeros([BM, NP], tl.float32)
    ssq = tl.zeros([BM, BK], tl.float32)
    # PLANES: x is bf16 and fnt is [3, K, NP] bf16 with fn = hi + mid + lo exactly (``fp32_planes``): three bf16
    # tensor-core dots give the fp32 products (bf16 x bf16 is exact in fp32) -- DOT16 on the GPU; the
    # interpreter (whose bf16 dot is wrong) multiplies the same planes in fp32.
    for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
        k = k0 + tl.arange(0, BK)
        km = k < k_hi
        xr = tl.load(x_ptr + t64[:, None] * K + k[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        xv = xr.to(tl.float32)
        ssq += xv * xv
        if PLANES:
            for i in tl.static_range(3):
                w = tl.load(fnt_ptr + i * K * NP + k[:, None] * NP + n[None, :], mask=km[:, None], other=0.0)
                if DOT16:
                    acc = tl.dot(xr, w, acc)                                                   # [BM, NP]
                else:
                    acc = tl.dot(xv, w.to(tl.float32), acc, input_precision="ieee")
        else:
            w = tl.load(fnt_ptr + k[:, None] * NP + n[None, :], mask=km[:, None], other=0.0)        # [BK, NP]
            acc += tl.dot(xv, w, input_precision="ieee")                                       # [BM, NP]
    acc = tl.where(n[None, :] == NM, tl.sum(ssq, axis=1)[:, None], acc)     # fn rows >= NM are zero: free slot
    tl.store(part_ptr + (t64[:, None] * tl.num_programs(1) + sp) * NP + n[None, :], acc, mask=tm[:, None])


@triton.jit
def mix_gates(mix, n, scale_ptr, base_ptr, hc_eps, BM: tl.constexpr, HC: tl.constexpr, ITERS: tl.constexpr):
    """mHC gates of BM tokens from their normalised mixing rows ``mix [BM, NP]`` (columns ``n``):
    ``pre``/``post`` [BM, HC] and the Sinkhorn-projected ``comb`` [BM, HC, HC] (dsv4lib.model.mhc.hc_pre)."""
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
    return pre, post, m


@triton.jit
def _mix_finish_kernel(part_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, T, K, NM, SPLIT, norm_eps, hc_eps,
                       BM: tl.constexpr, SP: tl.constexpr, NP: tl.constexpr, HC: tl.constexpr,
                       ITERS: tl.constexpr):
    # part [T, SPLIT, NP] -> pre (fp32 scratch) [T, HC], post [T, HC], comb [T, HC, HC] for BM tokens: their
    # partials in one load ([BM, SP, NP], SP = SPLIT rounded up to a power of two), summed over the splits
    # by tl.sum (a fixed reduction tree: the same bits on every run)
    t = tl.program_id(0) * BM + tl.arange(0, BM)
    tm = t < T
    t64 = t.to(tl.int64)
    sp = tl.arange(0, SP)
    n = tl.arange(0, NP)
    p = tl.load(part_ptr + ((t64[:, None, None] * SPLIT + sp[None, :, None]) * NP + n[None, None, :]),
                mask=tm[:, None, None] & (sp < SPLIT)[None, :, None], other=0.0)
    acc = tl.sum(p, axis=1)                                                                    # [BM, NP]
    ssq = tl.sum(tl.where(n[None, :] == NM, acc, 0.0), axis=1)                                 # [BM]
    mix = acc * (1.0 / tl.sqrt(ssq / K + norm_eps))[:, None]
    i = tl.arange(0, HC)
    rc = i[:, None] * HC + i[None, :]                                                          # [HC, HC]
    pre, post, m = mix_gates(mix, n, scale_ptr, base_ptr, hc_eps, BM, HC, ITERS)
    tl.store(pre_ptr + t64[:, None] * HC + i[None, :], pre, mask=tm[:, None])
    tl.store(post_ptr + t64[:, None] * HC + i[None, :], post, mask=tm[:, None])
    tl.store(comb_ptr + t64[:, None, None] * (HC * HC) + rc[None, :, :], m, mask=tm[:, None, None])


@triton.jit
def _collapse_kernel(x_ptr, pre_ptr, nw_ptr, y_ptr, K, D, out_eps,
                     HC: tl.constexpr, BD: tl.constexpr, SINGLE: tl.constexpr, HAS_NORM: tl.constexpr):
    # one token: y = sum_k pre_k X_k (fp32, rounded to y's dtype), then (HAS_NORM) y's RMSNorm with weight nw
    t = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + t * K
    yrow = y_ptr + t * D
    if SINGLE:   # D <= BD: the row in registers, one load per stream
        d = tl.arange(0, BD)
        dm = d < D
        ya = tl.zeros([BD], tl.float32)
        for kk in tl.static_range(HC):
            ya += tl.load(pre_ptr + t * HC + kk) * tl.load(xrow + kk * D + d, mask=dm, other=0.0).to(tl.float32)
        y = ya.to(y_ptr.dtype.element_ty)
        if HAS_NORM:
            y = norm_row(y, nw_ptr, d, dm, D, out_eps)
        tl.store(yrow + d, y, mask=dm)
    else:
        yss = tl.zeros([BD], tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            dm = d < D
            ya = tl.zeros([BD], tl.float32)
            for kk in tl.static_range(HC):
                ya += tl.load(pre_ptr + t * HC + kk) * tl.load(xrow + kk * D + d, mask=dm, other=0.0).to(tl.float32)
            y = ya.to(y_ptr.dtype.element_ty)
            tl.store(yrow + d, y, mask=dm)
            yf = y.to(tl.float32)
            yss += yf * yf
        if HAS_NORM:   # second pass over what this program stored
            renorm_row(yrow, nw_ptr, yss, D, out_eps, BD)


_FNT: dict[int, tuple] = {}   # id(fn) -> ((fn's version, address, NP), fnt); dropped when fn is freed


def fn_transposed(fn: torch.Tensor, NP: int, planes: bool = False) -> torch.Tensor:
    """fn [NM, K] -> fnt [K, NP] fp32, columns >= NM zero; ``planes``: [3, K, NP] bf16 (``fp32_planes``). Kept
    per mixing weight (2 / 3 MB at V4 shapes) while that tensor lives and is not modified in place (its version
    counter): made per call it cost 10-17 us of GPU time (a strided copy) on the H200."""
    key, tag = (id(fn), planes), (fn._version, fn.data_ptr(), fn.device, tuple(fn.shape), NP)
    hit = _FNT.get(key)
    if hit is not None and hit[0] == tag:
        return hit[1]
    fnt = torch.zeros(fn.shape[1], NP, dtype=torch.float32, device=fn.device)
    fnt[:, :fn.shape[0]] = fn.detach().t()
    if planes:
        fnt = fp32_planes(fnt)
    if hit is None:
        weakref.finalize(fn, _FNT.pop, key, None)
    _FNT[key] = (tag, fnt)
    return fnt


def fp32_planes(w: torch.Tensor) -> torch.Tensor:
    """fp32 w -> [3, *w.shape] bf16 (hi, mid, lo) with ``hi + mid + lo == w`` exactly for finite normal w: each
    plane takes the next 8 significant bits of the remainder (bf16 keeps fp32's exponent range)."""
    hi = w.to(torch.bfloat16)
    r = w - hi.float()                                                   # exact in fp32
    mid = r.to(torch.bfloat16)
    lo = (r - mid.float()).to(torch.bfloat16)
    return torch.stack([hi, mid, lo])


def mix_split(T: int, K: int, block_m: int, block_k: int, split: int | None = None,
              target: int | None = None) -> tuple[int, int]:
    """(SPLIT, KS): K slices of the mixing and channels per slice (a multiple of block_k; the last slice
    may be shorter), at most MIX_MAX_SPLIT. Default: a power of two, about ``target`` (MIX_TARGET) programs
    (rounded down), at least MIX_MIN_STEPS K steps each."""
    steps = triton.cdiv(K, block_k)
    if split is None:
        want = triton.cdiv(target or MIX_TARGET, triton.cdiv(T, block_m))
        split = min(triton.next_power_of_2(want + 1) // 2, MIX_MAX_SPLIT, max(1, steps // MIX_MIN_STEPS))
    split = max(1, min(int(split), steps, MIX_MAX_SPLIT))
    ks = triton.cdiv(steps, split) * block_k
    return triton.cdiv(K, ks), ks


def hc_pre_prefill(X: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
                   hc_eps: float, norm_eps: float, out_norm: torch.Tensor | None = None,
                   out_eps: float = 1e-6, block_m: int | None = None, *, split: int | None = None,
                   block_k: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [..., hc, D] (any number of tokens) -> (y [..., D] in X's dtype, post [..., hc], comb [..., hc, hc]
    fp32); ``out_norm`` [D]: y comes back RMS-normalised with that weight (eps ``out_eps``).
    ``block_m`` (tokens per mixing program), ``split`` (K slices), ``block_k``, ``num_warps`` and
    ``num_stages`` (of the mixing kernel) override the tuned defaults (MIX_*)."""
    T, hc, D, NM, K = check_pre(X, fn, out_norm, "hc_pre_prefill")
    lead = X.shape[:-2]
    dev = X.device
    y = torch.empty(T, D, dtype=X.dtype, device=dev)
    post = torch.empty(T, hc, dtype=torch.float32, device=dev)
    comb = torch.empty(T, hc, hc, dtype=torch.float32, device=dev)
    if T == 0:
        return y.reshape(*lead, D), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)
    x = X.reshape(T, K).contiguous()
    planes, bm, bk, stages, target = mix_launch(X)
    bm, bk = block_m or bm, block_k or bk
    NP = max(16, triton.next_power_of_2(NM + 1))          # column NM carries the sum of squares
    SPLIT, KS = mix_split(T, K, bm, bk, split, target)
    part = torch.empty(T, SPLIT, NP, dtype=torch.float32, device=dev)
    pre = torch.empty(T, hc, dtype=torch.float32, device=dev)
    _mix_partial_kernel[(triton.cdiv(T, bm), SPLIT)](
        x, fn_transposed(fn, NP, planes), part, T, K, NM, KS, BM=bm, NP=NP, BK=bk, STAGES=num_stages or stages,
        PLANES=planes, DOT16=planes and x.is_cuda,
        num_warps=num_warps or MIX_WARPS)
    _mix_finish_kernel[(triton.cdiv(T, FINISH_BM),)](
        part, scale.float().contiguous(), base.float().contiguous(), pre, post, comb, T, K, NM, SPLIT,
        float(norm_eps), float(hc_eps), BM=FINISH_BM, SP=triton.next_power_of_2(SPLIT), NP=NP, HC=hc,
        ITERS=iters, num_warps=FINISH_WARPS)
    DP = triton.next_power_of_2(D)
    BD = min(DP, COLLAPSE_MAX_BD)
    nw = out_norm.float().contiguous() if out_norm is not None else pre
    _collapse_kernel[(T,)](x, pre, nw, y, K, D, float(out_eps), HC=hc, BD=BD, SINGLE=DP <= COLLAPSE_MAX_BD,
                           HAS_NORM=out_norm is not None, num_warps=max(1, min(COLLAPSE_WARPS, BD // 256)))
    return y.reshape(*lead, D), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)
