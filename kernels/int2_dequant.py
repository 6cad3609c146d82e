"""INT2 g64 dequantisation: the shared tile helper, a Triton dequant kernel, and the torch reference.

Layout (ARCHITECTURE.md "The INT2 g64 on-disk format", a fixed contract), per projection with
E experts and a logical weight ``[E, K_out, K_in]``, group size G = 64:

* ``w_packed``      uint32 ``[E, K_out, K_in/16]``: code j (0..15) of each 16-run along K_in in bits
  ``[2j, 2j+2)``; codes q in {0..3}.
* ``w_scale``       float16 ``[E, K_out, K_in/64]``: one scale per group of 64 input channels.
* ``w_zero_packed`` int8 ``[E, K_out, K_in/128]``: 4-bit zero points, group 2i in the low nibble,
  group 2i+1 in the high nibble.

``w = (q - z) * s`` in fp32. K_in must be a multiple of 128 (the zero packing needs it); K_out is
arbitrary. Inside the kernels the uint32 words are viewed as int32 (same bits; shifts are masked).

``_int2_tile`` is the register-level fp32 dequant of the stand-alone dequant kernel: it loads a
``[BLOCK_N, W]`` tile of packed words (16 codes each) plus the per-word scale / zero, expands the codes
with a broadcast shift, and returns the dequantised ``[BLOCK_N, 16*W]`` fp32 tile in natural K order. The
MoE kernels build their own tiles: ``int2_moe_prefill`` in fp16 code pairs (``_tile_interleave``), the
decode kernels inside their inner loops (``int2_moe_decode``, ``int2_moe_idp``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP = 64
CODES_PER_WORD = 16


def dequant_configs() -> list[dict]:
    """Launch configurations for the stand-alone dequant kernel (rows x words per program)."""
    return [dict(BLOCK_N=32, W=32, num_warps=4)]


@triton.jit
def _int2_tile(
    # packed codes, scales, zeros of ONE expert, row-major [K_out, KW] / [K_out, KW/4] / [K_out, KW/8]
    w_ptr, s_ptr, z_ptr,
    # rows of this tile and their bounds mask
    rows, row_mask,
    # first packed word of this K chunk, words per row (K_in/16; a multiple of W)
    kw0, KW,
    # words per chunk (the chunk covers 16*W input channels)
    W: tl.constexpr,
):
    kw = kw0 + tl.arange(0, W)                                        # [W] word index (W divides KW)
    m2 = row_mask[:, None] & (kw >= 0)[None, :]                       # [BN, W] row bounds only
    words = tl.load(w_ptr + rows[:, None] * KW + kw[None, :], mask=m2, other=0)   # [BN, W] int32
    g = kw // 4                                                       # [W] group (64 = 4 words)
    sc = tl.load(s_ptr + rows[:, None] * (KW // 4) + g[None, :], mask=m2, other=0.0).to(tl.float32)
    zb = tl.load(z_ptr + rows[:, None] * (KW // 8) + (g // 2)[None, :], mask=m2, other=0)
    z = ((zb.to(tl.int32) & 0xFF) >> ((g % 2) * 4)[None, :]) & 0xF   # [BN, W]
    sh = tl.arange(0, 16) * 2
    q = ((words[:, :, None] >> sh[None, None, :]) & 3).to(tl.float32)  # [BN, W, 16]
    w = (q - z.to(tl.float32)[:, :, None]) * sc[:, :, None]            # [BN, W, 16]
    return tl.reshape(w, (w.shape[0], W * 16))                          # [BN, 16W]


@triton.jit
def _int2_dequant_kernel(
    # packed weight of one projection, all experts: [E, N, KW] int32, [E, N, KW/4] fp16, [E, N, KW/8] int8
    w_ptr, s_ptr, z_ptr,
    # output [E, N, 16*KW] (fp32 / bf16 / fp16)
    out_ptr,
    # sizes
    N, KW,
    BLOCK_N: tl.constexpr, W: tl.constexpr,
):
    e = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    kw0 = tl.program_id(1) * W
    w_ptr += e.to(tl.int64) * N * KW
    s_ptr += e.to(tl.int64) * N * (KW // 4)
    z_ptr += e.to(tl.int64) * N * (KW // 8)
    w = _int2_tile(w_ptr, s_ptr, z_ptr, rows, rmask, kw0, KW, W)        # [BN, 16W]
    k = kw0 * 16 + tl.arange(0, 16 * W)
    K = KW * 16
    ptrs = out_ptr + e.to(tl.int64) * N * K + rows[:, None] * K + k[None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def check_int2(name: str, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[int, int, int]:
    """Validate one INT2 projection; returns (E, K_out, K_in). Raises ValueError naming the tensor."""
    if packed.dtype not in (torch.uint32, torch.int32):
        raise ValueError(f"kernels.int2: {name}.w_packed must be uint32, got {packed.dtype}")
    if scale.dtype != torch.float16:
        raise ValueError(f"kernels.int2: {name}.w_scale must be float16, got {scale.dtype}")
    if zero.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"kernels.int2: {name}.w_zero_packed must be int8, got {zero.dtype}")
    if packed.dim() != 3:
        raise ValueError(f"kernels.int2: {name}.w_packed must be [E, K_out, K_in/16], got {tuple(packed.shape)}")
    E, N, KW = packed.shape
    K = KW * 16
    if K % 128:
        raise ValueError(f"kernels.int2: {name} K_in={K} must be a multiple of 128")
    if tuple(scale.shape) != (E, N, K // 64):
        raise ValueError(f"kernels.int2: {name}.w_scale shape {tuple(scale.shape)} != {(E, N, K // 64)}")
    if tuple(zero.shape) != (E, N, K // 128):
        raise ValueError(f"kernels.int2: {name}.w_zero_packed shape {tuple(zero.shape)} != {(E, N, K // 128)}")
    for t, what in ((packed, "w_packed"), (scale, "w_scale"), (zero, "w_zero_packed")):
        if not t.is_contiguous():
            raise ValueError(f"kernels.int2: {name}.{what} must be contiguous")
        if t.device != packed.device:
            raise ValueError(f"kernels.int2: {name}.{what} is on {t.device}, w_packed on {packed.device}")
    return E, N, K


def fit_w(w: int, kw: int) -> int:
    """Largest power of two <= w that divides kw (words per row); kernels need W | KW."""
    while kw % w:
        w //= 2
    return w


def fit_split(kw: int, w: int, split: int) -> int:
    """Largest K split <= ``split`` that gives every program the same whole number of ``w``-word steps."""
    split = max(1, min(split, kw // w))
    while (kw // w) % split:
        split -= 1
    return split


def as_int32(packed: torch.Tensor) -> torch.Tensor:
    """Same bits, int32 view (Triton and torch handle int32 everywhere)."""
    return packed.view(torch.int32) if packed.dtype == torch.uint32 else packed


def dequantize_int2(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton dequant of a stacked INT2 projection -> ``[E, K_out, K_in]`` in ``out_dtype``."""
    E, N, K = check_int2("w", packed, scale, zero)
    out = torch.empty((E, N, K), dtype=out_dtype, device=packed.device)
    cfg = dict(dequant_configs()[0])
    cfg["W"] = fit_w(cfg["W"], K // 16)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K // 16, cfg["W"]), E)
    _int2_dequant_kernel[grid](as_int32(packed), scale, zero, out, N, K // 16,
                               BLOCK_N=cfg["BLOCK_N"], W=cfg["W"], num_warps=cfg["num_warps"])
    return out


# ----------------------------------------------------------------------------- torch reference
def unpack_codes_reference(packed: torch.Tensor) -> torch.Tensor:
    """uint32/int32 ``[..., K/16]`` -> uint8 codes ``[..., K]`` (code j of a word at bits 2j)."""
    p = as_int32(packed).to(torch.int64) & 0xFFFFFFFF
    sh = torch.arange(16, device=p.device, dtype=torch.int64) * 2
    q = (p.unsqueeze(-1) >> sh) & 3                                    # [..., K/16, 16]
    return q.reshape(*p.shape[:-1], p.shape[-1] * 16).to(torch.uint8)


def unpack_zeros_reference(zero: torch.Tensor) -> torch.Tensor:
    """int8 ``[..., G/2]`` -> uint8 ``[..., G]`` (group 2i = low nibble)."""
    b = zero.view(torch.uint8).to(torch.int64)
    z = torch.stack([b & 0xF, b >> 4], dim=-1)                          # [..., G/2, 2]
    return z.reshape(*b.shape[:-1], b.shape[-1] * 2).to(torch.uint8)


def dequantize_int2_reference(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Plain-torch fp32 dequant: ``w = (q - z) * s`` -> ``[..., K_out, K_in]``."""
    q = unpack_codes_reference(packed).float()                          # [..., N, K]
    z = unpack_zeros_reference(zero).float().repeat_interleave(GROUP, dim=-1)   # [..., N, K]
    s = scale.float().repeat_interleave(GROUP, dim=-1)                  # [..., N, K]
    return (q - z) * s


def random_int2(E: int, n: int, k: int, device="cpu", generator: torch.Generator | None = None,
                scale: float = 0.02) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic INT2 projection (random codes / positive fp16 scales / zeros 0..15) for tests and benches."""
    if k % 128:
        raise ValueError(f"kernels.int2: K_in={k} must be a multiple of 128")
    kw = dict(device=device, generator=generator)
    packed = torch.randint(-2**31, 2**31 - 1, (E, n, k // 16), dtype=torch.int32, **kw).view(torch.uint32)
    s = (torch.rand((E, n, k // 64), **kw) * 0.5 + 0.75) * scale
    zero = torch.randint(-128, 128, (E, n, k // 128), dtype=torch.int32, **kw).to(torch.int8)
    return packed, s.to(torch.float16), zero
