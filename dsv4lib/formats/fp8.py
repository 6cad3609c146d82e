"""FP8 e4m3 weights with 128x128 block scales (spec v4_arch §3.3).

``W[o, i] = e4m3(Wq[o, i]) * S[o // 128, i // 128]``; the scale grid is
``[ceil(out/128), ceil(in/128)]`` (edge blocks are partial). Flash stores the scales as E8M0
(powers of two), Flash-Base as F32. Scales here are returned as ``torch.float8_e8m0fnu`` (E8M0,
so they write to safetensors as ``F8_E8M0``) or ``torch.float32``.
"""
from __future__ import annotations

import torch

from dsv4lib.formats import e8m0

BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-30  # all-zero blocks get a tiny (but valid) scale


def scale_grid(shape: tuple[int, int], block: int = BLOCK) -> tuple[int, int]:
    """Shape of the block-scale tensor of a ``[out, in]`` weight."""
    out, inp = shape
    return (-(-out // block), -(-inp // block))


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block: int = BLOCK) -> torch.Tensor:
    """Block scales ``[ceil(out/b), ceil(in/b)]`` -> fp32 per-element multiplier ``[out, in]``."""
    s = scale_to_float(scale)
    if tuple(s.shape) != scale_grid(shape, block):
        raise ValueError(f"scale shape {tuple(s.shape)} does not match weight {tuple(shape)} "
                         f"with {block}x{block} blocks (expected {scale_grid(shape, block)})")
    s = s.repeat_interleave(block, 0).repeat_interleave(block, 1)  # [>=out, >=in]
    return s[: shape[0], : shape[1]]


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 (``float8_e8m0fnu``/``uint8``) or float block scales -> fp32."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return e8m0.decode(scale)
    return scale.float()


def _block_amax(w: torch.Tensor, block: int) -> torch.Tensor:
    out, inp = w.shape
    go, gi = scale_grid((out, inp), block)
    pad = torch.zeros(go * block, gi * block, dtype=torch.float32, device=w.device)
    pad[:out, :inp] = w.abs()
    return pad.view(go, block, gi, block).amax(dim=(1, 3))  # [go, gi]


def quantize_block(w: torch.Tensor, scale_format: str = "e8m0",
                   block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [out, in]`` to (e4m3 ``[out, in]``, scale ``[ceil(out/b), ceil(in/b)]``).

    ``scale_format="e8m0"``: scale = 2**ceil(log2(amax/448)) per block (``float8_e8m0fnu``);
    ``"f32"``: scale = amax/448 (``float32``). Codes are round-to-nearest-even by the e4m3 cast.
    """
    if w.dim() != 2:
        raise ValueError(f"fp8.quantize_block expects a 2-D weight, got shape {tuple(w.shape)}")
    w = w.float()
    if not torch.isfinite(w).all():
        raise ValueError("fp8.quantize_block: weight has NaN/Inf")
    amax = _block_amax(w, block).clamp_min(AMAX_FLOOR)  # [go, gi]
    if scale_format == "e8m0":
        exp = e8m0.ceil_pow2_exponent(amax / E4M3_MAX).clamp(e8m0.MIN_EXP, e8m0.MAX_EXP)
        scale_bytes = e8m0.encode_exponent(exp)
        s = e8m0.decode(scale_bytes)
        scale = scale_bytes.view(torch.float8_e8m0fnu)
    elif scale_format == "f32":
        s = amax / E4M3_MAX
        scale = s
    else:
        raise ValueError(f"unknown FP8 scale format {scale_format!r} (use 'e8m0' or 'f32')")
    full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[: w.shape[0], : w.shape[1]]
    q = (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # [out, in]
    return q, scale


def dequantize_block(w: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """e4m3 ``[out, in]`` x block scales -> fp32 ``[out, in]``."""
    if w.dim() != 2:
        raise ValueError(f"fp8.dequantize_block expects a 2-D weight, got shape {tuple(w.shape)}")
    return w.float() * expand_scale(scale, tuple(w.shape), block)


def fake_quantize(w: torch.Tensor, scale_format: str = "e8m0", block: int = BLOCK) -> torch.Tensor:
    """``dequantize_block(*quantize_block(w))`` in fp32: what a model sees after an FP8 save/load."""
    return dequantize_block(*quantize_block(w, scale_format, block), block=block)
