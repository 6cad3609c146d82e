"""Lightning-indexer scores of CSA layers in one launch (v4_arch.md section 2.5; the score part of
``dsv4lib.model.indexer.Indexer.forward``):

    score[b, t, e] = sum_h w[b, t, h] * relu(q[b, t, h, :] . k[b, e, :]),  -inf where e >= thr[t]

with ``thr[t] = (pos[t] + 1) // ratio`` (entries not yet complete at query t). The torch path materialises
the per-head products ``[B, S, nI, T]`` in fp32 (268 MB per CSA layer at 2K tokens: einsum, ReLU, the
weighting and the head sum each read or write it) and runs the einsum as an fp32 SIMT GEMM. Here a program
owns a ``[BT queries, BE entries]`` tile, keeps its keys in registers and walks the heads: one ``tl.dot`` per
head, ReLU and the head's weight in the accumulator. 16-bit q and keys go to the dot as loaded (exact
products, fp32 accumulation -- the fp32 einsum's products, summed in another order). fp32 keys (the model's
compressor entries are fp32) take fp32 operands (16-bit q cast up exactly) with ``fp32_precision``: "ieee"
(FMA, exact products) or "tf32x3" (three TF32 products, ~fp32 accuracy on the tensor cores; the CPU
interpreter computes fp32 either way). Tiles that lie wholly in the future of their queries store -inf
without computing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _indexer_scores_kernel(q_ptr, k_ptr, w_ptr, pos_ptr, o_ptr, S, T, NH, ratio,
                           q_sb, q_ss, k_sb, w_sb, w_ss, o_sb, o_ss,
                           CI: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, DOT16: tl.constexpr,
                           PREC: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    tm = t < S
    em = e < T
    thr = (tl.load(pos_ptr + t, mask=tm, other=0) + 1) // ratio           # [BT] entries visible to query t
    live = tl.program_id(1) * BE < tl.max(tl.where(tm, thr, 0), axis=0)  # any visible entry in the tile
    acc = tl.zeros([BT, BE], tl.float32)
    if live:
        d = tl.arange(0, CI)
        k = tl.load(k_ptr + b * k_sb + e[:, None].to(tl.int64) * CI + d[None, :], mask=em[:, None], other=0.0)
        if not DOT16:
            k = k.to(tl.float32)
        for h in range(NH):
            q = tl.load(q_ptr + b * q_sb + t[:, None].to(tl.int64) * q_ss + h * CI + d[None, :], mask=tm[:, None],
                        other=0.0)
            if DOT16:
                s = tl.dot(q, tl.trans(k))
            else:
                s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision=PREC)
            wh = tl.load(w_ptr + b * w_sb + t.to(tl.int64) * w_ss + h, mask=tm, other=0.0)
            acc += tl.maximum(s, 0.0) * wh[:, None]
    out = tl.where(e[None, :] < thr[:, None], acc, float("-inf"))
    tl.store(o_ptr + b * o_sb + t[:, None].to(tl.int64) * o_ss + e[None, :], out, mask=tm[:, None] & em[None, :])


def indexer_scores(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, pos: torch.Tensor, ratio: int,
                   fp32_precision: str = "ieee") -> torch.Tensor:
    """q [B, S, nI, cI] (heads and channels contiguous), keys [B, T, cI] (rows contiguous), w [B, S, nI] fp32
    (the weights already scaled), pos [S] integer positions -> fp32 scores [B, S, T], -inf for entries
    e >= (pos[t] + 1) // ratio."""
    B, S, NH, CI = q.shape
    T = keys.shape[1]
    bad = []
    if CI & (CI - 1) or q.stride(3) != 1 or q.stride(2) != CI:
        bad.append(f"q must be [B, S, nI, cI] with contiguous heads and a power-of-two cI, got {tuple(q.shape)} "
                   f"strides {q.stride()}")
    if keys.dim() != 3 or keys.shape[0] != B or keys.shape[2] != CI or keys.stride(2) != 1 or keys.stride(1) != CI:
        bad.append(f"keys must be [B, T, {CI}] row-contiguous, got {tuple(keys.shape)}")
    if keys.dtype != q.dtype and keys.dtype != torch.float32:
        bad.append(f"keys must be fp32 or q's dtype, got q {q.dtype} and keys {keys.dtype}")
    if fp32_precision not in ("ieee", "tf32x3"):
        bad.append(f"fp32_precision must be 'ieee' or 'tf32x3', got {fp32_precision!r}")
    if tuple(w.shape) != (B, S, NH) or w.dtype != torch.float32 or w.stride(2) != 1:
        bad.append(f"w must be fp32 [B, S, nI] = {(B, S, NH)} with unit stride on nI, got {w.dtype} {tuple(w.shape)}")
    if pos.shape != (S,) or pos.dtype not in (torch.int32, torch.int64):
        bad.append(f"pos must be integer [{S}], got {pos.dtype} {tuple(pos.shape)}")
    if bad:
        raise ValueError("kernels.indexer_scores: " + "; ".join(bad))
    out = torch.empty(B, S, T, dtype=torch.float32, device=q.device)
    if S == 0 or T == 0:
        return out
    # 16-bit operands straight into the dot on the GPU (the CPU interpreter's bf16 dot is broken: fp16 only)
    dot16 = keys.dtype == q.dtype and (q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and q.is_cuda))
    BT, BE = (64, 64) if q.is_cuda else (16, 16)
    grid = (triton.cdiv(S, BT), triton.cdiv(T, BE), B)
    _indexer_scores_kernel[grid](q, keys, w, pos.contiguous(), out, S, T, NH, int(ratio),
                                 q.stride(0), q.stride(1), keys.stride(0), w.stride(0), w.stride(1),
                                 out.stride(0), out.stride(1), CI=CI, BT=BT, BE=BE, DOT16=dot16,
                                 PREC=fp32_precision if q.is_cuda else "ieee", num_warps=4)
    return out


def indexer_scores_reference(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, pos: torch.Tensor,
                             ratio: int) -> torch.Tensor:
    """The torch path of the eager indexer (fp32 products, then ReLU, weights, head sum, future mask)."""
    s = torch.einsum("bshd,btd->bsht", q.float(), keys.float()).relu()
    score = (s * w.unsqueeze(-1)).sum(2)
    T = keys.shape[1]
    thr = (pos + 1) // ratio
    future = torch.arange(T, device=q.device)[None, :] >= thr[:, None]
    return score.masked_fill(future, float("-inf"))
