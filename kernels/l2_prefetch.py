"""L2 prefetch of a weight's bytes: one short launch of ``prefetch.global.L2::evict_last`` hints.

The decode step has phases where HBM idles -- the attention core, the mHC pre and the router are
latency-bound launches over a few MB -- followed by GEMVs that stream tens of MB (``wo_a``, 32 MB at
V4-Flash shapes). Issued on a third stream at the start of such a phase, this kernel asks the memory system
to bring the next GEMV's weight into L2 (50 MB on the H100/H200) while the phase runs; the GEMV then reads
what arrived from L2. A prefetch is only a hint: no register waits for the data, the programs exit after
issuing, nothing is written, and results cannot change (the model's tests compare the step with and
without it bit for bit).

``_l2_prefetch_kernel``, grid ``cdiv(lines, LINES)``: program p hints the 128-byte lines
``[p * LINES, (p + 1) * LINES)`` of ``[base, base + nbytes)``. ``RECORD`` (tests) writes each line's byte
offset to ``rec`` instead, so the CPU interpreter -- which cannot run the inline PTX -- checks the
addressing: every line of the range exactly once, none past its end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LINE = 128          # bytes per L2 line (and per hint)
LINES = 1024        # lines per program: 128 KB; 256 programs for a 32 MB weight


@triton.jit
def _l2_prefetch_kernel(base_ptr, nbytes, rec_ptr, LINES: tl.constexpr, LINE: tl.constexpr,
                        RECORD: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    off = (p * LINES + tl.arange(0, LINES)) * LINE                       # [LINES] byte offsets
    ok = off < nbytes
    if RECORD:
        tl.store(rec_ptr + p * LINES + tl.arange(0, LINES), tl.where(ok, off, -1))
    else:
        ptrs = base_ptr + tl.where(ok, off, 0)                           # masked lanes re-hint line 0
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)


def l2_prefetch(t: torch.Tensor, max_bytes: int | None = None, record: bool = False) -> torch.Tensor | None:
    """Hint the first ``max_bytes`` (all if None) of contiguous ``t``'s bytes into L2 (CUDA). ``record``: return
    the byte offset of every line the launch covers instead (int64, -1 past the end; any device: the tests)."""
    if not t.is_contiguous():
        raise ValueError(f"kernels.l2_prefetch: the tensor must be contiguous, got strides {t.stride()}")
    nbytes = t.numel() * t.element_size()
    if max_bytes is not None:
        nbytes = min(nbytes, int(max_bytes))
    if nbytes <= 0:
        return torch.empty(0, dtype=torch.int64, device=t.device) if record else None
    grid = triton.cdiv(triton.cdiv(nbytes, LINE), LINES)
    base = t.view(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.view(-1)
    if not record and not t.is_cuda:
        return None
    rec = torch.empty(grid * LINES, dtype=torch.int64, device=t.device) if record else base   # not written
    _l2_prefetch_kernel[(grid,)](base, nbytes, rec, LINES=LINES, LINE=LINE, RECORD=record, num_warps=4)
    return rec if record else None
