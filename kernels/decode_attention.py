"""Single-query decode attention over the window ring + compressed entries (v4_arch.md section 2.3;
the decode-step core of ``model.attention.Attention``), split over keys, in two launches.

Keys (one shared K = V head, MQA): the window ring ``win [B, W, c]`` (slot n valid iff n <= pos)
followed by compressed entries ``ent [B, T, c]`` -- either gathered through ``sel [B, K]`` (CSA,
indexer top-k; valid iff sel < thr) or all T of them (HCA; valid iff j < thr). Per head h:
``o = sum_n softmax([q.k_n * scale, sink_h])_n k_n`` in fp32 (the sink takes probability mass
but adds no value), rounded to q's dtype.

Launch 1: programs (b, 16-head block, key split) run an online softmax over their key range with
IEEE-fp32 ``tl.dot`` (q and keys upcast in registers, as the torch path's ``hp``; no TF32) and
write (max, sum, acc). Launch 2 merges the splits with the sink. The torch path is ~12 kernels (cat of keys and biases, two einsums, casts,
softmax); this is two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

HB = 16          # heads per program (tl.dot needs M >= 16)
BN = 32          # keys per block


@triton.jit
def _attn_partial_kernel(q_ptr, win_ptr, ent_ptr, sel_ptr, pos_ptr, thr_ptr,
                         m_ptr, l_ptr, acc_ptr, scale,
                         H, W, K, T, win_sb, ent_sb, q_sb, sel_sb, per_split, S,
                         C: tl.constexpr, HBc: tl.constexpr, BNc: tl.constexpr,
                         HAS_SEL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    pos = tl.load(pos_ptr)
    thr = tl.load(thr_ptr)
    h = hb * HBc + tl.arange(0, HBc)
    hm = h < H
    c = tl.arange(0, C)
    q = tl.load(q_ptr + b * q_sb + h[:, None] * C + c[None, :], mask=hm[:, None], other=0.0).to(tl.float32)   # [HB, C]
    m = tl.full([HBc], float("-inf"), tl.float32)
    lsum = tl.zeros([HBc], tl.float32)
    acc = tl.zeros([HBc, C], tl.float32)
    N = W + K
    lo = sp * per_split
    hi = tl.minimum(lo + per_split, N)
    for n0 in range(lo, hi, BNc):
        n = n0 + tl.arange(0, BNc)
        inr = n < hi
        is_w = n < W
        j = tl.where(is_w, 0, n - W)
        if HAS_SEL:
            idx = tl.load(sel_ptr + b * sel_sb + j, mask=inr & (~is_w), other=0)
        else:
            idx = j.to(tl.int64)
        ok_w = is_w & (n <= pos)
        ok_e = (~is_w) & (idx < thr) & (idx < T)
        ok = inr & (ok_w | ok_e)
        wrow = win_ptr + b * win_sb + n.to(tl.int64) * C
        erow = ent_ptr + b * ent_sb + idx * C
        k = (tl.load(wrow[:, None] + c[None, :], mask=(inr & ok_w)[:, None], other=0.0)
             + tl.load(erow[:, None] + c[None, :], mask=(inr & ok_e)[:, None], other=0.0)).to(tl.float32)   # [BN, C]
        s = tl.dot(q, tl.trans(k), input_precision="ieee")                                     # [HB, BN]
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, k, input_precision="ieee")
        m = m_new
    o = (b * H + h) * S + sp
    tl.store(m_ptr + o, m, mask=hm)
    tl.store(l_ptr + o, lsum, mask=hm)
    tl.store(acc_ptr + o[:, None] * C + c[None, :], acc, mask=hm[:, None])


@triton.jit
def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, sink_ptr, out_ptr, H, S, out_sb,
                         C: tl.constexpr, SB: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    s = tl.arange(0, SB)
    sm = s < S
    m = tl.load(m_ptr + bh * S + s, mask=sm, other=float("-inf"))
    lsum = tl.load(l_ptr + bh * S + s, mask=sm, other=0.0)
    sink = tl.load(sink_ptr + h)
    mx = tl.maximum(tl.max(m, axis=0), sink)
    wgt = tl.exp(m - mx)                                                                        # [SB]
    den = tl.sum(wgt * lsum, axis=0) + tl.exp(sink - mx)
    c = tl.arange(0, C)
    acc = tl.load(acc_ptr + (bh * S + s)[:, None] * C + c[None, :], mask=sm[:, None], other=0.0)
    o = tl.sum(wgt[:, None] * acc, axis=0) / den
    tl.store(out_ptr + b * out_sb + h * C + c, o.to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, win: torch.Tensor, ent: torch.Tensor | None, sel: torch.Tensor | None,
                     pos: torch.Tensor, thr: torch.Tensor | None, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, c] -> o [B, H, c] in q's dtype (see the module docstring). ``ent`` None: window only;
    ``sel`` [B, K] int64 (CSA) or None (HCA: all entries); ``pos``/``thr`` [] int64 on the device."""
    B, H, C = q.shape
    W = win.shape[1]
    bad = []
    if C & (C - 1) or C < 16:
        bad.append(f"head dim {C} must be a power of two >= 16")
    if q.stride(-1) != 1 or q.stride(1) != C or win.stride(-1) != 1 or win.stride(1) != C:
        bad.append("q and window rows must be contiguous")
    if ent is not None and (ent.dtype != win.dtype or ent.stride(-1) != 1 or ent.stride(1) != C or thr is None):
        bad.append(f"entries {ent.dtype} must match the window's {win.dtype}, rows contiguous, with thr")
    if sel is not None and (ent is None or sel.dtype != torch.int64 or sel.dim() != 2 or sel.shape[0] != B
                            or sel.stride(1) != 1):
        bad.append("sel must be int64 [B, K] (unit column stride) with entries")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or q.dtype != win.dtype:
        bad.append(f"q {q.dtype} and keys {win.dtype} must share a dtype (fp32, bf16 or fp16)")
    if bad:
        raise ValueError("kernels.decode_attention: " + "; ".join(bad))
    T = ent.shape[1] if ent is not None else 0
    K = (sel.shape[1] if sel is not None else T) if ent is not None else 0
    N = W + K
    S = max(1, min(32, triton.cdiv(N, 2 * BN)))
    per = triton.cdiv(triton.cdiv(N, S), BN) * BN
    S = triton.cdiv(N, per)
    f32 = torch.float32
    m = torch.empty(B, H, S, dtype=f32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(B, H, S, C, dtype=f32, device=q.device)
    e = ent if ent is not None else win
    thr_ = thr if thr is not None else pos
    _attn_partial_kernel[(B, triton.cdiv(H, HB), S)](
        q, win, e, sel if sel is not None else pos, pos, thr_, m, lsum, acc, float(scale),
        H, W, K, T, win.stride(0), e.stride(0), q.stride(0), sel.stride(0) if sel is not None else 0, per, S,
        C=C, HBc=HB, BNc=BN, HAS_SEL=sel is not None,
        num_warps=8 if C >= 256 else 4)
    out = torch.empty(B, H, C, dtype=q.dtype, device=q.device)
    _attn_combine_kernel[(B * H,)](m, lsum, acc, sink.to(f32).contiguous(), out, H, S, out.stride(0),
                                   C=C, SB=triton.next_power_of_2(S), num_warps=4)
    return out


def decode_attention_reference(q, win, ent, sel, pos, thr, sink, scale) -> torch.Tensor:
    """The torch math of the static decode step (keys = window ‖ entries, 0/-inf biases, sink softmax)."""
    B, H, C = q.shape
    W = win.shape[1]
    keys = win
    bias = torch.where(torch.arange(W, device=q.device) <= pos, 0.0, float("-inf")).expand(B, W)
    if ent is not None:
        if sel is not None:
            e = ent.gather(1, sel.unsqueeze(-1).expand(-1, -1, C))
            cb = torch.where(sel < thr, 0.0, float("-inf"))
        else:
            e = ent
            cb = torch.where(torch.arange(ent.shape[1], device=q.device) < thr, 0.0, float("-inf")).expand(B, -1)
        keys = torch.cat([keys, e.to(keys.dtype)], 1)
        bias = torch.cat([bias, cb], -1)
    z = torch.einsum("bhd,bnd->bhn", q.float(), keys.float()) * scale + bias[:, None, :]
    p = torch.cat([z, sink.float().view(1, H, 1).expand(B, H, 1)], -1).softmax(-1)[..., :-1]
    return torch.einsum("bhn,bnd->bhd", p, keys.float()).to(q.dtype)
