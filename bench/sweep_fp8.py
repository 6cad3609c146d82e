"""FP8 block-scaled GEMV config sweep at the decode step's shapes (GPU script): prints a table, writes JSON.

    python3 bench/sweep_fp8.py --out fp8_sweep.json            # H200: ~2 min (about 100 compiles)
    python3 bench/sweep_fp8.py --smoke --out /tmp/s.json       # tiny shapes, CPU interpreter

For every projection the fused decode step reads through ``fp8_linear`` (stacked groups included) and the
row counts it uses at batch 1 and 8, every candidate tile / split-K / warps / stages (split-K with the
one-launch "last" epilogue) is timed over weight copies rotated through > 256 MB (CUDA-graph replay, so
L2 cannot hold them), next to the current default (``pick_config``) and the device copy bandwidth.
The winners are what ``kernels/fp8_linear.py`` ``TUNED`` holds (kernels/BENCHMARKS.md, "FP8 sweep").
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_kernels import timed  # noqa: E402
from dsv4lib.fullscale import copy_bandwidth  # noqa: E402
from dsv4lib.kernels.fp8_linear import FP8Config, fp8_linear, fp8_linear_reference, pick_config, random_fp8  # noqa: E402

# (name, N, K, row counts at batch 1 and 8) -- V4-Flash, the fused step's calls (dsv4lib/model/graphed.py)
SHAPES = [("wq_a|wkv", 1536, 4096, (1, 8)), ("wq_b", 32768, 1024, (1, 8)), ("wo_a (8 groups)", 8192, 4096, (8, 64)),
          ("wo_b", 4096, 8192, (1, 8)), ("shared w1|w3", 4096, 4096, (1, 8)), ("shared w2", 4096, 2048, (1, 8)),
          ("indexer wq_b", 8192, 1024, (1, 8))]
SMOKE_SHAPES = [("a", 192, 256, (1, 8)), ("b", 256, 384, (1, 20))]


def candidates(m: int, kb: int) -> list[FP8Config]:
    """Tile / split / warps / stages grid for m activation rows and kb 128-wide K blocks."""
    if m <= 16:
        tiles = [(16, 32, 4), (16, 64, 4), (16, 128, 4), (16, 128, 8), (16, 256, 8)]
        stages = (3, 5)
        splits = (1, 2, 4, 8, 16)
    else:
        tiles = [(64, 64, 4), (64, 128, 4), (128, 128, 8)]
        stages = (3, 4)
        splits = (1, 2, 4)
    out = []
    for (bm, bn, w), st, sp in itertools.product(tiles, stages, splits):
        if sp > 1 and kb < 2 * sp:
            continue
        out.append(FP8Config(bm, bn, sp, w, st, epilogue="last" if sp > 1 else "atomic"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    res = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M"))
    import triton
    res["triton"] = triton.__version__
    cp = res["copy_GBps"] = copy_bandwidth(dev, 2**31 if not args.smoke else 2**20, reps=20) / 1e9
    rows = []
    for name, N, K, ms in shapes:
        nbytes = N * K
        copies = 1 if args.smoke else max(2, min(64, -(-256 * 2**20 // nbytes)))
        g = torch.Generator(device=dev).manual_seed(N + K)
        ws = [random_fp8(N, K, dev, g) for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
            ref = fp8_linear_reference(x, *ws[0]).float()
            dflt = pick_config(m, N, K)
            cands = [dflt] + [c for c in candidates(m, triton.cdiv(K, 128)) if c != dflt]
            if args.smoke:
                cands = cands[:3] + [c for c in cands if c.epilogue == "last"][:1]
            timings = []
            for cfg in cands:
                y = fp8_linear(x, *ws[0], config=cfg).float()
                err = ((y - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    raise AssertionError(f"{name} M={m} {cfg}: rel err {err:.2e}")
                fn = lambda cfg=cfg: [fp8_linear(x, w, s, config=cfg) for w, s in ws]
                t = timed(fn, args.reps, graph=True) / copies
                timings.append(dict(cfg=repr(cfg), us=t * 1e6, GBps=nbytes / t / 1e9, frac_copy=nbytes / t / 1e9 / cp))
            best = min(timings, key=lambda r: r["us"])
            rows.append(dict(layer=name, N=N, K=K, M=m, default=timings[0], best=best, sweep=timings))
            print(f"[{time.strftime('%H:%M:%S')}] {name} M={m}: default {timings[0]['us']:.2f} us, "
                  f"best {best['us']:.2f} us {best['cfg']}", flush=True)
        del ws
        with open(args.out, "w") as f:
            json.dump(dict(res, rows=rows), f, indent=1)
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  copy {cp:.0f} GB/s")
    print(f"{'FP8 GEMV':18s} {'N':>6s} {'K':>5s} {'M':>3s} {'dflt us':>8s} {'%copy':>6s} {'best us':>8s} {'%copy':>6s}  best config")
    for r in rows:
        d, b = r["default"], r["best"]
        print(f"{r['layer']:18s} {r['N']:6d} {r['K']:5d} {r['M']:3d} {d['us']:8.2f} {100 * d['frac_copy']:6.1f} "
              f"{b['us']:8.2f} {100 * b['frac_copy']:6.1f}  {b['cfg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
