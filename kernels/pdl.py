"""Programmatic dependent launch (PDL, sm_90+) for the decode step's Triton kernels.

A kernel launched with ``launch_pdl=True`` may be scheduled while the kernel before it on the stream is
still running (CUDA graphs capture this as a programmatic edge): its launch latency and prologue overlap
the predecessor's tail instead of following it. Every PDL kernel here starts with :func:`pdl_wait`
before its first global memory access -- ``griddepcontrol.wait`` returns once the predecessor has
completed and its writes are visible -- and then releases its own dependents
(``griddepcontrol.launch_dependents``), so the next kernel's programs can be made resident early.
Semantics are those of plain stream order; only the gaps shrink. Kernels whose weights no predecessor
writes start on them before the wait: the router loads its weight rows, the mHC pre prefetches its
mixing weights to L2, the INT2 decode kernels load their first K step and the expert index (written by the router
two launches back: a launch is made resident only after all programs of its predecessor passed their own wait, so
the launch before that has completed). The same for the FP8 GEMV's weight slice measured slower on the H200 in two
sessions (b1 step 6.04 -> 6.42 ms, then 6.07 -> 6.37; b8 14.22 -> 14.64: early-resident programs
prefetching whole slices compete with the running kernel for bandwidth) and was removed.

``ENABLED`` switches it (the bench times both); off the GPU or below sm_90 the kernels compile without it
(``PDL=False``: the CPU interpreter never sees the inline PTX).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ENABLED = True       # H200, 2026-11-29 (bench "PDL toggled" column): b1 6.72 -> 6.50 ms, b8 15.01 -> 14.04 ms

_CAPABLE: dict = {}
# Triton >= 3.3 has griddepcontrol (tl.extra.cuda.gdc_*) and the launch_pdl option; older ones run without PDL
_TRITON_HAS_GDC = hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a PDL-aware kernel launch on ``device``: ``PDL`` (constexpr) and, when on,
    Triton's ``launch_pdl`` launch option."""
    device = torch.device(device)
    if not ENABLED or device.type != "cuda" or not _TRITON_HAS_GDC:
        return {"PDL": False}
    if device not in _CAPABLE:
        _CAPABLE[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if _CAPABLE[device] else {"PDL": False}


@triton.jit
def prefetch_l2(ptrs):
    """L2 prefetch hint (``prefetch.global.L2``) for every address of the pointer tensor ``ptrs`` (valid
    addresses only: the caller clamps masked lanes). GPU only -- callers guard it with ``PDL``."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """First statement of a PDL-aware kernel: wait for the predecessor, then let the successor launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
