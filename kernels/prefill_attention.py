"""V4 prefill attention for one query chunk, flash-style (v4_arch.md section 2.3; the chunk loop of
``dsv4lib.model.attention.Attention.forward``).

One shared key/value head (K = V) for all H query heads. For query t at position ``p`` and head h the
logits are: window keys j (position ``wpos0 + j``, visible iff ``p - window < pos <= p``), compressed
entries e with an additive bias ``ent_bias[t, e]`` (0 / -inf: HCA's visibility threshold or CSA's indexer
selection), and the head's sink -- a logit with a zero value. ``z = (q . k) * scale (+ bias)``,
``o = softmax(z) . K``.

Rows are (query, head) pairs, head fastest; a program owns BM of them and walks the key blocks with an
online softmax that starts from the sink (``m = sink, l = 1, acc = 0``, exactly one more logit with a zero
value). Window blocks outside the program's queries' span are skipped, so a 512-query chunk reads ~W + BM/H
window keys per program instead of all ~chunk + W. Products: for 16-bit models the scores on the 16-bit q and
keys (exact products, fp32 accumulation: what the eager path's TF32 matmuls compute on bf16 values) and the
value product with p in TF32 or, ``AttnConfig.p16`` (the default tile), rounded to the keys' type; IEEE fp32
for fp32 models.

On by default (``dsv4lib.model.attention.PREFILL_ATTN_KERNEL``; H200: 2K prefill 4,311 -> 5,499 tok/s, the
full-scale bench times it toggled); per-call times and the tile sweep: ``bench/bench_prefill_attention.py``,
kernels/BENCHMARKS.md "Prefill attention kernel". 16-bit models on the GPU take the score product on the
operands as loaded and (default tile) round p to the keys' type for the value product.
Reference: ``prefill_attention_reference`` (the eager chunk math).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _online(s, k, m, l, acc, PREC: tl.constexpr, P16: tl.constexpr):
    """One key block of the online softmax: s [BM, BN] logits, k [BN, C] keys (= values) as loaded; the
    value product in TF32/fp32 (p and k in fp32) or, ``P16``, with p rounded to k's 16-bit type."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if P16:
        pv = tl.dot(p.to(k.dtype), k)
    else:
        pv = tl.dot(p, k.to(tl.float32), input_precision=PREC)
    acc = acc * alpha[:, None] + pv
    return m_new, l, acc


@triton.jit
def _scores(q, k, scale, PREC: tl.constexpr, DOT16: tl.constexpr):
    """q [BM, C] . k [BN, C]^T * scale: ``DOT16`` with the 16-bit operands as loaded (exact products, fp32
    accumulation -- the TF32 product of 16-bit values), else in fp32/TF32."""
    if DOT16:
        return tl.dot(q, tl.trans(k)) * scale
    return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PREC) * scale


@triton.jit
def _prefill_attn_kernel(q_ptr, wk_ptr, ek_ptr, eb_ptr, sink_ptr, o_ptr,
                         S, NW, NE, H, qpos0, wpos0, window, scale,
                         q_sb, q_ss, wk_sb, ek_sb, eb_sb, eb_ss, o_sb, o_ss,
                         C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                         DOT16: tl.constexpr, P16: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    r0 = tl.program_id(0) * BM
    r = r0 + tl.arange(0, BM)                                            # rows: (query, head), head fastest
    rm = r < S * H
    t = r // H
    h = r % H
    c = tl.arange(0, C)
    q = tl.load(q_ptr + b * q_sb + t[:, None].to(tl.int64) * q_ss + h[:, None] * C + c[None, :],
                mask=rm[:, None], other=0.0)                             # [BM, C] as stored
    m = tl.load(sink_ptr + h, mask=rm, other=0.0).to(tl.float32)         # the sink: m = sink, l = exp(0)
    l = tl.full([BM], 1.0, tl.float32)
    acc = tl.zeros([BM, C], tl.float32)
    p_t = qpos0 + t                                                      # [BM] query positions
    # window keys this program's queries can see: positions in (p_first - window, p_last]
    t_hi = tl.minimum(S - 1, (r0 + BM - 1) // H)
    j_lo = tl.maximum(0, qpos0 + r0 // H - window + 1 - wpos0)
    j_hi = tl.minimum(NW, qpos0 + t_hi - wpos0 + 1)
    for j0 in range((j_lo // BN) * BN, j_hi, BN):
        j = j0 + tl.arange(0, BN)
        k = tl.load(wk_ptr + b * wk_sb + j[:, None].to(tl.int64) * C + c[None, :], mask=(j < NW)[:, None],
                    other=0.0)                                           # [BN, C]
        s = _scores(q, k, scale, PREC, DOT16)
        kp = wpos0 + j
        vis = (kp[None, :] <= p_t[:, None]) & (kp[None, :] > p_t[:, None] - window) & (j < NW)[None, :]
        m, l, acc = _online(tl.where(vis, s, float("-inf")), k, m, l, acc, PREC, P16)
    for e0 in range(0, NE, BN):
        e = e0 + tl.arange(0, BN)
        em = e < NE
        k = tl.load(ek_ptr + b * ek_sb + e[:, None].to(tl.int64) * C + c[None, :], mask=em[:, None],
                    other=0.0)
        s = _scores(q, k, scale, PREC, DOT16)
        bias = tl.load(eb_ptr + b * eb_sb + t[:, None].to(tl.int64) * eb_ss + e[None, :],
                       mask=rm[:, None] & em[None, :], other=float("-inf"))
        m, l, acc = _online(s + bias, k, m, l, acc, PREC, P16)
    o = acc / l[:, None]
    tl.store(o_ptr + b * o_sb + t[:, None].to(tl.int64) * o_ss + h[:, None] * C + c[None, :],
             o.to(o_ptr.dtype.element_ty), mask=rm[:, None])


@dataclass(frozen=True)
class AttnConfig:
    """Rows (query, head pairs) and keys per block, warps, pipeline stages, and ``p16``: the value product
    with p rounded to the keys' 16-bit type (16-bit models only; default: p in TF32 as the eager path)."""
    bm: int = 32
    bn: int = 32
    warps: int = 8
    stages: int = 3
    p16: bool = False


def pick_attn_config(C: int, dtype: torch.dtype = torch.bfloat16) -> AttnConfig:
    """Per head dim and dtype. 16-bit at C >= 512: 64 rows x 64 keys with p in 16 bits (the keys stay 16-bit for
    both products, which frees the registers of their fp32 copy) -- H200, bench/bench_prefill_attention.py run 2:
    the last 512-query chunk of a 2K prefill 657 -> 250 us (CSA), 270 -> 173 us (HCA), a 32 x 192 MMLU batch
    1.86-2.09 -> 0.97-1.03 ms, against the first version (32 rows, p in TF32); 64 x 32 keys was 374 / 171 /
    996 / 1036 us. Same max error against the eager math (the output's bf16 rounding dominates). Otherwise the
    [BM, C] accumulator and q tile stay ~64 registers each."""
    if C >= 512 and dtype in (torch.bfloat16, torch.float16):
        return AttnConfig(64, 64, 8, 2, p16=True)
    if C >= 512:
        return AttnConfig(32, 32, 8)
    if C >= 128:
        return AttnConfig(32, 32, 4)
    return AttnConfig(16, 16, 4)


def prefill_attention(q: torch.Tensor, win: torch.Tensor, ent: torch.Tensor | None, ent_bias: torch.Tensor | None,
                      sink: torch.Tensor, qpos0: int, wpos0: int, window: int, scale: float,
                      out: torch.Tensor | None = None, config: AttnConfig | None = None) -> torch.Tensor:
    """q [B, s, H, C] (a chunk; any strides on B and s, heads and C contiguous), win [B, NW, C] window keys at
    positions ``wpos0 + j``, ent [B, NE, C] entries with ``ent_bias`` [B, s, NE] (0 / -inf; any batch
    stride), sink [H] -> o [B, s, H, C] in q's dtype (written into ``out`` when given: a chunk of the
    caller's output). Queries sit at positions ``qpos0 + t``."""
    B, S, H, C = q.shape
    if C & (C - 1) or q.stride(3) != 1 or q.stride(2) != C:
        raise ValueError(f"kernels.prefill_attention: q must be [B, s, H, C] with contiguous heads and a "
                         f"power-of-two C, got shape {tuple(q.shape)} strides {q.stride()}")
    if win.shape[0] != B or win.shape[2] != C or win.stride(2) != 1 or win.stride(1) != C:
        raise ValueError(f"kernels.prefill_attention: win must be [B, NW, C] row-contiguous, got {tuple(win.shape)}")
    if sink.numel() != H:
        raise ValueError(f"kernels.prefill_attention: sink has {sink.numel()} values for {H} heads")
    NE = 0 if ent is None else ent.shape[1]
    if NE:
        if ent.shape[0] != B or ent.shape[2] != C or ent.stride(2) != 1 or ent.stride(1) != C:
            raise ValueError(f"kernels.prefill_attention: ent must be [B, NE, C] row-contiguous, got {tuple(ent.shape)}")
        if ent_bias is None or tuple(ent_bias.shape) != (B, S, NE) or ent_bias.stride(2) != 1:
            raise ValueError(f"kernels.prefill_attention: ent_bias must be [B, s, NE] = {(B, S, NE)} with unit "
                             f"stride on NE, got {None if ent_bias is None else tuple(ent_bias.shape)}")
    else:
        ent, ent_bias = win, sink                                        # unused (NE = 0)
    o = out if out is not None else torch.empty_like(q, memory_format=torch.contiguous_format)
    if o.shape != q.shape or o.stride(3) != 1 or o.stride(2) != C:
        raise ValueError("kernels.prefill_attention: out must be [B, s, H, C] with contiguous heads")
    if win.dtype != q.dtype or (NE and ent.dtype != q.dtype):
        raise ValueError(f"kernels.prefill_attention: q, win and ent must share a dtype, got {q.dtype}, "
                         f"{win.dtype}, {ent.dtype if NE else None}")
    cfg = config or pick_attn_config(C, q.dtype)
    prec = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    # 16-bit operands straight into the score product (the CPU interpreter's bf16 dot is broken: fp16 only there)
    dot16 = q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and q.is_cuda)
    sinkf = sink.float().contiguous()
    _prefill_attn_kernel[(triton.cdiv(S * H, cfg.bm), B)](
        q, win, ent, ent_bias.float() if ent_bias.dtype != torch.float32 else ent_bias, sinkf, o,
        S, win.shape[1], NE, H, int(qpos0), int(wpos0), int(window), float(scale),
        q.stride(0), q.stride(1), win.stride(0), ent.stride(0), ent_bias.stride(0) if NE else 0,
        ent_bias.stride(1) if NE else 0, o.stride(0), o.stride(1),
        C=C, BM=cfg.bm, BN=cfg.bn, PREC=prec, DOT16=dot16, P16=dot16 and cfg.p16,
        num_warps=cfg.warps, num_stages=cfg.stages)
    return o


def prefill_attention_reference(q, win, ent, ent_bias, sink, qpos0: int, wpos0: int, window: int,
                                scale: float) -> torch.Tensor:
    """The eager chunk math in torch (fp32 / fp64 for fp64 inputs): all window keys with their visibility,
    the entries with ``ent_bias``, the sink as one more logit with a zero value."""
    B, S, H, C = q.shape
    hp = (lambda v: v) if q.dtype == torch.float64 else (lambda v: v.float())
    keys = win if ent is None or ent.shape[1] == 0 else torch.cat([win, ent], 1)
    pq = qpos0 + torch.arange(S, device=q.device)
    kp = wpos0 + torch.arange(win.shape[1], device=q.device)
    vis = (kp[None, :] <= pq[:, None]) & (kp[None, :] > pq[:, None] - window)
    bias = torch.zeros(S, win.shape[1], device=q.device, dtype=hp(q).dtype).masked_fill(~vis, float("-inf"))
    bias = bias.expand(B, S, -1)
    if keys.shape[1] > win.shape[1]:
        bias = torch.cat([bias, hp(ent_bias)], -1)
    z = torch.einsum("bshc,bnc->bshn", hp(q), hp(keys)) * scale + bias[:, :, None]
    z = torch.cat([z, hp(sink).view(1, 1, H, 1).expand(B, S, H, 1)], -1)
    p = z.softmax(-1)[..., :-1]
    return torch.einsum("bshn,bnc->bshc", p, hp(keys)).to(q.dtype)
