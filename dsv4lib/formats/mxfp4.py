"""MXFP4 routed-expert weights of the Flash release (spec v4_arch §3.3).

Stored as I8 ``[out, in/2]``: byte k of a row holds logical element 2k in the **low** nibble and
2k+1 in the high nibble. Nibble = E2M1 code: 0..7 -> {0, .5, 1, 1.5, 2, 3, 4, 6}, bit 3 = sign.
One E8M0 scale per 32 consecutive inputs: ``W[o, i] = e2m1(code) * 2**(S[o, i // 32] - 127)``.
"""
from __future__ import annotations

import torch

from dsv4lib.formats import e8m0

BLOCK = 32
E2M1_MAX = 6.0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])  # code -> value
_VALUE2_TO_CODE = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7])  # 2*|value| -> code
AMAX_FLOOR = 1e-30


def _check_in(inp: int) -> None:
    if inp % BLOCK:
        raise ValueError(f"MXFP4 needs the input dim to be a multiple of {BLOCK}, got {inp}")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes uint8 ``[..., in]`` (0..15) -> int8 ``[..., in/2]``, element 2k in the low nibble."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 ``[..., in/2]`` -> codes uint8 ``[..., in]``."""
    p = packed.view(torch.uint8)
    return torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)


def quantize_codes(x: torch.Tensor) -> torch.Tensor:
    """Already-scaled fp32 values -> nearest E2M1 codes (ties to the even code; -0 -> code 0).

    E2M1 keeps one mantissa bit: round |x| to a multiple of 2**(max(floor(log2|x|), 0) - 1) with
    round-half-even (the even multiple is the even code), then map the value to its code.
    """
    a = x.abs().clamp(max=E2M1_MAX)
    _, e = torch.frexp(a)  # a = m * 2**e, m in [0.5, 1) -> floor(log2 a) = e - 1
    step = torch.ldexp(torch.ones_like(a), (e - 1).clamp(min=0) - 1)
    q = torch.round(a / step) * step  # round-half-even
    idx = _VALUE2_TO_CODE.to(x.device)[(q * 2).clamp(max=2 * E2M1_MAX).long()]  # 2*value 0..12 -> code 0..7
    sign = (x < 0) & (idx > 0)
    return (idx + 8 * sign.long()).to(torch.uint8)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., out, in]`` -> (packed int8 ``[..., out, in/2]``, scale E8M0 uint8 ``[..., out, in/32]``).

    scale = 2**ceil(log2(amax/6)) per 32-block, codes round-to-nearest.
    """
    _check_in(w.shape[-1])
    w = w.float()
    if not torch.isfinite(w).all():
        raise ValueError("mxfp4.quantize: weight has NaN/Inf")
    blocks = w.unflatten(-1, (-1, BLOCK))  # [..., out, in/32, 32]
    amax = blocks.abs().amax(-1).clamp_min(AMAX_FLOOR)  # [..., out, in/32]
    exp = e8m0.ceil_pow2_exponent(amax / E2M1_MAX).clamp(e8m0.MIN_EXP, e8m0.MAX_EXP)
    scale = e8m0.encode_exponent(exp)
    codes = quantize_codes(blocks / e8m0.decode(scale).unsqueeze(-1)).flatten(-2)  # [..., out, in]
    return pack_nibbles(codes), scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed ``[..., out, in/2]`` + E8M0 scales ``[..., out, in/32]`` -> fp32 ``[..., out, in]``."""
    codes = unpack_nibbles(packed).long()  # [..., out, in]
    if codes.shape[-1] != scale.shape[-1] * BLOCK or codes.shape[:-1] != scale.shape[:-1]:
        raise ValueError(f"MXFP4 shapes disagree: packed {tuple(packed.shape)}, scale {tuple(scale.shape)}")
    vals = E2M1_VALUES.to(packed.device)[codes]
    s = e8m0.decode(scale).repeat_interleave(BLOCK, -1)
    return vals * s


def fake_quantize(w: torch.Tensor) -> torch.Tensor:
    """``dequantize(*quantize(w))``: what a model sees after an MXFP4 save/load."""
    return dequantize(*quantize(w))
