"""INT2 g64 expert format (ARCHITECTURE.md "The INT2 g64 on-disk format", a fixed contract).

For a weight ``[..., K_out, K_in]`` with group size G = 64:

* ``w_packed``  uint32 ``[..., K_out, K_in/16]`` — 16 codes q in {0..3} per word; code j of each
  16-run along K_in sits in bits ``[2j, 2j+2)`` (``order="lsb"``, the contract);
* ``w_scale``   float16 ``[..., K_out, K_in/G]`` — one scale per group of G inputs;
* ``w_zero_packed`` int8 ``[..., K_out, K_in/(2G)]`` — 4-bit zero points, group 2i in the low
  nibble, 2i+1 in the high nibble (``zero_order="low"``, the contract).

``w = (q - z) * s`` in fp32. The ``order="msb"`` / ``zero_order="high"`` variants exist only so
``verify`` can test which convention a foreign file uses. Also an RTN quantizer (for tests).
"""
from __future__ import annotations

import torch

GROUP = 64
CODES_PER_WORD = 16
BITS = 2
_SHIFTS_LSB = torch.arange(CODES_PER_WORD, dtype=torch.int64) * BITS
CODE_ORDERS = ("lsb", "msb")
ZERO_ORDERS = ("low", "high")


def _shifts(order: str) -> torch.Tensor:
    if order == "lsb":
        return _SHIFTS_LSB
    if order == "msb":
        return _SHIFTS_LSB.flip(0)
    raise ValueError(f"unknown INT2 code order {order!r} (use one of {CODE_ORDERS})")


def pack_codes(q: torch.Tensor, order: str = "lsb") -> torch.Tensor:
    """Codes uint8 ``[..., K]`` (0..3, K % 16 == 0) -> uint32 ``[..., K/16]``."""
    if q.shape[-1] % CODES_PER_WORD:
        raise ValueError(f"INT2 pack: last dim {q.shape[-1]} is not a multiple of {CODES_PER_WORD}")
    if q.numel() and int(q.max()) > 3:
        raise ValueError("INT2 pack: codes must be in 0..3")
    runs = q.to(torch.int64).unflatten(-1, (-1, CODES_PER_WORD))  # [..., K/16, 16]
    words = (runs << _shifts(order).to(q.device)).sum(-1)  # [..., K/16] (disjoint bits: sum == or)
    return words.to(torch.uint32)


def unpack_codes(packed: torch.Tensor, order: str = "lsb") -> torch.Tensor:
    """uint32 (or int32 view) ``[..., K/16]`` -> codes uint8 ``[..., K]``."""
    if packed.dtype == torch.int32:
        packed = packed.view(torch.uint32)
    if packed.dtype != torch.uint32:
        raise TypeError(f"INT2 packed codes must be uint32, got {packed.dtype}")
    words = packed.to(torch.int64).unsqueeze(-1)  # [..., K/16, 1]
    codes = (words >> _shifts(order).to(packed.device)) & 3  # [..., K/16, 16]
    return codes.flatten(-2).to(torch.uint8)


def pack_zeros(z: torch.Tensor, zero_order: str = "low") -> torch.Tensor:
    """Zero points uint8 ``[..., G]`` (0..15, G even) -> int8 ``[..., G/2]``."""
    if z.shape[-1] % 2:
        raise ValueError(f"INT2 zero pack: number of groups {z.shape[-1]} is odd")
    if z.numel() and int(z.max()) > 15:
        raise ValueError("INT2 zero pack: zero points must be in 0..15")
    z = z.to(torch.uint8)
    first, second = z[..., 0::2], z[..., 1::2]
    if zero_order == "high":
        first, second = second, first
    elif zero_order != "low":
        raise ValueError(f"unknown zero nibble order {zero_order!r} (use one of {ZERO_ORDERS})")
    return (first | (second << 4)).view(torch.int8)


def unpack_zeros(zp: torch.Tensor, zero_order: str = "low") -> torch.Tensor:
    """int8/uint8 ``[..., G/2]`` -> zero points uint8 ``[..., G]``."""
    b = zp.view(torch.uint8)
    lo, hi = b & 0xF, b >> 4
    if zero_order == "high":
        lo, hi = hi, lo
    elif zero_order != "low":
        raise ValueError(f"unknown zero nibble order {zero_order!r} (use one of {ZERO_ORDERS})")
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     group_size: int = GROUP) -> torch.Tensor:
    """Unpacked codes ``[..., K]``, scale ``[..., K/G]``, zero ``[..., K/G]`` -> fp32 ``[..., K]``."""
    if q.shape[-1] != scale.shape[-1] * group_size or scale.shape != zero.shape:
        raise ValueError(f"INT2 shapes disagree: codes {tuple(q.shape)}, scale {tuple(scale.shape)}, "
                         f"zero {tuple(zero.shape)}, group {group_size}")
    qg = q.float().unflatten(-1, (-1, group_size))  # [..., K/G, G]
    w = (qg - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.flatten(-2)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero_packed: torch.Tensor,
               group_size: int = GROUP, order: str = "lsb", zero_order: str = "low") -> torch.Tensor:
    """On-disk INT2 tensors -> fp32 ``[..., K_out, K_in]``."""
    return dequantize_codes(unpack_codes(packed, order), scale,
                            unpack_zeros(zero_packed, zero_order), group_size)


def quantize_rtn(w: torch.Tensor, group_size: int = GROUP,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max round-to-nearest INT2: ``w [..., K]`` -> (codes uint8 ``[..., K]``,
    scale fp16 ``[..., K/G]``, zero uint8 ``[..., K/G]`` in 0..3). A baseline for tests; GPTQ
    lives in ``dsv4lib.quant``."""
    if w.shape[-1] % group_size:
        raise ValueError(f"INT2 quantize: K_in {w.shape[-1]} is not a multiple of {group_size}")
    g = w.float().unflatten(-1, (-1, group_size))  # [..., K/G, G]
    lo = g.amin(-1).clamp(max=0.0)
    hi = g.amax(-1).clamp(min=0.0)
    fp16 = torch.finfo(torch.float16)
    scale = ((hi - lo) / 3).clamp(fp16.smallest_normal, fp16.max).to(torch.float16)  # [..., K/G]
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, 3)
    q = torch.round(g / s.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 3)
    return q.flatten(-2).to(torch.uint8), scale, zero.to(torch.uint8)


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """Codes/scale/zero -> the three on-disk tensors ``{"w_packed", "w_scale", "w_zero_packed"}``."""
    return {"w_packed": pack_codes(q), "w_scale": scale.to(torch.float16).contiguous(),
            "w_zero_packed": pack_zeros(zero)}


def packed_shapes(k_out: int, k_in: int, group_size: int = GROUP,
                  lead: tuple[int, ...] = ()) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Expected shapes/dtypes of the three tensors of one projection (``lead`` = e.g. ``(E,)``)."""
    if k_in % (2 * group_size):
        raise ValueError(f"INT2 g{group_size}: K_in {k_in} must be a multiple of {2 * group_size}")
    return {"w_packed": (lead + (k_out, k_in // CODES_PER_WORD), torch.uint32),
            "w_scale": (lead + (k_out, k_in // group_size), torch.float16),
            "w_zero_packed": (lead + (k_out, k_in // (2 * group_size)), torch.int8)}
