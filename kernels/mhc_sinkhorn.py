"""mHC mixing split + Sinkhorn projection in one launch (v4_arch.md section 2.2, dsv4lib.model.mhc.hc_pre).

Input ``mix [T, (2+hc)*hc]`` fp32 (the RMS-normed streams times ``fn^T``), ``scale [3]``, ``base [(2+hc)*hc]``.
Per row t (one program; hc a power of two, the whole hc x hc matrix sits in registers):
``pre = sigmoid(mix[:hc]*s0 + b) + eps``, ``post = 2*sigmoid(mix[hc:2hc]*s1 + b)``,
``comb = sinkhorn(mix[2hc:]*s2 + b)``: row softmax + eps, column normalise, then ``iters-1`` x
(row, column) normalisations -- the torch reference (``mhc.sinkhorn``) runs ~4 kernels per iteration,
which at decode sizes is ~80 launches per mHC site; this is one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def sinkhorn_tile(m, eps, ITERS: tl.constexpr):
    """Sinkhorn projection of an [HC, HC] tile in registers (``dsv4lib.model.mhc.sinkhorn``): row
    softmax + eps, column normalisation, then ``ITERS - 1`` x (row, column) normalisations."""
    m = tl.exp(m - tl.max(m, axis=1)[:, None])
    m = m / tl.sum(m, axis=1)[:, None] + eps
    m = m / (tl.sum(m, axis=0)[None, :] + eps)
    for _ in tl.static_range(ITERS - 1):
        m = m / (tl.sum(m, axis=1)[:, None] + eps)
        m = m / (tl.sum(m, axis=0)[None, :] + eps)
    return m


@triton.jit
def _hc_split_kernel(
    # mix [T, (2+HC)*HC] fp32, scale [3] fp32, base [(2+HC)*HC] fp32
    mix_ptr, scale_ptr, base_ptr,
    # outputs: pre [T, HC], post [T, HC], comb [T, HC, HC] fp32
    pre_ptr, post_ptr, comb_ptr,
    # Sinkhorn epsilon, iterations (column passes), streams; PRE False: pre is not stored (the deferred decode launch)
    eps, ITERS: tl.constexpr, HC: tl.constexpr, PRE: tl.constexpr = True,
):
    t = tl.program_id(0).to(tl.int64)
    NM: tl.constexpr = (2 + HC) * HC
    i = tl.arange(0, HC)
    row = mix_ptr + t * NM
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    pre = tl.sigmoid(tl.load(row + i) * s0 + tl.load(base_ptr + i)) + eps
    post = 2.0 * tl.sigmoid(tl.load(row + HC + i) * s1 + tl.load(base_ptr + HC + i))
    rc = i[:, None] * HC + i[None, :]                                    # [HC, HC]
    m = sinkhorn_tile(tl.load(row + 2 * HC + rc) * s2 + tl.load(base_ptr + 2 * HC + rc), eps, ITERS)
    if PRE:
        tl.store(pre_ptr + t * HC + i, pre)
    tl.store(post_ptr + t * HC + i, post)
    tl.store(comb_ptr + t * HC * HC + rc, m)


def hc_split(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
             eps: float, want_pre: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """mix [..., (2+hc)*hc] fp32 -> (pre [..., hc], post [..., hc], comb [..., hc, hc]) fp32; pre is None
    without ``want_pre`` (the launch skips it)."""
    if hc < 1 or hc & (hc - 1):
        raise ValueError(f"kernels.hc_split: hc={hc} must be a power of two")
    if mix.shape[-1] != (2 + hc) * hc or mix.dtype != torch.float32:
        raise ValueError(f"kernels.hc_split: mix must be fp32 [..., {(2 + hc) * hc}], got {mix.dtype} {tuple(mix.shape)}")
    lead = mix.shape[:-1]
    m2 = mix.reshape(-1, mix.shape[-1]).contiguous()
    T = m2.shape[0]
    post = torch.empty(T, hc, dtype=torch.float32, device=mix.device)
    pre = torch.empty_like(post) if want_pre else post                   # (not written without want_pre)
    comb = torch.empty(T, hc, hc, dtype=torch.float32, device=mix.device)
    _hc_split_kernel[(T,)](m2, scale.float().contiguous(), base.float().contiguous(), pre, post, comb,
                           float(eps), ITERS=iters, HC=hc, PRE=want_pre, num_warps=1)
    return (pre.reshape(*lead, hc) if want_pre else None), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)


def hc_split_reference(mix, scale, base, hc: int, iters: int, eps: float):
    """The torch math of ``dsv4lib.model.mhc.hc_pre`` after the mixing matmul."""
    from dsv4lib.model.mhc import sinkhorn
    pre = torch.sigmoid(mix[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mix[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = sinkhorn((mix[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc)), iters, eps)
    return pre, post, comb
