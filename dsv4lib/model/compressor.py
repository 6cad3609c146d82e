"""KV compressor (spec §2.4): CSA "overlap" (ratio 4) and HCA "plain" (other ratios).

Entry i summarises window i (tokens r·i … r·i+r−1) by a per-channel softmax over the window's
gate logits (+ learned ``ape``); CSA mixes 2r slots: the first ``hd`` channels of window i−1
and the last ``hd`` channels of window i. Then RMSNorm, RoPE at position r·i, and (low-precision
sim) FP8 fake-quant of the non-rope dims, or Hadamard + FP4 for the indexer's keys.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .cache import CompressorState
from .linear import Linear, RMSNorm
from .lowp import fake_quant_fp4, fake_quant_fp8, hadamard, hp, tf32_matmuls
from .rope import apply_rope, cos_sin, layer_freqs


class Compressor(nn.Module):
    """Compressor producing ``head_dim``-wide entries; ``index=True`` for the indexer's keys."""

    def __init__(self, cfg: ModelConfig, ratio: int, head_dim: int, index: bool = False,
                 dtype=torch.float32, device=None) -> None:
        super().__init__()
        self.ratio, self.head_dim, self.index = ratio, head_dim, index
        self.overlap = ratio == 4
        self.rope_dim = cfg.qk_rope_head_dim
        self.lowp = False
        coff = 2 if self.overlap else 1
        self.wkv = Linear(cfg.hidden_size, coff * head_dim, dtype, device)
        self.wgate = Linear(cfg.hidden_size, coff * head_dim, dtype, device)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim, dtype=torch.float32, device=device))
        self.norm = RMSNorm(head_dim, cfg.rms_norm_eps, device)
        self.register_buffer("freqs", layer_freqs(cfg, ratio).to(device), persistent=False)

    def forward(self, x: torch.Tensor, state: CompressorState | None) -> torch.Tensor:
        """x [B,S,D] (stream continues the state's tokens) -> new entries [B, n, hd] fp32.

        Without state, x starts at position 0 and the remainder after the last full window is dropped.
        """
        B = x.shape[0]
        r, hd = self.ratio, self.head_dim
        # fp32 projections of the bf16 stream (the reference's precision). With bf16/fp16 weights on CUDA both
        # operands hold 16-bit values, exact in TF32: tensor cores give the same products, fp32 accumulation
        exact16 = (x.dtype in (torch.bfloat16, torch.float16)
                   and all(m.weight.dtype in (torch.bfloat16, torch.float16) for m in (self.wkv, self.wgate)))
        with tf32_matmuls(x.is_cuda and exact16):
            kv = self.wkv(hp(x))                                       # [B, S, coff*hd]
            gate = self.wgate(hp(x))
        first = 0
        if state is not None:
            first = state.n_entries
            if state.buf_kv is not None:
                kv = torch.cat([state.buf_kv, kv], 1)
                gate = torch.cat([state.buf_gate, gate], 1)
        n = kv.shape[1] // r
        if state is not None:
            state.buf_kv, state.buf_gate = kv[:, n * r:], gate[:, n * r:]
        if n == 0:
            return kv.new_zeros(B, 0, hd)
        ck = kv[:, :n * r].unflatten(1, (n, r))                            # [B, n, r, coff*hd]
        cg = gate[:, :n * r].unflatten(1, (n, r)) + self.ape
        if self.overlap:
            a_kv, a_g = ck[..., :hd], cg[..., :hd]                         # feeds the NEXT window
            if state is not None and state.prev_kv is not None:
                p_kv, p_g = state.prev_kv.unsqueeze(1), state.prev_gate.unsqueeze(1)
            else:
                p_kv = ck.new_zeros(B, 1, r, hd)
                p_g = ck.new_full((B, 1, r, hd), float("-inf"))
            prev_kv = torch.cat([p_kv, a_kv[:, :-1]], 1)                    # [B, n, r, hd]
            prev_g = torch.cat([p_g, a_g[:, :-1]], 1)
            if state is not None:
                state.prev_kv, state.prev_gate = a_kv[:, -1], a_g[:, -1]
            ck = torch.cat([prev_kv, ck[..., hd:]], 2)                     # [B, n, 2r, hd]
            cg = torch.cat([prev_g, cg[..., hd:]], 2)
        e = (ck * cg.softmax(2)).sum(2)                                    # [B, n, hd]
        e = self.norm(e)
        pos = (first + torch.arange(n, device=x.device)) * r
        cos, sin = cos_sin(self.freqs, pos)
        e = apply_rope(e, cos, sin)
        if self.lowp:
            if self.index:
                e = fake_quant_fp4(hadamard(e))
            else:
                nope = hd - self.rope_dim
                e = torch.cat([fake_quant_fp8(e[..., :nope], 64), e[..., nope:]], -1)
        if state is not None:
            state.entries = e if state.entries is None else torch.cat([state.entries, e], 1)
            state.n_entries += n
        return e
