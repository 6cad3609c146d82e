"""L2 prefetch of a weight's bytes with the Hopper bulk-copy engine (``cp.async.bulk.prefetch.L2``).

The decode step has phases where HBM idles -- the attention core and the mHC pre are latency-bound launches over a
few MB -- each followed by a GEMV that streams 32 MB (``wo_a`` after the attention core, ``wq_b`` after the mHC pre
and ``wq_a``). Issued on another stream at the start of such a phase, this launch asks the memory system to bring
the GEMV's weight into L2 (50 MB on the H200) while the phase runs; the GEMV then reads it from L2.

Session 9 tried the same with one ``prefetch.global.L2`` hint per 128-byte line: 256 programs of 4 warps for 32 MB,
which held the SMs the latency-bound phase needed and made the step slower (kernels/BENCHMARKS.md "Ninth
session"). Here one instruction hints a whole ``CHUNK`` (default 32 KB) and the copy engine walks it: a 32 MB
weight is 32 one-warp programs that exit right after issuing. A prefetch is only a hint: nothing is written, no
register waits for the data, results cannot change.

Measured (H200, session 12, bench/bench_l2_prefetch.py): refuted again, and why -- the 32 MB GEMVs run at about the
same rate from L2 as from HBM (an L2-resident weight 0-13 % faster), and the step with the prefetches forked was
slower (b1 4.49 -> 4.60-4.74 ms). The model does not use this kernel; it stays as that script's instrument.

``_l2_bulk_prefetch_kernel``, grid ``cdiv(nbytes, LANES * CHUNK)``: lane l of program p hints bytes
``[(p LANES + l) CHUNK, ... + CHUNK)`` clipped to ``nbytes``. ``RECORD`` (tests) writes each lane's (offset, size)
to ``rec`` instead, so the CPU interpreter -- which cannot run the PTX -- checks the addressing: every byte of the
range exactly once, nothing past its end, 16-byte granules (the instruction's alignment rule).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 32 << 10    # bytes per hint (a multiple of 16)
LANES = 32          # hints per program (one warp)


@triton.jit
def _l2_bulk_prefetch_kernel(base_ptr, nbytes, rec_ptr, CHUNK: tl.constexpr, LANES: tl.constexpr,
                             RECORD: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    off = i * CHUNK
    size = tl.minimum(nbytes - off, CHUNK)
    ok = size > 0
    if RECORD:
        tl.store(rec_ptr + 2 * i, tl.where(ok, off, -1))
        tl.store(rec_ptr + 2 * i + 1, tl.where(ok, size, 0))
    else:
        ptrs = base_ptr + tl.where(ok, off, 0)
        sz = tl.where(ok, size, 16).to(tl.int32)                         # idle lanes re-hint the first granule
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                  [ptrs, sz], dtype=tl.int32, is_pure=False, pack=1)


def l2_prefetch(t: torch.Tensor, max_bytes: int | None = None, record: bool = False,
                chunk: int = CHUNK) -> torch.Tensor | None:
    """Hint the first ``max_bytes`` (all if None) of contiguous ``t``'s bytes into L2 (CUDA, sm_90+; elsewhere a
    no-op). ``record``: launch on any device and return the hinted ``[offset, size]`` pairs instead (int64
    ``[programs * LANES, 2]``, ``[-1, 0]`` for idle lanes; the tests)."""
    if not t.is_contiguous():
        raise ValueError(f"kernels.l2_prefetch: the tensor must be contiguous, got strides {t.stride()}")
    if chunk <= 0 or chunk % 16:
        raise ValueError(f"kernels.l2_prefetch: chunk must be a positive multiple of 16 bytes, got {chunk}")
    nbytes = t.numel() * t.element_size()
    if max_bytes is not None:
        nbytes = min(nbytes, int(max_bytes))
    nbytes -= nbytes % 16                                                # whole 16-byte granules only
    if nbytes <= 0:
        return torch.empty(0, 2, dtype=torch.int64, device=t.device) if record else None
    if not record and not (t.is_cuda and torch.cuda.get_device_capability(t.device) >= (9, 0)):
        return None
    base = t.view(-1).view(torch.uint8)
    if base.data_ptr() % 16:
        raise ValueError("kernels.l2_prefetch: the tensor's storage must be 16-byte aligned")
    grid = triton.cdiv(nbytes, LANES * chunk)
    rec = torch.empty(grid * LANES, 2, dtype=torch.int64, device=t.device) if record else base   # not written
    _l2_bulk_prefetch_kernel[(grid,)](base, nbytes, rec, CHUNK=chunk, LANES=LANES, RECORD=record, num_warps=1)
    return rec if record else None
