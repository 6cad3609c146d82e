"""One-token KV-compressor step in one launch (v4_arch.md section 2.4; dsv4lib.model.graphed.compressor_step).

Decode-time state of one compressor with ratio ``r`` (dsv4lib.model.static_cache.StaticCompressorState):
``buf_kv``/``buf_gate [B, r, coff*hd]`` fp32 ring of the current window's projected kv and raw gate
logits (slot ``pos % r``), CSA only (``coff = 2``): ``prev_kv``/``prev_gate [B, r, hd]`` (first half of
the previous complete window, gate + ape), and ``entries [B, T, hd]``.

Per batch row (one program) the kernel
1. puts the new token's kv/gate (a row of the projection output ``y``, any float dtype) into slot
   ``pos % r`` of the buffers -- every step;
2. only when the window completes (``pos % r == r - 1``, read on the device: no host sync, graph
   capturable) computes entry ``pos // r``: per channel a softmax over the window's slots of
   ``gate + ape`` (CSA: the r ``prev`` slots and the second channel half of the r buffer slots),
   the weighted sum of kv, then RMSNorm (weight ``norm_w``) and interleaved RoPE on the trailing
   ``rope`` channels with the given ``cos``/``sin [rope/2]`` (the angle of position ``(pos // r) * r``);
3. CSA, at the same completion step: ``prev <- (buf first half, gate + ape)``.

Entry ``i`` is only visible once window ``i`` is complete (readers mask entries ``>= (pos+1)//r``;
the eager ``model.compressor`` only emits complete windows), so the other r-1 steps of a window do
nothing beyond the slot store. The torch reference (``dsv4lib.model.graphed.compressor_step_torch``)
rewrites a partial entry every step; both agree on every visible entry and on the buffers / prev.
Slots are read in chunks of ``RB`` with an online softmax, so ratio 128 (HCA) fits in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_args, pdl_wait


@triton.jit
def _softmax_chunk(kv_e, kv_o, g_e, g_o, m_e, m_o, s_e, s_o, a_e, a_o):
    """Online-softmax update of the per-channel (even/odd) running max, sum and weighted kv."""
    n_e = tl.maximum(m_e, tl.max(g_e, axis=0))
    n_o = tl.maximum(m_o, tl.max(g_o, axis=0))
    c_e = tl.exp(m_e - n_e)
    c_o = tl.exp(m_o - n_o)
    p_e = tl.exp(g_e - n_e[None, :])
    p_o = tl.exp(g_o - n_o[None, :])
    s_e = s_e * c_e + tl.sum(p_e, axis=0)
    s_o = s_o * c_o + tl.sum(p_o, axis=0)
    a_e = a_e * c_e + tl.sum(p_e * kv_e, axis=0)
    a_o = a_o * c_o + tl.sum(p_o * kv_o, axis=0)
    return n_e, n_o, s_e, s_o, a_e, a_o


@triton.jit
def _compressor_step_kernel(
    kv_ptr, kv_stride, g_ptr, g_stride,      # the token's projected kv / raw gate rows [B, COFF*HD]
    pos_ptr,                                 # [] int64 position
    bkv_ptr, bg_ptr,                         # [B, R, COFF*HD] fp32 (contiguous)
    pkv_ptr, pg_ptr,                         # [B, R, HD] fp32 (CSA only)
    ape_ptr, nw_ptr, cos_ptr, sin_ptr,       # [R, COFF*HD], [HD], [ROPE/2], [ROPE/2] fp32
    ent_ptr, ent_stride_b,                   # [B, T, HD] (row stride HD)
    eps,
    R: tl.constexpr, HD: tl.constexpr, COFF: tl.constexpr, ROPE: tl.constexpr, RB: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HD // 2
    CW: tl.constexpr = COFF * HD                         # buffer row width
    pos = tl.load(pos_ptr)
    slot = pos % R
    idx = pos // R
    kvrow = kv_ptr + b * kv_stride
    grow = g_ptr + b * g_stride
    # 1. the new token into its slot (every step; both channel halves for CSA)
    cw = tl.arange(0, CW)
    dst = b * R * CW + slot * CW
    tl.store(bkv_ptr + dst + cw, tl.load(kvrow + cw).to(tl.float32))
    tl.store(bg_ptr + dst + cw, tl.load(grow + cw).to(tl.float32))
    # 2./3. only when the window completes: its entry, and (CSA) the hand-over to the next window
    if slot == R - 1:
        p = tl.arange(0, HALF)
        ce = 2 * p                                       # even channels
        co = 2 * p + 1
        # the slot row as registers (the buffer loads below may not see the stores above)
        KH: tl.constexpr = (COFF - 1) * HD               # the half of the row that is this window's
        nkv_e = tl.load(kvrow + KH + ce).to(tl.float32)
        nkv_o = tl.load(kvrow + KH + co).to(tl.float32)
        ng_e = tl.load(grow + KH + ce).to(tl.float32)
        ng_o = tl.load(grow + KH + co).to(tl.float32)
        m_e = tl.full([HALF], float("-inf"), tl.float32)
        m_o = tl.full([HALF], float("-inf"), tl.float32)
        s_e = tl.zeros([HALF], tl.float32)
        s_o = tl.zeros([HALF], tl.float32)
        a_e = tl.zeros([HALF], tl.float32)
        a_o = tl.zeros([HALF], tl.float32)
        for j0 in tl.static_range(0, R, RB):
            j = j0 + tl.arange(0, RB)
            cur = (j == R - 1)[:, None]
            src = b * R * CW + j[:, None] * CW + KH
            kv_e = tl.where(cur, nkv_e[None, :], tl.load(bkv_ptr + src + ce[None, :], mask=~cur, other=0.0))
            kv_o = tl.where(cur, nkv_o[None, :], tl.load(bkv_ptr + src + co[None, :], mask=~cur, other=0.0))
            ap = j[:, None] * CW + KH
            g_e = (tl.where(cur, ng_e[None, :], tl.load(bg_ptr + src + ce[None, :], mask=~cur, other=0.0))
                   + tl.load(ape_ptr + ap + ce[None, :]))
            g_o = (tl.where(cur, ng_o[None, :], tl.load(bg_ptr + src + co[None, :], mask=~cur, other=0.0))
                   + tl.load(ape_ptr + ap + co[None, :]))
            m_e, m_o, s_e, s_o, a_e, a_o = _softmax_chunk(kv_e, kv_o, g_e, g_o, m_e, m_o, s_e, s_o, a_e, a_o)
        if COFF == 2:
            # previous window's first half (after the buffer slots so the running max is finite first)
            j = tl.arange(0, R)
            src = b * R * HD + j[:, None] * HD
            pkv_e = tl.load(pkv_ptr + src + ce[None, :])
            pkv_o = tl.load(pkv_ptr + src + co[None, :])
            pg_e = tl.load(pg_ptr + src + ce[None, :])
            pg_o = tl.load(pg_ptr + src + co[None, :])
            m_e, m_o, s_e, s_o, a_e, a_o = _softmax_chunk(pkv_e, pkv_o, pg_e, pg_o, m_e, m_o, s_e, s_o, a_e, a_o)
        e_e = a_e / s_e
        e_o = a_o / s_o
        # RMSNorm (fp32, weight after the scaling, as model.linear.RMSNorm)
        rs = tl.rsqrt((tl.sum(e_e * e_e, axis=0) + tl.sum(e_o * e_o, axis=0)) / HD + eps)
        e_e = tl.load(nw_ptr + ce) * (e_e * rs)
        e_o = tl.load(nw_ptr + co) * (e_o * rs)
        # interleaved RoPE on the trailing ROPE channels (pairs p >= (HD - ROPE) / 2)
        NOPE: tl.constexpr = (HD - ROPE) // 2
        isr = p >= NOPE
        q = tl.where(isr, p - NOPE, 0)
        cs = tl.load(cos_ptr + q, mask=isr, other=1.0)
        sn = tl.load(sin_ptr + q, mask=isr, other=0.0)
        row = ent_ptr + b * ent_stride_b + idx * HD
        tl.store(row + ce, (e_e * cs - e_o * sn).to(ent_ptr.dtype.element_ty))
        tl.store(row + co, (e_e * sn + e_o * cs).to(ent_ptr.dtype.element_ty))
        if COFF == 2:
            # CSA: the complete window hands its first half (gate + ape) to the next entry
            tl.debug_barrier()                           # every prev load above is done
            j = tl.arange(0, R)
            cur = (j == R - 1)[:, None]
            c = tl.arange(0, HD)
            src = b * R * CW + j[:, None] * CW + c[None, :]
            f = tl.load(kvrow + c).to(tl.float32)
            fg = tl.load(grow + c).to(tl.float32)
            kv = tl.where(cur, f[None, :], tl.load(bkv_ptr + src, mask=~cur, other=0.0))
            g = (tl.where(cur, fg[None, :], tl.load(bg_ptr + src, mask=~cur, other=0.0))
                 + tl.load(ape_ptr + j[:, None] * CW + c[None, :]))
            pdst = b * R * HD + j[:, None] * HD + c[None, :]
            tl.store(pkv_ptr + pdst, kv)
            tl.store(pg_ptr + pdst, g)


def compressor_step_fused(kv: torch.Tensor, gate: torch.Tensor, pos: torch.Tensor,
                          buf_kv: torch.Tensor, buf_gate: torch.Tensor, prev_kv: torch.Tensor,
                          prev_gate: torch.Tensor, ape: torch.Tensor, norm_w: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, entries: torch.Tensor, eps: float,
                          *, num_warps: int | None = None, rb: int | None = None) -> None:
    """Advance one compressor by one token in place (see the module docstring).

    ``kv``/``gate [B, coff*hd]`` (any float dtype, unit column stride; may be column slices of one
    stacked projection) are the token's projected kv and raw gate logits; ``pos`` [] int64 on the device.
    Only entry ``pos // r`` of a completed window is written (see the module docstring).
    ``num_warps``/``rb`` are tuning knobs (bench/bench_decode_attn.py).
    """
    B, R, CW = buf_kv.shape
    HD = entries.shape[-1]
    coff = CW // HD
    rope = 2 * cos.shape[-1]
    bad = []
    if coff not in (1, 2) or CW != coff * HD or (coff == 2) != (prev_kv.shape[1] == R):
        bad.append(f"buf_kv {tuple(buf_kv.shape)} vs entries hd {HD}, prev_kv {tuple(prev_kv.shape)}")
    if HD & (HD - 1) or R & (R - 1) or rope > HD or rope % 2:
        bad.append(f"hd {HD} and ratio {R} must be powers of two, rope {rope} even and <= hd")
    for name, t in (("buf_kv", buf_kv), ("buf_gate", buf_gate), ("prev_kv", prev_kv), ("prev_gate", prev_gate)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            bad.append(f"{name} must be contiguous fp32, got {t.dtype}")
    for name, t in (("kv", kv), ("gate", gate)):
        if t.dim() != 2 or tuple(t.shape) != (B, CW) or t.stride(1) != 1:
            bad.append(f"{name} must be [{B}, {CW}] with unit column stride, got {tuple(t.shape)} stride {t.stride()}")
    if entries.stride(-1) != 1 or entries.stride(1) != HD:
        bad.append("entries rows must be contiguous")
    if bad:
        raise ValueError("kernels.compressor_step_fused: " + "; ".join(bad))
    f32 = torch.float32
    _compressor_step_kernel[(B,)](
        kv, kv.stride(0), gate, gate.stride(0), pos, buf_kv, buf_gate, prev_kv, prev_gate,
        ape.to(f32).contiguous(), norm_w.to(f32).contiguous(), cos.to(f32).contiguous(), sin.to(f32).contiguous(),
        entries, entries.stride(0), float(eps),
        R=R, HD=HD, COFF=coff, ROPE=rope, RB=min(R, rb or 16),
        num_warps=num_warps or (16 if HD >= 512 else 8),   # measured best on the H200 (bench_decode_attn)
        **launch_args(kv.device))
