"""Per-call GPU time of the small decode-step launches at V4-Flash shapes, batch 1 and 8, and their launch knobs:

* ``mhc``: the mHC decode launch (``kernels/mhc_step.py`` ``hc_post_pre_fused``: the previous sublayer's post, the
  mixing GEMV, Sinkhorn and the next sublayer's normed input; hc 4, D 4096, 20 Sinkhorn iterations) by (K slices,
  K step, warps) -- ``pre_launch``; ``iters=1`` is not a valid V4 setting, it is timed to show what the 20 Sinkhorn
  iterations cost; ``--defer``: the launch as the fused step runs it (``defer_comb``: the Sinkhorn left to ``hc_comb``),
  to re-sweep the knobs without the finishing program's Sinkhorn;
* ``router``: the fused router (``kernels/moe_step.py`` ``router_fused``: logits GEMV + top-6 of 256, bf16 weights)
  by tokens per program (``ROUTER_TOKENS``), the routing checked against the default setting.

CUDA-graph replays of one call per layer over 43 layers' distinct weights (the mHC fn is 1.5 MB fp32 per layer, 65 MB
in all: more than L2), median of ``--reps`` replays. Prints tables, writes JSON. (Session 8's results came from the
two scripts this one merges, ``bench_mhc_step.py`` and ``bench_router.py``: same code.)

    python3 bench/bench_decode_launches.py --out $OUT/decode_launches.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dsv4lib.kernels import mhc_step as M  # noqa: E402
from dsv4lib.kernels import moe_step as MS  # noqa: E402
from timing import graph_us  # noqa: E402


def bench_mhc(a) -> dict:
    dev, hc, D, L = "cuda", 4, 4096, a.layers
    NM, K = (2 + hc) * hc, hc * D
    g = torch.Generator(device=dev).manual_seed(0)
    fns = [torch.randn(NM, K, device=dev, generator=g) * 0.01 for _ in range(L)]
    scale = torch.rand(3, device=dev, generator=g) + 0.5
    base = torch.randn(NM, device=dev, generator=g) * 0.1
    nw = torch.rand(D, device=dev, generator=g) + 0.5
    saved = (M.PRE_ONE, M.PRE_MANY)
    res = {"defaults": {"one": saved[0], "many": saved[1]}, "rows": []}
    for B in a.batch:
        X = torch.randn(B, hc, D, device=dev, generator=g).to(torch.bfloat16)
        f = torch.randn(B, D, device=dev, generator=g).to(torch.bfloat16)
        f2 = torch.randn(B, D, device=dev, generator=g).to(torch.bfloat16)
        pin = torch.rand(B, hc, device=dev, generator=g)
        cin = torch.rand(B, hc, hc, device=dev, generator=g) / hc

        def call(i, iters=20):   # --defer: as the fused step calls it since session 11 (the Sinkhorn in hc_comb)
            return M.hc_post_pre_fused(f, X, pin, cin, f2, fns[i % L], scale, base, iters, 1e-6, 1e-6, nw, 1e-6,
                                       defer_comb=a.defer)
        ref = [t.float() for t in call(0)]
        defaults = M.pre_launch(B)
        knobs = [defaults] + [c for c in itertools.product((128, 64, 32, 16), (128, 512), (4, 8)) if c != defaults]
        for ns, bk, w in knobs:
            M.PRE_ONE = M.PRE_MANY = (ns, bk, w)
            try:
                diff = max((t.float() - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
                           for t, r in zip(call(0), ref))
                us = graph_us(call, L, a.reps)
                us1 = graph_us(lambda i: call(i, iters=1), L, a.reps) if (ns, bk, w) == defaults else float("nan")
            except Exception as e:  # noqa: BLE001 -- a knob setting that fails is reported
                print(f"  B{B} nsplit {ns} bk {bk} warps {w}: {type(e).__name__}: {str(e)[:160]}")
                continue
            row = {"B": B, "nsplit": ns, "bk": bk, "warps": w, "us": us, "us_iters1": us1, "rel_diff_vs_default": diff}
            res["rows"].append(row)
            print(f"B{B} nsplit {ns:3d} bk {bk:3d} warps {w}: {us:6.2f} us/call"
                  + (f"  (1 Sinkhorn iteration: {us1:6.2f})" if us1 == us1 else "") + f"  rel diff {diff:.1e}", flush=True)
        M.PRE_ONE, M.PRE_MANY = saved
    print("\n   B  nsplit  bk  warps   us/call")
    for r in sorted(res["rows"], key=lambda r: (r["B"], r["us"])):
        print(f"  {r['B']:2d}  {r['nsplit']:6d} {r['bk']:3d}  {r['warps']:5d}  {r['us']:8.2f}")
    return res


def bench_router(a) -> dict:
    dev, E, D, L, k = "cuda", 256, 4096, a.layers, 6
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [(torch.randn(E, D, device=dev, generator=g) * 0.02).to(torch.bfloat16) for _ in range(L)]
    bias = torch.randn(E, device=dev, generator=g) * 0.01
    saved, saved_rows = MS.ROUTER_TOKENS, MS.ROUTER_ROWS
    res = {"default": saved, "default_rows": saved_rows, "rows": []}
    for B in a.batch:
        x = torch.randn(B, D, device=dev, generator=g).to(torch.bfloat16)
        ref = MS.router_fused(x, ws[0], bias, k, 2.5, True)
        for tb, be in itertools.product(sorted({saved, 8, 4, 2, 1}, reverse=True), sorted({saved_rows, 1, 2, 4})):
            if tb > B and tb != saved:
                continue
            MS.ROUTER_TOKENS, MS.ROUTER_ROWS = tb, be
            got = MS.router_fused(x, ws[0], bias, k, 2.5, True)
            same = bool(torch.equal(got[0], ref[0])) and (got[1] - ref[1]).abs().max().item() <= 1e-6
            us = graph_us(lambda i: MS.router_fused(x, ws[i % L], bias, k, 2.5, True), L, a.reps)
            res["rows"].append({"B": B, "tokens_per_program": tb, "rows_per_program": be, "us": us,
                                "same_routing": same})
            print(f"B{B} tokens per program {tb:2d} rows {be}: {us:6.2f} us/call  same routing {same}", flush=True)
        MS.ROUTER_TOKENS, MS.ROUTER_ROWS = saved, saved_rows
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", nargs="+", choices=("mhc", "router"), default=["mhc", "router"])
    ap.add_argument("--layers", type=int, default=43)
    ap.add_argument("--defer", action="store_true", help="mhc: the deferred launch (mixing logits out, no Sinkhorn)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=Path("decode_launches.json"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_launches: needs a CUDA GPU")
        return 1
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "layers": a.layers}
    for what in a.what:
        res[what] = (bench_mhc if what == "mhc" else bench_router)(a)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
