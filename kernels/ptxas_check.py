"""Does ptxas keep a kernel's wgmma instructions asynchronous? (tooling for the tests and the profiler)

ptxas may *serialise* every ``wgmma.mma_async`` of a function -- wait for each one before the next
instruction -- and say so only as an info line (``C7515 Potential Performance Loss: wgmma.mma_async
instructions are serialized due to ...``). The kernel stays correct and silently loses the overlap of
MMA with everything else. Seen here (2026-11-29): a zero-trip path around the K loop where LLVM
re-zeroes the accumulators (``int2_moe_prefill``; fixed with ``tl.assume(KW > 0)``), and register-A
tiles built right before each dot in K steps of 64. Triton's TTGIR shows ``pendings > 0`` either way.
"""
from __future__ import annotations

import os
import subprocess
import tempfile


def ptxas_path() -> str | None:
    """Triton's bundled ptxas (the one its compiler runs), or None."""
    try:
        from triton import knobs
        return knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - older/newer Triton layouts: no check
        return None


def wgmma_serialized(ptx: str, arch: str = "sm_90a") -> str:
    """The reason ptxas gives for serialising the wgmma instructions of ``ptx`` ("" when it does not, or when the
    PTX has no wgmma / no ptxas is available)."""
    exe = ptxas_path()
    if "wgmma.mma_async" not in ptx or not exe:
        return ""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, timeout=300)
    for line in (r.stdout + r.stderr).splitlines():
        if "C7515" in line:
            return line.split("serialized due to", 1)[-1].strip()[:200]
    return ""
