"""INT2 g64 MoE decode on integer dot products (1-16 tokens): the codes never become floats.

Same contract as ``int2_moe_decode`` (fused w1+w3 -> SwiGLU with the V4 clamp and the routing weight ->
w2, summed over the routed experts, fp32 ``[T, D]`` out), different arithmetic:

* The activations are quantised per 64-channel group (the weights' group) to signed integers,
  ``q = floor(x * QMAX / amax + 0.5)`` with ``QMAX = 2^(ABITS-1) - 1`` and the group's dequant scale
  ``amax / QMAX`` -- by the prep launch for x, by the gate/up epilogue for h (its tile owns whole
  groups). ``ABITS = 16`` keeps the fp16 path's accuracy (a 2^-16 relative step); 8 is llama.cpp's
  "Q8 activations" trade.
* A packed word holds the 16 codes of 16 channels, code i in bits ``[2i, 2i+2)``; byte b holds codes
  4b..4b+3. ``word & (0x03030303 << 2k)`` (one LOP3) leaves code ``4b+k`` in byte b, times ``4^k``.
  One ``dp4a`` (ABITS 8) or two ``dp2a`` (16) multiply those four bytes with the four matching
  activations, which the prep/epilogue stored pre-permuted ("planes": plane k of word w packs
  channels ``16w + 4b + k``; for 16 bits plane 2k+h packs bytes 2h, 2h+1). Four plane chains per
  group, each exact in int32 and divisible by ``4^k``: ``G = sum_k acc_k >> 2k = sum_c code_c q_c``.
* Per group: ``s_w * s_x * (G - z * sum q)`` in fp32 (the integer part exact).

Per 16 weights: 4 LOP3 + 4 DP4A (or 8 DP2A), against ~2.3 instructions per weight for the fp16 loop of
``int2_moe_decode`` (kernels/BENCHMARKS.md). Three launches (prep: quantise x and zero the workspace;
gate/up; down), no host sync, CUDA-graph capturable, PDL-aware. One program per (token, slot) pair and
tile, like the CUDA-core path of ``int2_moe_decode``. Sizes: ``I % BLOCK_N == 0`` for the gate/up tile
(a multiple of 64: the h groups), ``D % block_n == 0`` for the down tile. H200, 43 distinct layers:
T=1 23.6 us/layer (fp16 loop 30.2), T=8 100 (180); a one-launch variant measured slower (BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .int2_dequant import as_int32, fit_split
from .int2_moe_decode import _check_routing, check_moe_weights
from .pdl import launch_args, pdl_wait
from .ptx import dp2a_us, dp4a_us


@dataclass(frozen=True)
class IdpStage:
    """One launch's tile: output rows per program, packed words per K step, warps, K splits, and
    whether the next step's weights are loaded before the current step is computed."""
    block_n: int
    w: int
    warps: int = 4
    split: int = 1
    prefetch: bool = True


@dataclass(frozen=True)
class IdpConfig:
    gate_up: IdpStage
    down: IdpStage


def idp_configs() -> list[IdpConfig]:
    """Candidates for the benchmark sweep; the first is the default (V4-Flash: gate/up K = 4096 = 256
    words, I = 2048 rows; down K = 2048 = 128 words, D = 4096 rows)."""
    pairs = [(IdpStage(64, 32, 4, 2), IdpStage(32, 32, 4, 1)),
             (IdpStage(64, 32, 4, 1), IdpStage(32, 32, 4, 1)),
             (IdpStage(64, 16, 4, 4), IdpStage(32, 32, 4, 2)),
             (IdpStage(64, 32, 4, 4), IdpStage(64, 32, 4, 1)),
             (IdpStage(64, 64, 4, 2), IdpStage(32, 64, 4, 1)),
             (IdpStage(64, 32, 8, 2), IdpStage(64, 32, 8, 2)),
             (IdpStage(64, 32, 4, 2, False), IdpStage(32, 32, 4, 1, False)),
             (IdpStage(128, 32, 8, 2), IdpStage(32, 16, 2, 1))]
    return [IdpConfig(g, d) for g, d in pairs]


def idp_configs_many() -> list[IdpConfig]:
    """Extra candidates for several tokens (more programs per call: no split, smaller down tiles)."""
    pairs = [(IdpStage(64, 32, 4, 1), IdpStage(64, 32, 4, 1)),
             (IdpStage(64, 16, 4, 1), IdpStage(32, 16, 2, 1)),
             (IdpStage(64, 32, 4, 1), IdpStage(16, 32, 2, 1)),
             (IdpStage(128, 32, 8, 1), IdpStage(64, 32, 4, 1)),
             (IdpStage(64, 64, 8, 1), IdpStage(32, 64, 4, 1)),
             (IdpStage(64, 32, 2, 1), IdpStage(32, 32, 2, 1))]
    return [IdpConfig(g, d) for g, d in pairs]


ABITS_DEFAULT = 16

EARLY_LOAD = True
"""Launches with ``prefetch`` read the expert index and their first K step's weights before the PDL wait: the
index comes from the router, at least two launches back (prep, or gate/up, runs in between and waited for it
before releasing this launch), the weights from no launch at all. H200, session 11 (the bench's ``early_int2``
variant, same run): b1 4.74 -> 4.69 ms, b8 10.37 -> 10.17 (b8's run-to-run noise is ~0.1 ms)."""


def pick_idp_config(T: int) -> IdpConfig:
    """Default tile per token count (H200 sweeps, kernels/BENCHMARKS.md): T <= 3 the split-K gate/up of
    ``idp_configs()[0]`` (23.6 us/layer at T=1); more tokens give enough programs without a split,
    ``idp_configs_many()[0]`` (100.1 vs 113.9 us/layer at T=8)."""
    return idp_configs()[0] if T <= 3 else idp_configs_many()[0]


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _quad(t, BN: tl.constexpr, NG: tl.constexpr):
    """[BN, 4*NG] -> the four words of each group as four [BN, NG] tensors (in-thread split)."""
    t4 = tl.reshape(t, (BN, NG, 2, 2))
    a, b = tl.split(t4)
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, a1, b0, b1


@triton.jit
def _load_rows(w_ptr, s_ptr, z_ptr, rows, kw0, KW, W: tl.constexpr):
    """One K step of one matrix: words [BN, W] int32, scales [BN, W/4] fp32, zeros [BN, W/4] int32."""
    kw = kw0 + tl.arange(0, W)
    words = tl.load(w_ptr + rows[:, None] * KW + kw[None, :])
    g = kw0 // 4 + tl.arange(0, W // 4)
    sc = tl.load(s_ptr + rows[:, None] * (KW // 4) + g[None, :]).to(tl.float32)
    zb = tl.load(z_ptr + rows[:, None] * (KW // 8) + (g // 2)[None, :])
    z = ((zb.to(tl.int32) & 0xFF) >> ((g % 2) * 4)[None, :]) & 0xF
    return words, sc, z


@triton.jit
def _planes(xa_ptr, zrow, kw0, KW, p: tl.constexpr, BN: tl.constexpr, W: tl.constexpr):
    """Activation plane p for this step's words, in the weights' [BN, W] layout, as four [BN, W/4]."""
    kw = kw0 + tl.arange(0, W)
    xv = tl.load(xa_ptr + p * KW + kw[None, :] + zrow)
    return _quad(xv, BN, W // 4)


@triton.jit
def _group_dot(w0, w1, w2, w3, x_ptr, zrow, kw0, KW, BN: tl.constexpr, W: tl.constexpr, A16: tl.constexpr):
    """G [BN, W/4] int32 = sum over each group's 64 channels of code * q (see the module docstring)."""
    acc = tl.zeros([BN, W // 4], tl.int32)
    for k in tl.static_range(4):
        mk = tl.full((1, 1), 0x03030303, tl.int32) << (2 * k)             # int32: k = 3 wraps to 0xC0C0C0C0
        if A16:
            l0, l1, l2, l3 = _planes(x_ptr, zrow, kw0, KW, 2 * k, BN, W)
            h0, h1, h2, h3 = _planes(x_ptr, zrow, kw0, KW, 2 * k + 1, BN, W)
            a = dp2a_us(l0, w0 & mk, tl.zeros([BN, W // 4], tl.int32), False)
            a = dp2a_us(h0, w0 & mk, a, True)
            a = dp2a_us(l1, w1 & mk, a, False)
            a = dp2a_us(h1, w1 & mk, a, True)
            a = dp2a_us(l2, w2 & mk, a, False)
            a = dp2a_us(h2, w2 & mk, a, True)
            a = dp2a_us(l3, w3 & mk, a, False)
            a = dp2a_us(h3, w3 & mk, a, True)
        else:
            x0, x1, x2, x3 = _planes(x_ptr, zrow, kw0, KW, k, BN, W)
            a = dp4a_us(w0 & mk, x0, tl.zeros([BN, W // 4], tl.int32))
            a = dp4a_us(w1 & mk, x1, a)
            a = dp4a_us(w2 & mk, x2, a)
            a = dp4a_us(w3 & mk, x3, a)
        acc += a >> (2 * k)
    return acc


@triton.jit
def _apply_group(acc, G, sc, z, qs_ptr, sx_ptr, zrow, kw0, W: tl.constexpr):
    """acc [BN, W/4] fp32 += s_w * s_x * (G - z * sum q)."""
    g = kw0 // 4 + tl.arange(0, W // 4)
    qs = tl.load(qs_ptr + g[None, :] + zrow)
    sx = tl.load(sx_ptr + g[None, :] + zrow)
    return acc + (G - z * qs).to(tl.float32) * (sc * sx)


@triton.jit
def _quantize_store(v, QMAX: tl.constexpr, xa_ptr, sx_ptr, qs_ptr, NA: tl.constexpr, KW, word0, grp0,
                    NWORD: tl.constexpr, A16: tl.constexpr):
    """Quantise NWORD*16 fp32 values (whole 64-groups, natural channel order) and store them as planes
    (``xa_ptr`` [NA, KW] int32 of this row), with the group scales and sums."""
    NGRP: tl.constexpr = NWORD // 4
    v2 = tl.reshape(v, (NGRP, 64))
    amax = tl.max(tl.abs(v2), axis=1)
    inv = tl.where(amax > 0, QMAX / amax, 0.0)
    q = tl.floor(v2 * inv[:, None] + 0.5)
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX).to(tl.int32)                        # [NGRP, 64]
    gi = grp0 + tl.arange(0, NGRP)
    tl.store(sx_ptr + gi, amax / QMAX)
    tl.store(qs_ptr + gi, tl.sum(q, axis=1))
    wi = word0 + tl.arange(0, NWORD)
    kk = tl.arange(0, 4)
    if A16:
        q4 = tl.reshape(q, (NWORD, 2, 2, 4))                                       # [word, h, b, k]
        bp = tl.arange(0, 2)
        packed = tl.sum((q4 & 0xFFFF) << (16 * bp)[None, None, :, None], axis=2)   # [word, h, k]
        hh = tl.arange(0, 2)
        tl.store(xa_ptr + (2 * kk[None, None, :] + hh[None, :, None]) * KW + wi[:, None, None], packed)
    else:
        q3 = tl.reshape(q, (NWORD, 4, 4))                                          # [word, b, k]
        b = tl.arange(0, 4)
        packed = tl.sum((q3 & 0xFF) << (8 * b)[None, :, None], axis=1)             # [word, k]
        tl.store(xa_ptr + kk[None, :] * KW + wi[:, None], packed)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _prep_kernel(x_ptr, xa_ptr, sx_ptr, qs_ptr, ws_ptr, NZ, KW, NX,
                 GW: tl.constexpr, BLOCK_Z: tl.constexpr, QMAX: tl.constexpr, NA: tl.constexpr,
                 A16: tl.constexpr, PDL: tl.constexpr):
    """Programs [0, NX): quantise GW words (16*GW channels) of one token's x; all: zero BLOCK_Z of ws."""
    pdl_wait(PDL)
    pid = tl.program_id(0)
    zo = pid * BLOCK_Z + tl.arange(0, BLOCK_Z)
    tl.store(ws_ptr + zo, tl.zeros([BLOCK_Z], tl.float32), mask=zo < NZ)
    if pid < NX:
        nb = KW // GW
        t = (pid // nb).to(tl.int64)
        w0 = (pid % nb) * GW
        v = tl.load(x_ptr + t * KW * 16 + w0 * 16 + tl.arange(0, GW * 16)).to(tl.float32)
        _quantize_store(v, QMAX, xa_ptr + t * NA * KW, sx_ptr + t * (KW // 4), qs_ptr + t * (KW // 4),
                        NA, KW, w0, w0 // 4, GW, A16)


@triton.jit
def _gemv_pipelined(acc1, acc3, wa, sa, za, wb, sb, zb, w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr,
                    xa_ptr, qs_ptr, sx_ptr, rows, zrow, k_lo, k_hi, KW, BN: tl.constexpr, W: tl.constexpr,
                    TWO: tl.constexpr, A16: tl.constexpr):
    """The K loop with the first step (wa.., wb..) already loaded: each step loads the next before it
    computes (the last step re-loads itself, a cache hit)."""
    for kw0 in range(k_lo, k_hi, W):
        nxt = tl.minimum(kw0 + W, k_hi - W)
        wa_n, sa_n, za_n = _load_rows(w1_ptr, s1_ptr, z1_ptr, rows, nxt, KW, W)
        if TWO:
            wb_n, sb_n, zb_n = _load_rows(w3_ptr, s3_ptr, z3_ptr, rows, nxt, KW, W)
        a0, a1, a2, a3 = _quad(wa, BN, W // 4)
        acc1 = _apply_group(acc1, _group_dot(a0, a1, a2, a3, xa_ptr, zrow, kw0, KW, BN, W, A16),
                            sa, za, qs_ptr, sx_ptr, zrow, kw0, W)
        if TWO:
            b0, b1, b2, b3 = _quad(wb, BN, W // 4)
            acc3 = _apply_group(acc3, _group_dot(b0, b1, b2, b3, xa_ptr, zrow, kw0, KW, BN, W, A16),
                                sb, zb, qs_ptr, sx_ptr, zrow, kw0, W)
            wb, sb, zb = wb_n, sb_n, zb_n
        wa, sa, za = wa_n, sa_n, za_n
    return acc1, acc3


@triton.jit
def _gemv_steps(acc1, acc3, w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr, xa_ptr, qs_ptr, sx_ptr,
                rows, zrow, k_lo, k_hi, KW, BN: tl.constexpr, W: tl.constexpr, TWO: tl.constexpr,
                A16: tl.constexpr, PREFETCH: tl.constexpr, EARLY: tl.constexpr = False, PDL: tl.constexpr = False):
    """acc [BN, W/4] += the groups of words [k_lo, k_hi) of one (TWO: two) matrices against the planes.
    EARLY (with PREFETCH; the caller has not waited yet): the PDL wait comes after the first step's loads."""
    if PREFETCH:
        wa, sa, za = _load_rows(w1_ptr, s1_ptr, z1_ptr, rows, k_lo, KW, W)
        wb, sb, zb = wa, sa, za
        if TWO:
            wb, sb, zb = _load_rows(w3_ptr, s3_ptr, z3_ptr, rows, k_lo, KW, W)
        if EARLY:
            pdl_wait(PDL)
        acc1, acc3 = _gemv_pipelined(acc1, acc3, wa, sa, za, wb, sb, zb, w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr,
                                     z3_ptr, xa_ptr, qs_ptr, sx_ptr, rows, zrow, k_lo, k_hi, KW, BN, W, TWO, A16)
    else:
        for kw0 in range(k_lo, k_hi, W):
            wa, sa, za = _load_rows(w1_ptr, s1_ptr, z1_ptr, rows, kw0, KW, W)
            a0, a1, a2, a3 = _quad(wa, BN, W // 4)
            acc1 = _apply_group(acc1, _group_dot(a0, a1, a2, a3, xa_ptr, zrow, kw0, KW, BN, W, A16),
                                sa, za, qs_ptr, sx_ptr, zrow, kw0, W)
            if TWO:
                wb, sb, zb = _load_rows(w3_ptr, s3_ptr, z3_ptr, rows, kw0, KW, W)
                b0, b1, b2, b3 = _quad(wb, BN, W // 4)
                acc3 = _apply_group(acc3, _group_dot(b0, b1, b2, b3, xa_ptr, zrow, kw0, KW, BN, W, A16),
                                    sb, zb, qs_ptr, sx_ptr, zrow, kw0, W)
    return acc1, acc3


@triton.jit
def _swiglu_quant(g, u, rw, limit, QMAX: tl.constexpr, ha_ptr, hsx_ptr, hqs_ptr, NA: tl.constexpr,
                  KWD, pid_n, BN: tl.constexpr, A16: tl.constexpr):
    gc = tl.minimum(g, limit)
    h = gc / (1.0 + tl.exp(-gc)) * tl.minimum(tl.maximum(u, -limit), limit) * rw
    _quantize_store(h, QMAX, ha_ptr, hsx_ptr, hqs_ptr, NA, KWD, pid_n * (BN // 16), pid_n * (BN // 64),
                    BN // 16, A16)


@triton.jit
def _gate_up_kernel(xa_ptr, sx_ptr, qs_ptr, idx_ptr, rw_ptr, TOPK,
                    w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr,
                    gu_ptr, cnt_ptr, ha_ptr, hsx_ptr, hqs_ptr, I, KW, limit,
                    BLOCK_N: tl.constexpr, W: tl.constexpr, SPLIT_K: tl.constexpr, QMAX: tl.constexpr,
                    NA: tl.constexpr, A16: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
                    EARLY: tl.constexpr = False):
    """Grid (pairs, I / BLOCK_N, SPLIT_K): rows of W1 and W3 of the pair's expert against the token's
    planes; the tile's (last-arriving, with SPLIT_K > 1) program applies SwiGLU and the routing weight
    and stores h quantised as the down launch's planes. EARLY (with PREFETCH): the expert index and the
    first K step's weights load before the PDL wait (see ``EARLY_LOAD``)."""
    if not EARLY:
        pdl_wait(PDL)
    s = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(idx_ptr + s, cache_modifier=".cg").to(tl.int64)
    t = (s // TOPK).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    zrow = tl.zeros([BLOCK_N, 1], tl.int32)
    w1_ptr += e * I * KW
    w3_ptr += e * I * KW
    s1_ptr += e * I * (KW // 4)
    s3_ptr += e * I * (KW // 4)
    z1_ptr += e * I * (KW // 8)
    z3_ptr += e * I * (KW // 8)
    per = KW // SPLIT_K
    k_lo = tl.program_id(2) * per
    acc1 = tl.zeros([BLOCK_N, W // 4], tl.float32)
    acc3 = tl.zeros([BLOCK_N, W // 4], tl.float32)
    acc1, acc3 = _gemv_steps(acc1, acc3, w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr,
                             xa_ptr + t * NA * KW, qs_ptr + t * (KW // 4), sx_ptr + t * (KW // 4),
                             rows, zrow, k_lo, k_lo + per, KW, BLOCK_N, W, True, A16, PREFETCH, EARLY, PDL)
    g = tl.sum(acc1, axis=1)
    u = tl.sum(acc3, axis=1)
    rw = tl.load(rw_ptr + s)
    KWD = I // 16
    s64 = s.to(tl.int64)
    hout = ha_ptr + s64 * NA * KWD
    if SPLIT_K == 1:
        _swiglu_quant(g, u, rw, limit, QMAX, hout, hsx_ptr + s64 * (I // 64), hqs_ptr + s64 * (I // 64),
                      NA, KWD, pid_n, BLOCK_N, A16)
    else:
        gofs = s64 * (2 * I) + rows
        tl.atomic_add(gu_ptr + gofs, g, sem="relaxed")
        tl.atomic_add(gu_ptr + gofs + I, u, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + s * tl.num_programs(1) + pid_n, 1.0, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            gs = tl.load(gu_ptr + gofs, cache_modifier=".cg")
            us = tl.load(gu_ptr + gofs + I, cache_modifier=".cg")
            _swiglu_quant(gs, us, rw, limit, QMAX, hout, hsx_ptr + s64 * (I // 64), hqs_ptr + s64 * (I // 64),
                          NA, KWD, pid_n, BLOCK_N, A16)


@triton.jit
def _down_kernel(ha_ptr, hsx_ptr, hqs_ptr, TOPK, idx_ptr, w2_ptr, s2_ptr, z2_ptr, y_ptr, D, KW,
                 BLOCK_N: tl.constexpr, W: tl.constexpr, SPLIT_K: tl.constexpr, NA: tl.constexpr,
                 A16: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr = False):
    """Grid (pairs, D / BLOCK_N, SPLIT_K): rows of W2 of the pair's expert against the pair's h planes;
    fp32 atomics into y [T, D] (zeroed by the prep launch). EARLY: as in ``_gate_up_kernel``."""
    if not EARLY:
        pdl_wait(PDL)
    s = tl.program_id(0)
    e = tl.load(idx_ptr + s, cache_modifier=".cg").to(tl.int64)
    t = (s // TOPK).to(tl.int64)
    s64 = s.to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    zrow = tl.zeros([BLOCK_N, 1], tl.int32)
    w2_ptr += e * D * KW
    s2_ptr += e * D * (KW // 4)
    z2_ptr += e * D * (KW // 8)
    per = KW // SPLIT_K
    k_lo = tl.program_id(2) * per
    acc = tl.zeros([BLOCK_N, W // 4], tl.float32)
    acc, _ = _gemv_steps(acc, acc, w2_ptr, s2_ptr, z2_ptr, w2_ptr, s2_ptr, z2_ptr,
                         ha_ptr + s64 * NA * KW, hqs_ptr + s64 * (KW // 4), hsx_ptr + s64 * (KW // 4),
                         rows, zrow, k_lo, k_lo + per, KW, BLOCK_N, W, False, A16, PREFETCH, EARLY, PDL)
    tl.atomic_add(y_ptr + t * D + rows, tl.sum(acc, axis=1), sem="relaxed")


# ----------------------------------------------------------------------------- launcher
def _fit(stage: IdpStage, kw: int, rows: int, name: str) -> tuple[int, int]:
    """(words per step, K splits) for a row of ``kw`` words; checks the row tile."""
    if rows % stage.block_n:
        raise ValueError(f"kernels.int2_moe_idp: {name}: {rows} rows are not a multiple of block_n={stage.block_n}")
    w = min(stage.w, kw)
    while kw % w or w % 4:
        w //= 2
    if w < 4:
        raise ValueError(f"kernels.int2_moe_idp: {name}: {kw} words per row cannot be split in 4-word groups")
    return w, fit_split(kw, w, stage.split)


def int2_moe_idp(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                 w1_packed: torch.Tensor, w1_scale: torch.Tensor, w1_zero_packed: torch.Tensor,
                 w3_packed: torch.Tensor, w3_scale: torch.Tensor, w3_zero_packed: torch.Tensor,
                 w2_packed: torch.Tensor, w2_scale: torch.Tensor, w2_zero_packed: torch.Tensor,
                 limit: float, *, abits: int | None = None, config: IdpConfig | None = None) -> torch.Tensor:
    """Routed-expert MoE for a few tokens on integer dot products -> fp32 ``[T, D]`` (module docstring).

    ``abits``: 16 (default, ``ABITS_DEFAULT``) or 8 bits per activation. Reference with the same
    quantisation: ``int2_moe_idp_reference``; against the fp32 math (``int2_moe_reference``) the
    relative error is ~1e-4 at 16 bits and ~1e-2 at 8 (tests/test_kernels_int2_idp.py)."""
    T, k = _check_routing(x, idx, weight)
    w1 = (w1_packed, w1_scale, w1_zero_packed)
    w3 = (w3_packed, w3_scale, w3_zero_packed)
    w2 = (w2_packed, w2_scale, w2_zero_packed)
    E, D, I = check_moe_weights(x, w1, w3, w2)
    abits = ABITS_DEFAULT if abits is None else int(abits)
    if abits not in (8, 16):
        raise ValueError(f"kernels.int2_moe_idp: abits must be 8 or 16, got {abits}")
    cfg = config or pick_idp_config(T)
    if cfg.gate_up.block_n % 64:
        raise ValueError("kernels.int2_moe_idp: gate_up block_n must be a multiple of 64 (whole h groups)")
    gu_w, gu_split = _fit(cfg.gate_up, D // 16, I, "gate_up")
    dn_w, dn_split = _fit(cfg.down, I // 16, D, "down")
    a16 = abits == 16
    na = 8 if a16 else 4
    qmax = float(2 ** (abits - 1) - 1)
    S = T * k
    dev = x.device
    n_tiles = I // cfg.gate_up.block_n
    gw = 16 if (D // 16) % 16 == 0 else 8
    la = launch_args(dev)
    ws = torch.empty(T * D + S * 2 * I + S * n_tiles, dtype=torch.float32, device=dev)
    y = ws[:T * D].view(T, D)
    gu_buf = ws[T * D:T * D + S * 2 * I]
    cnt = ws[T * D + S * 2 * I:]
    xa = torch.empty((T, na, D // 16), dtype=torch.int32, device=dev)
    xsx = torch.empty((T, D // 64), dtype=torch.float32, device=dev)
    xqs = torch.empty((T, D // 64), dtype=torch.int32, device=dev)
    ha = torch.empty((S, na, I // 16), dtype=torch.int32, device=dev)
    hsx = torch.empty((S, I // 64), dtype=torch.float32, device=dev)
    hqs = torch.empty((S, I // 64), dtype=torch.int32, device=dev)
    idx_f = idx.reshape(-1).contiguous()
    rw = weight.reshape(-1).to(torch.float32).contiguous()
    nx = T * (D // 16 // gw)
    nz = ws.numel()
    _prep_kernel[(max(nx, triton.cdiv(nz, 1024)),)](x.contiguous(), xa, xsx, xqs, ws, nz, D // 16, nx,
                                                    GW=gw, BLOCK_Z=1024, QMAX=qmax, NA=na, A16=a16, num_warps=4, **la)
    gu = cfg.gate_up
    _gate_up_kernel[(S, n_tiles, gu_split)](
        xa, xsx, xqs, idx_f, rw, k,
        as_int32(w1_packed), w1_scale, w1_zero_packed, as_int32(w3_packed), w3_scale, w3_zero_packed,
        gu_buf, cnt, ha, hsx, hqs, I, D // 16, float(limit),
        BLOCK_N=gu.block_n, W=gu_w, SPLIT_K=gu_split, QMAX=qmax, NA=na, A16=a16, PREFETCH=gu.prefetch,
        EARLY=gu.prefetch and EARLY_LOAD, num_warps=gu.warps, **la)
    dn = cfg.down
    _down_kernel[(S, D // dn.block_n, dn_split)](
        ha, hsx, hqs, k, idx_f, as_int32(w2_packed), w2_scale, w2_zero_packed, y, D, I // 16,
        BLOCK_N=dn.block_n, W=dn_w, SPLIT_K=dn_split, NA=na, A16=a16, PREFETCH=dn.prefetch,
        EARLY=dn.prefetch and EARLY_LOAD, num_warps=dn.warps, **la)
    return y


# ----------------------------------------------------------------------------- torch references
def quantize_groups_reference(v: torch.Tensor, abits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[..., C]`` -> (int ``q`` [..., C], fp32 dequant scale [..., C/64]) with the kernels' rule."""
    qmax = float(2 ** (abits - 1) - 1)
    g = v.float().reshape(*v.shape[:-1], -1, 64)
    amax = g.abs().amax(-1)
    inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    q = torch.floor(g * inv[..., None] + 0.5).clamp(-qmax, qmax)
    return q.reshape(v.shape), amax / qmax


def int2_moe_idp_reference(x, idx, weight, w1_packed, w1_scale, w1_zero_packed,
                           w3_packed, w3_scale, w3_zero_packed, w2_packed, w2_scale, w2_zero_packed,
                           limit: float, abits: int = ABITS_DEFAULT) -> torch.Tensor:
    """The kernel's arithmetic in torch (fp64 accumulation of the exact integer group products)."""
    from .int2_dequant import unpack_codes_reference, unpack_zeros_reference
    T, k = idx.shape
    D = x.shape[1]

    def gemv(q, sq, packed, scale, zp):            # q [C] ints, sq [C/64] -> [rows] fp64
        codes = unpack_codes_reference(packed).double()                  # [rows, C]
        z = unpack_zeros_reference(zp).double()                          # [rows, C/64]
        G = (codes * q.double()).reshape(codes.shape[0], -1, 64).sum(-1)   # [rows, C/64] exact
        qs = q.double().reshape(-1, 64).sum(-1)
        return ((G - z * qs) * scale.double() * sq.double()).sum(-1)

    xq, xs = quantize_groups_reference(x.float(), abits)
    y = torch.zeros(T, D, dtype=torch.float64, device=x.device)
    for t in range(T):
        for j in range(k):
            e = int(idx[t, j])
            g = gemv(xq[t], xs[t], w1_packed[e], w1_scale[e], w1_zero_packed[e]).float()
            u = gemv(xq[t], xs[t], w3_packed[e], w3_scale[e], w3_zero_packed[e]).float()
            gc = g.clamp(max=limit)
            h = gc / (1.0 + torch.exp(-gc)) * u.clamp(-limit, limit) * weight[t, j].float()
            hq, hs = quantize_groups_reference(h, abits)
            y[t] += gemv(hq, hs, w2_packed[e], w2_scale[e], w2_zero_packed[e])
    return y.float()
