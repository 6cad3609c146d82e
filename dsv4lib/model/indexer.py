"""Lightning indexer of CSA layers (spec §2.5): picks the top-k compressed entries per query.

I[t,s] = Σ_h w[t,h]·ReLU(q_I[t,h]·K_I[s]), w = weights_proj(x)·(c_I^-1/2·n_I^-1/2); entries
s ≥ (t+1)//4 are masked. Exact ties (ReLU zeros) go to the lower entry index (stable sort),
so prefill and decode select alike; the demo/HF ``torch.topk`` leaves the tie order unspecified.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .cache import CompressorState
from .compressor import Compressor
from .linear import Linear
from .lowp import fake_quant_fp4, hadamard, hp
from .rope import apply_rope


INDEXER_KERNEL = True
"""CUDA: the scores through ``kernels.indexer_scores`` (one launch; no [B, S, nI, T] fp32 products) instead of
the einsum / ReLU / weighting / head sum -- when q and the keys share a dtype (fp32 models)."""
INDEXER_KERNEL_FP32_KEYS = True
"""The same for 16-bit q against the fp32 compressor entries (every bf16 model; the products in 3xTF32).
H200 full-scale bench, same run (bench/results/h200_fullscale_v8_start.json): 2K prefill 5,611 tok/s with it
off, 5,829 on (+3.9 %); predicted -15 ms of ~365 (+4 %)."""


def _use_kernel(q: torch.Tensor) -> bool:
    return INDEXER_KERNEL and q.is_cuda and q.shape[-1] & (q.shape[-1] - 1) == 0


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype=torch.float32, device=None) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.ratio = 4
        self.lowp = False
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, dtype, device, fp8_act=True)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, dtype, device)
        self.compressor = Compressor(cfg, 4, self.head_dim, index=True, dtype=dtype, device=device)

    def precompute(self, x: torch.Tensor, state: CompressorState | None) -> tuple:
        """The parts that read only x: the compressor step (new entries, state advanced) and the head weights
        ``weights_proj(x)`` scaled -- for a caller that runs them concurrently with the query path; pass the
        result to :meth:`forward` as ``pre``."""
        return self.compressor(x, state), self._head_weights(x)

    def _head_weights(self, x: torch.Tensor) -> torch.Tensor:
        return hp(self.weights_proj(x)) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)   # [B, S, nI]

    def forward(self, x: torch.Tensor, qr: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, state: CompressorState | None, pre: tuple | None = None) -> torch.Tensor:
        """Selected entry indices [B, S, k] (int64, −1 = nothing valid); k = min(topk, #entries).
        ``pre``: :meth:`precompute` of the same x and state, already run (the compressor is not stepped again)."""
        B, S, _ = x.shape
        new = self.compressor(x, state) if pre is None else pre[0]
        keys = state.entries if state is not None else new                 # [B, T, cI]
        T = 0 if keys is None else keys.shape[1]
        if T == 0:
            return torch.empty(B, S, 0, dtype=torch.long, device=x.device)
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))    # [B, S, nI, cI]
        q = apply_rope(q, cos, sin)
        if self.lowp:
            q = fake_quant_fp4(hadamard(q))
        w = self._head_weights(x) if pre is None else pre[1]                # [B, S, nI]
        thr = (pos + 1) // self.ratio                                       # [S]
        if _use_kernel(q) and not self.lowp and (keys.dtype == q.dtype or INDEXER_KERNEL_FP32_KEYS):
            from dsv4lib.kernels.indexer_scores import indexer_scores
            kk = keys if keys.dtype in (q.dtype, torch.float32) else keys.float()
            prec = "ieee" if q.dtype == torch.float32 else "tf32x3"     # fp32 models keep exact products
            score = indexer_scores(q, kk, w.float().contiguous(), pos, self.ratio, fp32_precision=prec)   # [B, S, T]
        else:
            s = torch.einsum("bshd,btd->bsht", hp(q), hp(keys)).relu()  # [B, S, nI, T]
            score = (s * w.unsqueeze(-1)).sum(2)                            # [B, S, T]
            future = torch.arange(T, device=x.device)[None, :] >= thr[:, None]  # [S, T]
            score = score.masked_fill(future, float("-inf"))
        k = min(self.topk, T)
        idx = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]   # [B, S, k]
        return torch.where(idx >= thr[None, :, None], torch.full_like(idx, -1), idx)
