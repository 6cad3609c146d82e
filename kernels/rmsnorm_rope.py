"""RMSNorm (+ interleaved RoPE) of decode rows in one launch (v4_arch.md sections 2.3, 2.6; the
decode-step twin of ``model.linear.RMSNorm`` followed by ``model.rope.apply_rope``).

Per row of ``x [N, D]`` (one program; fp32 math, rounding to x's dtype where torch rounds):

* ``mode 0`` (``RMSNorm``): ``n = (w * (x * rsqrt(mean(x^2) + eps))).to(dtype)``;
* ``mode 1`` (V4's per-head q norm, no weight): ``n = x * rsqrt(mean(x^2) + eps).to(dtype)``;
* ``mode 2``: ``n = x`` (RoPE only, e.g. the inverse RoPE of the attention output with ``-sin``);

then, with ``cos``/``sin [R/2]``, pairs (2i, 2i+1) of the trailing R channels rotate:
``(a, b) -> (a cos - b sin, a sin + b cos)`` on ``n`` in fp32, rounded to x's dtype. The torch
path is 6 kernels for the norm and 3–4 for the RoPE at decode sizes; this is one.

Prefill (``cos``/``sin [S, R/2]``, one row per position): x is ``[B, S, (H,) D]`` and row n takes the
angles of position ``(n // H) % S``. The eager prefill's per-head q norm + RoPE was an fp32 copy, pow,
mean, rsqrt, cast, multiply and the RoPE's slices (~1.6 GB of traffic per layer at 2K tokens); here one
read and one write of q (``out=x``: in place -- every program reads its whole row before writing it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_args, pdl_wait


@triton.jit
def _rmsnorm_rope_kernel(x_ptr, x_stride, w_ptr, cos_ptr, sin_ptr, out_ptr, out_stride, slot_ptr, eps,
                         cs_stride, rows_per_pos, npos, D: tl.constexpr, HALF_B: tl.constexpr, MODE: tl.constexpr, ROPE: tl.constexpr,
                         SCATTER: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    n = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = D // 2
    p = tl.arange(0, HALF_B)
    m = p < HALF
    xr = x_ptr + n * x_stride
    xe = tl.load(xr + 2 * p, mask=m, other=0.0)
    xo = tl.load(xr + 2 * p + 1, mask=m, other=0.0)
    dt = xe.dtype
    fe = xe.to(tl.float32)
    fo = xo.to(tl.float32)
    if MODE == 0:
        rs = tl.rsqrt((tl.sum(fe * fe, axis=0) + tl.sum(fo * fo, axis=0)) / D + eps)
        fe = (tl.load(w_ptr + 2 * p, mask=m, other=0.0) * (fe * rs)).to(dt).to(tl.float32)
        fo = (tl.load(w_ptr + 2 * p + 1, mask=m, other=0.0) * (fo * rs)).to(dt).to(tl.float32)
    elif MODE == 1:
        rs = tl.rsqrt((tl.sum(fe * fe, axis=0) + tl.sum(fo * fo, axis=0)) / D + eps).to(dt).to(tl.float32)
        fe = (fe * rs).to(dt).to(tl.float32)
        fo = (fo * rs).to(dt).to(tl.float32)
    if ROPE > 0:
        NOPE: tl.constexpr = HALF - ROPE // 2
        isr = (p >= NOPE) & m
        q = tl.where(isr, p - NOPE, 0)
        cs_row = ((n // rows_per_pos) % npos) * cs_stride                 # 0 with one shared row (decode)
        cs = tl.load(cos_ptr + cs_row + q, mask=isr, other=1.0)
        sn = tl.load(sin_ptr + cs_row + q, mask=isr, other=0.0)
        re = fe * cs - fo * sn
        ro = fe * sn + fo * cs
        fe = re
        fo = ro
    if SCATTER:   # row n goes to out[n, slot, :] of a [N, S, D] buffer (slot read on the device)
        orow = out_ptr + n * out_stride + tl.load(slot_ptr) * D
    else:
        orow = out_ptr + n * out_stride
    tl.store(orow + 2 * p, fe.to(dt), mask=m)
    tl.store(orow + 2 * p + 1, fo.to(dt), mask=m)


def rmsnorm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, mode: int = 0,
                 scatter_to: tuple[torch.Tensor, torch.Tensor] | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., D] (rows with unit column stride) -> new tensor like x (see the module docstring);
    ``weight [D]`` fp32 for mode 0; ``cos``/``sin [R/2]`` fp32 or None (no RoPE), or ``[S, R/2]`` for x
    ``[B, S, D]`` / ``[B, S, H, D]`` (per-position angles). ``out``: write there instead (x itself allowed).
    ``scatter_to`` = (buf [N, S, D] contiguous in x's dtype, slot int64 [1] on the device): row n is
    written to ``buf[n, slot]`` instead (e.g. the decode step's key into the window ring); returns None."""
    D = x.shape[-1]
    bad = []
    if scatter_to is not None:
        buf, slot = scatter_to
        if (buf.dim() != 3 or buf.shape[2] != D or buf.dtype != x.dtype or not buf.is_contiguous()
                or buf.shape[0] * D != x.numel() or slot.numel() != 1 or slot.dtype != torch.int64):
            bad.append(f"scatter_to buffer {tuple(buf.shape)} {buf.dtype} / slot {tuple(slot.shape)} {slot.dtype} "
                       f"do not fit x {tuple(x.shape)} {x.dtype}")
    if D % 2 or x.stride(-1) != 1:
        bad.append(f"x {tuple(x.shape)} needs an even last dim with unit stride")
    if mode not in (0, 1, 2) or (mode == 0 and (weight is None or weight.numel() != D)):
        bad.append(f"mode {mode} with weight {None if weight is None else tuple(weight.shape)}")
    per_pos = cos is not None and cos.dim() == 2
    if (cos is None) != (sin is None) or (cos is not None and (2 * cos.shape[-1] > D or cos.shape != sin.shape
                                                              or cos.dim() > 2 or not cos.is_contiguous()
                                                              or not sin.is_contiguous())):
        bad.append("cos/sin must both be given, contiguous [R/2] or [S, R/2] with R <= D")
    if per_pos and (x.dim() not in (3, 4) or x.shape[1] != cos.shape[0]):
        bad.append(f"per-position cos/sin {tuple(cos.shape)} need x [B, S, (H,) D] with S = {cos.shape[0]}, "
                   f"got {tuple(x.shape)}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous()
                            or scatter_to is not None):
        bad.append(f"out {tuple(out.shape)} {out.dtype} must be contiguous like x {tuple(x.shape)} {x.dtype}")
    if bad:
        raise ValueError("kernels.rmsnorm_rope: " + "; ".join(bad))
    x2 = x.reshape(-1, D)
    if x2.shape[0] > 1 and x2.stride(0) < D:
        if out is not None and out.data_ptr() == x.data_ptr():
            raise ValueError("kernels.rmsnorm_rope: in place needs x with row stride >= D")
        x2 = x2.contiguous()
    if scatter_to is not None:
        dst, ostride, slot = scatter_to[0], scatter_to[0].stride(0), scatter_to[1]
    else:
        dst = out.view(-1, D) if out is not None else torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        ostride, slot = D, x2
    rope = 0 if cos is None else 2 * cos.shape[-1]
    rows_per_pos = x.shape[2] if per_pos and x.dim() == 4 else 1
    npos = cos.shape[0] if per_pos else 1
    cs_stride = cos.shape[-1] if per_pos else 0
    w = weight if weight is not None else x2
    cs = cos if cos is not None else x2
    sn = sin if sin is not None else x2
    half_b = triton.next_power_of_2(D // 2)
    _rmsnorm_rope_kernel[(x2.shape[0],)](x2, x2.stride(0), w, cs, sn, dst, ostride, slot, float(eps),
                                         cs_stride, rows_per_pos, npos, D=D, HALF_B=half_b, MODE=mode, ROPE=rope, SCATTER=scatter_to is not None,
                                         num_warps=1 if half_b <= 256 else 4, **launch_args(x.device))
    return None if scatter_to is not None else dst.view(x.shape)


def rmsnorm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos=None, sin=None,
                           mode: int = 0) -> torch.Tensor:
    """The torch math of the eager model (RMSNorm / V4 q norm, then ``apply_rope``)."""
    from dsv4lib.model.rope import apply_rope
    xf = x.float()
    if mode == 0:
        y = (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)
    elif mode == 1:
        y = x * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
    else:
        y = x
    if cos is not None:
        y = apply_rope(y, cos.view(1, -1), sin.view(1, -1)) if cos.dim() == 1 else apply_rope(y, cos, sin)
    return y
