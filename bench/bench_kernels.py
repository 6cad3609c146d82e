"""Kernel benchmarks at V4-Flash shapes (GPU script): prints a table, writes JSON to --out.

    python bench/bench_kernels.py --out results.json            # on a CUDA machine
    python bench/bench_kernels.py --smoke --out /tmp/s.json     # tiny shapes, CPU interpreter
    python bench/bench_kernels.py --prefill-only [--no-sweep] --out p.json   # INT2 prefill only

Measures (kernels/BENCHMARKS.md explains each number):
* device-to-device copy bandwidth (bytes read + written), the ceiling for the ratios below;
* INT2 MoE decode over 43 DISTINCT layers' weights (CUDA-graph replay, so L2 cannot hold them):
  achieved GB/s of routed-expert weight bytes, for 1 / 3 / 16 tokens, a config sweep, the
  dequantise-then-matmul baseline;
* FP8 GEMV at the attention shapes (weights rotated through > 256 MB), vs the torch path;
* INT2 prefill grouped GEMM (E=256) at 2048 and 6144 tokens: per-launch config sweep, TFLOP/s of the
  kernels vs a torch bf16 matmul of the same logical shapes (``--prefill-only``; the first version's
  numbers are in kernels/BENCHMARKS.md, its code was removed);
* MXFP4 MoE (dequantise + bf16 matmul) for one decode token.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dsv4lib.fullscale import copy_bandwidth, time_cuda  # noqa: E402  (one timer and copy ceiling for all benchmarks)
from dsv4lib.kernels.fp8_linear import fp8_configs, fp8_linear, fp8_linear_reference, pick_config, random_fp8  # noqa: E402
from dsv4lib.kernels.int2_dequant import dequantize_int2, random_int2  # noqa: E402
from dsv4lib.kernels.int2_moe_decode import decode_configs, int2_moe_decode, int2_moe_reference  # noqa: E402
from dsv4lib.kernels.int2_moe_prefill import (GemmConfig, PrefillConfig, align_pairs, int2_moe_prefill,  # noqa: E402
                                              launch_down, launch_gate_up,
                                              pick_prefill_config)
from dsv4lib.kernels.mxfp4 import mxfp4_moe, random_mxfp4  # noqa: E402

INT2_BYTES_PER_WEIGHT = 0.25 + 2 / 64 + 1 / 128       # codes + fp16 scale + 4-bit zero, per weight


def timed(fn, reps: int, graph: bool) -> float:
    """Median seconds per call of fn (CUDA-graph replay when graph=True)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    fn()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    return time_cuda(run, reps, warmup=1) / 1e3                          # median ms -> s


def us_each(body, count: int, reps: int) -> float:
    """us per item of ``body()`` (which does ``count`` items: sites, rotated weight copies, launches), replayed from
    one CUDA graph (host clock on CPU)."""
    return timed(body, reps, graph=True) * 1e6 / count


class Int2Layers:
    """L distinct layers of synthetic INT2 experts, stored as one stacked tensor per projection."""

    def __init__(self, L, E, D, I, dev, seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        self.L, self.E, self.D, self.I = L, E, D, I
        self.w1 = random_int2(L * E, I, D, dev, g)
        self.w3 = random_int2(L * E, I, D, dev, g)
        self.w2 = random_int2(L * E, D, I, dev, g)

    def layer(self, l):
        sl = slice(l * self.E, (l + 1) * self.E)
        return [t[sl] for p in (self.w1, self.w3, self.w2) for t in p]

    def expert_bytes(self):
        return 3 * self.D * self.I * INT2_BYTES_PER_WEIGHT


def routing(T, E, k, dev, seed, shared=False):
    g = torch.Generator().manual_seed(seed)
    if shared:
        pool = torch.randperm(E, generator=g)[:k]
        idx = torch.stack([pool[torch.randperm(k, generator=g)] for _ in range(T)])
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return idx.to(dev), (torch.rand(T, k, generator=g) + 0.25).to(dev)


def time_decode(layers: Int2Layers, weights, xs, T, shared, cfg, reps, seed, use_dot=False, half=False,
                fn=None) -> dict:
    """One INT2 decode case over all L layers (CUDA-graph replay): us per layer, GB/s of the distinct
    experts' bytes, and the layer-0 error against the fp32 torch reference. ``fn``: the kernel to time,
    called as ``fn(x, idx, weight, *w1, *w3, *w2, limit)`` (default: ``int2_moe_decode`` with cfg / use_dot / half)."""
    if fn is None:
        def fn(*args):
            return int2_moe_decode(*args, config=cfg, use_dot=use_dot, half=half)
    L, dev = layers.L, xs.device
    routes = [routing(T, layers.E, 6, dev, seed + l, shared) for l in range(L)]
    distinct = sum(torch.unique(r[0]).numel() for r in routes)
    ref = int2_moe_reference(xs[0, :T], *routes[0], *weights[0], 10.0)
    y = fn(xs[0, :T], *routes[0], *weights[0], 10.0)
    t = timed(lambda: [fn(xs[l, :T], *routes[l], *weights[l], 10.0) for l in range(L)], reps, graph=True)
    return dict(us_per_layer=t / L * 1e6, GBps=distinct * layers.expert_bytes() / t / 1e9,
                distinct_experts_per_layer=distinct / L, rel_err=((y - ref).norm() / ref.norm()).item())


def bench_decode(res, layers: Int2Layers, dev, reps, sweep, quick=False):
    L, D = layers.L, layers.D
    xs = torch.randn(L, 16, D, device=dev, dtype=torch.bfloat16)
    weights = [layers.layer(l) for l in range(L)]
    rows = []

    def run_case(T, shared, use_dot, cfg, seed=0):
        # the fp32 CUDA-core loop and the dot path (bench/bench_int2_half.py times the fp16 loop, the default)
        r = dict(T=T, shared=shared, use_dot=use_dot, cfg=repr(cfg),
                 **time_decode(layers, weights, xs, T, shared, cfg, reps, seed, use_dot=use_dot))
        print(f"  decode T={T} shared={shared} dot={use_dot} {r['us_per_layer']:8.2f} us/layer "
              f"rel {r['rel_err']:.1e} {cfg}", flush=True)
        return r

    cands = decode_configs(False) if sweep else decode_configs(False)[:1]
    sweep_rows = [run_case(1, False, False, c) for c in cands]
    best = min((r for r in sweep_rows if r["rel_err"] < 1e-4), key=lambda r: r["us_per_layer"])
    res["decode_sweep_T1"] = sweep_rows
    best_cfg = cands[sweep_rows.index(best)]
    rows.append(dict(best, case="T=1"))
    if quick:
        dcands = decode_configs(True)
        dot_rows = [run_case(16, True, True, c) for c in dcands]
        res["decode_sweep_T16_shared"] = dot_rows
        best_dot = min((r for r in dot_rows if r["rel_err"] < 3e-3), key=lambda r: r["us_per_layer"])
        rows.append(dict(best_dot, case="T=16, all share 6 experts"))
        rows.append(dict(run_case(1, False, False, cands[0]), case="T=1 default again (spread)"))
        res["decode"] = rows
        return best_cfg, dcands[dot_rows.index(best_dot)]
    rows.append(dict(run_case(3, False, False, best_cfg), case="T=3 distinct (CUDA-core path)"))
    dcands = decode_configs(True) if sweep else decode_configs(True)[:1]
    dot_rows = [run_case(16, True, True, c) for c in dcands]
    res["decode_sweep_T16_shared"] = dot_rows
    best_dot = min((r for r in dot_rows if r["rel_err"] < 3e-3), key=lambda r: r["us_per_layer"])
    bd = dcands[dot_rows.index(best_dot)]
    rows.append(dict(best_dot, case="T=16, all share 6 experts"))
    rows.append(dict(run_case(16, True, False, best_cfg), case="T=16 shared, CUDA-core path"))
    rows.append(dict(run_case(3, False, True, bd), case="T=3 distinct (dot path)"))
    rows.append(dict(run_case(1, False, True, bd), case="T=1 (dot path)"))
    rows.append(dict(run_case(4, True, True, bd), case="T=4, all share 6 experts (dot)"))
    rows.append(dict(run_case(1, False, False, best_cfg), case="T=1 again (timing spread)"))
    res["decode"] = rows
    res["decode_best_config"] = dict(ew=repr(best_cfg), dot=repr(bd))
    return best_cfg, bd


def bench_decode_random256(res, layers: Int2Layers, dev, reps, cfg_dot, cfg_ew):
    """T=16 with independent routing over all 256 experts: bytes grow with distinct experts."""
    L, D = layers.L, layers.D
    weights = [layers.layer(l) for l in range(L)]
    xs = torch.randn(L, 16, D, device=dev, dtype=torch.bfloat16)
    out = []
    for T, use_dot, cfg in ((1, False, cfg_ew), (16, True, cfg_dot), (16, False, cfg_ew)):
        # the fp32 CUDA-core loop and the dot path (bench/bench_int2_half.py times the fp16 loop, the default)
        out.append(dict(T=T, use_dot=use_dot, layers=L,
                        **time_decode(layers, weights, xs, T, False, cfg, reps, 100, use_dot=use_dot)))
    res["decode_random256"] = out


def bench_dequant_matmul_decode(res, layers: Int2Layers, dev, reps):
    """Baseline: gather the 6 routed experts, dequantise to bf16 (Triton), bf16 matmuls (one layer)."""
    w = layers.layer(0)
    x = torch.randn(1, layers.D, device=dev, dtype=torch.bfloat16)
    idx, wt = routing(1, layers.E, 6, dev, 7)
    e = idx[0]

    w = [t.view(torch.int32) if t.dtype == torch.uint32 else t for t in w]   # uint32 has no CUDA gather

    def fn():
        a1 = dequantize_int2(w[0][e], w[1][e], w[2][e])                  # [6, I, D] bf16
        a3 = dequantize_int2(w[3][e], w[4][e], w[5][e])
        a2 = dequantize_int2(w[6][e], w[7][e], w[8][e])                  # [6, D, I]
        g = torch.bmm(a1, x.T.expand(6, -1, -1).contiguous()).float().clamp(max=10.0)
        u = torch.bmm(a3, x.T.expand(6, -1, -1).contiguous()).float().clamp(-10.0, 10.0)
        h = (torch.nn.functional.silu(g) * u * wt[0][:, None, None]).to(torch.bfloat16)
        return torch.bmm(a2, h).float().sum(0)

    t = timed(fn, reps, graph=True)
    res["decode_dequant_then_matmul_T1_us"] = t * 1e6


def bench_fp8(res, dev, reps, sweep, copy_gbps):
    shapes = [("wq_a", 1024, 4096, 1), ("wq_b", 32768, 1024, 1), ("wkv", 512, 4096, 1),
              ("wo_a (8 groups)", 1024, 4096, 8), ("wo_b", 4096, 8192, 1)]
    rows = []
    for name, N, K, groups in shapes:
        nbytes = N * K * groups
        copies = max(2, -(-256 * 2**20 // nbytes))
        g = torch.Generator(device=dev).manual_seed(N)
        ws = [random_fp8(N, K, dev, g) for _ in range(min(copies, 64) * groups)]
        n_sets = len(ws) // groups
        for M in (1, 16):
            x = torch.randn(groups, M, K, device=dev, dtype=torch.bfloat16)
            cands = fp8_configs(M)[1:4] if sweep else []
            cfgs = [None] + cands
            best = None
            for cfg in cfgs:
                fn = lambda: [fp8_linear(x[gi], *ws[si * groups + gi], config=cfg)
                              for si in range(n_sets) for gi in range(groups)]
                t = timed(fn, reps, graph=True) / n_sets
                r = dict(layer=name, M=M, cfg=repr(cfg or pick_config(M, N, K)), us=t * 1e6,
                         GBps=nbytes / t / 1e9, frac_copy=nbytes / t / 1e9 / copy_gbps)
                if best is None or r["us"] < best["us"]:
                    best = r
            dflt = pick_config(M, N, K)
            if dflt.split_k > 1:   # the old split-K epilogue (memset + atomics + cast) against the default
                acfg = dataclasses.replace(dflt, epilogue="atomic" if dflt.epilogue == "last" else "last")
                fn = lambda: [fp8_linear(x[gi], *ws[si * groups + gi], config=acfg)
                              for si in range(n_sets) for gi in range(groups)]
                best[f"{acfg.epilogue}_epilogue_us"] = timed(fn, reps, graph=True) / n_sets * 1e6
            torch_fn = lambda: [fp8_linear_reference(x[gi], *ws[si * groups + gi])
                                for si in range(min(n_sets, 4)) for gi in range(groups)]
            tt = timed(torch_fn, max(3, reps // 4), graph=False) / min(n_sets, 4)
            best["torch_dequant_matmul_us"] = tt * 1e6
            rows.append(best)
        del ws
    # one prefill-sized GEMM: Triton vs torch (dequantise + bf16 matmul)
    N, K, M = 4096, 8192, 2048
    w, s = random_fp8(N, K, dev, torch.Generator(device=dev).manual_seed(1))
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    tk = timed(lambda: fp8_linear(x, w, s), reps, graph=False)
    tt = timed(lambda: fp8_linear_reference(x, w, s), reps, graph=False)
    res["fp8_gemm_2048x8192x4096"] = dict(triton_TFLOPs=2 * M * N * K / tk / 1e12, torch_TFLOPs=2 * M * N * K / tt / 1e12)
    res["fp8_gemv"] = rows


# (block_m, GemmConfig) candidates of the prefill sweep per T (kernels/BENCHMARKS.md "INT2 prefill grouped
# GEMM v2"): expand 2 = interleave tree + prefetched scales (default), 3 = no prefetch, 0 = run 1's reshape;
# (swap=False with expand 2/3 fails to compile on Triton 3.6: run 2); chunk=32: dequantise 32 experts
# at a time to fp16, then the fp16 grouped GEMM
_G = GemmConfig
PREFILL_GATE_UP = {
    2048: [(64, _G(64, 8, 4, 3)), (64, _G(64, 8, 4, 3, expand=3)),
           (128, _G(64, 8, 8, 3)), (64, _G(128, 8, 8, 3)), (64, _G(64, 16, 4, 3)), (64, _G(64, 8, 4, 4)),
           (64, _G(64, 8, 4, 3, expand=0)), (64, _G(128, 4, 4, 4, False, chunk=32)),
           # 168 registers: 3 CTAs of 4 warps per SM instead of 2 with 3 stages (58 KB shared each; with 4 stages,
           # 78 KB, shared memory keeps it at 2); offline ptxas: ~36 spill stores; untimed
           (64, _G(64, 8, 4, 3, maxnreg=168)), (64, _G(64, 8, 4, 4, maxnreg=168)),
           # 4 words per step: no longer serialised by ptxas since tl.assume (offline, Triton 3.8); 168-184
           # registers without spills, 30-40 KB shared -> 3 CTAs per SM with expand=3 or the cap; untimed
           (64, _G(64, 4, 4, 3, expand=3)), (64, _G(64, 4, 4, 4, expand=3)), (64, _G(64, 4, 4, 3, maxnreg=168))],
    6144: [(256, _G(64, 8, 8, 3)), (128, _G(64, 8, 4, 3)), (256, _G(64, 8, 8, 3, expand=0)),
           (256, _G(64, 8, 8, 3, expand=3)), (128, _G(128, 4, 8, 3, False, chunk=32)),
           (128, _G(64, 4, 4, 3)), (128, _G(64, 4, 4, 3, expand=3))]}   # 4 words: no spills offline (8: ~38); untimed
PREFILL_DOWN = {
    2048: [(64, _G(64, 8, 4, 3)), (64, _G(128, 8, 8, 3)), (128, _G(64, 8, 8, 3)), (64, _G(64, 8, 4, 3, expand=0)),
           (64, _G(64, 8, 4, 3, expand=3)), (64, _G(128, 4, 4, 4, False, chunk=32)),
           (64, _G(64, 8, 4, 3, maxnreg=168)),
           (64, _G(64, 4, 4, 3)), (64, _G(64, 4, 4, 4, expand=3))],                  # 4 CTAs per SM (offline)
    6144: [(256, _G(128, 8, 8, 2)), (256, _G(64, 8, 8, 3)), (128, _G(64, 8, 4, 3)), (256, _G(128, 8, 8, 2, expand=0)),
           (128, _G(128, 4, 8, 3, False, chunk=32))]}


def bench_prefill(res, layers: Int2Layers, dev, reps, sweep, tokens=(2048, 6144)):
    """INT2 prefill (E=256 full-size weights): per-launch config sweep, the kernel vs torch bf16 matmul."""
    k, D, I, E = 6, layers.D, layers.I, layers.E
    w = layers.layer(0)
    w1, w3, w2 = w[0:3], w[3:6], w[6:9]
    out = []
    for T in tokens:
        S = T * k
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
        idx, wt = routing(T, E, k, dev, 11 + T)
        flops_gu, flops_dn = 2 * S * D * 2 * I, 2 * S * I * D
        flops = flops_gu + flops_dn
        x16 = x.to(torch.float16)
        rw = wt.reshape(-1).float()
        row = dict(T=T, k=k, E=E, GFLOP=flops / 1e9)
        gu_rows, dn_rows = [], []
        if sweep:
            for bm, c in PREFILL_GATE_UP.get(T, PREFILL_GATE_UP[2048]):
                sid, bexp = align_pairs(idx, E, bm)
                h = torch.empty((bexp.numel() * bm, I), dtype=torch.float16, device=dev)
                try:
                    t = timed(lambda: launch_gate_up(x16, sid, bexp, k, rw, w1, w3, h, 10.0, bm, c), reps, graph=False)
                except Exception as ex:                                   # out of resources etc.
                    print(f"  gate_up T={T} bm={bm} {c}: FAILED {type(ex).__name__}", flush=True)
                    continue
                gu_rows.append(dict(block_m=bm, cfg=c, ms=t * 1e3, TFLOPs=flops_gu / t / 1e12))
                print(f"  gate_up T={T} bm={bm:3d} {t * 1e3:7.3f} ms {flops_gu / t / 1e12:6.0f} TFLOP/s {c}",
                      flush=True)
            for bm, c in PREFILL_DOWN.get(T, PREFILL_DOWN[2048]):
                sid, bexp = align_pairs(idx, E, bm)
                h = torch.randn((bexp.numel() * bm, I), device=dev).to(torch.float16)
                y = torch.zeros((T, D), device=dev)
                try:
                    t = timed(lambda: launch_down(h, sid, bexp, k, w2, y, bm, 1, c), reps, graph=False)
                except Exception as ex:
                    print(f"  down T={T} bm={bm} {c}: FAILED {type(ex).__name__}", flush=True)
                    continue
                dn_rows.append(dict(block_m=bm, cfg=c, ms=t * 1e3, TFLOPs=flops_dn / t / 1e12))
                print(f"  down    T={T} bm={bm:3d} {t * 1e3:7.3f} ms {flops_dn / t / 1e12:6.0f} TFLOP/s {c}",
                      flush=True)
        cands = [pick_prefill_config(T, k, E)]
        for fused_only in (False, True):
            gs = [r for r in gu_rows if not (fused_only and r["cfg"].chunk)]
            if not gs:
                continue
            g = min(gs, key=lambda r: r["ms"])
            ds = [r for r in dn_rows if g["block_m"] % r["block_m"] == 0 and not (fused_only and r["cfg"].chunk)]
            if ds:
                d = min(ds, key=lambda r: r["ms"])
                c = PrefillConfig(g["block_m"], g["cfg"], d["cfg"], d["block_m"])
                if c not in cands:
                    cands.append(c)
        best = None
        ref = int2_moe_prefill(x, idx, wt, *w, 10.0)                     # default config: the quick reference
        for cfg in cands:
            try:
                y = int2_moe_prefill(x, idx, wt, *w, 10.0, config=cfg)
            except Exception as ex:
                print(f"  prefill T={T} FAILED {type(ex).__name__}: {str(ex)[:300]} {cfg}", flush=True)
                continue
            rel = ((y - ref).norm() / ref.norm()).item()
            t = timed(lambda: int2_moe_prefill(x, idx, wt, *w, 10.0, config=cfg), reps, graph=False)
            r = dict(cfg=repr(cfg), ms=t * 1e3, TFLOPs=flops / t / 1e12, rel_vs_default=rel)
            print(f"  prefill T={T} {t * 1e3:7.3f} ms {flops / t / 1e12:6.0f} TFLOP/s rel vs default {rel:.1e} {cfg}",
                  flush=True)
            if best is None or r["ms"] < best["ms"]:
                best = r
        if T <= 2048:                                                     # fp32 torch reference (slow)
            yr = int2_moe_reference(x, idx, wt, *w, 10.0)
            for cfg in cands:
                try:
                    y = int2_moe_prefill(x, idx, wt, *w, 10.0, config=cfg)
                    row.setdefault("rel_vs_fp32_reference", {})[repr(cfg)] = ((y - yr).norm() / yr.norm()).item()
                except Exception:
                    pass
        xa = torch.randn(S, D, device=dev, dtype=torch.bfloat16)
        b13 = torch.randn(D, 2 * I, device=dev, dtype=torch.bfloat16)
        hb = torch.randn(S, I, device=dev, dtype=torch.bfloat16)
        b2 = torch.randn(I, D, device=dev, dtype=torch.bfloat16)
        tb = timed(lambda: (xa @ b13, hb @ b2), reps, graph=False)
        row.update(v2=best, bf16_matmul_ms=tb * 1e3,
                   bf16_matmul_TFLOPs=flops / tb / 1e12, frac_bf16=flops / best["ms"] * 1e3 / (flops / tb),
                   gate_up_sweep=[dict(r, cfg=repr(r["cfg"])) for r in gu_rows],
                   down_sweep=[dict(r, cfg=repr(r["cfg"])) for r in dn_rows])
        out.append(row)
        del x, x16, xa, b13, hb, b2
    res["prefill"] = out


def bench_mxfp4(res, dev, reps, D, I, E):
    g = torch.Generator(device=dev).manual_seed(5)
    w1, w3, w2 = random_mxfp4(E, I, D, device=dev, generator=g), random_mxfp4(E, I, D, device=dev, generator=g), \
        random_mxfp4(E, D, I, device=dev, generator=g)
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    idx, wt = routing(1, E, 6, dev, 3)
    t = timed(lambda: mxfp4_moe(x, idx, wt, *w1, *w3, *w2, 10.0), reps, graph=False)
    res["mxfp4_moe_T1_us"] = t * 1e6
    res["mxfp4_bytes_per_token_layer"] = 6 * 3 * D * I * (0.5 + 1 / 32)


def print_fp8(res):
    print(f"{'FP8 GEMV':18s} {'M':>3s} {'us':>8s} {'GB/s':>7s} {'%copy':>6s} {'atomic-epi us':>13s} {'torch us':>9s}")
    for r in res["fp8_gemv"]:
        print(f"{r['layer']:18s} {r['M']:3d} {r['us']:8.2f} {r['GBps']:7.0f} {100 * r['frac_copy']:6.1f} "
              f"{r.get('atomic_epilogue_us', float('nan')):13.2f} {r['torch_dequant_matmul_us']:9.1f}")
    print(f"FP8 GEMM 2048x8192x4096 TFLOP/s: {res['fp8_gemm_2048x8192x4096']}")


def print_prefill(res):
    print(f"{'INT2 prefill (E=256, k=6)':26s} {'ms':>7s} {'TF/s':>8s} {'bf16 ms':>8s} {'bf16 TF/s':>9s} {'%bf16':>6s}")
    for r in res["prefill"]:
        print(f"{'T=' + str(r['T']):26s} {r['v2']['ms']:7.2f} {r['v2']['TFLOPs']:8.0f} {r['bf16_matmul_ms']:8.2f} "
              f"{r['bf16_matmul_TFLOPs']:9.0f} {100 * r['frac_bf16']:6.1f}  {r['v2']['cfg']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter ok)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-decode", action="store_true", help="skip the INT2 decode sections")
    ap.add_argument("--quick", action="store_true", help="decode config sweeps only (implies --decode-only)")
    ap.add_argument("--decode-only", action="store_true", help="only copy bandwidth + the INT2 decode sections")
    ap.add_argument("--prefill-only", action="store_true", help="only the INT2 prefill section (T=2048, 6144)")
    ap.add_argument("--fp8-only", action="store_true", help="only copy bandwidth + the FP8 GEMV/GEMM section")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sweep = not args.no_sweep and not args.smoke
    if args.smoke:
        L, E, D, I, E256, L256, reps = 2, 8, 256, 128, 16, 1, 1
    else:
        L, E, D, I, E256, L256, reps = 43, 24, 4096, 2048, 256, 4, args.reps
    res = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M"), shapes=dict(L=L, E_per_layer=E, D=D, I=I))
    import triton
    res["triton"] = triton.__version__
    if args.prefill_only:
        big = Int2Layers(1, E256, D, I, dev, 1)
        bench_prefill(res, big, dev, max(3, reps // 4), sweep, (64, 100) if args.smoke else (2048, 6144))
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print_prefill(res)
        return 0
    res["copy_GBps"] = copy_bandwidth(dev, 2**31 if not args.smoke else 2**20, reps=20) / 1e9
    if args.fp8_only:
        bench_fp8(res, dev, reps, sweep, res["copy_GBps"])
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print_fp8(res)
        return 0
    layers = Int2Layers(L, E, D, I, dev, 0)
    # correctness at these shapes before timing
    lw = layers.layer(0)
    for T, shared in ((1, False), (16, True)):
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
        idx, wt = routing(T, E, 6, dev, 42, shared)
        ref = int2_moe_reference(x, idx, wt, *lw, 10.0)
        y = int2_moe_decode(x, idx, wt, *lw, 10.0)
        res[f"check_decode_T{T}_rel"] = ((y - ref).norm() / ref.norm()).item()
    def save(section):
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"[{time.strftime('%H:%M:%S')}] {section}: " + json.dumps({k: v for k, v in res.items()
              if k.startswith(section)})[:1500], flush=True)

    if not args.skip_decode:
        cfg_ew, cfg_dot = bench_decode(res, layers, dev, reps, sweep, args.quick)
        save("decode")
        if args.quick:
            return 0
        bench_dequant_matmul_decode(res, layers, dev, reps)
        save("decode_dequant")
    del layers
    big = Int2Layers(L256, E256, D, I, dev, 1)
    if not args.skip_decode:
        bench_decode_random256(res, big, dev, reps, cfg_dot, cfg_ew)
        save("decode_random")
    if args.decode_only:
        del big
    else:
        bench_prefill(res, big, dev, max(3, reps // 4), sweep, (64, 100) if args.smoke else (2048, 6144))
        save("prefill")
        del big
    if not args.smoke and not args.decode_only:
        bench_fp8(res, dev, reps, sweep, res["copy_GBps"])
        save("fp8")
    if not args.decode_only:
        bench_mxfp4(res, dev, reps, D, I, E256)
        save("mxfp4")
    # ---- table
    cp = res["copy_GBps"]
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  copy {cp:.0f} GB/s")
    print(f"check rel err: T1 {res['check_decode_T1_rel']:.2e}  T16 {res['check_decode_T16_rel']:.2e}")
    if args.skip_decode:
        res["decode"], res["decode_random256"] = [], []
        res["decode_best_config"], res["decode_dequant_then_matmul_T1_us"] = {}, float("nan")
    print(f"{'INT2 decode case':34s} {'us/layer':>9s} {'GB/s':>7s} {'%copy':>6s} {'experts':>7s} {'rel err':>8s}")
    for r in res["decode"] + [dict(r, case=f"T={r['T']} random/256 {'dot' if r['use_dot'] else 'ew'}, {r['layers']} layers") for r in res["decode_random256"]]:
        print(f"{r['case']:34s} {r['us_per_layer']:9.2f} {r['GBps']:7.0f} {100 * r['GBps'] / cp:6.1f} "
              f"{r['distinct_experts_per_layer']:7.1f} {r.get('rel_err', float('nan')):8.1e}")
    print(f"decode best cfgs: {res['decode_best_config']}")
    print(f"dequant-then-matmul T=1: {res['decode_dequant_then_matmul_T1_us']:.1f} us/layer")
    if "fp8_gemv" in res:
        print_fp8(res)
    if args.decode_only:
        return 0
    print_prefill(res)
    print(f"MXFP4 MoE T=1 (dequant+bf16): {res['mxfp4_moe_T1_us']:.0f} us/layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
