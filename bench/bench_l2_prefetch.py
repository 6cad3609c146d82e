"""Does an L2 prefetch during a latency-bound phase make the next 32 MB GEMV faster? (GPU script; prints a table,
writes JSON.)

    python3 bench/bench_l2_prefetch.py --out l2pf.json          # H200: ~1 min
    python3 bench/bench_l2_prefetch.py --smoke --out /tmp/l.json  # tiny shapes, CPU interpreter (no prefetch)

The decode step at batch 1 runs phases where HBM idles (attention core ~14 us, mHC pre ~9-13 us), each followed by a
GEMV streaming 32 MB (``wo_a``, ``wq_b``). Model of one such site, captured in a CUDA graph and replayed over
``--copies`` distinct weights (> 256 MB, so L2 cannot keep them between uses): a spin kernel of ``--phase`` us on
the main stream stands for the latency-bound phase, then the GEMV. Columns, us per site:

- ``cold``: phase, then the GEMV (today's step);
- ``bulk side``: the same with ``kernels.l2_prefetch`` (bulk hints, one warp per 1 MB) forked on a second stream at
  the phase's start, joined after the last site;
- ``bulk inline``: the prefetch launch on the main stream right before the phase (no fork);
- ``warm``: the GEMV alone over one weight again and again (L2-resident: the floor a prefetch can reach);
- ``gemv``: the GEMV alone over the rotated weights (no phase).
Predicted (session 12): ``wo_a`` in the step 12.7 us; from L2 ~6 us, so ``bulk side`` ~= phase + 6.
Measured (H200, `bench/results/h200_l2_prefetch_v15.*`): ``warm`` is 0-13 % below ``cold`` (wo_a 10.1 vs 11.0 us,
wq_b 11.4 vs 11.4, wo_b 9.8 vs 11.3): these GEMVs run at the same ~3 TB/s from L2 as from HBM, so no prefetch can
buy more than that; prefetched sites gained <= 0.7 us after a 9-15 us phase and lost 6 us without one, and the step
with the prefetches forked (session 12's ``L2_PREFETCH`` in model/graphed.py, removed) went b1 4.49 -> 4.60-4.74 ms.
The kernel stays as this script's instrument; the model does not use it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_kernels import us_each  # noqa: E402
from dsv4lib.fullscale import copy_bandwidth, time_cuda  # noqa: E402
from dsv4lib.kernels.fp8_linear import fp8_linear, random_fp8  # noqa: E402
from dsv4lib.kernels.l2_prefetch import l2_prefetch  # noqa: E402

# (name, N, K, groups): V4-Flash's 32 MB projections of the decode step (bench/sweep_fp8.py SHAPES)
SHAPES = [("wo_a (8 groups)", 8192, 4096, 8), ("wq_b", 32768, 1024, 1), ("wo_b", 4096, 8192, 1)]
SMOKE_SHAPES = [("a", 256, 512, 2)]


def _spin(us: float, hz: float):
    if us > 0 and torch.cuda.is_available():
        torch.cuda._sleep(int(us * 1e-6 * hz))


def spin_hz() -> float:
    """The spin kernel's cycles per second (torch.cuda._sleep counts SM clock cycles)."""
    if not torch.cuda.is_available():
        return 1.0
    cyc = 2_000_000
    ms = time_cuda(lambda: torch.cuda._sleep(cyc), 5)
    return cyc / (ms * 1e-3)


def run_shape(name, N, K, G, copies, phases, chunks, reps, dev, hz) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(1)
    ws = [random_fp8(N, K, dev, g) for _ in range(copies)]
    x = torch.randn(1, G, K, device=dev, dtype=torch.bfloat16) if G > 1 else torch.randn(1, K, device=dev,
                                                                                       dtype=torch.bfloat16)
    side = torch.cuda.Stream(dev) if torch.cuda.is_available() else None
    nb = N * K
    rows = []

    def gemv(i):
        w, s = ws[i]
        return fp8_linear(x, w, s, groups=G)

    def sites(phase, mode, chunk):
        def body():
            for i in range(copies):
                if mode == "side" and side is not None:
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        l2_prefetch(ws[i][0], chunk=chunk)
                elif mode == "inline":
                    l2_prefetch(ws[i][0], chunk=chunk)
                _spin(phase, hz)
                gemv(i)
            if mode == "side" and side is not None:
                torch.cuda.current_stream().wait_stream(side)
        return body

    gemv_us = us_each(lambda: [gemv(i) for i in range(copies)], copies, reps)
    warm_us = us_each(lambda: [gemv(0) for _ in range(copies)], copies, reps)
    for phase in phases:
        cold = us_each(sites(phase, "cold", 0), copies, reps)
        phase_only = us_each(lambda: [_spin(phase, hz) for _ in range(copies)], copies, reps) if phase else 0.0
        for chunk in chunks:
            side_us = us_each(sites(phase, "side", chunk), copies, reps)
            inline_us = us_each(sites(phase, "inline", chunk), copies, reps)
            rows.append({"shape": name, "MB": nb / 2**20, "phase_us": phase, "phase_only_us": phase_only,
                         "chunk": chunk, "cold": cold, "bulk_side": side_us, "bulk_inline": inline_us,
                         "gemv": gemv_us, "warm": warm_us})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--phases", type=float, nargs="*", default=[0.0, 8.0, 14.0])
    ap.add_argument("--chunks", type=int, nargs="*", default=[32 << 10])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = SMOKE_SHAPES if a.smoke else SHAPES
    copies = 2 if a.smoke else a.copies
    phases = a.phases[:1] if a.smoke else a.phases
    chunks = [4096] if a.smoke else a.chunks
    reps = 1 if a.smoke else a.reps
    hz = spin_hz()
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "spin_hz": hz,
           "copy_GBps": copy_bandwidth(dev, 1 << 30 if dev == "cuda" else 1 << 20) / 1e9, "rows": []}
    for name, N, K, G in shapes:
        res["rows"] += run_shape(name, N, K, G, copies, phases, chunks, reps, dev, hz)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{res['device']}  copy {res['copy_GBps']:.0f} GB/s  (us per site; phase = spin kernel before the GEMV)")
    print(f"{'shape':<16}{'MB':>5}{'phase':>7}{'chunk':>8}{'cold':>8}{'side':>8}{'inline':>8}{'gemv':>8}{'warm':>8}")
    for r in res["rows"]:
        print(f"{r['shape']:<16}{r['MB']:>5.0f}{r['phase_only_us']:>7.1f}{r['chunk'] >> 10:>7}K{r['cold']:>8.2f}"
              f"{r['bulk_side']:>8.2f}{r['bulk_inline']:>8.2f}{r['gemv']:>8.2f}{r['warm']:>8.2f}")
    return res


if __name__ == "__main__":
    main()
