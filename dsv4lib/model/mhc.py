"""Manifold-constrained hyper-connections (mHC), spec §2.2.

``hc_pre`` collapses the n_hc residual streams into the sublayer input and returns the
``post`` weights and the Sinkhorn-projected ``comb`` matrix; ``hc_post`` expands the sublayer
output back (new stream k gets column k of comb: X_out = comb^T·R + post⊗F); ``hc_head``
is the final collapse. All math fp32.
"""
from __future__ import annotations

import torch

from .lowp import hp


def _mix(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    v = hp(x.flatten(-2))                                             # [B, S, hc*D]
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return v @ hp(fn).t()                                             # [B, S, n_mix]


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax then alternate column / row normalisation (``iters`` column passes)."""
    m = m.softmax(-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int,
           iters: int, hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B,S,hc,D] -> (sublayer input [B,S,D], post [B,S,hc], comb [B,S,hc,hc])."""
    mix = _mix(x, fn, norm_eps)                                            # [B, S, (2+hc)*hc]
    base = hp(base)
    pre = torch.sigmoid(mix[..., :hc] * scale[0] + base[:hc]) + hc_eps     # [B, S, hc]
    post = 2 * torch.sigmoid(mix[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = mix[..., 2 * hc:] * scale[2] + base[2 * hc:]
    comb = sinkhorn(comb.unflatten(-1, (hc, hc)), iters, hc_eps)           # [B, S, hc, hc]
    y = (pre.unsqueeze(-1) * hp(x)).sum(-2)                            # [B, S, D]
    return y.to(x.dtype), post, comb


def hc_post(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """f [B,S,D], res [B,S,hc,D] -> [B,S,hc,D]: out_k = post_k f + sum_j comb[j,k] res_j."""
    out = post.unsqueeze(-1) * hp(f).unsqueeze(-2) + comb.transpose(-1, -2) @ hp(res)
    return out.to(res.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse x [B,S,hc,D] -> [B,S,D] (no Sinkhorn, no post)."""
    mix = _mix(x, fn, norm_eps)                                            # [B, S, hc]
    pre = torch.sigmoid(mix * hp(scale) + hp(base)) + hc_eps
    return (pre.unsqueeze(-1) * hp(x)).sum(-2).to(x.dtype)
