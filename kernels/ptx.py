"""Single PTX instructions for Triton kernels, with their exact emulation for the CPU interpreter.

Triton's interpreter (``TRITON_INTERPRET=1``, the CI) cannot run inline assembly, so each helper takes
the ``inline_asm_elementwise`` path when compiled and an integer emulation of the instruction's
documented semantics (PTX ISA, "Integer Arithmetic Instructions: dp4a / dp2a") otherwise. The choice is
the module constant ``ASM``, fixed at import from the environment: one kernel source, the emulation only
stands in for the one instruction. ``tests/test_kernels_ptx.py`` checks the emulation against a torch
reference; the GPU tests and the offline sm_90 compile test cover the assembly.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def dp4a_us(a, b, c):
    """``c + sum_i u8(a, i) * s8(b, i)`` over the 4 bytes of int32 ``a`` (unsigned) and ``b`` (signed)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for i in tl.static_range(4):
            r += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return r


@triton.jit
def dp2a_us(a, b, c, HI: tl.constexpr):
    """``c + s16(a, 0) * u8(b, j) + s16(a, 1) * u8(b, j + 1)``, j = 2 if ``HI`` else 0 (``dp2a.lo/hi.s32.u32``)."""
    if ASM:
        if HI:
            return tl.inline_asm_elementwise("dp2a.hi.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("dp2a.lo.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        j: tl.constexpr = 2 if HI else 0
        lo = (a << 16) >> 16
        hi = a >> 16
        return c + lo * ((b >> (8 * j)) & 0xFF) + hi * ((b >> (8 * j + 8)) & 0xFF)


@triton.jit
def codes_f16x2(s, zz, ss):
    """Two INT2 codes at bits [0, 2) and [16, 18) of int32 ``s`` -> fp16 ``((1024 + q) - zh) * sh`` each,
    where ``zz`` / ``ss`` hold the fp16 pair (zh, zh) / (sh, sh) as int32 bits: one ``lop3`` (mask |
    0x6400 exponent, both halves), ``sub.rn.f16x2`` (exact for 1024 + q - (1024 + z)) and
    ``mul.rn.f16x2`` (one rounding, as an fp16 multiply). Returns (low code, high code)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 r; lop3.b32 r, $2, 0x30003, 0x64006400, 0xEA; sub.rn.f16x2 r, r, $3; "
            "mul.rn.f16x2 r, r, $4; mov.b32 {$0, $1}, r; }",
            "=h,=h,r,r,r", [s, zz, ss], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        t = (s & 0x30003) | 0x64006400
        zh = zz.to(tl.int16).to(tl.float16, bitcast=True)
        sh = ss.to(tl.int16).to(tl.float16, bitcast=True)
        lo = ((t & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True) - zh) * sh
        hi = ((t >> 16).to(tl.int16).to(tl.float16, bitcast=True) - zh) * sh
        return lo, hi
