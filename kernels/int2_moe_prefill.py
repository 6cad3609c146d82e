"""INT2 g64 MoE prefill: grouped GEMM over tokens sorted by expert, dequant fused into the dot loop.

Math as ``int2_moe_decode`` (v4_arch.md section 2.7): ``h = silu(min(W1 x, L)) * clamp(W3 x, +-L) * rw``,
``y_t = sum_experts W2 h`` (fp32). Weight layout: the INT2 g64 contract (``int2_dequant.py``).

Routing is turned into blocks with a sort (``align_pairs``, moe_align_block_size-style, torch ops
only, no host sync): the ``S = T*k`` (token, slot) pairs are sorted by expert and each expert's run
is padded to a multiple of BLOCK_M with the sentinel S; ``block_expert[b]`` is the expert of M-block
b, or -1 past the end. Activations are converted to fp16 once (``x16 [T, D]``), in the weight tile's K order:
the interleave-tree tiles (``EXPAND`` 2/3) are in *pair order* (``pair_order``: codes j and j + 8 of a word
side by side), so x16 is permuted to match and the gate/up epilogue writes h in the down launch's order.

1. ``_gate_up_kernel``, grid ``(cdiv(I, BLOCK_N), blocks)``: one expert's w1 and w3 ``[BLOCK_N, 16*W]``
   tiles are dequantised once per K step for BLOCK_M routed tokens (``_int2_tile_f16``) and fed to
   ``tl.dot`` (fp16 operands, fp32 accumulation); SwiGLU, clamp and the routing weight in the
   epilogue; writes ``h [blocks*BLOCK_M, I]`` (fp16) by SORTED position (padding rows get 0).
2. ``_down_kernel``, grid ``(cdiv(D, BLOCK_N), blocks * R)``: M-blocks of ``BLOCK_M / R`` rows read
   ``h`` contiguously (all-padding sub-blocks exit at once); the epilogue atomically adds into
   ``y [T, D]`` (fp32), which sums the k experts of each token.

Dequant in fp16 (``_int2_tile_f16``): a code q becomes ``1024 + q`` by OR-ing it into the mantissa of
0x6400 and bit-casting; the zero z likewise, so ``(1024+q) - (1024+z)`` is exact and one fp16 multiply
by the scale gives the weight with a single rounding (the value the fp32 path rounds to fp16).
The tile is built in the packed words' own register layout: the 16 codes of a ``[BN, W]`` word tile
are dequantised as 16 ``[BN, W]`` tensors and merged by a tree of ``tl.interleave`` (in-thread
joins), so no code crosses threads (``EXPAND`` 2/3; 0 and 1 are the slower layouts, kept for the
benchmark). ``SWAP`` (constexpr) puts the weight tile on the left of the dot (``acc [BLOCK_N,
BLOCK_M]``): the dequantised registers are the MMA's A operand and the token count is the MMA's N
side (>= 16), so a small BLOCK_M costs no padding of the weight side. ``GemmConfig.chunk`` instead
dequantises ``chunk`` experts at a time to fp16 (``dequantize_int2``) and runs the same kernels as
a plain fp16 grouped GEMM. ``GemmConfig.split`` splits K over a third grid axis for decode-size token counts
(``SPLIT_DECODE_CONFIG``): gate/up partial sums go into a zeroed fp32 workspace (``workspace.zeroed_workspace``)
by atomic adds and the last split of a tile to arrive (per-tile counter) applies SwiGLU and zeroes what it used;
down splits add into y like the M-blocks do. Measurements: kernels/BENCHMARKS.md "INT2 prefill grouped GEMM v2".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .int2_dequant import as_int32, dequantize_int2, fit_w
from .int2_moe_decode import _check_routing, check_moe_weights
from .ptx import codes_f16x2
from .workspace import split_workspace, zeroed_workspace

HAS_ASSUME = tl.constexpr(hasattr(tl, "assume"))


@dataclass(frozen=True)
class GemmConfig:
    """One launch: weight rows per program, packed words per K step (16*w channels), warps, stages,
    weights as the dot's left operand (``swap``), how the K tile is built (``expand``: 2 = interleave
    tree with the next step's scales/zeros prefetched, 3 = the same without prefetch, 1 =
    repeated-address load, 0 = [BN, W, 16] expand + reshape; see ``_int2_tile_f16``); ``chunk > 0``:
    dequantise ``chunk`` experts at a time to fp16 (``dequantize_int2``, a ``[chunk, N, K]``
    temporary) and run the dot on those instead; ``maxnreg`` caps the registers per thread (Triton's launch
    option) to fit more CTAs on an SM; ``split`` > 1 splits K over a third grid axis (gate/up: partial sums in a
    zeroed fp32 workspace, the last split of a tile applies SwiGLU; down: each split adds into y)."""
    block_n: int = 128
    w: int = 8
    warps: int = 8
    stages: int = 3
    swap: bool = True
    expand: int = 2
    chunk: int = 0
    maxnreg: int = 0      # > 0: cap registers per thread (more CTAs per SM; ptxas may spill)
    split: int = 1        # > 1: split-K over a third grid axis (decode-size token counts: more programs)


@dataclass(frozen=True)
class PrefillConfig:
    """Tokens per M-block of the expert runs (``block_m``), the two launches, and the down kernel's
    M-block (``down_block_m``, 0 = block_m; must divide block_m)."""
    block_m: int = 64
    gate_up: GemmConfig = GemmConfig()
    down: GemmConfig = GemmConfig()
    down_block_m: int = 0


# Split-K launches for decode-size token counts: 16-token blocks, gate/up K split 8 ways, down 4 ways, so the few
# expert blocks of a 1-16 token call still make ~1-2k programs. Measured on the H200 (session 9, 43 layers' weights,
# bench/bench_int2_idp.py --split-prefill, h200_int2_split_decode_v12.json), us/layer against the idp decode kernel:
# 16 tokens on 6 shared experts 109-123 vs 176 (the only win), 1 token 100-116 vs 24, 8 independent tokens
# 434-556 vs 106; the whole b8 step on it went 10.3 -> 30.9 ms. The tensor-core path dequantises at ~1.4e12
# weights/s here (the prefill launches reach ~2.2e12), a quarter of idp's rate, so it only wins when many tokens
# share an expert. Not used by the model (the dispatch switch was removed); kept for that case and the benchmark.
SPLIT_DECODE_CONFIG = PrefillConfig(16, GemmConfig(64, 8, 4, 3, split=8), GemmConfig(64, 8, 4, 3, split=4))


def pick_prefill_config(T: int, k: int, E: int) -> PrefillConfig:
    """Default launch for T tokens x top-k over E experts (shapes only, no host sync).

    Chosen by measurement on the H200 (kernels/BENCHMARKS.md "INT2 prefill grouped GEMM v2").
    """
    per_expert = T * k / max(E, 1)
    if per_expert <= 16:     # not timed (T <= ~680 at top-6 of 256); the T=2048 tiles with 16-token blocks
        return PrefillConfig(16, GemmConfig(64, 8, 4, 3), GemmConfig(64, 8, 4, 3))
    if per_expert <= 96:     # T=2048: 4.18 ms/layer (2026-11-29 run 6; the previous expand=3 / 128-row down: 4.53)
        return PrefillConfig(64, GemmConfig(64, 8, 4, 4, expand=2), GemmConfig(64, 8, 4, 3))
    return PrefillConfig(128, GemmConfig(64, 8, 4, 3), GemmConfig(64, 8, 4, 3))   # T=6144: 11.04 ms/layer


@triton.jit
def _words_load(w_ptr, rows, row_mask, kw0, KW, W: tl.constexpr):
    """Packed words ``[BN, W]`` int32 of K step kw0."""
    kw = kw0 + tl.arange(0, W)
    return tl.load(w_ptr + rows[:, None] * KW + kw[None, :], mask=row_mask[:, None] & (kw >= 0)[None, :], other=0)


@triton.jit
def _sz_load(s_ptr, z_ptr, rows, row_mask, kw0, KW, W: tl.constexpr):
    """Scale ``[BN, W]`` fp16 and packed zero byte ``[BN, W]`` of each word of K step kw0 (0 past K)."""
    kw = kw0 + tl.arange(0, W)
    m2 = row_mask[:, None] & (kw < KW)[None, :]
    g = kw // 4                                                          # [W] group (64 = 4 words)
    sc = tl.load(s_ptr + rows[:, None] * (KW // 4) + g[None, :], mask=m2, other=0.0)
    zb = tl.load(z_ptr + rows[:, None] * (KW // 8) + (g // 2)[None, :], mask=m2, other=0)
    return sc, zb


@triton.jit
def _tile_interleave(words, sc, zb, kw0, W: tl.constexpr):
    """``[BN, 16W]`` fp16 tile from words / scales / zero bytes ``[BN, W]`` in **pair order** (``pair_order``):
    position ``16w + 2j + h`` holds code ``j + 8h`` of word w.

    Codes j and j + 8 of a word sit 16 bits apart, so ``words >> 2j`` holds both where one ``lop3`` makes
    them an fp16 pair ``(1024 + q)`` and ``sub/mul.f16x2`` finish both weights (``ptx.codes_f16x2``): about
    2.6 instructions per weight instead of ~6 for one code at a time, bit-identical results. Keeping each pair
    next to itself in K lets the pair's 32-bit register go to shared memory as it is: the natural order needed
    68 PRMT per K step to repack 16-bit halves (665 -> 604 SASS instructions per thread per step, Triton 3.8);
    the activations are permuted to match once per call."""
    g = (kw0 + tl.arange(0, W)) // 4
    z = ((zb.to(tl.int32) & 0xFF) >> ((g % 2) * 4)[None, :]) & 0xF
    zz = (z | 0x6400) * 0x10001                                          # (1024 + z) in both fp16 halves
    sb = sc.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    ss = sb | (sb << 16)                                                 # (s, s)
    # out[16w + j] = code j: interleave(evens, odds) recursively -> leaf pairs (j, j + 8)
    c0, c8 = codes_f16x2(words, zz, ss)
    c4, c12 = codes_f16x2(words >> 8, zz, ss)
    c2, c10 = codes_f16x2(words >> 4, zz, ss)
    c6, c14 = codes_f16x2(words >> 12, zz, ss)
    c1, c9 = codes_f16x2(words >> 2, zz, ss)
    c5, c13 = codes_f16x2(words >> 10, zz, ss)
    c3, c11 = codes_f16x2(words >> 6, zz, ss)
    c7, c15 = codes_f16x2(words >> 14, zz, ss)
    lo = tl.interleave(tl.interleave(tl.interleave(c0, c4), tl.interleave(c2, c6)),
                       tl.interleave(tl.interleave(c1, c5), tl.interleave(c3, c7)))      # [BN, 8W] codes 0-7
    hi = tl.interleave(tl.interleave(tl.interleave(c8, c12), tl.interleave(c10, c14)),
                       tl.interleave(tl.interleave(c9, c13), tl.interleave(c11, c15)))   # codes 8-15
    return tl.interleave(lo, hi)                                                          # [BN, 16W] pair order


@triton.jit
def _int2_tile_f16(
    # packed codes, scales, zeros of ONE expert, row-major [K_out, KW] / [K_out, KW/4] / [K_out, KW/8]
    w_ptr, s_ptr, z_ptr,
    # rows of this tile and their bounds mask
    rows, row_mask,
    # first packed word of this K chunk, words per row (K_in/16; a multiple of W)
    kw0, KW,
    W: tl.constexpr, EXPAND: tl.constexpr,
):
    """Dequantised ``[BN, 16*W]`` fp16 tile (see module docstring): pair order for EXPAND >= 2, natural K order
    for 0 and 1.

    EXPAND=0: expand the words to [BN, W, 16] and reshape; 1: load every channel's word (repeated
    addresses); 2: dequantise the 16 codes as 16 [BN, W] tensors in the words' own layout and merge
    them with a tree of ``tl.interleave`` (in-thread joins, no cross-thread data movement).
    """
    if EXPAND >= 2:
        sc, zb = _sz_load(s_ptr, z_ptr, rows, row_mask, kw0, KW, W)
        w = _tile_interleave(_words_load(w_ptr, rows, row_mask, kw0, KW, W), sc, zb, kw0, W)
    elif EXPAND == 1:
        k = kw0 * 16 + tl.arange(0, 16 * W)                              # [BK] channel
        m = row_mask[:, None] & (k >= 0)[None, :]
        words = tl.load(w_ptr + rows[:, None] * KW + (k // 16)[None, :], mask=m, other=0)   # [BN, BK]
        g = k // 64
        sc = tl.load(s_ptr + rows[:, None] * (KW // 4) + g[None, :], mask=m, other=0.0)
        zb = tl.load(z_ptr + rows[:, None] * (KW // 8) + (g // 2)[None, :], mask=m, other=0)
        z = ((zb.to(tl.int32) & 0xFF) >> ((g % 2) * 4)[None, :]) & 0xF
        q = (words >> ((k % 16) * 2)[None, :]) & 3
        qh = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)      # 1024 + q
        zh = (z | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)      # 1024 + z
        w = (qh - zh) * sc
    else:
        kw = kw0 + tl.arange(0, W)                                       # [W]
        m2 = row_mask[:, None] & (kw >= 0)[None, :]
        words = tl.load(w_ptr + rows[:, None] * KW + kw[None, :], mask=m2, other=0)          # [BN, W]
        g = kw // 4
        sc = tl.load(s_ptr + rows[:, None] * (KW // 4) + g[None, :], mask=m2, other=0.0)    # [BN, W] fp16
        zb = tl.load(z_ptr + rows[:, None] * (KW // 8) + (g // 2)[None, :], mask=m2, other=0)
        z = ((zb.to(tl.int32) & 0xFF) >> ((g % 2) * 4)[None, :]) & 0xF
        zh = (z | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)      # [BN, W]
        sh = tl.arange(0, 16) * 2
        q = (words[:, :, None] >> sh[None, None, :]) & 3                 # [BN, W, 16]
        qh = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        w3d = (qh - zh[:, :, None]) * sc[:, :, None]                     # [BN, W, 16] fp16
        w = tl.reshape(w3d, (w3d.shape[0], W * 16))
    return w


@triton.jit
def _gate_up_kernel(
    # activations x16 [T, D] fp16
    x_ptr,
    # routing blocks: sorted pair ids [blocks*BLOCK_M] (S = padding), expert per M-block, S, k, rw [S]
    sorted_ptr, bexp_ptr, S, TOPK, rw_ptr,
    # gate / up INT2 weights [E, I, D/16] int32, [E, I, D/64] fp16, [E, I, D/128] int8
    w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr,
    # output h [blocks*BLOCK_M, I] fp16 (by sorted position)
    h_ptr,
    # sizes (KW = D/16) and the clamp
    I, D, KW, limit,
    # DEQ: w1/w3 are fp16 [EC, I, D] of experts E0..E0+EC-1 (other blocks exit)
    E0, EC,
    # split-K (SPLIT > 1): zeroed fp32 workspace [blocks*BLOCK_M, 2I], zeroed int32 counter per tile, words per split
    ws_ptr, cnt_ptr, KS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr, SWAP: tl.constexpr,
    EXPAND: tl.constexpr, DEQ: tl.constexpr, H_PAIRS: tl.constexpr, SPLIT: tl.constexpr,
):
    if HAS_ASSUME:   # no zero-trip path around the K loop: LLVM would re-zero the accumulators there, and
        tl.assume(KW > 0)   # ptxas serialises every wgmma of a loop whose accumulators have a second definition (C7515)
        tl.assume(KS > 0)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    if SPLIT > 1:
        k0 = tl.program_id(2) * KS                                       # this split's first word
        kn = KS
    else:   # the unsplit launch keeps its compile-time start (the code of the prefill default)
        k0 = 0
        kn = KW
    e = tl.load(bexp_ptr + pid_m).to(tl.int64) - E0
    if (e < 0) | (e >= EC):
        return
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                        # [BM] sorted position
    pair = tl.load(sorted_ptr + pos)
    valid = pair < S
    tok = (pair // TOPK).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                       # [BN]
    rmask = rows < I
    if DEQ:
        w1_ptr += e * I * D
        w3_ptr += e * I * D
    else:
        w1_ptr += e * I * KW
        w3_ptr += e * I * KW
    s1_ptr += e * I * (KW // 4)
    s3_ptr += e * I * (KW // 4)
    z1_ptr += e * I * (KW // 8)
    z3_ptr += e * I * (KW // 8)
    kk = tl.arange(0, 16 * W)
    if SWAP:
        acc1 = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if EXPAND == 2 and not DEQ:
        # scales / zeros of step i+1 are loaded during step i (they are too narrow for cp.async)
        sc1, zb1 = _sz_load(s1_ptr, z1_ptr, rows, rmask, k0, KW, W)
        sc3, zb3 = _sz_load(s3_ptr, z3_ptr, rows, rmask, k0, KW, W)
        for i in range(0, kn, W):
            kw0 = k0 + i
            a = tl.load(x_ptr + tok[:, None] * D + (kw0 * 16 + kk)[None, :], mask=valid[:, None],
                        other=0.0)                                       # [BM, 16W] fp16
            q1 = _words_load(w1_ptr, rows, rmask, kw0, KW, W)            # [BN, W]
            q3 = _words_load(w3_ptr, rows, rmask, kw0, KW, W)
            sc1n, zb1n = _sz_load(s1_ptr, z1_ptr, rows, rmask, kw0 + W, KW, W)   # next step's
            sc3n, zb3n = _sz_load(s3_ptr, z3_ptr, rows, rmask, kw0 + W, KW, W)
            b1 = _tile_interleave(q1, sc1, zb1, kw0, W)                  # [BN, 16W]
            b3 = _tile_interleave(q3, sc3, zb3, kw0, W)
            if SWAP:
                at = tl.trans(a)
                acc1 = tl.dot(b1, at, acc1)
                acc3 = tl.dot(b3, at, acc3)
            else:
                acc1 = tl.dot(a, tl.trans(b1), acc1)
                acc3 = tl.dot(a, tl.trans(b3), acc3)
            sc1, zb1, sc3, zb3 = sc1n, zb1n, sc3n, zb3n
    for i in range(0, kn if (EXPAND != 2 or DEQ) else 0, W):
        kw0 = k0 + i
        a = tl.load(x_ptr + tok[:, None] * D + (kw0 * 16 + kk)[None, :], mask=valid[:, None],
                    other=0.0)                                           # [BM, 16W] fp16
        if DEQ:
            wofs = rows[:, None] * D + (kw0 * 16 + kk)[None, :]
            b1 = tl.load(w1_ptr + wofs, mask=rmask[:, None], other=0.0)  # [BN, 16W] fp16
            b3 = tl.load(w3_ptr + wofs, mask=rmask[:, None], other=0.0)
        else:
            b1 = _int2_tile_f16(w1_ptr, s1_ptr, z1_ptr, rows, rmask, kw0, KW, W, EXPAND)   # [BN, 16W]
            b3 = _int2_tile_f16(w3_ptr, s3_ptr, z3_ptr, rows, rmask, kw0, KW, W, EXPAND)
        if SWAP:
            at = tl.trans(a)                                             # [16W, BM]
            acc1 = tl.dot(b1, at, acc1)
            acc3 = tl.dot(b3, at, acc3)
        else:
            acc1 = tl.dot(a, tl.trans(b1), acc1)
            acc3 = tl.dot(a, tl.trans(b3), acc3)
    if SPLIT > 1:   # partial sums into the workspace; the tile's last split to arrive finishes it
        if SWAP:
            wsi = pos[None, :].to(tl.int64) * (2 * I) + rows[:, None]    # [BN, BM]
            wm = valid[None, :] & rmask[:, None]
        else:
            wsi = pos[:, None].to(tl.int64) * (2 * I) + rows[None, :]    # [BM, BN]
            wm = valid[:, None] & rmask[None, :]
        tl.atomic_add(ws_ptr + wsi, acc1, mask=wm, sem="relaxed")
        tl.atomic_add(ws_ptr + wsi + I, acc3, mask=wm, sem="relaxed")
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            acc1 = tl.load(ws_ptr + wsi, mask=wm, other=0.0, cache_modifier=".cg")
            acc3 = tl.load(ws_ptr + wsi + I, mask=wm, other=0.0, cache_modifier=".cg")
            tl.store(ws_ptr + wsi, tl.zeros_like(acc1), mask=wm)          # zero again for the next call
            tl.store(ws_ptr + wsi + I, tl.zeros_like(acc3), mask=wm)
            tl.atomic_xchg(cnt_ptr + tile, 0)
            _swiglu_h(acc1, acc3, rw_ptr, pair, valid, pos, rows, rmask, h_ptr, I, limit, SWAP, H_PAIRS)
    else:
        _swiglu_h(acc1, acc3, rw_ptr, pair, valid, pos, rows, rmask, h_ptr, I, limit, SWAP, H_PAIRS)


@triton.jit
def _swiglu_h(acc1, acc3, rw_ptr, pair, valid, pos, rows, rmask, h_ptr, I, limit,
              SWAP: tl.constexpr, H_PAIRS: tl.constexpr):
    """Gate/up epilogue: SwiGLU with the V4 clamp and the routing weight -> h (fp16) at the sorted positions."""
    rw = tl.load(rw_ptr + pair, mask=valid, other=0.0)                   # [BM]
    g = tl.minimum(acc1, limit)
    u = tl.minimum(tl.maximum(acc3, -limit), limit)
    if H_PAIRS:   # h in the down kernel's pair order: column 16w + j + 8h -> 16w + 2j + h
        cols = (rows // 16) * 16 + (rows % 8) * 2 + (rows % 16) // 8
    else:
        cols = rows
    if SWAP:
        h = g * tl.sigmoid(g) * u * rw[None, :]                          # [BN, BM]
        tl.store(h_ptr + pos[None, :].to(tl.int64) * I + cols[:, None], h.to(tl.float16),
                 mask=rmask[:, None])
    else:
        h = g * tl.sigmoid(g) * u * rw[:, None]                          # [BM, BN]
        tl.store(h_ptr + pos[:, None].to(tl.int64) * I + cols[None, :], h.to(tl.float16),
                 mask=rmask[None, :])


@triton.jit
def _down_kernel(
    # h [blocks*BLOCK_M*R, I] fp16 from _gate_up_kernel (by sorted position)
    h_ptr,
    # routing blocks (as above; bexp per gate/up block of BLOCK_M*R rows)
    sorted_ptr, bexp_ptr, S, TOPK,
    # down INT2 weight [E, D, I/16] int32, [E, D, I/64] fp16, [E, D, I/128] int8
    w2_ptr, s2_ptr, z2_ptr,
    # output y [T, D] fp32, zero-initialised, atomic adds
    y_ptr,
    # sizes (KW = I/16)
    I, D, KW,
    # DEQ: w2 is fp16 [EC, D, I] of experts E0..E0+EC-1 (other blocks exit)
    E0, EC,
    # words per K split (split-K over the third grid axis: each split adds its partial into y)
    KS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
    SWAP: tl.constexpr, EXPAND: tl.constexpr, DEQ: tl.constexpr, SPLIT: tl.constexpr,
):
    if HAS_ASSUME:
        tl.assume(KW > 0)   # see _gate_up_kernel (ptxas C7515)
        tl.assume(KS > 0)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    if SPLIT > 1:
        k0 = tl.program_id(2) * KS
        kn = KS
    else:
        k0 = 0
        kn = KW
    e = tl.load(bexp_ptr + pid_m // R).to(tl.int64) - E0
    if (e < 0) | (e >= EC):
        return
    first = tl.load(sorted_ptr + pid_m * BLOCK_M)
    if first >= S:                                                       # padding sits at the run's end
        return
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + pos)
    valid = pair < S
    tok = (pair // TOPK).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < D
    if DEQ:
        w2_ptr += e * D * I
    else:
        w2_ptr += e * D * KW
    s2_ptr += e * D * (KW // 4)
    z2_ptr += e * D * (KW // 8)
    kk = tl.arange(0, 16 * W)
    hrow = h_ptr + pos[:, None].to(tl.int64) * I                         # [BM, 1]
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if EXPAND == 2 and not DEQ:
        sc, zb = _sz_load(s2_ptr, z2_ptr, rows, rmask, k0, KW, W)
        for i in range(0, kn, W):
            kw0 = k0 + i
            a = tl.load(hrow + (kw0 * 16 + kk)[None, :])                # [BM, 16W] fp16
            q = _words_load(w2_ptr, rows, rmask, kw0, KW, W)
            scn, zbn = _sz_load(s2_ptr, z2_ptr, rows, rmask, kw0 + W, KW, W)
            b = _tile_interleave(q, sc, zb, kw0, W)
            if SWAP:
                acc = tl.dot(b, tl.trans(a), acc)
            else:
                acc = tl.dot(a, tl.trans(b), acc)
            sc, zb = scn, zbn
    for i in range(0, kn if (EXPAND != 2 or DEQ) else 0, W):
        kw0 = k0 + i
        a = tl.load(hrow + (kw0 * 16 + kk)[None, :])                    # [BM, 16W] fp16
        if DEQ:
            b = tl.load(w2_ptr + rows[:, None] * I + (kw0 * 16 + kk)[None, :], mask=rmask[:, None], other=0.0)
        else:
            b = _int2_tile_f16(w2_ptr, s2_ptr, z2_ptr, rows, rmask, kw0, KW, W, EXPAND)    # [BN, 16W]
        if SWAP:
            acc = tl.dot(b, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if SWAP:
        tl.atomic_add(y_ptr + tok[None, :] * D + rows[:, None], acc, mask=valid[None, :] & rmask[:, None])
    else:
        tl.atomic_add(y_ptr + tok[:, None] * D + rows[None, :], acc, mask=valid[:, None] & rmask[None, :])


def align_pairs(idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert, pad each expert's run to ``block_m`` -> (sorted ids, block expert).

    ``sorted_ids [max_blocks*block_m]`` int32 holds pair ids ``t*k + j`` (S = padding);
    ``block_expert [max_blocks]`` int32 holds the expert of each M-block or -1 past the used blocks.
    Torch ops only and no host sync (graph-capturable).
    """
    flat = idx.reshape(-1).to(torch.int64)                               # [S]
    S = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat))                                   # [E] (bincount would sync)
    padded = (counts + block_m - 1) // block_m * block_m                 # [E]
    ends = torch.cumsum(padded, 0)                                       # [E]
    starts = ends - padded
    order = torch.argsort(flat, stable=True)                             # [S]
    sorted_e = flat[order]
    first = torch.cumsum(counts, 0) - counts                             # [E] first sorted position
    dest = starts[sorted_e] + torch.arange(S, device=dev) - first[sorted_e]
    max_blocks = triton.cdiv(S + min(num_experts, S) * (block_m - 1), block_m)
    sorted_ids = torch.full((max_blocks * block_m,), S, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    bstart = torch.arange(max_blocks, device=dev) * block_m              # [B]
    bexp = torch.searchsorted(ends, bstart, right=True)                  # [B]
    bexp = torch.where(bstart < ends[-1], bexp, torch.full_like(bexp, -1)).to(torch.int32)
    return sorted_ids, bexp


# ``align_pairs`` in three Triton launches (+ one fill) instead of ~25 torch ops per layer; same output bits.
# On by default since session 8: interleaved 8-round A/B of a 2K prefill on the H200, fastest rounds 311.1 ->
# 305.1 ms (predicted -2 ms; bench/results/h200_prefill_ab_align_kernel.json). The full-scale bench toggles it.
ALIGN_KERNEL = True
ALIGN_CHUNK = 256      # pairs per program of the histogram / scatter launches


@triton.jit
def _align_hist_kernel(idx_ptr, hist_ptr, tot_ptr, S, E, CH: tl.constexpr, EP: tl.constexpr):
    """hist[p, e] = how many of chunk p's pairs (CH of them) route to expert e; tot[e] += that (tot zeroed)."""
    p = tl.program_id(0)
    i = p * CH + tl.arange(0, CH)
    ex = tl.load(idx_ptr + i, mask=i < S, other=-1).to(tl.int32)
    for e0 in tl.static_range(0, EP, 32):                                 # [CH, 32] compares at a time
        e = e0 + tl.arange(0, 32)
        cnt = tl.sum((ex[:, None] == e[None, :]).to(tl.int32), axis=0)
        tl.store(hist_ptr + p * EP + e, cnt, mask=e < E)
        tl.atomic_add(tot_ptr + e, cnt, mask=(e < E) & (cnt > 0), sem="relaxed")


@triton.jit
def _align_plan_kernel(hist_ptr, tot_ptr, base_ptr, bexp_ptr, P, E, NB, NBP,
                       BM: tl.constexpr, EP: tl.constexpr, EC: tl.constexpr, PP: tl.constexpr, NBC: tl.constexpr):
    """Program c (of EP / EC): the runs of all experts padded to BM and laid out in expert order; for its EC
    experts base[p, e] = starts[e] + pairs of expert e in chunks before p (no loop-carried loads); and
    bexp[b] = expert of M-block b (-1 past the used blocks) for its NBP blocks."""
    c = tl.program_id(0)
    e_all = tl.arange(0, EP)
    tot = tl.load(tot_ptr + e_all, mask=e_all < E, other=0)
    padded = (tot + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)                                      # [EP] inclusive
    total = tl.sum(padded, axis=0)
    ec = c * EC + tl.arange(0, EC)
    starts_c = tl.sum(tl.where(e_all[None, :] < ec[:, None], padded[None, :], 0), axis=1)    # [EC]
    pr = tl.arange(0, PP)
    m2 = (pr < P)[:, None] & (ec < E)[None, :]
    h = tl.load(hist_ptr + pr[:, None] * EP + ec[None, :], mask=m2, other=0)                # [PP, EC]
    base = tl.cumsum(h, axis=0) - h + starts_c[None, :]
    tl.store(base_ptr + pr[:, None] * EP + ec[None, :], base, mask=m2)
    ends_m = tl.where(e_all < E, ends, 2147483647)
    for b0 in range(c * NBP, tl.minimum(c * NBP + NBP, NB), NBC):
        b = b0 + tl.arange(0, NBC)
        pos = b * BM
        ex = tl.sum((ends_m[None, :] <= pos[:, None]).to(tl.int32), axis=1)   # experts ending at or before pos
        tl.store(bexp_ptr + b, tl.where(pos < total, ex, -1), mask=(b < NB) & (b < c * NBP + NBP))


@triton.jit
def _align_scatter_kernel(idx_ptr, base_ptr, sorted_ptr, S, CH: tl.constexpr, EP: tl.constexpr):
    """sorted[base[p, e] + rank] = pair id, rank = earlier pairs of the chunk with the same expert (stable)."""
    p = tl.program_id(0)
    r = tl.arange(0, CH)
    i = p * CH + r
    im = i < S
    ex = tl.load(idx_ptr + i, mask=im, other=-1).to(tl.int32)
    rank = tl.zeros([CH], tl.int32)
    for j0 in tl.static_range(0, CH, 32):                                 # [CH (i), 32 (j)] at a time: j before i
        j = j0 + tl.arange(0, 32)
        exj = tl.load(idx_ptr + p * CH + j, mask=p * CH + j < S, other=-2).to(tl.int32)
        rank += tl.sum(((exj[None, :] == ex[:, None]) & (j[None, :] < r[:, None])).to(tl.int32), axis=1)
    dest = tl.load(base_ptr + p * EP + tl.where(im, ex, 0), mask=im, other=0) + rank
    tl.store(sorted_ptr + dest, i.to(tl.int32), mask=im)


def align_pairs_fused(idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``align_pairs`` (same outputs, bit for bit) in two fills + three Triton launches, no host sync."""
    flat = idx.reshape(-1).contiguous()
    S, E = flat.numel(), num_experts
    dev = flat.device
    max_blocks = triton.cdiv(S + min(E, S) * (block_m - 1), block_m)
    sorted_ids = torch.full((max_blocks * block_m,), S, dtype=torch.int32, device=dev)
    bexp = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    if S == 0:
        return sorted_ids, bexp.fill_(-1)
    EP = max(32, triton.next_power_of_2(E))
    EC = 32
    P = triton.cdiv(S, ALIGN_CHUNK)
    hist = torch.empty(P, EP, dtype=torch.int32, device=dev)
    base = torch.empty(P, EP, dtype=torch.int32, device=dev)
    tot = torch.zeros(EP, dtype=torch.int32, device=dev)
    nprog = EP // EC
    _align_hist_kernel[(P,)](flat, hist, tot, S, E, CH=ALIGN_CHUNK, EP=EP)
    _align_plan_kernel[(nprog,)](hist, tot, base, bexp, P, E, max_blocks, triton.cdiv(max_blocks, nprog),
                                 BM=block_m, EP=EP, EC=EC, PP=triton.next_power_of_2(P), NBC=16)
    _align_scatter_kernel[(P,)](flat, base, sorted_ids, S, CH=ALIGN_CHUNK, EP=EP)
    return sorted_ids, bexp


def pair_order(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The last dim in pair order: within each 16-channel word, position ``2j + h`` holds channel ``j + 8h``; a new
    contiguous tensor, cast to ``dtype`` in the same copy."""
    v = x.unflatten(-1, (-1, 2, 8)).transpose(-1, -2)
    return torch.empty(v.shape, dtype=dtype or x.dtype, device=x.device).copy_(v).flatten(-3)


def _split_words(KW: int, W: int, c: GemmConfig, name: str) -> int:
    """Packed words per K split of a launch (all of K when ``c.split == 1``)."""
    if c.split < 1 or KW % (c.split * W) or (c.split > 1 and c.chunk):
        raise ValueError(f"kernels.int2_moe_prefill: {name} split={c.split} must divide the {KW} words per row into "
                         f"whole {W}-word steps (and cannot be combined with chunk={c.chunk})")
    return KW // c.split


def _reg_cap(c: GemmConfig) -> dict:
    return {"maxnreg": c.maxnreg} if c.maxnreg else {}


def uses_pairs(c: GemmConfig) -> bool:
    """The launch's weight tile (and so its activations) is in pair order."""
    return c.expand >= 2 and not c.chunk


def launch_gate_up(x16, sorted_ids, bexp, k, rw, w1, w3, h, limit: float, block_m: int, c: GemmConfig,
                   h_pairs: bool = False):
    """``_gate_up_kernel`` over ``align_pairs`` blocks of ``block_m``: x16 [T, D] fp16 -> h [B*block_m, I].

    x16 must be in the launch's K order (``pair_order(x16)`` when ``uses_pairs(c)``); ``h_pairs`` writes h in
    pair order for a down launch that uses it. With ``c.chunk`` the experts are dequantised to fp16 ``chunk``
    at a time and the kernel reads them.
    """
    (p1, s1, z1), (p3, s3, z3) = w1, w3
    E, I, KW = p1.shape
    W = fit_w(c.w, KW)
    ks = _split_words(KW, W, c, "gate_up")
    nt = triton.cdiv(I, c.block_n)
    grid = (nt, bexp.numel(), c.split)
    meta = dict(BLOCK_M=block_m, BLOCK_N=c.block_n, W=W, SWAP=c.swap, EXPAND=c.expand,
                H_PAIRS=h_pairs, SPLIT=c.split, num_warps=c.warps, num_stages=c.stages, **_reg_cap(c))
    if c.split > 1:   # zero on entry; the finishing programs zero what they used
        ws = zeroed_workspace(x16.device, bexp.numel() * block_m * 2 * I)
        cnt = split_workspace(x16.device, 0, nt * bexp.numel())[1]
    else:
        ws, cnt = rw, rw                                                  # unused
    if not c.chunk:
        _gate_up_kernel[grid](x16, sorted_ids, bexp, rw.numel(), k, rw, as_int32(p1), s1, z1, as_int32(p3), s3, z3,
                              h, I, KW * 16, KW, limit, 0, E, ws, cnt, ks, DEQ=False, **meta)
        return
    for e0 in range(0, E, c.chunk):
        e1 = min(E, e0 + c.chunk)
        d1 = dequantize_int2(p1[e0:e1], s1[e0:e1], z1[e0:e1], torch.float16)     # [C, I, D]
        d3 = dequantize_int2(p3[e0:e1], s3[e0:e1], z3[e0:e1], torch.float16)
        _gate_up_kernel[grid](x16, sorted_ids, bexp, rw.numel(), k, rw, d1, s1, z1, d3, s3, z3,
                              h, I, KW * 16, KW, limit, e0, e1 - e0, ws, cnt, ks, DEQ=True, **meta)


def launch_down(h, sorted_ids, bexp, k, w2, y, block_m: int, r: int, c: GemmConfig):
    """``_down_kernel`` in M-blocks of ``block_m`` (``r`` per ``bexp`` block): h -> atomic adds into y [T, D].
    h must be in the launch's K order (pair order when ``uses_pairs(c)``)."""
    p2, s2, z2 = w2
    E, D, KW = p2.shape
    S = y.shape[0] * k
    W = fit_w(c.w, KW)
    ks = _split_words(KW, W, c, "down")
    grid = (triton.cdiv(D, c.block_n), bexp.numel() * r, c.split)
    meta = dict(BLOCK_M=block_m, BLOCK_N=c.block_n, W=W, R=r, SWAP=c.swap, EXPAND=c.expand, SPLIT=c.split,
                num_warps=c.warps, num_stages=c.stages, **_reg_cap(c))
    if not c.chunk:
        _down_kernel[grid](h, sorted_ids, bexp, S, k, as_int32(p2), s2, z2, y, KW * 16, D, KW, 0, E, ks, DEQ=False,
                           **meta)
        return
    for e0 in range(0, E, c.chunk):
        e1 = min(E, e0 + c.chunk)
        d2 = dequantize_int2(p2[e0:e1], s2[e0:e1], z2[e0:e1], torch.float16)     # [C, D, I]
        _down_kernel[grid](h, sorted_ids, bexp, S, k, d2, s2, z2, y, KW * 16, D, KW, e0, e1 - e0, ks, DEQ=True, **meta)


def int2_moe_prefill(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                     w1_packed: torch.Tensor, w1_scale: torch.Tensor, w1_zero_packed: torch.Tensor,
                     w3_packed: torch.Tensor, w3_scale: torch.Tensor, w3_zero_packed: torch.Tensor,
                     w2_packed: torch.Tensor, w2_scale: torch.Tensor, w2_zero_packed: torch.Tensor,
                     limit: float, *, config: PrefillConfig | None = None) -> torch.Tensor:
    """Routed-expert MoE for many tokens -> fp32 ``[T, D]`` (see module docstring). No host sync.

    Temporaries: ``x16 [T, D]`` and ``h [blocks*block_m, I]`` fp16 (``blocks*block_m <= T*k +
    E*(block_m-1)``), the sort buffers, and the ``y`` output.
    """
    T, k = _check_routing(x, idx, weight)
    w1 = (w1_packed, w1_scale, w1_zero_packed)
    w3 = (w3_packed, w3_scale, w3_zero_packed)
    w2 = (w2_packed, w2_scale, w2_zero_packed)
    E, D, I = check_moe_weights(x, w1, w3, w2)
    cfg = config or pick_prefill_config(T, k, E)
    dbm = cfg.down_block_m or cfg.block_m
    if cfg.block_m % dbm:
        raise ValueError(f"kernels.int2_moe_prefill: down_block_m={dbm} must divide block_m={cfg.block_m}")
    S = T * k
    sorted_ids, bexp = (align_pairs_fused if ALIGN_KERNEL else align_pairs)(idx, E, cfg.block_m)
    nb = bexp.numel()
    rw = weight.reshape(-1).to(torch.float32).contiguous()              # [S]
    x16 = (pair_order(x, torch.float16) if uses_pairs(cfg.gate_up)   # [T, D], cast and permuted in one copy
           else x.to(torch.float16).contiguous())
    h = torch.empty((nb * cfg.block_m, I), dtype=torch.float16, device=x.device)
    y = torch.zeros((T, D), dtype=torch.float32, device=x.device)
    launch_gate_up(x16, sorted_ids, bexp, k, rw, w1, w3, h, float(limit), cfg.block_m, cfg.gate_up,
                   h_pairs=uses_pairs(cfg.down))
    launch_down(h, sorted_ids, bexp, k, w2, y, dbm, cfg.block_m // dbm, cfg.down)
    return y
