"""INT2 g64 MoE decode (1-16 tokens): fused w1+w3 -> SwiGLU -> w2, summed over the routed experts.

Math (v4_arch.md section 2.7, docs/CONTRACTS.md "Experts"), per (token t, slot j) with expert e = idx[t, j]:
``g = W1_e x_t``, ``u = W3_e x_t``, ``h = silu(min(g, limit)) * clamp(u, -limit, limit) * weight[t, j]``
(routing weight applied BEFORE w2), ``y_t += W2_e h`` -- fp32 accumulation, fp32 output ``[T, D]``.

Weight layout: the INT2 g64 contract (see ``int2_dequant.py``); W1/W3 ``[E, I, D]``, W2 ``[E, D, I]``.

Three launches per call, no host sync (CUDA-graph capturable):

0. ``_prep_kernel``: activations into the layout of the chosen path, and zeroes one fp32 workspace
   holding ``y``, the split-K partial sums and the arrival counters.
1. ``_gate_up_kernel``, grid ``(T*k pair slots, cdiv(I, BLOCK_N), SPLIT_K)``: rows of W1 and W3 are
   read in the same K step. With ``SPLIT_K > 1`` partial sums go to ``gu [S, 2, I]`` by atomics and the
   last program of a tile to arrive (a per-tile counter) applies SwiGLU; otherwise it does directly.
2. ``_down_kernel``, grid ``(T*k, cdiv(D, BLOCK_N), SPLIT_K)``: partial sums go to ``y`` by atomics.

Expert de-duplication happens inside the kernels, with no host sync and no sort: the program of
pair slot s looks at all ``T*k`` routed experts, and only the first ``BLOCK_P``-th occurrence of
its expert runs; it then serves every pair routed to that expert (up to BLOCK_P of them).

Two inner loops (constexpr ``DOT``):

* ``DOT=False`` (one pair per program, BLOCK_P = 1; the default): CUDA-core GEMV with a bit trick.
  A code at bits [2j, 2j+2) of a word is masked in place (no shift) and OR-ed into the mantissa of
  2^23, so the float reads ``2^23 + q * 4^j``; subtracting 2^23 is exact and the 4^-j is folded into
  the activation. Scale and zero are applied once per 16 codes: ``s * (sum_j x_j q_j - z * sum_j x_j)``.
  Activations are pre-transposed to ``xt [T, 16, K/16]`` so each ``x_j`` slice is contiguous.
* ``DOT=True`` (BLOCK_P = 16 pairs per program, each expert read once for all its tokens): codes to
  fp16 by ``0x6400 | q`` (= 1024 + q, minus 1024, exact), one ``tl.dot`` per 64-channel group, scale
  and zero folded into the product: ``s * (q.x - z * sum x)``. fp16 activations (|x| < 65504; the
  clamps guarantee it for h, RMS-normed inputs for x).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import launch_args, pdl_wait

from .int2_dequant import as_int32, check_int2, dequantize_int2_reference, fit_split, fit_w


@dataclass(frozen=True)
class StageConfig:
    """Tile of one decode launch: output rows per program, packed words per K step, warps, K splits.

    ``split`` programs share the K axis of one output tile (fp32 atomics); with ``split = KW / w``
    every program issues all of its loads in a single step (no dependent K loop).
    """
    block_n: int
    w: int
    warps: int = 4
    split: int = 1
    stages: int = 2


@dataclass(frozen=True)
class DecodeConfig:
    gate_up: StageConfig
    down: StageConfig


def decode_configs(use_dot: bool, half: bool = False) -> list[DecodeConfig]:
    """Candidate configurations swept by the benchmarks; the first is the default.

    V4-Flash shapes: gate/up K = D = 4096 (256 words), down K = I = 2048 (128 words).
    ``half``: the fp16 CUDA-core path (bench/bench_int2_half.py); otherwise the fp32 one or the dot path.
    """
    if use_dot:
        pairs = [(StageConfig(64, 8, 4, 1, 3), StageConfig(64, 8, 4, 1, 3)),      # best (H200, run 2)
                 (StageConfig(64, 8, 4, 2, 3), StageConfig(64, 8, 4, 1, 3)),
                 (StageConfig(64, 8, 4, 4, 3), StageConfig(64, 8, 4, 2, 3)),
                 (StageConfig(64, 8, 4, 2, 2), StageConfig(64, 8, 4, 2, 2)),
                 (StageConfig(64, 16, 4, 2, 3), StageConfig(64, 16, 4, 1, 3))]
    elif half:
        pairs = [(StageConfig(32, 64, 4, 1), StageConfig(32, 64, 4, 2)),           # best (H200, half run 1)
                 (StageConfig(32, 128, 4, 1), StageConfig(32, 128, 4, 1)),
                 (StageConfig(64, 64, 8, 1), StageConfig(64, 64, 8, 2)),
                 (StageConfig(16, 64, 2, 1), StageConfig(16, 64, 2, 2)),
                 (StageConfig(32, 64, 8, 1), StageConfig(32, 64, 8, 2)),
                 (StageConfig(32, 64, 4, 2), StageConfig(32, 64, 4, 1)),
                 (StageConfig(64, 128, 8, 1), StageConfig(64, 128, 8, 1)),
                 (StageConfig(32, 32, 4, 1), StageConfig(32, 32, 4, 2))]
    else:
        pairs = [(StageConfig(16, 32, 2, 1), StageConfig(16, 32, 2, 4)),           # best (H200, run 2)
                 (StageConfig(16, 32, 2, 1), StageConfig(32, 32, 4, 2)),
                 (StageConfig(16, 32, 2, 2), StageConfig(32, 32, 4, 2)),
                 (StageConfig(16, 32, 2, 8), StageConfig(32, 32, 4, 2)),
                 (StageConfig(16, 32, 2, 1), StageConfig(32, 32, 2, 1)),
                 (StageConfig(16, 32, 2, 1), StageConfig(32, 16, 4, 4)),
                 (StageConfig(32, 16, 2, 1), StageConfig(32, 32, 4, 2))]
    return [DecodeConfig(g, d) for g, d in pairs]


_MAGIC = 0x4B000000  # float bits of 2^23
_MAGIC16 = 0x6400    # fp16 bits of 1024.0 (HALF path)
HALF_DEFAULT = True   # fp16 CUDA-core inner loop: 48.0 -> 32.0 us/layer at T=1 on the H200 (kernels/BENCHMARKS.md)


@triton.jit
def _expert_pairs(idx_ptr, s, S, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    """Expert of pair slot s, the pairs this program serves ([BLOCK_P] ids + mask) and whether it runs."""
    offs = tl.arange(0, BLOCK_S)
    in_s = offs < S
    all_e = tl.load(idx_ptr + offs, mask=in_s, other=-1)                # [BLOCK_S]
    e = tl.load(idx_ptr + s)
    eq = (all_e == e) & in_s
    r = tl.sum((eq & (offs < s)).to(tl.int32), axis=0)                   # occurrences before s
    rank = tl.cumsum(eq.to(tl.int32), axis=0) - 1                        # [BLOCK_S]
    p = r + tl.arange(0, BLOCK_P)
    sel = eq[None, :] & (rank[None, :] == p[:, None])                   # [BLOCK_P, BLOCK_S]
    pair = tl.sum(tl.where(sel, offs[None, :], 0), axis=1)              # [BLOCK_P]
    valid = tl.sum(sel.to(tl.int32), axis=1) > 0                        # [BLOCK_P]
    return e.to(tl.int64), pair, valid, (r % BLOCK_P) == 0


@triton.jit
def _ew_chunk2(acc1, acc3, w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr, x_ptr, xs_ptr,
               rows, row_mask, kw0, KW, magic, W: tl.constexpr, TWO: tl.constexpr):
    """One K step (16*W channels) of the CUDA-core GEMV for one or two matrices sharing x.

    ``acc [BN, W] += s * (x.q - z * sum x)`` per packed word. x_ptr points at the pre-scaled
    transposed activation ``x[16*kw + j] * 4^-(j%8)`` laid out [16, KW]; xs_ptr at the per-word sums
    ``sum_j x[16*kw + j]`` [KW]. All weight, scale and zero loads are issued before the first use.
    """
    kw = kw0 + tl.arange(0, W)                                           # [W] (W divides KW)
    m2 = row_mask[:, None] & (kw >= 0)[None, :]
    g = kw // 4
    wofs = rows[:, None] * KW + kw[None, :]                              # [BN, W]
    sofs = rows[:, None] * (KW // 4) + g[None, :]
    zofs = rows[:, None] * (KW // 8) + (g // 2)[None, :]
    zsh = ((g % 2) * 4)[None, :]
    words1 = tl.load(w1_ptr + wofs, mask=m2, other=0)                   # [BN, W] int32
    if TWO:
        words3 = tl.load(w3_ptr + wofs, mask=m2, other=0)
    sc1 = tl.load(s1_ptr + sofs, mask=m2, other=0.0)
    zb1 = tl.load(z1_ptr + zofs, mask=m2, other=0)
    if TWO:
        sc3 = tl.load(s3_ptr + sofs, mask=m2, other=0.0)
        zb3 = tl.load(z3_ptr + zofs, mask=m2, other=0)
    hi1 = words1 >> 16
    part1 = tl.zeros(acc1.shape, tl.float32)                             # [BN, W]
    if TWO:
        hi3 = words3 >> 16
        part3 = tl.zeros(acc3.shape, tl.float32)
    for j in tl.static_range(16):
        xj = tl.load(x_ptr + j * KW + kw)                                # [W]
        mbits = 3 << (2 * (j % 8))
        if j < 8:
            f1 = ((words1 & mbits) | magic).to(tl.float32, bitcast=True) - 8388608.0   # q * 4^(j%8)
        else:
            f1 = ((hi1 & mbits) | magic).to(tl.float32, bitcast=True) - 8388608.0
        part1 += f1 * xj[None, :]
        if TWO:
            if j < 8:
                f3 = ((words3 & mbits) | magic).to(tl.float32, bitcast=True) - 8388608.0
            else:
                f3 = ((hi3 & mbits) | magic).to(tl.float32, bitcast=True) - 8388608.0
            part3 += f3 * xj[None, :]
    xs = tl.load(xs_ptr + kw)[None, :]                                   # [1, W]
    z1 = ((zb1.to(tl.int32) & 0xFF) >> zsh) & 0xF
    acc1 += sc1.to(tl.float32) * (part1 - z1.to(tl.float32) * xs)
    if TWO:
        z3 = ((zb3.to(tl.int32) & 0xFF) >> zsh) & 0xF
        acc3 += sc3.to(tl.float32) * (part3 - z3.to(tl.float32) * xs)
    return acc1, acc3


@triton.jit
def _ew16_chunk2(acc1, acc3, w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr, x_ptr, xs_ptr,
                 rows, row_mask, kw0, KW, magic, W: tl.constexpr, TWO: tl.constexpr):
    """One K step (16*W channels) of the fp16 CUDA-core GEMV (HALF path) for one or two matrices.

    The packed words are read as int16 halves (little-endian: half 2w holds codes 0-7 of word w,
    half 2w+1 codes 8-15). Code j of a half sits at bits [2j, 2j+2): for j < 5 it is masked in place
    and OR-ed into the mantissa of 1024.0 (fp16 0x6400), so the half reads ``1024 + q*4^j`` exactly,
    and one fp16 FMA ``f*4^-j - 1024*4^-j`` gives q exactly; codes 5-7 take one shift by 10 first.
    Two halves share each 32-bit LOP3 / HFMA2. Products ``q*x`` accumulate in fp16 over the 8 codes
    of a half, then per 64-channel group in fp32: ``acc [BN, W/4] += s * (x.q - z * sum x)``.
    x_ptr: fp16 activations laid out [8, 2*KW] (code j of half hh); xs_ptr: fp32 group sums [KW/4].
    """
    BN: tl.constexpr = acc1.shape[0]
    hw = 2 * kw0 + tl.arange(0, 2 * W)                                   # [2W] int16 halves
    m2 = row_mask[:, None] & (hw >= 0)[None, :]
    hofs = rows[:, None] * (2 * KW) + hw[None, :]                        # [BN, 2W]
    zrow = 0 * rows[:, None]                                             # x loads in the weights' layout
    h1 = tl.load(w1_ptr + hofs, mask=m2, other=0)                        # [BN, 2W] int16
    if TWO:
        h3 = tl.load(w3_ptr + hofs, mask=m2, other=0)
    g = kw0 // 4 + tl.arange(0, W // 4)                                  # [W/4] groups of this step
    gm = row_mask[:, None] & (g >= 0)[None, :]
    sofs = rows[:, None] * (KW // 4) + g[None, :]
    zofs = rows[:, None] * (KW // 8) + (g // 2)[None, :]
    zsh = ((g % 2) * 4)[None, :]
    sc1 = tl.load(s1_ptr + sofs, mask=gm, other=0.0)
    zb1 = tl.load(z1_ptr + zofs, mask=gm, other=0)
    if TWO:
        sc3 = tl.load(s3_ptr + sofs, mask=gm, other=0.0)
        zb3 = tl.load(z3_ptr + zofs, mask=gm, other=0)
    mg = magic.to(tl.int16)
    part1 = tl.zeros([BN, 2 * W], tl.float16)
    if TWO:
        part3 = tl.zeros([BN, 2 * W], tl.float16)
    for j in tl.static_range(5):
        mk = tl.full((1, 1), 3 << (2 * j), tl.int16)
        xj = tl.load(x_ptr + j * (2 * KW) + hw[None, :] + zrow)          # [BN, 2W] fp16 (same for all rows)
        q1 = ((h1 & mk) | mg).to(tl.float16, bitcast=True) * (0.25 ** j) - 1024.0 * (0.25 ** j)
        part1 += q1 * xj
        if TWO:
            q3 = ((h3 & mk) | mg).to(tl.float16, bitcast=True) * (0.25 ** j) - 1024.0 * (0.25 ** j)
            part3 += q3 * xj
    ten = tl.full((1, 1), 10, tl.int16)
    s1h = h1 >> ten
    if TWO:
        s3h = h3 >> ten
    for j in tl.static_range(3):
        mk = tl.full((1, 1), 3 << (2 * j), tl.int16)
        xj = tl.load(x_ptr + (j + 5) * (2 * KW) + hw[None, :] + zrow)
        q1 = ((s1h & mk) | mg).to(tl.float16, bitcast=True) * (0.25 ** j) - 1024.0 * (0.25 ** j)
        part1 += q1 * xj
        if TWO:
            q3 = ((s3h & mk) | mg).to(tl.float16, bitcast=True) * (0.25 ** j) - 1024.0 * (0.25 ** j)
            part3 += q3 * xj
    xs = tl.load(xs_ptr + g)[None, :]                                    # [1, W/4]
    p1 = tl.sum(tl.reshape(part1.to(tl.float32), (BN, W // 4, 8)), axis=2)   # [BN, W/4]
    z1 = ((zb1.to(tl.int32) & 0xFF) >> zsh) & 0xF
    acc1 += sc1.to(tl.float32) * (p1 - z1.to(tl.float32) * xs)
    if TWO:
        p3 = tl.sum(tl.reshape(part3.to(tl.float32), (BN, W // 4, 8)), axis=2)
        z3 = ((zb3.to(tl.int32) & 0xFF) >> zsh) & 0xF
        acc3 += sc3.to(tl.float32) * (p3 - z3.to(tl.float32) * xs)
    return acc1, acc3


@triton.jit
def _q_group_dot(w_ptr, s_ptr, z_ptr, rows, row_mask, kw0, KW, xa, xg):
    """One 64-channel group (4 packed words) on the tensor cores: ``s * (q @ x - z * sum x)`` [BN, P].

    The codes become fp16 by the magic-number trick (``0x6400 | q`` reads ``1024 + q``); scale and
    zero are applied to the [BN, P] product, so the dot operand is the raw code (exact in fp16).
    xa [64, P] fp16 activations of this group, xg [P] fp32 their sums.
    """
    kw = kw0 + tl.arange(0, 4)
    words = tl.load(w_ptr + rows[:, None] * KW + kw[None, :], mask=row_mask[:, None], other=0)   # [BN, 4]
    grp = kw0 // 4
    sc = tl.load(s_ptr + rows * (KW // 4) + grp, mask=row_mask, other=0.0).to(tl.float32)       # [BN]
    zb = tl.load(z_ptr + rows * (KW // 8) + grp // 2, mask=row_mask, other=0)
    z = (((zb.to(tl.int32) & 0xFF) >> ((grp % 2) * 4)) & 0xF).to(tl.float32)                     # [BN]
    sh = tl.arange(0, 16) * 2
    q = ((words[:, :, None] >> sh[None, None, :]) & 3) | 0x6400                                 # [BN, 4, 16]
    qf = q.to(tl.int16).to(tl.float16, bitcast=True) - 1024.0                                   # exact codes
    qt = tl.reshape(qf, (qf.shape[0], 64))                                                      # [BN, 64]
    part = tl.dot(qt, xa)                                                                       # [BN, P] fp32
    return sc[:, None] * (part - z[:, None] * xg[None, :])


@triton.jit
def _prep_kernel(
    # x [T, D] (any float dtype) ->
    #   EW:  xt [T, 16, D/16] fp32 scaled by 4^-(j%8), xs [T, D/16] fp32 per-word sums
    #   DOT: xt [T, D] fp16, xs [T, D/64] fp32 per-group sums of the fp16 values
    #   HALF: xt [T, 8, 2*D/16] fp16 (code j of int16 half hh), xs [T, D/64] as DOT
    x_ptr, xt_ptr, xs_ptr,
    # workspace to zero (y, gate/up partial sums, split counters), fp32 [NZ]
    ws_ptr, NZ,
    # words per row, the number of x programs (T * cdiv(KW, BLOCK_W))
    KW, NX,
    BLOCK_W: tl.constexpr, BLOCK_Z: tl.constexpr, DOT: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    pid = tl.program_id(0)
    zo = pid * BLOCK_Z + tl.arange(0, BLOCK_Z)
    tl.store(ws_ptr + zo, tl.zeros([BLOCK_Z], tl.float32), mask=zo < NZ)
    if pid < NX:
        nb = tl.cdiv(KW, BLOCK_W)
        t = (pid // nb).to(tl.int64)
        kw = (pid % nb) * BLOCK_W + tl.arange(0, BLOCK_W)
        j = tl.arange(0, 16)
        m = kw < KW
        x = tl.load(x_ptr + t * KW * 16 + kw[:, None] * 16 + j[None, :], mask=m[:, None], other=0.0)
        if DOT:
            xh = x.to(tl.float16)                                        # [BW, 16]
            tl.store(xt_ptr + t * KW * 16 + kw[:, None] * 16 + j[None, :], xh, mask=m[:, None])
            ws = tl.sum(xh.to(tl.float32), axis=1)                       # [BW] per-word sums
            gs = tl.sum(tl.reshape(ws, (BLOCK_W // 4, 4)), axis=1)       # [BW/4] per-group sums
            gi = (pid % nb) * (BLOCK_W // 4) + tl.arange(0, BLOCK_W // 4)
            tl.store(xs_ptr + t * (KW // 4) + gi, gs, mask=gi < KW // 4)
        elif HALF:
            xh = x.to(tl.float16)                                        # [BW, 16]
            hh = 2 * kw[:, None] + (j // 8)[None, :]                     # int16 half of the word
            tl.store(xt_ptr + t * KW * 16 + (j % 8)[None, :] * (2 * KW) + hh, xh, mask=m[:, None])
            ws = tl.sum(xh.to(tl.float32), axis=1)
            gs = tl.sum(tl.reshape(ws, (BLOCK_W // 4, 4)), axis=1)
            gi = (pid % nb) * (BLOCK_W // 4) + tl.arange(0, BLOCK_W // 4)
            tl.store(xs_ptr + t * (KW // 4) + gi, gs, mask=gi < KW // 4)
        else:
            x = x.to(tl.float32)
            tl.store(xs_ptr + t * KW + kw, tl.sum(x, axis=1), mask=m)
            sc = tl.exp2(-2.0 * (j % 8).to(tl.float32))                  # 4^-(j%8), exact
            tl.store(xt_ptr + t * KW * 16 + j[None, :] * KW + kw[:, None], x * sc[None, :], mask=m[:, None])


@triton.jit
def _swiglu_store(g, u, rw, rows, rmask, pair, valid, h_ptr, hs_ptr, I, limit, pid_n,
                  BLOCK_N: tl.constexpr, DOT: tl.constexpr, HALF: tl.constexpr):
    """SwiGLU * routing weight on a finished [BN] (EW) or [BN, P] (DOT) tile of g, u; writes h (+ sums)."""
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    if DOT:
        h = (g * tl.sigmoid(g) * u * rw[None, :]).to(tl.float16)         # [BN, P]
        m = rmask[:, None] & valid[None, :]
        tl.store(h_ptr + pair[None, :].to(tl.int64) * I + rows[:, None], h, mask=m)
        hg = tl.sum(tl.reshape(tl.where(m, h.to(tl.float32), 0.0), (BLOCK_N // 64, 64, h.shape[1])), axis=1)
        gi = pid_n * (BLOCK_N // 64) + tl.arange(0, BLOCK_N // 64)
        tl.store(hs_ptr + pair[None, :].to(tl.int64) * (I // 64) + gi[:, None], hg,
                 mask=(gi < I // 64)[:, None] & valid[None, :])
    elif HALF:
        h = (g * tl.sigmoid(g) * u * rw).to(tl.float16)                  # [BN]
        IW = I // 16
        c = rows % 16
        tl.store(h_ptr + pair.to(tl.int64) * I + (c % 8) * (2 * IW) + 2 * (rows // 16) + c // 8, h, mask=rmask)
        hf = tl.where(rmask, h.to(tl.float32), 0.0)
        hrow = hs_ptr + pair.to(tl.int64) * (I // 64)                    # group sums, zeroed by the prep kernel
        if BLOCK_N >= 64:
            gi = pid_n * (BLOCK_N // 64) + tl.arange(0, BLOCK_N // 64)
            tl.atomic_add(hrow + gi, tl.sum(tl.reshape(hf, (BLOCK_N // 64, 64)), axis=1), mask=gi < I // 64,
                          sem="relaxed")
        else:
            tl.atomic_add(hrow + (pid_n * BLOCK_N) // 64, tl.sum(hf, axis=0), sem="relaxed")
    else:
        h = g * tl.sigmoid(g) * u * rw                                   # [BN]
        IW = I // 16
        hsc = tl.exp2(-2.0 * ((rows % 16) % 8).to(tl.float32))
        tl.store(h_ptr + pair.to(tl.int64) * I + (rows % 16) * IW + rows // 16, h * hsc, mask=rmask)
        wrd = pid_n * (BLOCK_N // 16) + tl.arange(0, BLOCK_N // 16)
        hs = tl.sum(tl.reshape(tl.where(rmask, h, 0.0), (BLOCK_N // 16, 16)), axis=1)
        tl.store(hs_ptr + pair.to(tl.int64) * IW + wrd, hs, mask=wrd < IW)


@triton.jit
def _gate_up_kernel(
    # activations from _prep_kernel (layout per DOT, see there)
    x_ptr, xs_ptr,
    # routing: idx [T*k] int32/int64 expert ids, rw [T*k] fp32 weights, S = T*k, TOPK = k
    idx_ptr, rw_ptr, S, TOPK,
    # gate / up INT2 weights: packed [E, I, D/16] int32, scale [E, I, D/64] fp16, zero [E, I, D/128] int8
    w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr,
    # split-K partial sums gu [S, 2, I] fp32 and arrival counters cnt [S, cdiv(I, BLOCK_N)] fp32,
    # both zeroed by _prep_kernel (unused when SPLIT_K == 1)
    gu_ptr, cnt_ptr,
    # outputs: EW h [S, 16, I/16] fp32 transposed and scaled like xt + hs [S, I/16] per-word sums;
    # DOT h [S, I] fp16 + hs [S, I/64] per-group sums of the fp16 values
    h_ptr, hs_ptr,
    # sizes (KW = D/16 packed words per row), the SwiGLU clamp, MAGIC = 0x4B000000 (a runtime
    # value so that ptxas fuses the mask and the OR into one LOP3 instead of two immediates)
    I, D, KW, limit, MAGIC,
    BLOCK_N: tl.constexpr, W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_K: tl.constexpr, STAGES: tl.constexpr, DOT: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    s = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, pair, valid, active = _expert_pairs(idx_ptr, s, S, BLOCK_S, BLOCK_P)
    if not active:
        return
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < I
    WSZ: tl.constexpr = 2 if HALF else 1                                 # HALF: weights seen as int16 halves
    w1_ptr += e * I * KW * WSZ
    w3_ptr += e * I * KW * WSZ
    s1_ptr += e * I * (KW // 4)
    s3_ptr += e * I * (KW // 4)
    z1_ptr += e * I * (KW // 8)
    z3_ptr += e * I * (KW // 8)
    per_split = KW // SPLIT_K                                            # a multiple of W (host checks)
    k_lo = tl.program_id(2) * per_split
    if DOT:
        tok = (pair // TOPK).to(tl.int64)                                # [P]
        rw = tl.load(rw_ptr + pair, mask=valid, other=0.0)               # [P]
        acc1 = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
        kk = tl.arange(0, 64)
        for kw0 in tl.range(k_lo, k_lo + per_split, W, num_stages=STAGES):
            for gi in tl.static_range(W // 4):
                kg = kw0 + 4 * gi
                xa = tl.load(x_ptr + tok[None, :] * D + (kg * 16 + kk)[:, None], mask=valid[None, :],
                             other=0.0)                                  # [64, P] fp16
                xg = tl.load(xs_ptr + tok * (D // 64) + kg // 4, mask=valid, other=0.0)   # [P]
                acc1 += _q_group_dot(w1_ptr, s1_ptr, z1_ptr, rows, rmask, kg, KW, xa, xg)
                acc3 += _q_group_dot(w3_ptr, s3_ptr, z3_ptr, rows, rmask, kg, KW, xa, xg)
        gout = acc1
        uout = acc3
        m = rmask[:, None] & valid[None, :]
        gofs = pair[None, :].to(tl.int64) * (2 * I) + rows[:, None]      # [BN, P]
    else:
        t0 = (s // TOPK).to(tl.int64)
        rw = tl.load(rw_ptr + s)
        x_ptr += t0 * D
        if HALF:
            xs_ptr += t0 * (KW // 4)
            acc1 = tl.zeros([BLOCK_N, W // 4], tl.float32)
            acc3 = tl.zeros([BLOCK_N, W // 4], tl.float32)
            for kw0 in range(k_lo, k_lo + per_split, W):
                acc1, acc3 = _ew16_chunk2(acc1, acc3, w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr, x_ptr, xs_ptr,
                                          rows, rmask, kw0, KW, MAGIC, W, True)
        else:
            xs_ptr += t0 * KW
            acc1 = tl.zeros([BLOCK_N, W], tl.float32)
            acc3 = tl.zeros([BLOCK_N, W], tl.float32)
            for kw0 in range(k_lo, k_lo + per_split, W):
                acc1, acc3 = _ew_chunk2(acc1, acc3, w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr, x_ptr, xs_ptr,
                                        rows, rmask, kw0, KW, MAGIC, W, True)
        gout = tl.sum(acc1, axis=1)                                      # [BN]
        uout = tl.sum(acc3, axis=1)
        m = rmask
        gofs = s.to(tl.int64) * (2 * I) + rows
        pair = s
    if SPLIT_K == 1:
        _swiglu_store(gout, uout, rw, rows, rmask, pair, valid, h_ptr, hs_ptr, I, limit, pid_n, BLOCK_N, DOT, HALF)
    else:
        # split-K: partial sums by atomics; the last program of this tile to arrive applies SwiGLU
        tl.atomic_add(gu_ptr + gofs, gout, mask=m, sem="relaxed")
        tl.atomic_add(gu_ptr + gofs + I, uout, mask=m, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + s * tl.num_programs(1) + pid_n, 1.0, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            gsum = tl.load(gu_ptr + gofs, mask=m, other=0.0, cache_modifier=".cg")
            usum = tl.load(gu_ptr + gofs + I, mask=m, other=0.0, cache_modifier=".cg")
            _swiglu_store(gsum, usum, rw, rows, rmask, pair, valid, h_ptr, hs_ptr, I, limit, pid_n,
                          BLOCK_N, DOT, HALF)


@triton.jit
def _down_kernel(
    # h (and hs) from _gate_up_kernel (layout per DOT, see there)
    h_ptr, hs_ptr,
    # routing (as in _gate_up_kernel)
    idx_ptr, S, TOPK,
    # down INT2 weight: packed [E, D, I/16] int32, scale [E, D, I/64] fp16, zero [E, D, I/128] int8
    w2_ptr, s2_ptr, z2_ptr,
    # output y [T, D] fp32, zeroed by _prep_kernel; receives atomic adds
    y_ptr,
    # sizes (KW = I/16 packed words per row), MAGIC as in _gate_up_kernel
    I, D, KW, MAGIC,
    BLOCK_N: tl.constexpr, W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_K: tl.constexpr, STAGES: tl.constexpr, DOT: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    s = tl.program_id(0)
    e, pair, valid, active = _expert_pairs(idx_ptr, s, S, BLOCK_S, BLOCK_P)
    if not active:
        return
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < D
    WSZ: tl.constexpr = 2 if HALF else 1
    w2_ptr += e * D * KW * WSZ
    s2_ptr += e * D * (KW // 4)
    z2_ptr += e * D * (KW // 8)
    per_split = KW // SPLIT_K
    k_lo = tl.program_id(2) * per_split
    if DOT:
        tok = (pair // TOPK).to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
        kk = tl.arange(0, 64)
        for kw0 in tl.range(k_lo, k_lo + per_split, W, num_stages=STAGES):
            for gi in tl.static_range(W // 4):
                kg = kw0 + 4 * gi
                ha = tl.load(h_ptr + pair[None, :].to(tl.int64) * I + (kg * 16 + kk)[:, None],
                             mask=valid[None, :], other=0.0)             # [64, P] fp16
                hg = tl.load(hs_ptr + pair.to(tl.int64) * (I // 64) + kg // 4, mask=valid, other=0.0)
                acc += _q_group_dot(w2_ptr, s2_ptr, z2_ptr, rows, rmask, kg, KW, ha, hg)
        tl.atomic_add(y_ptr + tok[None, :] * D + rows[:, None], acc, mask=rmask[:, None] & valid[None, :],
                      sem="relaxed")
    else:
        t0 = (s // TOPK).to(tl.int64)
        h_ptr += s.to(tl.int64) * I
        if HALF:
            hs_ptr += s.to(tl.int64) * (KW // 4)
            acc = tl.zeros([BLOCK_N, W // 4], tl.float32)
            for kw0 in range(k_lo, k_lo + per_split, W):
                acc, _ = _ew16_chunk2(acc, acc, w2_ptr, s2_ptr, z2_ptr, w2_ptr, s2_ptr, z2_ptr, h_ptr, hs_ptr,
                                      rows, rmask, kw0, KW, MAGIC, W, False)
        else:
            hs_ptr += s.to(tl.int64) * KW
            acc = tl.zeros([BLOCK_N, W], tl.float32)
            for kw0 in range(k_lo, k_lo + per_split, W):
                acc, _ = _ew_chunk2(acc, acc, w2_ptr, s2_ptr, z2_ptr, w2_ptr, s2_ptr, z2_ptr, h_ptr, hs_ptr,
                                    rows, rmask, kw0, KW, MAGIC, W, False)
        tl.atomic_add(y_ptr + t0 * D + rows, tl.sum(acc, axis=1), mask=rmask, sem="relaxed")


def _check_routing(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"kernels.int2_moe: x must be [T, D], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"kernels.int2_moe: x must be fp32/bf16/fp16, got {x.dtype}")
    if idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"kernels.int2_moe: idx must be [T, k] with T={x.shape[0]}, got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kernels.int2_moe: idx must be int32/int64, got {idx.dtype}")
    if tuple(weight.shape) != tuple(idx.shape):
        raise ValueError(f"kernels.int2_moe: weight shape {tuple(weight.shape)} != idx shape {tuple(idx.shape)}")
    for t, name in ((idx, "idx"), (weight, "weight")):
        if t.device != x.device:
            raise ValueError(f"kernels.int2_moe: {name} is on {t.device}, x on {x.device}")
    return x.shape[0], idx.shape[1]


def check_moe_weights(x, w1, w3, w2) -> tuple[int, int, int]:
    """Validate the three projections against x; returns (E, D, I)."""
    E, I, D = check_int2("w1", *w1)
    if check_int2("w3", *w3) != (E, I, D):
        raise ValueError(f"kernels.int2_moe: w3 shape differs from w1 {(E, I, D)}")
    if check_int2("w2", *w2) != (E, D, I):
        raise ValueError(f"kernels.int2_moe: w2 must be [E, D, I] = {(E, D, I)}, got {tuple(w2[0].shape)}*16")
    if x.shape[1] != D:
        raise ValueError(f"kernels.int2_moe: x has D={x.shape[1]}, weights D={D}")
    if w1[0].device != x.device:
        raise ValueError(f"kernels.int2_moe: weights on {w1[0].device}, x on {x.device}")
    return E, D, I


def _stage(cfg: StageConfig, kw: int, dot: bool, name: str) -> tuple[int, int]:
    """(words per K step, K splits) fitted to a row of kw packed words."""
    w = fit_w(cfg.w, kw)
    if dot and w % 4:
        raise ValueError(f"kernels.int2_moe_decode: {name}: the dot and fp16 paths need w to be a multiple of 4")
    return w, fit_split(kw, w, cfg.split)


def int2_moe_decode(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                    w1_packed: torch.Tensor, w1_scale: torch.Tensor, w1_zero_packed: torch.Tensor,
                    w3_packed: torch.Tensor, w3_scale: torch.Tensor, w3_zero_packed: torch.Tensor,
                    w2_packed: torch.Tensor, w2_scale: torch.Tensor, w2_zero_packed: torch.Tensor,
                    limit: float, *, config: DecodeConfig | None = None,
                    use_dot: bool | None = None, half: bool | None = None) -> torch.Tensor:
    """Routed-expert MoE for a few tokens -> fp32 ``[T, D]`` (see module docstring).

    ``use_dot`` defaults to False (the CUDA-core path, one pair per program); True reads each
    expert once for all its tokens (tensor cores). On the CUDA-core path ``half`` selects the fp16
    inner loop (``_ew16_chunk2``: two codes per 32-bit op, fp16 products summed over 8 codes;
    4e-5 - 2e-4 relative error for bf16 inputs, ~1e-3 for fp32 inputs rounded to fp16) over the fp32
    one (~1e-7); default: ``HALF_DEFAULT`` for bf16/fp16 activations, the fp32 loop for fp32 ones.
    See kernels/BENCHMARKS.md for the measurements. Three launches, no host sync (CUDA-graph capturable).
    """
    T, k = _check_routing(x, idx, weight)
    w1 = (w1_packed, w1_scale, w1_zero_packed)
    w3 = (w3_packed, w3_scale, w3_zero_packed)
    w2 = (w2_packed, w2_scale, w2_zero_packed)
    E, D, I = check_moe_weights(x, w1, w3, w2)
    S = T * k
    if S > 4096:
        raise ValueError(f"kernels.int2_moe_decode: T*k={S} too large for the decode kernel; use prefill")
    use_dot = bool(use_dot)
    if half is None:   # bf16/fp16 activations are exact in fp16; an fp32 model keeps the fp32 loop
        half = HALF_DEFAULT and x.dtype in (torch.bfloat16, torch.float16)
    half = bool(half) and not use_dot
    cfg = config or decode_configs(use_dot, half)[0]
    gu, dn = cfg.gate_up, cfg.down
    gu_w, gu_split = _stage(gu, D // 16, use_dot or half, "gate_up")
    dn_w, dn_split = _stage(dn, I // 16, use_dot or half, "down")
    if gu.block_n % (64 if use_dot else 16):
        raise ValueError(f"kernels.int2_moe_decode: gate_up block_n must be a multiple of {64 if use_dot else 16}")
    if half and gu.block_n < 64 and 64 % gu.block_n:
        raise ValueError("kernels.int2_moe_decode: the fp16 path needs gate_up block_n dividing 64 or a multiple of 64")
    if use_dot and dn.block_n < 16:
        raise ValueError("kernels.int2_moe_decode: the dot path needs down block_n >= 16")
    block_p = 16 if use_dot else 1
    block_s = max(16, triton.next_power_of_2(S))
    idx_f = idx.reshape(-1).contiguous()
    rw = weight.reshape(-1).to(torch.float32).contiguous()
    dev = x.device
    n_tiles = triton.cdiv(I, gu.block_n)
    n_hs = S * (I // 64) if half else 0
    ws = torch.empty(T * D + S * 2 * I + S * n_tiles + n_hs, dtype=torch.float32, device=dev)
    y = ws[:T * D].view(T, D)                                            # [T, D]
    gu_buf = ws[T * D:T * D + S * 2 * I]                                 # [S, 2, I]
    cnt = ws[T * D + S * 2 * I:T * D + S * 2 * I + S * n_tiles]          # [S, n_tiles]
    if use_dot or half:
        xin = torch.empty((T, D), dtype=torch.float16, device=dev)       # DOT [T, D]; HALF [T, 8, D/8]
        xs = torch.empty((T, D // 64), dtype=torch.float32, device=dev)
        h = torch.empty((S, I), dtype=torch.float16, device=dev)
        hs = (ws[T * D + S * 2 * I + S * n_tiles:].view(S, I // 64) if half
              else torch.empty((S, I // 64), dtype=torch.float32, device=dev))
    else:
        xin = torch.empty((T, 16, D // 16), dtype=torch.float32, device=dev)
        xs = torch.empty((T, D // 16), dtype=torch.float32, device=dev)
        h = torch.empty((S, I), dtype=torch.float32, device=dev)
        hs = torch.empty((S, I // 16), dtype=torch.float32, device=dev)
    wv = (lambda t: as_int32(t).view(torch.int16)) if half else as_int32
    nx = T * triton.cdiv(D // 16, 64)
    nz = ws.numel()
    _prep_kernel[(max(nx, triton.cdiv(nz, 1024)),)](x.contiguous(), xin, xs, ws, nz, D // 16, nx,
                                                    BLOCK_W=64, BLOCK_Z=1024, DOT=use_dot, HALF=half, **launch_args(x.device))
    _gate_up_kernel[(S, n_tiles, gu_split)](
        xin, xs, idx_f, rw, S, k,
        wv(w1_packed), w1_scale, w1_zero_packed, wv(w3_packed), w3_scale, w3_zero_packed,
        gu_buf, cnt, h, hs, I, D, D // 16, float(limit), _MAGIC16 if half else _MAGIC,
        BLOCK_N=gu.block_n, W=gu_w, BLOCK_P=block_p, BLOCK_S=block_s, SPLIT_K=gu_split,
        STAGES=gu.stages, DOT=use_dot, HALF=half, num_warps=gu.warps, num_stages=gu.stages, **launch_args(x.device))
    _down_kernel[(S, triton.cdiv(D, dn.block_n), dn_split)](
        h, hs, idx_f, S, k, wv(w2_packed), w2_scale, w2_zero_packed, y, I, D, I // 16,
        _MAGIC16 if half else _MAGIC,
        BLOCK_N=dn.block_n, W=dn_w, BLOCK_P=block_p, BLOCK_S=block_s, SPLIT_K=dn_split,
        STAGES=dn.stages, DOT=use_dot, HALF=half, num_warps=dn.warps, num_stages=dn.stages, **launch_args(x.device))
    return y


# ----------------------------------------------------------------------------- torch reference
def swiglu_reference(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """``silu(g.clamp(max=limit)) * u.clamp(-limit, limit)`` in fp32."""
    return torch.nn.functional.silu(g.float().clamp(max=limit)) * u.float().clamp(-limit, limit)


def int2_moe_reference(x, idx, weight, w1_packed, w1_scale, w1_zero_packed,
                       w3_packed, w3_scale, w3_zero_packed, w2_packed, w2_scale, w2_zero_packed,
                       limit: float) -> torch.Tensor:
    """Plain torch (fp32): dequantise each routed expert and apply the MoE math -> ``[T, D]``."""
    T, k = idx.shape
    xf = x.float()
    y = torch.zeros((T, x.shape[1]), dtype=torch.float32, device=x.device)
    for e in torch.unique(idx).tolist():
        t, j = (idx == e).nonzero(as_tuple=True)
        w1 = dequantize_int2_reference(w1_packed[e], w1_scale[e], w1_zero_packed[e])   # [I, D]
        w3 = dequantize_int2_reference(w3_packed[e], w3_scale[e], w3_zero_packed[e])
        w2 = dequantize_int2_reference(w2_packed[e], w2_scale[e], w2_zero_packed[e])   # [D, I]
        h = swiglu_reference(xf[t] @ w1.T, xf[t] @ w3.T, limit) * weight[t, j].float()[:, None]
        y.index_add_(0, t, h @ w2.T)
    return y
