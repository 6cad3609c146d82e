"""Timing helpers shared by the decode micro-benchmarks (GPU): per-call time of a CUDA graph of back-to-back calls,
and each kernel's GPU time per launch from the torch profiler."""
from __future__ import annotations

import torch


def graph_us(fn, calls: int, reps: int) -> float:
    """Median microseconds per call of ``fn(i)`` for i in range(calls), captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / calls)
    ts.sort()
    return ts[len(ts) // 2]


def kernel_us(fn, calls: int) -> dict:
    """Average GPU microseconds per launch of each kernel over ``calls`` eager calls (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    tot: dict = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            t = tot.setdefault(e.name, [0.0, 0])
            t[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            t[1] += 1
    return {k: round(v[0] / v[1], 2) for k, v in tot.items() if v[1] >= calls}
