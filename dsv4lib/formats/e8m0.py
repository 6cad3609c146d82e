"""E8M0 scale bytes: an unsigned biased exponent, value 2**(e - 127), 255 = NaN (spec v4_arch §3.3).

Used by the Flash release for every block scale (FP8 128x128 and MXFP4 1x32). Stored in files as
``F8_E8M0`` (``torch.float8_e8m0fnu``); in memory we keep the raw byte as ``uint8``.
"""
from __future__ import annotations

import torch

BIAS = 127
NAN_BYTE = 255
MIN_EXP = -BIAS          # byte 0
MAX_EXP = NAN_BYTE - 1 - BIAS  # byte 254 -> 2**127


def as_bytes(e: torch.Tensor) -> torch.Tensor:
    """View an ``float8_e8m0fnu`` / ``uint8`` / ``int8`` tensor as its raw ``uint8`` bytes."""
    if e.dtype == torch.uint8:
        return e
    if e.dtype in (torch.float8_e8m0fnu, torch.int8):
        return e.view(torch.uint8)
    raise TypeError(f"E8M0 scales must be uint8 or float8_e8m0fnu, got {e.dtype}")


def decode(e: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> fp32 ``2**(e-127)`` (byte 255 -> NaN). Exact, also for byte 0 (2**-127)."""
    b = as_bytes(e).to(torch.int32)
    out = torch.ldexp(torch.ones_like(b, dtype=torch.float32), b - BIAS)
    return torch.where(b == NAN_BYTE, torch.full_like(out, float("nan")), out)


def encode_exponent(exp: torch.Tensor) -> torch.Tensor:
    """Integer exponents (clamped to the representable range) -> E8M0 bytes (uint8)."""
    return (exp.to(torch.int32).clamp(MIN_EXP, MAX_EXP) + BIAS).to(torch.uint8)


def encode(x: torch.Tensor) -> torch.Tensor:
    """Positive powers of two -> E8M0 bytes; raises if any value is not an exact power of two."""
    x = x.float()
    if not torch.isfinite(x).all() or (x <= 0).any():
        raise ValueError("E8M0 encode: values must be finite and positive")
    mant, exp = torch.frexp(x)  # x = mant * 2**exp, mant in [0.5, 1)
    if not (mant == 0.5).all():
        raise ValueError("E8M0 encode: values must be exact powers of two")
    exp = exp.to(torch.int32) - 1
    if (exp < MIN_EXP).any() or (exp > MAX_EXP).any():
        raise ValueError("E8M0 encode: exponent out of range [-127, 127]")
    return encode_exponent(exp)


def ceil_pow2_exponent(ratio: torch.Tensor) -> torch.Tensor:
    """Smallest integer k with 2**k >= ratio (ratio > 0), computed exactly with frexp; int32."""
    mant, exp = torch.frexp(ratio.float())
    exact = mant == 0.5
    return torch.where(exact, exp - 1, exp).to(torch.int32)
