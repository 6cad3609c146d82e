"""Single-query decode attention over the window ring + compressed entries (v4_arch.md section 2.3;
the decode-step core of ``model.attention.Attention``), split over keys, in two launches.

Keys (one shared K = V head, MQA): the window ring ``win [B, W, c]`` (slot n valid iff n <= pos)
followed by compressed entries ``ent [B, T, c]`` -- either gathered through ``sel [B, K]`` (CSA,
indexer top-k; valid iff sel < thr) or all T of them (HCA; valid iff j < thr). Per head h:
``o = sum_n softmax([q.k_n * scale, sink_h])_n k_n`` in fp32 (the sink takes probability mass
but adds no value), rounded to q's dtype.

Launch 1: program (b, split, head group) takes a group of the heads of batch row b (the MMA M
dimension; MQA means every head reads the same keys: with one group each key row is fetched once per
split; ``head_groups`` splits the heads only while the grid stays within a wave) against ``NB`` blocks of
``BN`` keys. The 512-wide head dim is walked in chunks of ``BC`` so the tiles fit in registers:
scores ``s [HP, BN] = sum_chunks q[:, chunk] @ k[:, chunk]^T``, then for each output chunk
``acc [HP, BC] = p @ v[:, chunk]`` is written straight out (no [HP, c] accumulator is held).
With more than one block per program the fp32 scores go through a small per-program scratch.
Writes (max, sum, acc) per (b, split, head). Launch 2 merges the splits with the per-head sink.

Precision (tensor cores): bf16/fp16 q.k products are exact in the fp32 accumulator; p @ V uses
p split into hi + lo halves of the key dtype (two MMAs, p to ~2^-17 relative), far below the bf16
rounding of the output. fp32 inputs (and bf16 on the CPU interpreter, whose bf16 ``tl.dot`` is
wrong) upcast in registers and use ``input_precision="ieee"``, as the torch path's ``hp``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_args, pdl_wait

# Tuning defaults, measured on the H200 (bench/bench_decode_attn.py --sweep; docs/FULLSCALE_NOTES.md):
# (keys per block = MMA N of q.k and K of p @ v, head-dim chunk, warps) for the tensor-core path and
# for the fp32 ("ieee", FMA) path. Tensor-core path: 32-key blocks while B * blocks fits one wave of
# SMs (``WAVE``), else 64-key blocks; several blocks per program (long contexts) use 64-wide chunks.
LOWP_CFG = (32, 128, 4)
IEEE_CFG = (32, 32, 8)
WAVE = 132
MAX_PROGRAMS = 256   # launch-1 programs aimed for (splits = min(blocks, MAX_PROGRAMS // B, 64))
# Launch 2 (combine): output channels per program, warps. One program per (row, head) with the whole 512-wide
# head: H200 (bench/bench_decode_attn.py --combine-sweep, session 8), combine at b8 CSA 8.85 -> 3.63 us and
# the whole call 25.3 -> 13.1 us -- the 2048 programs of 128 channels, launched early under PDL, held SM slots
# while launch 1 ran; b1 12.3 -> 11.5 us per call.
COMBINE = (512, 4)


@triton.jit
def _key_rows(win_ptr, ent_ptr, sel_ptr, b, n, pos, thr, W, N, T, win_sb, ent_sb, sel_sb,
              C: tl.constexpr, HAS_SEL: tl.constexpr):
    """Row pointers [BN] and validity of keys n (window slot n < W, else entry n - W)."""
    inr = n < N
    is_w = n < W
    j = tl.where(is_w, 0, n - W)
    if HAS_SEL:
        idx = tl.load(sel_ptr + b * sel_sb + j, mask=inr & (~is_w), other=0)
    else:
        idx = j.to(tl.int64)
    ok = inr & tl.where(is_w, n <= pos, (idx < thr) & (idx < T) & (idx >= 0))
    idx = tl.where(ok & (~is_w), idx, 0)
    row = tl.where(is_w, win_ptr + b * win_sb + n.to(tl.int64) * C, ent_ptr + b * ent_sb + idx * C)
    return row, ok


@triton.jit
def _scores(q_ptr, b, q_sb, h, hm, row, ok, scale,
            C: tl.constexpr, HP: tl.constexpr, BNc: tl.constexpr, BCc: tl.constexpr, LOWP: tl.constexpr):
    """s [HP, BN] = q . k * scale over the head dim in BC chunks; -inf for invalid keys."""
    s = tl.zeros([HP, BNc], tl.float32)
    for c0 in tl.static_range(0, C, BCc):
        cc = c0 + tl.arange(0, BCc)
        qc = tl.load(q_ptr + b * q_sb + h[:, None] * C + cc[None, :], mask=hm[:, None], other=0.0)   # [HP, BC]
        kc = tl.load(row[:, None] + cc[None, :], mask=ok[:, None], other=0.0)                         # [BN, BC]
        if LOWP:
            s = tl.dot(qc, tl.trans(kc), s)
        else:
            s = tl.dot(qc.to(tl.float32), tl.trans(kc.to(tl.float32)), s, input_precision="ieee")
    return tl.where(ok[None, :], s * scale, float("-inf"))


@triton.jit
def _pv(p, row, ok, cc, acc, LOWP: tl.constexpr):
    """acc += p [HP, BN] @ v [BN, BC] (p as hi + lo halves of the key dtype when LOWP)."""
    v = tl.load(row[:, None] + cc[None, :], mask=ok[:, None], other=0.0)                             # [BN, BC]
    if LOWP:
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        acc = tl.dot(p_hi, v, acc)
        acc = tl.dot(p_lo, v, acc)
    else:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _attn_partial_kernel(q_ptr, win_ptr, ent_ptr, sel_ptr, pos_ptr, thr_ptr, scr_ptr,
                         m_ptr, l_ptr, acc_ptr, scale,
                         H, W, N, T, win_sb, ent_sb, q_sb, sel_sb, NB, S,
                         C: tl.constexpr, HP: tl.constexpr, BNc: tl.constexpr, BCc: tl.constexpr,
                         HAS_SEL: tl.constexpr, LOWP: tl.constexpr, ONE: tl.constexpr, HPT: tl.constexpr,
                         PDL: tl.constexpr):
    # HP: heads per program (a group of the padded heads: program_id(2)); HPT: all padded heads
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    pos = tl.load(pos_ptr)
    thr = tl.load(thr_ptr)
    h = tl.program_id(2) * HP + tl.arange(0, HP)
    hm = h < H
    o = (b * S + sp) * H + h                                                  # [HP] rows of the partials
    lo = sp * NB * BNc
    if ONE:
        # one key block: scores and probabilities stay in registers
        n = lo + tl.arange(0, BNc)
        row, ok = _key_rows(win_ptr, ent_ptr, sel_ptr, b, n, pos, thr, W, N, T, win_sb, ent_sb, sel_sb, C, HAS_SEL)
        s = _scores(q_ptr, b, q_sb, h, hm, row, ok, scale, C, HP, BNc, BCc, LOWP)    # [HP, BN]
        m = tl.max(s, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp(s - m_safe[:, None])
        lsum = tl.sum(p, axis=1)
        for c0 in tl.static_range(0, C, BCc):
            cc = c0 + tl.arange(0, BCc)
            acc = _pv(p, row, ok, cc, tl.zeros([HP, BCc], tl.float32), LOWP)
            tl.store(acc_ptr + o[:, None] * C + cc[None, :], acc, mask=hm[:, None])
    else:
        # NB blocks: scores to the scratch [HP, NB*BN] with an online max/sum, then p @ v per chunk
        scr = scr_ptr + (b * S + sp) * HPT * NB * BNc
        kk = tl.arange(0, BNc)
        m = tl.full([HP], float("-inf"), tl.float32)
        lsum = tl.zeros([HP], tl.float32)
        for i in range(NB):
            n = lo + i * BNc + kk
            row, ok = _key_rows(win_ptr, ent_ptr, sel_ptr, b, n, pos, thr, W, N, T, win_sb, ent_sb, sel_sb,
                                C, HAS_SEL)
            s = _scores(q_ptr, b, q_sb, h, hm, row, ok, scale, C, HP, BNc, BCc, LOWP)
            tl.store(scr + h[:, None] * (NB * BNc) + (i * BNc + kk)[None, :], s)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
            lsum = lsum * tl.exp(m - m_s) + tl.sum(tl.exp(s - m_s[:, None]), axis=1)
            m = m_new
        tl.debug_barrier()                                                     # scratch written
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        for c0 in tl.static_range(0, C, BCc):
            cc = c0 + tl.arange(0, BCc)
            acc = tl.zeros([HP, BCc], tl.float32)
            for i in range(NB):
                n = lo + i * BNc + kk
                row, ok = _key_rows(win_ptr, ent_ptr, sel_ptr, b, n, pos, thr, W, N, T, win_sb, ent_sb, sel_sb,
                                    C, HAS_SEL)
                s = tl.load(scr + h[:, None] * (NB * BNc) + (i * BNc + kk)[None, :])
                acc = _pv(tl.exp(s - m_safe[:, None]), row, ok, cc, acc, LOWP)
            tl.store(acc_ptr + o[:, None] * C + cc[None, :], acc, mask=hm[:, None])
    tl.store(m_ptr + o, m, mask=hm)
    tl.store(l_ptr + o, lsum, mask=hm)


@triton.jit
def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, sink_ptr, cos_ptr, sin_ptr, out_ptr, H, S, out_sb,
                         C: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    s = tl.arange(0, SB)
    sm = s < S
    r = (b * S + s) * H + h                                                   # [SB] partial rows
    m = tl.load(m_ptr + r, mask=sm, other=float("-inf"))
    lsum = tl.load(l_ptr + r, mask=sm, other=0.0)
    sink = tl.load(sink_ptr + h)
    mx = tl.maximum(tl.max(m, axis=0), sink)
    wgt = tl.exp(m - mx)                                                      # [SB]
    den = tl.sum(wgt * lsum, axis=0) + tl.exp(sink - mx)
    c = tl.program_id(1) * CB + tl.arange(0, CB)
    acc = tl.load(acc_ptr + r[:, None] * C + c[None, :], mask=sm[:, None], other=0.0)   # [SB, CB]
    dt = out_ptr.dtype.element_ty
    o = tl.sum(wgt[:, None] * acc, axis=0) / den
    if ROPE > 0:   # interleaved RoPE of the trailing ROPE channels (pairs 2i, 2i+1) on the rounded output
        # the pairs are split in registers (reshape + split, no partner-channel load of acc)
        ev, od = tl.split(tl.reshape(o.to(dt).to(tl.float32), [CB // 2, 2]))          # (a, b) of each pair
        pi = tl.program_id(1) * (CB // 2) + tl.arange(0, CB // 2)                        # pair index in the row
        isr = pi >= (C - ROPE) // 2
        i = tl.where(isr, pi - (C - ROPE) // 2, 0)
        cs = tl.load(cos_ptr + i, mask=isr, other=1.0)
        sn = tl.load(sin_ptr + i, mask=isr, other=0.0)
        o = tl.reshape(tl.join(ev * cs - od * sn, ev * sn + od * cs), [CB])             # (a cos - b sin, a sin + b cos)
    tl.store(out_ptr + b * out_sb + h * C + c, o.to(dt))


def _plan(B: int, N: int, bn: int, max_programs: int) -> tuple[int, int]:
    """(splits S, key blocks per split NB) for N keys."""
    nblk = max(1, triton.cdiv(N, bn))
    s = max(1, min(nblk, max_programs // B, 64))
    nb = triton.cdiv(nblk, s)
    return triton.cdiv(nblk, nb), nb


GROUP_HEADS = True   # False: all heads in one program (the bench's ``attn_groups`` variant)


def head_groups(B: int, S: int, HP: int) -> int:
    """Head groups per (row, split) program of launch 1: the largest power of two that keeps >= 16 heads per
    group (the MMA M) and the grid within one wave of SMs. At batch 1 a short context has few key blocks (V4-Flash
    at 1K: 5-20 splits), so all 64 heads in one program left most SMs idle, each program loading the whole q and
    writing a 64 x 512 fp32 partial; groups split that work (each re-reads the keys, from L2)."""
    g = 1
    while GROUP_HEADS and HP // (2 * g) >= 16 and B * S * 2 * g <= WAVE:
        g *= 2
    return g


def decode_attention(q: torch.Tensor, win: torch.Tensor, ent: torch.Tensor | None, sel: torch.Tensor | None,
                     pos: torch.Tensor, thr: torch.Tensor | None, sink: torch.Tensor, scale: float,
                     *, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                     bn: int | None = None, bc: int | None = None, num_warps: int | None = None,
                     max_programs: int = MAX_PROGRAMS, groups: int | None = None) -> torch.Tensor:
    """q [B, H, c] -> o [B, H, c] in q's dtype (see the module docstring). ``ent`` None: window only;
    ``sel`` [B, K] int64 (CSA) or None (HCA: all entries); ``pos``/``thr`` [] int64 on the device.
    ``rope`` = (cos, sin) [R/2] fp32: the output's trailing R channels are then rotated in the combine
    launch (V4's inverse RoPE of the attention output passes -sin), as ``rmsnorm_rope`` mode 2 on o.
    The other keyword arguments are tuning knobs (bench/bench_decode_attn.py)."""
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
    if rope is not None and (rope[0].numel() != rope[1].numel() or 2 * rope[0].numel() > C):
        bad.append(f"rope cos/sin must both be [R/2] with R <= {C}")
    if bad:
        raise ValueError("kernels.decode_attention: " + "; ".join(bad))
    T = ent.shape[1] if ent is not None else 0
    K = (sel.shape[1] if sel is not None else T) if ent is not None else 0
    N = W + K
    # tensor-core path for 16-bit keys; bf16 only off the CPU interpreter (its bf16 tl.dot is wrong)
    lowp = q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and q.device.type != "cpu")
    d_bn, d_bc, d_nw = LOWP_CFG if lowp else IEEE_CFG
    if bn is None:
        bn = 64 if lowp and B * triton.cdiv(N, d_bn) > WAVE else d_bn
    num_warps = num_warps or d_nw
    S, NB = _plan(B, N, bn, max_programs)
    bc = min(bc or (d_bc if NB == 1 else min(d_bc, 64)), C)
    HP = max(16, triton.next_power_of_2(H))
    hg = groups or head_groups(B, S, HP)
    if hg & (hg - 1) or HP % hg or HP // hg < 16:
        raise ValueError(f"kernels.decode_attention: {hg} head groups of {HP} padded heads (need a power of two, >= 16 each)")
    f32 = torch.float32
    m = torch.empty(B, S, H, dtype=f32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(B, S, H, C, dtype=f32, device=q.device)
    scr = torch.empty(B * S * HP * NB * bn if NB > 1 else 1, dtype=f32, device=q.device)
    e = ent if ent is not None else win
    thr_ = thr if thr is not None else pos
    _attn_partial_kernel[(B, S, hg)](
        q, win, e, sel if sel is not None else pos, pos, thr_, scr, m, lsum, acc, float(scale),
        H, W, N, T, win.stride(0), e.stride(0), q.stride(0), sel.stride(0) if sel is not None else 0, NB, S,
        C=C, HP=HP // hg, BNc=bn, BCc=bc, HAS_SEL=sel is not None, LOWP=lowp, ONE=NB == 1, HPT=HP,
        num_warps=num_warps, num_stages=1, **launch_args(q.device))   # no software pipelining: the NB-block loops overflow shared memory
    out = torch.empty(B, H, C, dtype=q.dtype, device=q.device)
    CB = min(C, COMBINE[0])
    R = 2 * rope[0].numel() if rope is not None else 0
    cs, sn = (rope[0].float().contiguous(), rope[1].float().contiguous()) if rope is not None else (m, m)
    _attn_combine_kernel[(B * H, C // CB)](m, lsum, acc, sink.to(f32).contiguous(), cs, sn, out, H, S, out.stride(0),
                                           C=C, CB=CB, SB=triton.next_power_of_2(S), ROPE=R, num_warps=COMBINE[1],
                                           **launch_args(q.device))
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
