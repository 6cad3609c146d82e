"""FP8 block-scaled GEMV config sweep at the decode step's shapes (GPU script): prints a table, writes JSON.

    python3 bench/sweep_fp8.py --out fp8_sweep.json            # H200: ~2 min (about 100 compiles)
    python3 bench/sweep_fp8.py --smoke --out /tmp/s.json       # tiny shapes, CPU interpreter
    python3 bench/sweep_fp8.py --chain --out fp8_chain.json    # H200: the dependent pairs of the step, ~1 min

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

import triton  # noqa: E402

from bench.bench_kernels import timed  # noqa: E402
from dsv4lib.fullscale import copy_bandwidth  # noqa: E402
from dsv4lib.kernels.fp8_gemv import GemvConfig  # noqa: E402
from dsv4lib.kernels.fp8_linear import FP8Config, fp8_linear, fp8_linear_reference, pick_config, random_fp8  # noqa: E402

# (name, N, K, token counts at batch 1 and 8, groups) -- V4-Flash, the fused step's calls (dsv4lib/model/graphed.py);
# wo_a is one grouped call (x [tokens, 8, K], kernels.fp8_linear groups=8)
SHAPES = [("wq_a|wkv", 1536, 4096, (1, 8), 1), ("wq_b", 32768, 1024, (1, 8), 1), ("wo_a (8 groups)", 8192, 4096, (1, 8), 8),
          ("wo_b", 4096, 8192, (1, 8), 1), ("shared w1|w3", 4096, 4096, (1, 8), 1), ("shared w2", 4096, 2048, (1, 8), 1),
          ("indexer wq_b", 8192, 1024, (1, 8), 1)]
SMOKE_SHAPES = [("a", 192, 256, (1, 8), 1), ("b", 256, 384, (1, 20), 2)]
# --chain: the dependent GEMV pairs on the b1 critical path (kernels/BENCHMARKS.md "Ninth session": in the step wo_b
# took 18.1 us after wo_a against 14.1 alone). (name, first (N, K, groups), second (N, K), second's input = the
# first's output columns [0, K2)); the second GEMV's candidates are timed inside the pair.
CHAINS = [("wo_a -> wo_b", (8192, 4096, 8), (4096, 8192)), ("wq_a|wkv -> wq_b", (1536, 4096, 1), (32768, 1024))]
SMOKE_CHAINS = [("a -> b", (256, 128, 2), (192, 256)), ("c -> d", (384, 256, 1), (256, 128))]


def checked_candidates(m: int, n: int, k: int, smoke: bool, keep: int, run, ref: torch.Tensor,
                       label: str, gemv_only: bool = False) -> list[FP8Config | GemvConfig]:
    """The default config first, then the grid (in smoke runs the first ``keep``, one split-K "last" and one
    CUDA-core GEMV); each config's output ``run(cfg)`` must match ``ref`` (relative error < 1e-2)."""
    dflt = pick_config(m, n, k)
    cands = [dflt] + [c for c in candidates(m, triton.cdiv(k, 128)) if c != dflt
                      and (isinstance(c, GemvConfig) or not gemv_only)]
    if smoke:
        cands = (cands[:keep] + [c for c in cands if getattr(c, "epilogue", None) == "last"][:1]
                 + [c for c in cands[keep:] if isinstance(c, GemvConfig)][:1])
    for cfg in cands:
        err = ((run(cfg).float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise AssertionError(f"{label} {cfg}: rel err {err:.2e}")
    return cands


def chain_rows(chains, tokens, dev, reps: int, smoke: bool, cp: float) -> list[dict]:
    """For each pair and token count: the pair (first GEMV at its default, second at each candidate) over weight
    copies rotated through > 256 MB, CUDA-graph replay with the step's PDL launches, against the second alone."""
    rows = []
    for name, (n1, k1, g1), (n2, k2) in chains:
        nbytes = n1 * k1 + n2 * k2
        copies = 1 if smoke else max(2, min(32, -(-256 * 2**20 // nbytes)))
        g = torch.Generator(device=dev).manual_seed(n1 + n2)
        w1 = [random_fp8(n1, k1, dev, g) for _ in range(copies)]
        w2 = [random_fp8(n2, k2, dev, g) for _ in range(copies)]
        for t in tokens:
            x = torch.randn(t, *((g1,) if g1 > 1 else ()), k1, device=dev, dtype=torch.bfloat16)
            u = fp8_linear(x, *w1[0], groups=g1)[..., :k2].contiguous()
            ref = fp8_linear_reference(u, *w2[0]).float()
            cands = checked_candidates(t, n2, k2, smoke, 2, lambda cfg: fp8_linear(u, *w2[0], config=cfg), ref,
                                       f"{name} T={t}")
            out = []
            for cfg in cands:
                def pair(cfg=cfg):
                    for (a, sa), (b, sb) in zip(w1, w2):
                        h = fp8_linear(x, a, sa, groups=g1)
                        fp8_linear(h[..., :k2], b, sb, config=cfg)
                alone = lambda cfg=cfg: [fp8_linear(u, b, sb, config=cfg) for b, sb in w2]
                tp = timed(pair, reps, graph=True) / copies
                ta = timed(alone, reps, graph=True) / copies
                out.append(dict(cfg=repr(cfg), pair_us=tp * 1e6, second_alone_us=ta * 1e6,
                                pair_frac_copy=nbytes / tp / 1e9 / cp))
            best = min(out, key=lambda r: r["pair_us"])
            rows.append(dict(chain=name, tokens=t, default=out[0], best=best, sweep=out))
            print(f"[{time.strftime('%H:%M:%S')}] {name} T={t}: default pair {out[0]['pair_us']:.2f} us "
                  f"(second alone {out[0]['second_alone_us']:.2f}), best pair {best['pair_us']:.2f} {best['cfg']}",
                  flush=True)
        del w1, w2
    return rows


# --bf16: the fused step's stacked bf16 projections at batch 1 (dsv4lib/model/graphed.py attention_step): CSA layers
# compressor wkv|wgate (2 x 1024) + indexer compressor (2 x 256) + weights_proj (64); HCA layers 2 x 512
BF16_SHAPES = [("CSA compressors + indexer", 2624, 4096), ("HCA compressors", 1024, 4096)]
SMOKE_BF16 = [("a", 96, 256)]


def bf16_rows(shapes, dev, reps: int, smoke: bool, cp: float) -> list[dict]:
    """The bf16 GEMV's default and candidate configs (checked against F.linear) next to torch's F.linear, over
    weight copies rotated through > 256 MB, CUDA-graph replay."""
    from dsv4lib.kernels.fp8_gemv import BF16_DEFAULT, TUNED_BF16, bf16_gemv
    rows = []
    for name, N, K in shapes:
        nbytes = 2 * N * K
        copies = 1 if smoke else max(2, min(64, -(-256 * 2**20 // nbytes)))
        g = torch.Generator(device=dev).manual_seed(N + K)
        ws = [torch.randn(N, K, device=dev, generator=g).to(torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, 1, K, device=dev, dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), ws[0].float())
        dflt = TUNED_BF16.get((N, K), BF16_DEFAULT)
        cands = [dflt] + [c for c in candidates(1, triton.cdiv(K, 128)) if isinstance(c, GemvConfig) and c != dflt
                          and c.rows * 16 * c.unroll >= 32 * c.warps and c.stages == 1]
        if smoke:
            cands = cands[:2]
        out = []
        for cfg in cands:
            err = ((bf16_gemv(x, ws[0], cfg).float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                raise AssertionError(f"bf16 {name} {cfg}: rel err {err:.2e}")
            t = timed(lambda cfg=cfg: [bf16_gemv(x, w, cfg) for w in ws], reps, graph=True) / copies
            out.append(dict(cfg=repr(cfg), us=t * 1e6, frac_copy=nbytes / t / 1e9 / cp))
        tt = timed(lambda: [torch.nn.functional.linear(x, w) for w in ws], reps, graph=True) / copies
        best = min(out, key=lambda r: r["us"])
        rows.append(dict(layer=name, N=N, K=K, torch_us=tt * 1e6, default=out[0], best=best, sweep=out))
        print(f"[{time.strftime('%H:%M:%S')}] bf16 {name}: torch {tt * 1e6:.2f} us, default {out[0]['us']:.2f}, "
              f"best {best['us']:.2f} {best['cfg']}", flush=True)
    return rows


def candidates(m: int, kb: int) -> list[FP8Config | GemvConfig]:
    """Tile / split / warps / stages grid for m activation rows and kb 128-wide K blocks; for m <= 2 also the
    CUDA-core GEMV's rows / unroll / warps (kernels/fp8_gemv.py)."""
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
    if m <= 2:   # every thread owns distinct 16-byte pieces (rows * 8 * unroll >= threads); unmasked K steps only
        out += [GemvConfig(r, u, w, st) for r, u, w, st in itertools.product((1, 2, 4, 8), (2, 4, 8, 16), (1, 2, 4), (1, 2))
                if kb % u == 0 and r * 8 * u >= 32 * w and (st == 1 or r <= 4)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--chain", action="store_true",
                    help="time the dependent pairs (wo_a -> wo_b, wq_a|wkv -> wq_b) with the second GEMV's candidates")
    ap.add_argument("--gemv-only", action="store_true", help="time only the default and the CUDA-core GEMV configs")
    ap.add_argument("--bf16", action="store_true",
                    help="the CUDA-core GEMV on the step's stacked bf16 projections (compressors + indexer) instead")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts to sweep (default: 1 and 8)")
    args = ap.parse_args(argv)
    only = None if args.tokens is None else {int(t) for t in args.tokens.split(",")}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    res = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M"))
    res["triton"] = triton.__version__
    cp = res["copy_GBps"] = copy_bandwidth(dev, 2**31 if not args.smoke else 2**20, reps=20) / 1e9
    if args.bf16:
        rows = bf16_rows(SMOKE_BF16 if args.smoke else BF16_SHAPES, dev, args.reps, args.smoke, cp)
        _report(args.out, res, "bf16", rows,
                f"{'bf16 GEMV':26s} {'N':>5s} {'K':>5s} {'torch us':>8s} {'dflt us':>8s} {'best us':>8s} {'%copy':>6s}  best config",
                lambda r, d, b: f"{r['layer']:26s} {r['N']:5d} {r['K']:5d} {r['torch_us']:8.2f} {d['us']:8.2f} "
                                f"{b['us']:8.2f} {100 * b['frac_copy']:6.1f}  {b['cfg']}")
        return 0
    if args.chain:
        rows = chain_rows(SMOKE_CHAINS if args.smoke else CHAINS, tuple(sorted(only or (1, 8))), dev, args.reps,
                          args.smoke, cp)
        _report(args.out, res, "chains", rows,
                f"{'FP8 pair':18s} {'T':>2s} {'dflt pair us':>12s} {'2nd alone':>9s} {'best pair us':>12s} {'%copy':>6s}  best config",
                lambda r, d, b: f"{r['chain']:18s} {r['tokens']:2d} {d['pair_us']:12.2f} {d['second_alone_us']:9.2f} "
                                f"{b['pair_us']:12.2f} {100 * b['pair_frac_copy']:6.1f}  {b['cfg']}")
        return 0
    rows = []
    for name, N, K, ms, G in shapes:
        nbytes = N * K
        copies = 1 if args.smoke else max(2, min(64, -(-256 * 2**20 // nbytes)))
        g = torch.Generator(device=dev).manual_seed(N + K)
        ws = [random_fp8(N, K, dev, g) for _ in range(copies)]
        for m in (m for m in ms if only is None or m in only):
            x = torch.randn(m, *((G,) if G > 1 else ()), K, device=dev, dtype=torch.bfloat16)
            ref = fp8_linear_reference(x, *ws[0], groups=G).float()
            cands = checked_candidates(m, N, K, args.smoke, 3, lambda cfg: fp8_linear(x, *ws[0], config=cfg, groups=G),
                                       ref, f"{name} M={m}", gemv_only=args.gemv_only)
            timings = []
            for cfg in cands:
                fn = lambda cfg=cfg: [fp8_linear(x, w, s, config=cfg, groups=G) for w, s in ws]
                t = timed(fn, args.reps, graph=True) / copies
                timings.append(dict(cfg=repr(cfg), us=t * 1e6, GBps=nbytes / t / 1e9, frac_copy=nbytes / t / 1e9 / cp))
            best = min(timings, key=lambda r: r["us"])
            rows.append(dict(layer=name, N=N, K=K, M=m, default=timings[0], best=best, sweep=timings))
            print(f"[{time.strftime('%H:%M:%S')}] {name} M={m}: default {timings[0]['us']:.2f} us, "
                  f"best {best['us']:.2f} us {best['cfg']}", flush=True)
        del ws
        with open(args.out, "w") as f:                                   # after every shape: a cut run keeps them
            json.dump(dict(res, rows=rows), f, indent=1)
    _report(args.out, res, "rows", rows,
            f"{'FP8 GEMV':18s} {'N':>6s} {'K':>5s} {'M':>3s} {'dflt us':>8s} {'%copy':>6s} {'best us':>8s} {'%copy':>6s}  best config",
            lambda r, d, b: f"{r['layer']:18s} {r['N']:6d} {r['K']:5d} {r['M']:3d} {d['us']:8.2f} {100 * d['frac_copy']:6.1f} "
                            f"{b['us']:8.2f} {100 * b['frac_copy']:6.1f}  {b['cfg']}")
    return 0


def _report(path: str, res: dict, key: str, rows: list[dict], header: str, line) -> None:
    """Write ``res`` with ``rows`` under ``key`` as JSON and print the device line and the table (``line(row,
    default, best)`` formats one row)."""
    with open(path, "w") as f:
        json.dump(dict(res, **{key: rows}), f, indent=1)
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  copy {res['copy_GBps']:.0f} GB/s")
    print(header)
    for r in rows:
        print(line(r, r["default"], r["best"]))


if __name__ == "__main__":
    sys.exit(main())
