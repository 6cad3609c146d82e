"""V4 attention (spec §2.3): low-rank q with per-head RMSNorm, one shared K=V head, sliding
window + compressed entries (HCA: all visible, CSA: indexer top-k), per-head sink, inverse
RoPE on the output, grouped output projection (wo_a per group, then wo_b).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..config import ModelConfig
from .cache import LayerCache
from .compressor import Compressor
from .indexer import Indexer
from .linear import Linear, RMSNorm
from .lowp import fake_quant_fp8, hp, tf32_matmuls
from .rope import apply_rope, cos_sin, layer_freqs


QUERY_CHUNK = 512
"""Queries per attention block in prefill (memory: scores are [B, QUERY_CHUNK, H, keys of the chunk])."""

PREFILL_ATTN_KERNEL = True
"""CUDA: each query chunk through the flash-style Triton kernel (kernels/prefill_attention.py) instead of
the torch scores/softmax/product. H200, full-scale 2K prefill, same-run A/B
(bench/results/h200_fullscale_v7_prefill_final.json): 4,560 tok/s with the torch chunk math, 5,516 with the kernel."""


PREFILL_NORM_ROPE_KERNEL = True
"""CUDA, eager forward: q_norm, the per-head q norm + RoPE (in place) and kv_norm + RoPE through
``kernels.rmsnorm_rope`` (one launch each, the torch path's roundings) instead of ~6-10 torch kernels each;
the q path alone moved ~1.6 GB per layer at 2K tokens. The full-scale bench times the prefill toggled."""


PREFILL_SIDE_STREAM = True
"""In a prefill (S > 1) of a compressed layer,
the compressor steps (and the indexer's compressor and head weights), which read only x, run first -- on CUDA
on a second stream, concurrently with the query / key path -- and are joined before the attention needs them.
The same operations on the same inputs: bit-identical results. On since session 8: interleaved 8-round A/B
of a 2K prefill on the H200, median 312.8 -> 310.3 ms, fastest rounds 311.8 -> 309.8 (predicted -5 to -10 ms;
bench/results/h200_prefill_ab_side_stream.json). The full-scale bench times the prefill toggled."""

_SIDE: dict = {}


def side_stream(device, index: int = 0) -> torch.cuda.Stream:
    """One second stream per CUDA device, shared by this prefill branch and the fused decode step's concurrent
    branches (model/graphed.py: its warm-up, capture and uncaptured steps); ``index`` 1: a third one (the decode
    step's deferred mHC Sinkhorn, beside the other branches)."""
    key = (torch.device(device), index)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(key[0])
    return _SIDE[key]


@contextmanager
def on_side(side: torch.cuda.Stream | None):
    """``with on_side(s): ...`` runs the block on stream ``s`` after everything issued so far on the current stream
    (a fork; ``s`` None: in place, e.g. off CUDA). :func:`join_side` is the matching join."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


def join_side(side: torch.cuda.Stream | None) -> None:
    """The current stream waits for what was issued on ``side`` (nothing when ``side`` is None)."""
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)


def _record_state(st, stream) -> None:
    """Tensors of a compressor state that the side stream reads (and may replace): the caching allocator must not
    hand their blocks to the main stream before the side stream is done with them."""
    if st is None or stream is None:
        return
    for t in (st.buf_kv, st.buf_gate, st.prev_kv, st.prev_gate, st.entries):
        if t is not None:
            t.record_stream(stream)


def _use_norm_rope_kernel(x: torch.Tensor) -> bool:
    return PREFILL_NORM_ROPE_KERNEL and x.is_cuda


def _use_attn_kernel(q: torch.Tensor) -> bool:
    """The kernel's domain: CUDA, no fp64, a power-of-two head dim."""
    c = q.shape[-1]
    return PREFILL_ATTN_KERNEL and q.is_cuda and q.dtype != torch.float64 and not c & (c - 1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype=torch.float32, device=None) -> None:
        super().__init__()
        D, H, c = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.rope_dim = H, c, cfg.qk_rope_head_dim
        self.groups, self.o_lora = cfg.o_groups, cfg.o_lora_rank
        self.window, self.eps = cfg.sliding_window, cfg.rms_norm_eps
        self.ratio = cfg.compress_ratios[layer_idx]
        self.lowp = False
        self.wq_a = Linear(D, cfg.q_lora_rank, dtype, device, fp8_act=True)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, device)
        self.wq_b = Linear(cfg.q_lora_rank, H * c, dtype, device, fp8_act=True)
        self.wkv = Linear(D, c, dtype, device, fp8_act=True)
        self.kv_norm = RMSNorm(c, cfg.rms_norm_eps, device)
        self.wo_a = Linear(H * c // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, dtype, device)  # bf16 in the demo
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, D, dtype, device, fp8_act=True)
        self.attn_sink = nn.Parameter(torch.zeros(H, dtype=torch.float32, device=device))
        self.compressor = Compressor(cfg, self.ratio, c, dtype=dtype, device=device) if self.ratio else None
        self.indexer = Indexer(cfg, dtype, device) if self.ratio == 4 else None
        self.register_buffer("freqs", layer_freqs(cfg, self.ratio).to(device), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int, lc: LayerCache | None = None) -> torch.Tensor:
        """x [B,S,D] (post attn_norm) at absolute positions start_pos… -> [B,S,D]."""
        B, S, _ = x.shape
        H, c = self.n_heads, self.head_dim
        pos = start_pos + torch.arange(S, device=x.device)                 # [S]
        cos, sin = cos_sin(self.freqs, pos)                                 # [S, r/2]
        pre = side = None
        if PREFILL_SIDE_STREAM and self.ratio and S > 1:   # x-only work first, on a side stream on CUDA
            side = side_stream(x.device) if x.is_cuda else None   # off CUDA: in place, first
            comp_st = lc.comp if lc is not None else None
            idx_st = lc.index if lc is not None else None
            _record_state(comp_st, side)
            _record_state(idx_st, side)
            with on_side(side):
                pre = (self.compressor(x, comp_st),
                       self.indexer.precompute(x, idx_st) if self.indexer is not None else None)
        if _use_norm_rope_kernel(x) and not self.lowp:
            # the same roundings in one launch each (kernels/rmsnorm_rope.py), q normalised + rotated in place
            from dsv4lib.kernels.rmsnorm_rope import rmsnorm_rope
            qr = rmsnorm_rope(self.wq_a(x), self.q_norm.weight, self.q_norm.eps)
            q = self.wq_b(qr).unflatten(-1, (H, c))
            q = rmsnorm_rope(q, None, self.eps, cos, sin, mode=1, out=q)
            kv = rmsnorm_rope(self.wkv(x), self.kv_norm.weight, self.kv_norm.eps, cos, sin)
        else:
            qr = self.q_norm(self.wq_a(x))                                  # [B, S, q_lora]
            q = self.wq_b(qr).unflatten(-1, (H, c))                         # [B, S, H, c]
            q = q * torch.rsqrt(hp(q).pow(2).mean(-1, keepdim=True) + self.eps).to(q.dtype)
            q = apply_rope(q, cos, sin, inplace=True)                       # q: this function's own tensor
            kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)            # [B, S, c]
        if self.lowp:
            nope = c - self.rope_dim
            kv = torch.cat([fake_quant_fp8(kv[..., :nope], 64), kv[..., nope:]], -1)

        # sliding window: keys at absolute positions kpos
        if lc is not None:
            prev = lc.window if lc.window is not None else kv.new_zeros(B, 0, c)
            win = torch.cat([prev, kv], 1)                                  # [B, Nw, c]
            keep = self.window - 1
            lc.window = win[:, max(0, win.shape[1] - keep):] if keep > 0 else win[:, :0]
        else:
            win = kv
        Nw = win.shape[1]
        base = start_pos - (Nw - S)                                         # window key j sits at position base + j
        kpos = base + torch.arange(Nw, device=x.device)                     # [Nw]
        ent = cb = None
        T = 0
        join_side(side)                                                     # join the x-only branch
        if self.ratio:
            new = self.compressor(x, lc.comp if lc is not None else None) if pre is None else pre[0]
            ent = lc.comp.entries if lc is not None else new                # [B, T, c]
            T = 0 if ent is None else ent.shape[1]
            if not T and self.indexer is not None and lc is not None and pre is None:
                self.indexer.compressor(x, lc.index)   # keep the indexer's stream in step with the main one
            if T:
                thr = (pos + 1) // self.ratio                               # [S]
                if self.indexer is not None:
                    idx = self.indexer(x, qr, pos, cos, sin, lc.index if lc is not None else None,
                                       pre=None if pre is None else pre[1])                   # [B,S,k]
                    idx = torch.where(idx < 0, torch.full_like(idx, T), idx)
                    cb = torch.full((B, S, T + 1), float("-inf"), device=x.device)
                    cb = cb.scatter(-1, idx, 0.0)[..., :T]                  # [B, S, T]
                else:
                    ok = torch.arange(T, device=x.device)[None, :] < thr[:, None]
                    cb = torch.zeros(S, T, device=x.device).masked_fill(~ok, float("-inf")).expand(B, S, T)
                ent = ent.to(win.dtype)
        # queries in chunks of QUERY_CHUNK: each chunk sees only the window keys inside its span and the
        # entries complete by its last query (the rest are -inf for all of its queries), so scores are
        # [B, chunk, H, ~chunk + window + T/r] instead of [B, S, H, S + T] (same softmax, less memory)
        o = torch.empty(B, S, H, c, dtype=x.dtype, device=x.device)
        sink = hp(self.attn_sink)
        kernel = _use_attn_kernel(q)
        if kernel:
            from dsv4lib.kernels.prefill_attention import prefill_attention
        for s0 in range(0, S, QUERY_CHUNK):
            s1 = min(S, s0 + QUERY_CHUNK)
            t1 = min(T, (start_pos + s1) // self.ratio) if T else 0         # entries visible to the chunk's last query
            if kernel:
                prefill_attention(q[:, s0:s1], win, ent[:, :t1] if t1 else None, cb[:, s0:s1, :t1] if t1 else None,
                                  self.attn_sink, start_pos + s0, base, self.window, c ** -0.5, out=o[:, s0:s1])
                continue
            j0 = max(0, start_pos + s0 - self.window + 1 - base)
            j1 = min(Nw, start_pos + s1 - base)
            pq, kp = pos[s0:s1], kpos[j0:j1]
            vis = (kp[None, :] <= pq[:, None]) & (kp[None, :] > pq[:, None] - self.window)    # [s, n]
            bias = torch.zeros(s1 - s0, j1 - j0, device=x.device).masked_fill(~vis, float("-inf")).expand(B, -1, -1)
            keys = win[:, j0:j1]
            if t1:
                keys = torch.cat([keys, ent[:, :t1]], 1)
                bias = torch.cat([bias, cb[:, s0:s1, :t1]], -1)
            # the sink as one more key: a zero vector whose logit is overwritten with the sink, and whose
            # value (the same zero row, K = V) adds nothing -- no [B, H, s, n+1] concatenation or slice of p
            keys = torch.cat([keys, keys.new_zeros(B, 1, c)], 1)                               # [B, n+1, c]
            bias = torch.nn.functional.pad(bias, (0, 1))
            # bf16/fp16 model on CUDA: q and keys hold bf16 values, exact in TF32 -> tensor cores for the
            # two products (scores exact up to summation order; p rounded to 11 bits, below o's bf16 rounding)
            # scores kept as [B, s, H, n+1] (the batched matmul's own layout): no head-major permute copies
            with tf32_matmuls(x.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and keys.dtype == q.dtype):
                kf = hp(keys)                                                                   # [B, n+1, c]
                z = torch.matmul(hp(q[:, s0:s1]).flatten(1, 2), kf.transpose(1, 2))             # [B, s*H, n+1]
                z = z.view(B, s1 - s0, H, -1).mul_(c ** -0.5).add_(bias[:, :, None])
                z[..., -1] = sink
                p = z.softmax(-1)                                                               # [B, s, H, n+1]
                o[:, s0:s1] = torch.matmul(p.flatten(1, 2), kf).view(B, s1 - s0, H, c).to(x.dtype)
        o = apply_rope(o, cos, sin, inverse=True, inplace=True)
        u = grouped_output_a(self, o.reshape(B, S, self.groups, -1))       # [B, S, G*o_lora]
        return self.wo_b(u)


def grouped_output_a(attn: Attention, o: torch.Tensor) -> torch.Tensor:
    """Grouped output projection (spec §2.3): o [B, S, G, H*c/G] -> [B, S, G*o_lora], group g through
    its own [o_lora, H*c/G] block of ``wo_a``. On CUDA with an FP8 weight: the grouped FP8 kernel (each
    weight byte read once, only the diagonal blocks computed, no dequantised copy); otherwise the
    dequantised weight and an einsum."""
    B, S, G = o.shape[:3]
    R = attn.o_lora
    w = attn.wo_a.weight
    if w.dtype == torch.float8_e4m3fn and o.is_cuda and not (attn.wo_a.lowp and attn.wo_a.fp8_act):
        from dsv4lib.kernels.dispatch import fp8_linear
        return fp8_linear(o.contiguous(), w, attn.wo_a.scale, groups=G)    # [B, S, G*R]
    wa = attn.wo_a.dequantized_weight(o.dtype).view(G, R, -1)
    return torch.einsum("bsgi,goi->bsgo", o, wa).flatten(2)

