"""INT2 g64 MoE decode (1-16 tokens): fused w1+w3 -> SwiGLU -> w2, summed over the routed experts.

Math (v4_arch.md section 2.7, docs/CONTRACTS.md "Experts"), per (token t, slot j) with expert e = idx[t, j]:
``g = W1_e x_t``, ``u = W3_e x_t``, ``h = silu(min(g, limit)) * clamp(u, -limit, limit) * weight[t, j]``
(routing weight applied BEFORE w2), ``y_t += W2_e h`` -- fp32 accumulation, fp32 output ``[T, D]``.

Weight layout: the INT2 g64 contract (see ``int2_dequant.py``); W1/W3 ``[E, I, D]``, W2 ``[E, D, I]``.

Two launches per call (plus a transpose of x and the zeroed output):

1. ``_gate_up_kernel``, grid ``(T*k pair slots, cdiv(I, BLOCK_N))``: rows of W1 and W3 are read in
   the same loop, dequantised in registers, and the SwiGLU epilogue writes ``h`` (fp32).
2. ``_down_kernel``, grid ``(T*k, cdiv(D, BLOCK_N), SPLIT_K)``: split-K over I so that one token's
   six experts still give >= 132 programs; partial sums go to ``y`` by fp32 atomic add.

Expert de-duplication happens inside the kernels, with no host sync and no sort: the program of
pair slot s looks at all ``T*k`` routed experts, and only the first ``BLOCK_P``-th occurrence of
its expert runs; it then serves every pair routed to that expert (up to BLOCK_P of them), so each
packed weight byte is read once per step even when tokens share experts.

Two inner loops (constexpr ``USE_DOT``):

* ``USE_DOT=False`` (one pair per program, the T=1 path): CUDA-core GEMV with a bit trick that
  keeps the per-weight cost at one LOP3 + one FADD + one FFMA. A code at bits [2j, 2j+2) of a
  word is masked in place (no shift) and OR-ed into the mantissa of 2^23, so the float reads
  ``2^23 + q * 4^j``; subtracting 2^23 is exact and the 4^-j is folded into the activation.
  Scale and zero are applied once per 16 codes: ``s * (sum_j x_j q_j - z * sum_j x_j)``.
  Activations are pre-transposed to ``xt [T, 16, K/16]`` so each ``x_j`` slice is contiguous.
* ``USE_DOT=True`` (BLOCK_P = 16 pairs per program): dequantised fp16 tiles into ``tl.dot``.
  fp16 operands (the CPU interpreter's bf16 dot is broken); activations must stay below 65504
  in magnitude, which the clamps guarantee for h and RMS-normed inputs do for x.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .int2_dequant import _int2_tile, as_int32, check_int2, dequantize_int2_reference, fit_w


@dataclass(frozen=True)
class StageConfig:
    """Tile of one decode launch: output rows per program, packed words per K chunk, warps, split-K."""
    block_n: int
    w: int
    warps: int = 4
    split: int = 1
    stages: int = 2


@dataclass(frozen=True)
class DecodeConfig:
    gate_up: StageConfig
    down: StageConfig


def decode_configs(use_dot: bool) -> list[DecodeConfig]:
    """Candidate configurations swept by bench/bench_kernels.py; the first is the default."""
    if use_dot:
        gu = [StageConfig(32, 8), StageConfig(16, 16), StageConfig(64, 8), StageConfig(32, 16, 8)]
        dn = [StageConfig(32, 16, split=2), StageConfig(64, 16, split=2), StageConfig(32, 16, split=4),
              StageConfig(16, 32, split=2)]
    else:
        gu = [StageConfig(16, 32), StageConfig(16, 64), StageConfig(32, 32), StageConfig(16, 16),
              StageConfig(16, 32, 2), StageConfig(32, 64, 8)]
        dn = [StageConfig(32, 32, split=2), StageConfig(64, 32, split=2), StageConfig(32, 64, split=1),
              StageConfig(16, 32, 2, split=4), StageConfig(32, 32, split=4), StageConfig(64, 64, 8, split=2)]
    out = [DecodeConfig(gu[0], dn[0])]
    out += [DecodeConfig(g, dn[0]) for g in gu[1:]] + [DecodeConfig(gu[0], d) for d in dn[1:]]
    return out





_MAGIC = 0x4B000000  # float bits of 2^23


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
def _ew_chunk(acc, w_ptr, s_ptr, z_ptr, x_ptr, xs_ptr, rows, row_mask, kw0, KW, magic, W: tl.constexpr):
    """One K chunk (16*W channels) of the CUDA-core GEMV: acc [BN, W] += s * (x.q - z * sum x).

    x_ptr points at the pre-scaled transposed activation ``x[16*kw + j] * 4^-(j%8)`` laid out
    [16, KW]; xs_ptr at the per-word sums ``sum_j x[16*kw + j]`` [KW].
    """
    kw = kw0 + tl.arange(0, W)                                           # [W] (W divides KW)
    m2 = row_mask[:, None] & (kw >= 0)[None, :]
    words = tl.load(w_ptr + rows[:, None] * KW + kw[None, :], mask=m2, other=0)   # [BN, W]
    hi = words >> 16
    part = tl.zeros(acc.shape, tl.float32)                               # [BN, W]
    for j in tl.static_range(16):
        xj = tl.load(x_ptr + j * KW + kw)                                # [W]
        if j < 8:
            src = words
        else:
            src = hi
        mbits = 3 << (2 * (j % 8))
        f = ((src & mbits) | magic).to(tl.float32, bitcast=True) - 8388608.0   # q * 4^(j%8), exact
        part += f * xj[None, :]
    xs = tl.load(xs_ptr + kw)                                            # [W]
    g = kw // 4
    sc = tl.load(s_ptr + rows[:, None] * (KW // 4) + g[None, :], mask=m2, other=0.0).to(tl.float32)
    zb = tl.load(z_ptr + rows[:, None] * (KW // 8) + (g // 2)[None, :], mask=m2, other=0)
    z = ((zb.to(tl.int32) & 0xFF) >> ((g % 2) * 4)[None, :]) & 0xF
    return acc + sc * (part - z.to(tl.float32) * xs[None, :])


@triton.jit
def _prep_x_kernel(
    # x [T, D] (any float dtype) -> xt [T, 16, D/16] fp32 scaled by 4^-(j%8), xs [T, D/16] fp32
    x_ptr, xt_ptr, xs_ptr,
    # words per row
    KW,
    BLOCK_W: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    kw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    j = tl.arange(0, 16)
    m = kw < KW
    x = tl.load(x_ptr + t * KW * 16 + kw[:, None] * 16 + j[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    tl.store(xs_ptr + t * KW + kw, tl.sum(x, axis=1), mask=m)
    sc = tl.exp2(-2.0 * (j % 8).to(tl.float32))                          # 4^-(j%8), exact
    tl.store(xt_ptr + t * KW * 16 + j[None, :] * KW + kw[:, None], x * sc[None, :], mask=m[:, None])


@triton.jit
def _gate_up_kernel(
    # activations: xt [T, 16, D/16] + xs [T, D/16] fp32 from _prep_x_kernel (USE_DOT=False) or x [T, D]
    x_ptr, xs_ptr,
    # routing: idx [T*k] int32/int64 expert ids, rw [T*k] fp32 weights, S = T*k, TOPK = k
    idx_ptr, rw_ptr, S, TOPK,
    # gate / up INT2 weights: packed [E, I, D/16] int32, scale [E, I, D/64] fp16, zero [E, I, D/128] int8
    w1_ptr, s1_ptr, z1_ptr, w3_ptr, s3_ptr, z3_ptr,
    # output h [S, I] fp32 (USE_DOT=True), or (USE_DOT=False) h [S, 16, I/16] transposed and scaled
    # like xt, plus hs [S, I/16] its per-word sums
    h_ptr, hs_ptr,
    # sizes (KW = D/16 packed words per row), the SwiGLU clamp, MAGIC = 0x4B000000 (a runtime
    # value so that ptxas fuses the mask and the OR into one LOP3 instead of two immediates)
    I, D, KW, limit, MAGIC,
    # tiles
    BLOCK_N: tl.constexpr, W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    s = tl.program_id(0)
    e, pair, valid, active = _expert_pairs(idx_ptr, s, S, BLOCK_S, BLOCK_P)
    if not active:
        return
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < I
    w1_ptr += e * I * KW
    w3_ptr += e * I * KW
    s1_ptr += e * I * (KW // 4)
    s3_ptr += e * I * (KW // 4)
    z1_ptr += e * I * (KW // 8)
    z3_ptr += e * I * (KW // 8)
    tok = pair // TOPK                                                   # [BLOCK_P]
    rw = tl.load(rw_ptr + pair, mask=valid, other=0.0)                   # [BLOCK_P]
    if USE_DOT:
        acc1 = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
        kk = tl.arange(0, 16 * W)
        for kw0 in range(0, KW, W):
            k = kw0 * 16 + kk
            xa = tl.load(x_ptr + tok[None, :] * D + k[:, None], mask=valid[None, :],
                         other=0.0).to(tl.float16)                       # [16W, BLOCK_P]
            w1 = _int2_tile(w1_ptr, s1_ptr, z1_ptr, rows, rmask, kw0, KW, W).to(tl.float16)
            w3 = _int2_tile(w3_ptr, s3_ptr, z3_ptr, rows, rmask, kw0, KW, W).to(tl.float16)
            acc1 = tl.dot(w1, xa, acc1)                                  # [BN, BLOCK_P]
            acc3 = tl.dot(w3, xa, acc3)
        g = tl.minimum(acc1, limit)
        u = tl.minimum(tl.maximum(acc3, -limit), limit)
        h = g * tl.sigmoid(g) * u * rw[None, :]
        tl.store(h_ptr + pair[None, :] * I + rows[:, None], h, mask=rmask[:, None] & valid[None, :])
    else:
        t0 = tl.sum(tok, axis=0)
        p0 = tl.sum(pair, axis=0)
        r0 = tl.sum(rw, axis=0)
        x_ptr += t0.to(tl.int64) * D
        xs_ptr += t0.to(tl.int64) * KW
        acc1 = tl.zeros([BLOCK_N, W], tl.float32)
        acc3 = tl.zeros([BLOCK_N, W], tl.float32)
        for kw0 in range(0, KW, W):
            acc1 = _ew_chunk(acc1, w1_ptr, s1_ptr, z1_ptr, x_ptr, xs_ptr, rows, rmask, kw0, KW, MAGIC, W)
            acc3 = _ew_chunk(acc3, w3_ptr, s3_ptr, z3_ptr, x_ptr, xs_ptr, rows, rmask, kw0, KW, MAGIC, W)
        g = tl.minimum(tl.sum(acc1, axis=1), limit)                      # [BN]
        u = tl.minimum(tl.maximum(tl.sum(acc3, axis=1), -limit), limit)
        h = g * tl.sigmoid(g) * u * r0
        IW = I // 16
        hsc = tl.exp2(-2.0 * ((rows % 16) % 8).to(tl.float32))
        tl.store(h_ptr + p0.to(tl.int64) * I + (rows % 16) * IW + rows // 16, h * hsc, mask=rmask)
        wrd = tl.program_id(1) * (BLOCK_N // 16) + tl.arange(0, BLOCK_N // 16)
        hs = tl.sum(tl.reshape(tl.where(rmask, h, 0.0), (BLOCK_N // 16, 16)), axis=1)
        tl.store(hs_ptr + p0.to(tl.int64) * IW + wrd, hs, mask=wrd < IW)


@triton.jit
def _down_kernel(
    # h (and hs) from _gate_up_kernel (layout per USE_DOT, see there)
    h_ptr, hs_ptr,
    # routing (as in _gate_up_kernel)
    idx_ptr, S, TOPK,
    # down INT2 weight: packed [E, D, I/16] int32, scale [E, D, I/64] fp16, zero [E, D, I/128] int8
    w2_ptr, s2_ptr, z2_ptr,
    # output y [T, D] fp32, zero-initialised; receives atomic adds
    y_ptr,
    # sizes (KW = I/16 packed words per row), MAGIC as in _gate_up_kernel
    I, D, KW, MAGIC,
    # tiles; SPLIT_K programs share the I axis of one output tile
    BLOCK_N: tl.constexpr, W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
):
    s = tl.program_id(0)
    e, pair, valid, active = _expert_pairs(idx_ptr, s, S, BLOCK_S, BLOCK_P)
    if not active:
        return
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < D
    w2_ptr += e * D * KW
    s2_ptr += e * D * (KW // 4)
    z2_ptr += e * D * (KW // 8)
    per_split = tl.cdiv(tl.cdiv(KW, SPLIT_K), W) * W
    k_lo = tl.program_id(2) * per_split
    k_hi = tl.minimum(k_lo + per_split, KW)
    tok = pair // TOPK
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
        kk = tl.arange(0, 16 * W)
        for kw0 in range(k_lo, k_hi, W):
            k = kw0 * 16 + kk
            ha = tl.load(h_ptr + pair[None, :] * I + k[:, None], mask=valid[None, :],
                         other=0.0).to(tl.float16)                       # [16W, BLOCK_P]
            w2 = _int2_tile(w2_ptr, s2_ptr, z2_ptr, rows, rmask, kw0, KW, W).to(tl.float16)
            acc = tl.dot(w2, ha, acc)
        tl.atomic_add(y_ptr + tok[None, :] * D + rows[:, None], acc, mask=rmask[:, None] & valid[None, :])
    else:
        t0 = tl.sum(tok, axis=0)
        p0 = tl.sum(pair, axis=0)
        h_ptr += p0.to(tl.int64) * I
        hs_ptr += p0.to(tl.int64) * KW
        acc = tl.zeros([BLOCK_N, W], tl.float32)
        for kw0 in range(k_lo, k_hi, W):
            acc = _ew_chunk(acc, w2_ptr, s2_ptr, z2_ptr, h_ptr, hs_ptr, rows, rmask, kw0, KW, MAGIC, W)
        tl.atomic_add(y_ptr + t0.to(tl.int64) * D + rows, tl.sum(acc, axis=1), mask=rmask)


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


def int2_moe_decode(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                    w1_packed: torch.Tensor, w1_scale: torch.Tensor, w1_zero_packed: torch.Tensor,
                    w3_packed: torch.Tensor, w3_scale: torch.Tensor, w3_zero_packed: torch.Tensor,
                    w2_packed: torch.Tensor, w2_scale: torch.Tensor, w2_zero_packed: torch.Tensor,
                    limit: float, *, config: DecodeConfig | None = None,
                    use_dot: bool | None = None) -> torch.Tensor:
    """Routed-expert MoE for a few tokens -> fp32 ``[T, D]`` (see module docstring).

    ``use_dot`` defaults to False: the CUDA-core path (one pair per program) measured faster on the
    H200 for T=3 (161 vs 484 us/layer) and, by its per-pair cost, for T=16 with independent routing;
    the dot path wins only when many tokens share experts (T=16 sharing 6: 388 vs 722 us).
    See kernels/BENCHMARKS.md.
    """
    T, k = _check_routing(x, idx, weight)
    w1 = (w1_packed, w1_scale, w1_zero_packed)
    w3 = (w3_packed, w3_scale, w3_zero_packed)
    w2 = (w2_packed, w2_scale, w2_zero_packed)
    E, D, I = check_moe_weights(x, w1, w3, w2)
    S = T * k
    if S > 4096:
        raise ValueError(f"kernels.int2_moe_decode: T*k={S} too large for the decode kernel; use prefill")
    if use_dot is None:
        use_dot = False
    cfg = config or decode_configs(use_dot)[0]
    gu, dn = cfg.gate_up, cfg.down
    gu_w, dn_w = fit_w(gu.w, D // 16), fit_w(dn.w, I // 16)
    if use_dot and min(gu.block_n, dn.block_n) < 16:
        raise ValueError("kernels.int2_moe_decode: the dot path needs block_n >= 16")
    block_p = 16 if use_dot else 1
    block_s = max(16, triton.next_power_of_2(S))
    idx_f = idx.reshape(-1).contiguous()
    rw = weight.reshape(-1).to(torch.float32).contiguous()
    h = torch.empty((S, I), dtype=torch.float32, device=x.device)
    if use_dot:
        xin, xs, hs = x.contiguous(), h, h
    else:
        if gu.block_n % 16:
            raise ValueError("kernels.int2_moe_decode: gate_up block_n must be a multiple of 16")
        xin = torch.empty((T, 16, D // 16), dtype=torch.float32, device=x.device)
        xs = torch.empty((T, D // 16), dtype=torch.float32, device=x.device)
        hs = torch.empty((S, I // 16), dtype=torch.float32, device=x.device)
        _prep_x_kernel[(T, triton.cdiv(D // 16, 64))](x.contiguous(), xin, xs, D // 16, BLOCK_W=64)
    y = torch.zeros((T, D), dtype=torch.float32, device=x.device)
    _gate_up_kernel[(S, triton.cdiv(I, gu.block_n))](
        xin, xs, idx_f, rw, S, k,
        as_int32(w1_packed), w1_scale, w1_zero_packed, as_int32(w3_packed), w3_scale, w3_zero_packed,
        h, hs, I, D, D // 16, float(limit), _MAGIC,
        BLOCK_N=gu.block_n, W=gu_w, BLOCK_P=block_p, BLOCK_S=block_s, USE_DOT=use_dot,
        num_warps=gu.warps, num_stages=gu.stages)
    _down_kernel[(S, triton.cdiv(D, dn.block_n), dn.split)](
        h, hs, idx_f, S, k, as_int32(w2_packed), w2_scale, w2_zero_packed, y, I, D, I // 16, _MAGIC,
        BLOCK_N=dn.block_n, W=dn_w, BLOCK_P=block_p, BLOCK_S=block_s, SPLIT_K=dn.split,
        USE_DOT=use_dot, num_warps=dn.warps, num_stages=dn.stages)
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
