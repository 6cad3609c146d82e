"""Interleaved RoPE on the trailing rope dims, with YaRN on compressed layers (spec §2.6).

Pairs (2i, 2i+1) of the rope slice rotate by angle pos·freq_i, freq_i = base^(-2i/r).
Sliding-only layers: base ``rope_theta``, no YaRN. CSA/HCA layers (attention, compressor,
indexer): base ``compress_rope_theta`` with the YaRN frequency ramp always on and no mscale.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig, RopeScaling
from .lowp import hp


def rope_freqs(dim: int, base: float, yarn: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies fp32 [dim/2] (fp64 math, as the demo's precompute)."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))   # [dim/2]
    if yarn is not None:
        def corr(rot: float) -> float:
            return dim * math.log(yarn.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(corr(yarn.beta_fast)), 0)
        high = min(math.ceil(corr(yarn.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        freqs = freqs / yarn.factor * ramp + freqs * (1 - ramp)
    return freqs.float()


def layer_freqs(cfg: ModelConfig, ratio: int) -> torch.Tensor:
    """Frequencies for a layer with compression ratio ``ratio`` (0 = sliding-only)."""
    if ratio == 0:
        return rope_freqs(cfg.qk_rope_head_dim, cfg.rope_theta, None)
    return rope_freqs(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)


def cos_sin(freqs: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin fp32 [*pos.shape, r/2] for integer positions ``pos``."""
    ang = pos.to(torch.float32)[..., None] * freqs.to(pos.device)           # [..., r/2]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False,
               inplace: bool = False) -> torch.Tensor:
    """Rotate the trailing ``2*cos.shape[-1]`` dims of ``x`` [..., L, (heads,) d] (interleaved pairs).

    ``cos``/``sin`` [..., L, r/2] broadcast over an optional heads axis when x has one more dim.
    ``inplace``: write the rotated dims into ``x`` (a tensor the caller owns) instead of concatenating a
    copy of all of it -- skipped when autograd records ``x``.
    """
    r = 2 * cos.shape[-1]
    while cos.dim() < x.dim() - 1:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if inverse:
        sin = -sin
    xr = hp(x[..., -r:]).unflatten(-1, (-1, 2))                        # [..., r/2, 2]
    a, b = xr[..., 0], xr[..., 1]
    rot = torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)
    if inplace and not (torch.is_grad_enabled() and x.requires_grad):
        x[..., -r:] = rot.to(x.dtype)
        return x
    return torch.cat([x[..., :-r], rot.to(x.dtype)], -1)
