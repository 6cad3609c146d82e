"""MXFP4 (e2m1 + E8M0 per 1x32) dequantisation and the routed-expert MoE built on it.

Layout (v4_arch.md section 3.3): ``packed`` uint8/int8 ``[..., out, in/2]``, byte k of a row holds
elements 2k (low nibble) and 2k+1 (high nibble); nibble code -> value: 0..7 = {0, .5, 1, 1.5, 2, 3,
4, 6}, bit 3 = sign; ``scale`` uint8 E8M0 ``[..., out, in/32]``: ``W = code * 2^(s - 127)``.

``dequantize_mxfp4`` is a Triton kernel (one program per ``[BLOCK_N, 32*BLOCK_G]`` tile) writing
bf16/fp16/fp32. ``mxfp4_moe`` is the BF16-equivalent baseline for the upstream experts: it finds
the routed experts (one host sync), dequantises only those with the kernel, and runs the same MoE
math as the INT2 kernels with torch matmuls (fp32 accumulation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def mxfp4_configs() -> list[dict]:
    return [dict(BLOCK_N=32, BLOCK_G=8, num_warps=4)]


@triton.jit
def _mxfp4_dequant_kernel(
    # packed [R, K/2] uint8 (R = all rows of all experts), scales [R, K/32] uint8
    p_ptr, s_ptr,
    # output [R, K]
    out_ptr,
    # sizes: rows, K/32 scale groups per row
    R, G,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    rm = rows < R
    gm = gs < G
    m2 = rm[:, None] & gm[None, :]
    b = tl.arange(0, 16)                                                 # byte within a 32-group
    rows64 = rows.to(tl.int64)
    byt = tl.load(p_ptr + rows64[:, None, None] * (G * 16) + (gs * 16)[None, :, None] + b[None, None, :],
                  mask=m2[:, :, None], other=0).to(tl.int32) & 0xFF      # [BN, BG, 16]
    sc = tl.load(s_ptr + rows64[:, None] * G + gs[None, :], mask=m2, other=127).to(tl.int32) & 0xFF
    scale = tl.where(sc == 0, 5.877471754111438e-39, ((sc << 23).to(tl.float32, bitcast=True)))  # 2^(s-127)
    nib = tl.join(byt & 0xF, byt >> 4)                                   # [BN, BG, 16, 2]: low first
    mag = nib & 7
    ex = mag >> 1
    man = (mag & 1).to(tl.float32)
    val = tl.where(ex == 0, 0.5 * man, (1.0 + 0.5 * man) * tl.exp2((ex - 1).to(tl.float32)))
    val = tl.where((nib & 8) != 0, -val, val) * scale[:, :, None, None]
    val = tl.reshape(val, (BLOCK_N, BLOCK_G * 32))
    k = tl.program_id(1) * BLOCK_G * 32 + tl.arange(0, BLOCK_G * 32)
    tl.store(out_ptr + rows64[:, None] * (G * 32) + k[None, :], val.to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & (k < G * 32)[None, :])


def _check(packed: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    if packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"kernels.mxfp4: packed must be uint8/int8, got {packed.dtype}")
    if scale.dtype != torch.uint8 and str(scale.dtype) != "torch.float8_e8m0fnu":
        raise ValueError(f"kernels.mxfp4: scale must be uint8 / float8_e8m0fnu, got {scale.dtype}")
    K = packed.shape[-1] * 2
    if K % 32 or tuple(scale.shape) != (*packed.shape[:-1], K // 32):
        raise ValueError(f"kernels.mxfp4: scale shape {tuple(scale.shape)} does not match packed {tuple(packed.shape)}")
    if not (packed.is_contiguous() and scale.is_contiguous()):
        raise ValueError("kernels.mxfp4: packed and scale must be contiguous")
    return packed.numel() // packed.shape[-1], K


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton dequant ``[..., out, in/2]`` + ``[..., out, in/32]`` -> ``[..., out, in]`` in ``out_dtype``."""
    R, K = _check(packed, scale)
    out = torch.empty((*packed.shape[:-1], K), dtype=out_dtype, device=packed.device)
    cfg = mxfp4_configs()[0]
    grid = (triton.cdiv(R, cfg["BLOCK_N"]), triton.cdiv(K // 32, cfg["BLOCK_G"]))
    _mxfp4_dequant_kernel[grid](packed.view(torch.uint8), scale.view(torch.uint8), out, R, K // 32,
                                BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], num_warps=cfg["num_warps"])
    return out


def mxfp4_moe(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
              w1: torch.Tensor, w1_scale: torch.Tensor, w3: torch.Tensor, w3_scale: torch.Tensor,
              w2: torch.Tensor, w2_scale: torch.Tensor, limit: float,
              dequant=dequantize_mxfp4, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Routed-expert MoE with MXFP4 stacked weights (w1/w3 ``[E, I, D/2]``, w2 ``[E, D, I/2]``) -> fp32 ``[T, D]``."""
    T, k = idx.shape
    xf = x.float()
    y = torch.zeros((T, x.shape[1]), dtype=torch.float32, device=x.device)
    experts = torch.unique(idx)                                          # one host sync
    for e in experts.tolist():
        t, j = (idx == e).nonzero(as_tuple=True)
        a1 = dequant(w1[e], w1_scale[e], dtype)                          # [I, D]
        a3 = dequant(w3[e], w3_scale[e], dtype)
        a2 = dequant(w2[e], w2_scale[e], dtype)                          # [D, I]
        xt = xf[t].to(a1.dtype)
        g = (xt @ a1.T).float().clamp(max=limit)
        u = (xt @ a3.T).float().clamp(-limit, limit)
        h = torch.nn.functional.silu(g) * u * weight[t, j].float()[:, None]
        y.index_add_(0, t, (h.to(a2.dtype) @ a2.T).float())
    return y


# ----------------------------------------------------------------------------- torch reference
def dequantize_mxfp4_reference(packed: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain torch: nibble table lookup times ``2^(s-127)``."""
    b = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)   # [..., K]
    table = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32, device=b.device)
    s = torch.exp2(scale.view(torch.uint8).float() - 127.0).repeat_interleave(32, dim=-1)
    return (table[codes] * s).to(out_dtype)


def mxfp4_moe_reference(x, idx, weight, w1, w1_scale, w3, w3_scale, w2, w2_scale, limit: float) -> torch.Tensor:
    """fp32 torch reference of ``mxfp4_moe``."""
    return mxfp4_moe(x, idx, weight, w1, w1_scale, w3, w3_scale, w2, w2_scale, limit,
                     dequant=dequantize_mxfp4_reference, dtype=torch.float32)


def random_mxfp4(*shape: int, device="cpu", generator: torch.Generator | None = None):
    """Synthetic MXFP4 tensor ``[..., out, in]`` -> (packed uint8 [..., in/2], scale uint8 [..., in/32])."""
    *lead, n, k = shape
    packed = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, device=device, generator=generator)
    scale = torch.randint(118, 124, (*lead, n, k // 32), dtype=torch.uint8, device=device, generator=generator)
    return packed, scale
